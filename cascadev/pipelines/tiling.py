"""Where the DiT's windows and tiles go over a clip, and how their outputs merge into one prediction.

All sizes are latent (T, H, W) of a clip in the layout (B, C, T, H, W). The DiT was trained on windows of
``window_frames`` latent frames and ``window_size``^2 latent pixels. Longer clips and larger frames are cut into
overlapping windows (stride half a window, as released) and tiles (stride round(0.75 * size), as released); the last
one is moved back to end at the edge.
- ``official``: the released rule. Tiles overwrite earlier tiles; a window overlapping the previous
  one by k >= 2 frames blends its first k frames with linear weights 0..1. Needs T >= window_frames
  and H, W >= window_size.
- ``blend`` (default): every window and tile is weighted by a linear ramp across its overlaps (no
  ramp at the clip's own edges), and the weighted outputs are averaged: smooth in every direction,
  for any H != W. A clip or frame smaller than the window is run as a single smaller window, padded
  by repeating its last frame / row / column up to what the attention partitions divide, and cropped.
- ``shifted``: windows a whole window apart, their grid moved at every denoising step (``Tiling``).

``spec`` below is a DiT's ``Window`` (``dit.video_dit``): its window and the multiples its attention partitions
need. Running the DiT on the windows is ``cascadev.pipelines.sampling``'s part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from cascadev.blend import ramp

TILING_MODES = ("blend", "official", "shifted")
TILE_DETAILS = ("average", "central")
DETAIL_KERNEL = 3         # latent pixels: the detail band is what a 3 x 3 box filter removes (periods < ~24 px)
CENTRAL_POWER = 8         # central weights ~ depth^8: the deepest window's detail, a short cross-fade where two tie
Crop = tuple[slice, slice, slice]   # frames, rows, columns of one window x tile


@dataclass(frozen=True)
class Tiling:
    """How a clip larger than the trained window is split. Strides (``blend``, ``official``) default to the release's.

    ``shifted`` places windows a whole window apart on a grid that moves at every denoising step, so no seam stays in
    one place, and blends the finishing step (``sampling.finishing_step``: the last one from real noise, which
    sets the detail) at the release's spacing: measured on the tiny cascade against blending every step, shifting
    that step too cost 0.3 dB, blending only it 0.01-0.05 dB (benchmarks/tiling.py, docs/fast-decoding.md).

    ``detail``: how blended overlaps combine. ``average``: the windows' outputs weighted by their ramps. ``central``:
    two-band blending (Burt & Adelson 1983): the low band (``DETAIL_KERNEL`` box filter) averaged as ``average``, the
    detail band taken from the window in whose interior a latent lies deepest (``central_weights``). Windows disagree
    on fine detail they cannot see of each other; averaging two such guesses blurs them, which a sampler's later
    steps repair and a 1-step decoder cannot. None: the pipeline's saved ``tile_detail`` (else ``average``)."""

    mode: Literal["blend", "official", "shifted"] = "blend"
    frame_stride: int | None = None   # latent frames between windows; default window_frames // 2
    tile_stride: int | None = None    # latent pixels between tiles; default round(0.75 * window_size)
    detail: Literal["average", "central"] | None = None

    def __post_init__(self):
        if self.mode not in TILING_MODES:
            raise ValueError(f"tiling must be one of {', '.join(TILING_MODES)}, got {self.mode!r}")
        for name in ("frame_stride", "tile_stride"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
            if value is not None and self.mode == "shifted":
                raise ValueError(f"{name} applies to blend and official tiling; shifted windows are a window apart")
        if self.detail not in (None, *TILE_DETAILS):
            raise ValueError(f"detail must be one of {', '.join(TILE_DETAILS)}, got {self.detail!r}")
        if self.detail == "central" and self.mode == "official":
            raise ValueError("detail 'central' applies to blend and shifted tiling; official tiling is the release's")

    @classmethod
    def of(cls, tiling: "str | Tiling") -> "Tiling":
        """A mode's name ("blend", "official", "shifted") as that mode with its defaults; a ``Tiling`` as it is."""
        return cls(tiling) if isinstance(tiling, str) else tiling

    def at_step(self, step: int, finishing: int) -> "Tiling":
        """The tiling of denoising step ``step`` of a sampler whose finishing step is ``finishing``: ``shifted`` blends
        that one; other modes are the same at every step."""
        return Tiling("blend", detail=self.detail) if self.mode == "shifted" and step == finishing else self


def window_starts(length: int, size: int, stride: int) -> list[int]:
    """Start indices of windows of ``size`` every ``stride`` over ``length``, the last moved back to end at
    ``length``."""
    starts, begin = [], 0
    while begin + size < length:
        starts.append(begin)
        begin += stride
    starts.append(max(length - size, 0))
    return starts


def grid_offset(step: int, size: int, multiple: int) -> int:
    """Where ``shifted`` tiling's grid starts at denoising step ``step``: the van der Corput sequence 0, 1/2, 1/4,
    3/4, 1/8, ... of a window, rounded down to ``multiple``, so consecutive steps put their seams far apart and n steps
    spread them evenly over the window (SpotDiffusion, Frolov et al. 2024, shifts at random; this is its
    low-discrepancy variant, reproducible without a generator)."""
    fraction, denominator = 0.0, 1
    while step:
        denominator *= 2
        fraction += (step & 1) / denominator
        step >>= 1
    return int(fraction * size / multiple) * multiple


def shifted_spans(length: int, size: int, offset: int, multiple: int) -> list[slice]:
    """Non-overlapping spans covering [0, length) with boundaries at ``offset`` + k * ``size``. A span at an edge
    shorter than half a window is merged into its neighbour and the pair split in two halves (at a multiple of
    ``multiple``), so every window keeps between half a window and a window of context."""
    if length <= size:
        return [slice(0, length)]
    cuts = [0, *range(offset % size or size, length, size), length]
    spans = [[a, b] for a, b in zip(cuts, cuts[1:])]
    for edge, inner in ((0, 1), (-1, -2)):
        if len(spans) > 1 and spans[edge][1] - spans[edge][0] < size / 2:
            a, b = min(spans[edge][0], spans[inner][0]), max(spans[edge][1], spans[inner][1])
            middle = a + max(multiple, round((b - a) / 2 / multiple) * multiple)
            spans[edge], spans[inner] = ([a, middle], [middle, b]) if edge == 0 else ([middle, b], [a, middle])
    return [slice(a, b) for a, b in spans]


def axis_ramp(length: int, size: int, start: int, stride: int, device: torch.device) -> torch.Tensor:
    """``blend`` weights (size,) of a window at ``start`` along an axis of ``length``: ramps across the nominal overlap
    (size - stride) toward neighbours, flat at the clip's own edges (``cascadev.blend.ramp``)."""
    overlap = size - stride
    return ramp(size, overlap if start > 0 else 0, overlap if start + size < length else 0, device=device)


def interior_depth(length: int, size: int, start: int, device: torch.device | str | None = None) -> torch.Tensor:
    """How deep each position of a window at ``start`` lies inside it, as a fraction of the window (size,): 1 / size
    at an edge toward a neighbour, about 1/2 in the middle; 2 where the clip's own border is the nearer edge (no
    neighbour sees beyond it)."""
    i = torch.arange(size, dtype=torch.float32, device=device)
    depth = torch.full((size,), 2.0 * size, device=device)
    if start > 0:
        depth = torch.minimum(depth, i + 1)
    if start + size < length:
        depth = torch.minimum(depth, size - i)
    return depth / size


def central_weights(size: tuple[int, int, int], crop: Crop, device: torch.device | str | None = None) -> torch.Tensor:
    """Detail-band weights (t, h, w) of a window ``crop`` of a clip of ``size`` (T, H, W): its interior depth along
    the shallowest axis, to the power ``CENTRAL_POWER`` (between 1 / window^8 and 2^8: no float32 overflow).
    Normalised by their sum over windows, they take the deepest window's detail almost everywhere."""
    depths = [interior_depth(n, s.stop - s.start, s.start, device) for n, s in zip(size, crop)]
    depth = torch.minimum(torch.minimum(depths[0][:, None, None], depths[1][None, :, None]), depths[2][None, None, :])
    return depth ** CENTRAL_POWER


def low_band(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H + 2p, W + 2p) -> (B, C, T, H, W): the ``DETAIL_KERNEL`` box filter per frame (p its half-width)
    over the positions whose neighbourhood is inside."""
    return F.avg_pool3d(x, (1, DETAIL_KERNEL, DETAIL_KERNEL), stride=1)


def central_blend(average: torch.Tensor, crops: list[Crop], eps: list[torch.Tensor]) -> torch.Tensor:
    """Two-band blending (``Tiling.detail == "central"``) of the windows' outputs ``eps`` over ``crops``, given their
    ramp-weighted ``average`` (B, C, T, H, W): the average's low band plus the detail band of the window each latent
    lies deepest in. A window's band split sees, across its edges toward neighbours, what the windows there made on
    average (at the clip's edges, its own edge replicated), so windows that agree give their common output back
    exactly, and a window without detail (a constant) adds none."""
    T, H, W = average.shape[2:]
    pad = DETAIL_KERNEL // 2
    around = F.pad(average, (pad, pad, pad, pad, 0, 0), mode="replicate")    # b c t (h + 2p) (w + 2p)
    detail, weight = torch.zeros_like(average), average.new_zeros(1, 1, T, H, W)
    for (f, r, col), e in zip(crops, eps):
        patch = F.pad(e, (pad, pad, pad, pad, 0, 0), mode="replicate")     # b c t (h + 2p) (w + 2p)
        for side, inner in ((0, r.start > 0), (1, r.stop < H), (2, col.start > 0), (3, col.stop < W)):
            if inner:     # a neighbour's side: what the windows there made on average
                ring = [slice(None)] * 2
                ring[side // 2] = slice(None, pad) if side % 2 == 0 else slice(-pad, None)
                rows, cols = slice(r.start, r.stop + 2 * pad), slice(col.start, col.stop + 2 * pad)
                patch[..., ring[0], ring[1]] = around[:, :, f, rows, cols][..., ring[0], ring[1]]
        v = central_weights((T, H, W), (f, r, col), average.device).to(average.dtype)      # t h w
        detail[:, :, f, r, col] += (e - low_band(patch)) * v
        weight[:, :, f, r, col] += v
    smooth = low_band(around)
    return smooth + detail / weight


def blend_strides(spec, tiling: Tiling) -> tuple[int, int]:
    """Frame and tile strides of ``blend`` / ``official`` tiling: as given, else the release's."""
    frame_stride = tiling.frame_stride or spec.window_frames // 2
    tile_stride = tiling.tile_stride or round(0.75 * spec.window_size)
    if frame_stride > spec.window_frames or tile_stride > spec.window_size:
        raise ValueError(f"strides ({frame_stride} frames, {tile_stride} px) longer than the DiT's window "
                         f"({spec.window_frames} frames, {spec.window_size} px) would leave latents no window covers")
    return frame_stride, tile_stride


def window_crops(spec, size: tuple[int, int, int], tiling: str | Tiling = "blend", step: int = 0) -> list[Crop]:
    """The windows x tiles the DiT runs on for latents of ``size`` (T, H, W) at denoising step ``step``, in run
    order. ``spec``: the DiT's window (``window_frames``, ``window_size``) and multiples. ``blend`` and ``official``
    place windows of the DiT's size every stride, the same at every step; ``shifted`` places them a window apart,
    their grid moved at each step (``grid_offset``, ``shifted_spans``), in space and, for clips longer than a window,
    in time."""
    tiling = Tiling.of(tiling)
    T, H, W = size
    if tiling.mode == "shifted":
        frames = shifted_spans(T, spec.window_frames, grid_offset(step, spec.window_frames, spec.frame_multiple),
                               spec.frame_multiple)
        offset = grid_offset(step, spec.window_size, spec.spatial_multiple)
        rows, cols = (shifted_spans(n, spec.window_size, offset, spec.spatial_multiple) for n in (H, W))
        return [(f, r, col) for f in frames for r in rows for col in cols]
    frame_stride, tile_stride = blend_strides(spec, tiling)
    length, th, tw = min(spec.window_frames, T), min(spec.window_size, H), min(spec.window_size, W)
    return [(slice(f, f + length), slice(r, r + th), slice(col, col + tw))
            for f in window_starts(T, length, frame_stride)
            for r in window_starts(H, th, tile_stride) for col in window_starts(W, tw, tile_stride)]


def dit_work(spec, size: tuple[int, int, int], tiling: str | Tiling = "blend", steps: int = 1,
             finishing: int | None = None) -> tuple[int, int]:
    """DiT forwards (windows) and latent voxels (frames x latent pixels, the padding to the attention partitions
    included) that decoding latents of ``size`` (T, H, W) in ``steps`` steps runs through the DiT; ``finishing``: the
    sampler's finishing step (``finishing_step``; default the last)."""
    tiling = Tiling.of(tiling)
    finishing = steps - 1 if finishing is None else finishing
    forwards = voxels = 0
    for step in range(steps):
        for crop in window_crops(spec, size, tiling.at_step(step, finishing), step):
            forwards += 1
            voxels += math.prod(-(-(s.stop - s.start) // m) * m for s, m in
                                zip(crop, (spec.frame_multiple, spec.spatial_multiple, spec.spatial_multiple)))
    return forwards, voxels


def crop_size(crop: Crop) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in crop)


def crops_by_size(crops: list[Crop]) -> list[list[int]]:
    """Indices of ``crops`` grouped by crop size (windows of one size stack on the batch), in first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, crop in enumerate(crops):
        groups.setdefault(crop_size(crop), []).append(i)
    return list(groups.values())


def merge_windows(eps: list[torch.Tensor], crops: list[Crop], spec, size: tuple[int, int, int],
                  tiling: Tiling) -> torch.Tensor:
    """One prediction (B, C, T, H, W) for latents of ``size`` (T, H, W) from the windows' outputs ``eps`` (one
    (B, C, *crop size) per crop of ``window_crops(spec, size, tiling, step)``, in its order), as ``tiling`` merges
    them (the module's docstring)."""
    T, H, W = size
    first = eps[0]
    out = first.new_zeros(first.shape[0], first.shape[1], T, H, W)
    if tiling.mode == "shifted":    # the windows partition the clip: each latent has one eps
        for (f, r, col), e in zip(crops, eps):
            out[:, :, f, r, col] = e
        return out

    if tiling.mode == "official":
        starts = list(dict.fromkeys(f.start for f, _, _ in crops))        # window starts, in order
        tiles, length = len(crops) // len(starts), crop_size(crops[0])[0]
        outputs, last_end = iter(eps), 0
        for k, start in enumerate(starts):
            window = out.new_zeros(*out.shape[:2], length, H, W)
            for _, r, col in crops[k * tiles:(k + 1) * tiles]:
                window[..., r, col] = next(outputs)  # later tiles overwrite earlier ones
            overlap = last_end - start
            w = torch.ones(length, device=out.device)
            if overlap >= 2:  # the release blends the overlap of consecutive windows linearly, 0 -> 1
                w[:overlap] = torch.linspace(0, 1, overlap, device=out.device)
            w = w.to(out.dtype).reshape(1, 1, length, 1, 1)
            out[:, :, start:start + length] = out[:, :, start:start + length] * (1 - w) + window * w
            last_end = start + length
        return out

    # blend: each crop weighted by the product of its ramps over frames, rows and columns, then normalised; with
    # central detail, the detail band from the deepest window instead (Tiling's docstring)
    frame_stride, tile_stride = blend_strides(spec, tiling)
    weight = out.new_zeros(1, 1, T, H, W)
    for (f, r, col), e in zip(crops, eps):
        length, th, tw = crop_size((f, r, col))
        w = (axis_ramp(T, length, f.start, frame_stride, out.device)[:, None, None]
             * axis_ramp(H, th, r.start, tile_stride, out.device)[None, :, None]
             * axis_ramp(W, tw, col.start, tile_stride, out.device)[None, None, :]).to(out.dtype)  # t h w
        out[:, :, f, r, col] += e * w
        weight[:, :, f, r, col] += w
    out = out / weight
    return central_blend(out, crops, eps) if tiling.detail == "central" else out
