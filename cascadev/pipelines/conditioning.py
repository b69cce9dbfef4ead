"""The condition the Stage B DiT reads beside the noisy latent, for training, caching and inference alike.

Two routes (CascadeV, Fig. 4):

- ``semantic`` (Fig. 4a, the release): the semantic latent (B, 16, T, H/32, W/32) of the video, times the
  Stage A scale (0.13025, owned by ``vae.stage_a``), upsampled x4 to the Stage A latent grid.
- ``resize`` (Fig. 4b): a low-resolution and/or low-frame-rate Stage A latent, upsampled back to the
  full grid; the DiT then learns 4x resolution or 4x frame rate (``VideoDiT(cond_channels=4)``). The
  low-resolution latent is either the Stage A latent of the downsampled video (``condition.resize_from: pixels``,
  as the release trained, and what another model's latents of a small video are) or the full latent downsampled
  (cheap, and possible from a latent cache).

Each route has two halves: ``*_small`` makes the compact condition (what a latent cache stores),
``upsample_condition`` brings it to the latent grid (B, C, T, h, w). All tensors are (B, C, T, H, W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def _spatial_resize(x: torch.Tensor, size: tuple[int, int], antialias: bool = False) -> torch.Tensor:
    """Bilinear resize (align_corners False) of every frame of (B, C, T, H, W) to ``size``."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    T = x.shape[2]
    y = F.interpolate(rearrange(x, "b c t h w -> (b t) c h w"), size=tuple(size), mode="bilinear",
                      align_corners=False, antialias=antialias and size[0] < x.shape[-2])
    return rearrange(y, "(b t) c h w -> b c t h w", t=T)


def temporal_upsample(x: torch.Tensor, factor: int, frames: int) -> torch.Tensor:
    """(B, C, T', h, w) of frames 0, k, 2k, ... -> (B, C, frames, h, w), linear in time between them.

    Low-rate frame i sits at time i * k (it *is* full-rate frame i * k); frames after the last one hold it.
    """
    if factor == 1 and x.shape[2] == frames:
        return x
    pos = torch.arange(frames, dtype=torch.float32, device=x.device) / factor
    i0 = pos.floor().long().clamp(max=x.shape[2] - 1)
    i1 = (i0 + 1).clamp(max=x.shape[2] - 1)
    w = (pos - i0).clamp(0, 1).to(x.dtype).view(1, 1, -1, 1, 1)
    return x[:, :, i0] * (1 - w) + x[:, :, i1] * w


def upsample_condition(small: torch.Tensor, grid: tuple[int, int, int], temporal_factor: int = 1) -> torch.Tensor:
    """Compact condition (B, C, T', h', w') -> (B, C, T, h, w) on the Stage A latent ``grid`` = (T, h, w).

    Spatial: bilinear, align_corners False (the release: x4 for f32 semantic latents). Temporal (resize
    route only): linear between the kept frames (``temporal_upsample``).
    """
    T, h, w = grid
    return _spatial_resize(temporal_upsample(small, temporal_factor, T), (h, w))


def semantic_small(semantic_latent: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """Semantic route: the raw encoder output (B, 16, T, H/32, W/32) times the Stage A scale."""
    return semantic_latent * scale_factor


def resize_small_from_latent(latent: torch.Tensor, spatial_factor: int, temporal_factor: int) -> torch.Tensor:
    """Resize route from a (scaled) Stage A latent: keep every ``temporal_factor``-th frame and shrink the
    frame by ``spatial_factor`` (bilinear, antialiased)."""
    latent = latent[:, :, ::temporal_factor]
    h, w = latent.shape[-2:]
    if h % spatial_factor or w % spatial_factor:
        raise ValueError(f"latent {h}x{w} is not divisible by the resize route's spatial_factor {spatial_factor}")
    return _spatial_resize(latent, (h // spatial_factor, w // spatial_factor), antialias=True)


def downsample_video(video: torch.Tensor, spatial_factor: int, temporal_factor: int) -> torch.Tensor:
    """Resize route from pixels: the low-rate, low-resolution video (B, 3, T/kt, H/ks, W/ks) whose Stage A
    latent is the condition (bilinear, antialiased, in [-1, 1])."""
    video = video[:, :, ::temporal_factor]
    H, W = video.shape[-2:]
    if H % spatial_factor or W % spatial_factor:
        raise ValueError(f"frames {H}x{W} are not divisible by the resize route's spatial_factor {spatial_factor}")
    return _spatial_resize(video, (H // spatial_factor, W // spatial_factor), antialias=True).clamp(-1, 1)
