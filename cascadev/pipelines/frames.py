"""Pixel-space helpers of the pipelines, on videos (B, C, T, H, W): sizes on the cascade's f32 grid, resizing, the
pieces a clip is read and encoded in, and StableSR's colour fix."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

SEMANTIC_DOWNSAMPLE = 32        # Stage B latent: f32, so frame sizes are multiples of 32
SEMANTIC_CHANNELS = 16          # Stage B latent channels (the semantic encoder's 1x1 conv to 16, as Stable Cascade)


def round_size(height: int, width: int, long_side: int | None = None,
               multiple: int = SEMANTIC_DOWNSAMPLE) -> tuple[int, int]:
    """(H, W) scaled so the long side is ``long_side`` (aspect kept), each rounded to a multiple."""
    scale = 1.0 if long_side is None else long_side / max(height, width)
    return tuple(max(multiple, round(n * scale / multiple) * multiple) for n in (height, width))


def resize_video(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 3, T, H, W) -> (B, 3, T, *size), bilinear with antialiasing."""
    if tuple(video.shape[-2:]) == tuple(size):
        return video
    T = video.shape[2]
    frames = F.interpolate(rearrange(video, "b c t h w -> (b t) c h w"), size=size, mode="bilinear",
                           align_corners=False, antialias=True)
    return rearrange(frames, "(b t) c h w -> b c t h w", t=T)


PIECE_PIXELS = 4 * 1024 * 576      # input pixels read, resized and encoded at a time (4 frames at 1024 x 576, one at
                                   # 2K): neither long clips nor large frames sit whole, nor the encoder's activations


def frames_per_piece(*sizes: tuple[int, int]) -> int:
    """Frames per piece read and encoded when frames are read at, or resized to, these (H, W) sizes: at least one."""
    return max(1, PIECE_PIXELS // max(h * w for h, w in sizes))


def check_colour_fix(height: int, width: int, factor: int | None) -> None:
    """The colour fix's blocks of ``factor`` x ``factor`` pixels must tile frames of ``height`` x ``width``."""
    if factor and (factor < 1 or height % factor or width % factor):
        divisors = [n for n in (32, 16, 8, 4, 2) if height % n == 0 and width % n == 0]
        raise ValueError(f"colour fix {factor}: {width}x{height} frames are not divisible by {factor}; use a divisor "
                         f"of both (e.g. {divisors[0] if divisors else 1}) or 0 to turn it off")


def low_band(video: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, 3, T, H, W) -> the same size, holding only the band of ``factor`` x ``factor`` pixel blocks:
    antialiased bilinear down by ``factor``, bilinear back up."""
    H, W = video.shape[-2:]
    check_colour_fix(H, W, factor)
    return resize_video(resize_video(video, (H // factor, W // factor)), (H, W))


def fix_colour(video: torch.Tensor, reference: torch.Tensor, factor: int) -> torch.Tensor:
    """``video``'s detail above the ``factor`` band on ``reference``'s band below it, both (B, 3, T, H, W).

    StableSR's wavelet colour fix (Wang et al. 2023), with the Previewer's decoding of the same
    semantic latents as the low-resolution reference: a diffusion decoder's samples drift in colour and
    brightness over whole regions, the regression-trained Previewer does not."""
    out = video - low_band(video, factor)
    out += low_band(reference, factor)                    # in place: one temporary of the video's size at a time
    return out.clamp_(-1, 1)


def infer_size(height: int, width: int, size: str | None, multiple: int = SEMANTIC_DOWNSAMPLE) -> tuple[int, int]:
    """Parse ``--size``: None (keep), "N" (long side N, aspect kept) or "WxH"; rounded to ``multiple``."""
    if size is None:
        return round_size(height, width, None, multiple)
    try:
        numbers = [int(v) for v in size.lower().split("x")]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or min(numbers) < 1:
        raise ValueError(f"--size {size!r}: give a long side (2048) or WxH (2048x1152) in pixels")
    if len(numbers) == 2:
        return round_size(numbers[1], numbers[0], None, multiple)
    return round_size(height, width, numbers[0], multiple)
