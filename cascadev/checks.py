"""Checks of the tensors every entry point takes: videos and latents (B, C, T, H, W), in one place for all packages."""

from __future__ import annotations

import torch

PIXEL_LIMIT = 1.5    # videos are in [-1, 1]; values past this are another convention ([0, 1] cannot be told apart)


def check_video(video: torch.Tensor, channels: int, multiple: int, who: str, pixels: bool = False) -> None:
    """Fail loudly on a tensor that is not (B, channels, T, H, W), finite, with H and W multiples of ``multiple``;
    ``pixels``: also on values far outside [-1, 1] (frames of [0, 255], say)."""
    if not isinstance(video, torch.Tensor) or video.ndim != 5:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"{who}: expected a (B, {channels}, T, H, W) tensor, got {shape}")
    if video.shape[1] != channels:
        hint = " (is T before C? expected B C T H W)" if video.shape[2] == channels else ""
        raise ValueError(f"{who}: expected {channels} channels in (B, C, T, H, W), "
                         f"got shape {tuple(video.shape)}{hint}")
    if not video.is_floating_point():
        raise ValueError(f"{who}: expected a float tensor, got {video.dtype}")
    if video.shape[0] == 0 or video.shape[2] == 0:
        raise ValueError(f"{who}: empty input of shape {tuple(video.shape)} (no videos or no frames)")
    for name, size in (("H", video.shape[3]), ("W", video.shape[4])):
        if size % multiple or size == 0:
            low, high = size // multiple * multiple, (size // multiple + 1) * multiple
            works = f"{low} or {high}" if low else f"{high}"
            raise ValueError(f"{who}: {name}={size} is not a positive multiple of {multiple}; sizes that work: {works}")
    least, most = video.aminmax()        # one pass: NaN and inf show in the extremes
    if not (torch.isfinite(least) and torch.isfinite(most)):
        raise ValueError(f"{who}: input contains NaN or inf values")
    if pixels and max(-least, most) > PIXEL_LIMIT:
        raise ValueError(f"{who}: pixel values span [{least:.4g}, {most:.4g}]; videos are in [-1, 1] "
                         f"(from uint8 frames: x / 127.5 - 1)")
