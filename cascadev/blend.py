"""Blend weights of overlapping windows: the one ramp the DiT's windows and tiles (``cascadev.pipelines.sampling``) and
Stage A's tiles and chunks (``vae.stage_a``) are blended with. Each window's output is weighted by its ramp along each
axis and the sum divided by the summed weights."""

from __future__ import annotations

import torch


def ramp(size: int, before: int = 0, after: int = 0, margin: int = 0,
         device: torch.device | str | None = None) -> torch.Tensor:
    """Weights (size,) of a window sharing ``before`` units with the previous window and ``after`` with the next: 1
    inside, and across each shared span of n units a linear ramp 1/(n+1), 2/(n+1), ..., n/(n+1) rising from the
    window's edge, so two windows sharing n units sum to one there (more windows on one unit: the division by the
    summed weights covers it). Never zero without a margin.

    ``margin`` keeps the ramp off the last ``margin`` units of a shared edge (at most half the span, less one): there
    the weight is 0 and the neighbour alone counts. A decoder whose receptive field reaches r units is exact r units
    inside a tile's edge, so a margin >= r blends two exact values. Made on ``device`` (no host-to-device copy, which
    would wait for the GPU, in a denoising loop)."""
    weight = torch.ones(size, device=device)

    def rising(n: int) -> torch.Tensor:                      # 0 -> 1 across a shared span of n units
        m = min(margin, (n - 1) // 2)
        inner = (torch.arange(n - 2 * m, dtype=torch.float32, device=device) + 1) / (n - 2 * m + 1)
        return torch.cat([weight.new_zeros(m), inner, weight.new_ones(m)])
    if before > 0:
        weight[:before] = torch.minimum(weight[:before], rising(before))
    if after > 0:
        weight[-after:] = torch.minimum(weight[-after:], rising(after).flip(0))
    return weight
