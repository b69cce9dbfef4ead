"""Sampling the LDM-VAE decoder over diffusers schedulers, with windows in time and tiles in space.

All tensors here are already-scaled latents in the layout (B, C, T, H, W). ``cond`` is the semantic
latent upsampled to the Stage A grid; the model sees ``cat([noisy latent, cond])`` at every step.

Windows and tiles: the DiT was trained on windows of ``window_frames`` latent frames and
``window_size``^2 latent pixels. Longer clips and larger frames are cut into overlapping windows
(stride half a window, as released) and tiles (stride round(0.75 * size), as released); the last one
is moved back to end at the edge.
- ``official``: the released rule. Tiles overwrite earlier tiles; a window overlapping the previous
  one by k >= 2 frames blends its first k frames with linear weights 0..1. Needs T >= window_frames
  and H, W >= window_size.
- ``blend`` (default): every window and tile is weighted by a linear ramp across its overlaps (no
  ramp at the clip's own edges), and the weighted outputs are averaged: smooth in every direction,
  for any H != W. A clip or frame smaller than the window is run as a single smaller window, padded
  by repeating its last frame / row / column up to what the attention partitions divide, and cropped.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from einops import rearrange

from cascadev.blend import ramp

from cascadev.errors import first_line
from cascadev.weights import read_json_object

SCHEDULERS = {                   # short names, as the CLI takes them
    "euler_a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "dpmpp": DPMSolverMultistepScheduler,         # algorithm_type "dpmsolver++" by default
    "flow": FlowMatchEulerDiscreteScheduler,      # models trained with rectified flow: v = eps - x0
                                                  # (cascadev.training.diffusion)
}


@dataclass(frozen=True)
class Tiling:
    """How a clip larger than the trained window is split. Strides (``blend``, ``official``) default to the release's.

    ``shifted`` places windows a whole window apart on a grid that moves at every denoising step, so no seam stays in
    one place, and blends the finishing step (``finishing_step``: the last one that starts from real noise, which
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

    def at_step(self, step: int, finishing: int) -> "Tiling":
        """The tiling of denoising step ``step`` of a sampler whose finishing step is ``finishing``: ``shifted`` blends
        that one; other modes are the same at every step."""
        return Tiling("blend", detail=self.detail) if self.mode == "shifted" and step == finishing else self


TILING_MODES = ("blend", "official", "shifted")
TILE_DETAILS = ("average", "central")
DETAIL_KERNEL = 3         # latent pixels: the detail band is what a 3 x 3 box filter removes (periods < ~24 px)
CENTRAL_POWER = 8         # central weights ~ depth^8: the deepest window's detail, a short cross-fade where two tie
NEGLIGIBLE_NOISE = 0.05   # noise-to-signal ratio below which a step only polishes what is there


def finishing_step(scheduler: SchedulerMixin) -> int:
    """The last step of a scheduler (after ``set_timesteps``) that starts from a noise-to-signal ratio of at least
    ``NEGLIGIBLE_NOISE``: the step whose prediction sets the sample's detail. Flow matching's 4 steps start at sigma
    1, 0.67, 0.33 and 0.001, so the third (index 2) finishes; the release's 8 Euler-ancestral steps end at t = 0 and
    the seventh (t = 142, ratio 0.45) finishes."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        sigma = scheduler.sigmas[:len(scheduler.timesteps)].double().cpu()
        ratio = sigma / (1 - sigma).clamp(min=1e-12)
    else:
        alpha = scheduler.alphas_cumprod.double()[scheduler.timesteps.round().long().cpu()]
        ratio = ((1 - alpha) / alpha).sqrt()
    above = (ratio >= NEGLIGIBLE_NOISE).nonzero()
    return int(above[-1]) if len(above) else len(ratio) - 1


def make_scheduler(name: str | SchedulerMixin = "euler_a", config: dict | None = None) -> SchedulerMixin:
    """A diffusers scheduler by short name, with its default config (as the release used them) or ``config``.

    One exception: DDIM's default ``clip_sample=True`` clamps the predicted x0 to [-1, 1], a rule for
    pixels that distorts latents, so it is off unless ``config`` turns it on (the release's DDIM path
    kept the clamp: pass ``{"clip_sample": True}`` to reproduce it).
    """
    if isinstance(name, SchedulerMixin):
        return name
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {tuple(SCHEDULERS)}")
    cls = SCHEDULERS[name]
    defaults = {"clip_sample": False} if name == "ddim" else {}
    return cls.from_config(cls().config, **{**defaults, **(config or {})})


def scheduler_for_objective(diffusion, eps_sampler: str = "euler_a") -> SchedulerMixin:
    """The sampler of a training objective (``cascadev.training.diffusion.DiffusionConfig``): flow Euler at the
    trained ``sigma_shift`` for rectified flow (the model predicts v = eps - x0), else ``eps_sampler`` (eps)."""
    if diffusion.objective == "rf":
        return make_scheduler("flow", {"shift": diffusion.sigma_shift})
    return make_scheduler(eps_sampler)


def load_scheduler(folder: str | Path) -> SchedulerMixin:
    """A scheduler saved by ``save_pretrained`` (``scheduler_config.json``), one of ``SCHEDULERS``' classes."""
    config_file = Path(folder) / "scheduler_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no scheduler_config.json "
                                "(a folder written by a scheduler's save_pretrained)")
    name = read_json_object(config_file, "a scheduler config").get("_class_name")
    cls = next((c for c in SCHEDULERS.values() if c.__name__ == name), None)
    if cls is None:
        raise ValueError(f"{config_file}: scheduler {name!r} is not one of "
                         f"{', '.join(c.__name__ for c in SCHEDULERS.values())}")
    return build_saved_scheduler(cls, folder)


def build_saved_scheduler(cls: type[SchedulerMixin], folder: str | Path) -> SchedulerMixin:
    """``cls.from_pretrained(folder)`` set to a few steps once, so that a damaged ``scheduler_config.json`` (no
    training timesteps, a word for a number) fails here in one line naming it, not inside diffusers or in the first
    denoising step."""
    try:
        scheduler = cls.from_pretrained(folder)
        copy.deepcopy(scheduler).set_timesteps(2)
    except OSError:
        raise
    except Exception as e:      # whatever the scheduler's own code raises on such a config
        raise ValueError(f"{Path(folder) / 'scheduler_config.json'}: does not make a working {cls.__name__} "
                         f"({first_line(e)})") from None
    return scheduler


def set_steps(scheduler: SchedulerMixin, steps: int, device: torch.device | str | None = None) -> None:
    """``scheduler.set_timesteps(steps)``, refusing a schedule that is not finite: diffusers' flow scheduler with a
    ``shift_terminal`` (a 2-step distilled student's) divides 0 by 0 at 1 step."""
    terminal = getattr(scheduler.config, "shift_terminal", None)
    message = f"{type(scheduler).__name__} gives no finite noise levels at {steps} step(s)"
    if terminal and steps < 2:
        raise ValueError(f"{message} (its shift_terminal {terminal} needs at least 2 steps)")
    scheduler.set_timesteps(steps, device=device)
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and not torch.isfinite(sigmas).all():
        raise ValueError(message)


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """The short name of a scheduler's class ("euler_a", "flow", ...), or its class name."""
    return next((name for name, cls in SCHEDULERS.items() if type(scheduler) is cls), type(scheduler).__name__)


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


def _central_blend(average: torch.Tensor, crops: list[Crop], eps: list[torch.Tensor]) -> torch.Tensor:
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


def _pad_to(x: torch.Tensor, multiples: tuple[int, int, int]) -> torch.Tensor:
    """Pad (B, C, T, H, W) at the end of T, H, W by repetition up to the given multiples."""
    T, H, W = x.shape[2:]
    pads = [(-n) % m for n, m in zip((T, H, W), multiples)]
    if not any(pads):
        return x
    return F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]), mode="replicate")


def _run_window(model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eps of one window (B, C_in, T, H, W) -> (B, C_latent, T, H, W) in x's dtype; pads sizes the partitions
    need. The model runs in its own dtype (half precision stays inside the network)."""
    net = getattr(model, "module", model)   # as predict_noise
    T, H, W = x.shape[2:]
    weights = next(model.parameters(), None)
    padded = _pad_to(x, (net.frame_multiple, net.spatial_multiple, net.spatial_multiple))
    out = model(padded if weights is None else padded.to(weights.dtype), t)
    return out[:, : net.config.latent_channels, :T, :H, :W].to(x.dtype)


Crop = tuple[slice, slice, slice]   # frames, rows, columns of one window x tile


def _strides(spec, tiling: Tiling) -> tuple[int, int]:
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
    tiling = Tiling(tiling) if isinstance(tiling, str) else tiling
    T, H, W = size
    if tiling.mode == "shifted":
        frames = shifted_spans(T, spec.window_frames, grid_offset(step, spec.window_frames, spec.frame_multiple),
                               spec.frame_multiple)
        offset = grid_offset(step, spec.window_size, spec.spatial_multiple)
        rows, cols = (shifted_spans(n, spec.window_size, offset, spec.spatial_multiple) for n in (H, W))
        return [(f, r, col) for f in frames for r in rows for col in cols]
    frame_stride, tile_stride = _strides(spec, tiling)
    length, th, tw = min(spec.window_frames, T), min(spec.window_size, H), min(spec.window_size, W)
    return [(slice(f, f + length), slice(r, r + th), slice(col, col + tw))
            for f in window_starts(T, length, frame_stride)
            for r in window_starts(H, th, tile_stride) for col in window_starts(W, tw, tile_stride)]


def dit_work(spec, size: tuple[int, int, int], tiling: str | Tiling = "blend", steps: int = 1,
             finishing: int | None = None) -> tuple[int, int]:
    """DiT forwards (windows) and latent voxels (frames x latent pixels, the padding to the attention partitions
    included) that decoding latents of ``size`` (T, H, W) in ``steps`` steps runs through the DiT; ``finishing``: the
    sampler's finishing step (``finishing_step``; default the last)."""
    tiling = Tiling(tiling) if isinstance(tiling, str) else tiling
    finishing = steps - 1 if finishing is None else finishing
    forwards = voxels = 0
    for step in range(steps):
        for crop in window_crops(spec, size, tiling.at_step(step, finishing), step):
            forwards += 1
            voxels += math.prod(-(-(s.stop - s.start) // m) * m for s, m in
                                zip(crop, (spec.frame_multiple, spec.spatial_multiple, spec.spatial_multiple)))
    return forwards, voxels


def _crop_size(crop: Crop) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in crop)


def _by_size(crops: list[Crop]) -> list[list[int]]:
    """Indices of ``crops`` grouped by crop size (windows of one size stack on the batch), in first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, crop in enumerate(crops):
        groups.setdefault(_crop_size(crop), []).append(i)
    return list(groups.values())


def _crops_eps(model, x: torch.Tensor, t: torch.Tensor, crops: list[Crop], window_batch: int) -> list[torch.Tensor]:
    """Eps of every crop of x (B, C_in, T, H, W), up to ``window_batch`` crops of one size stacked on the batch per
    forward. Returns one (B, C_latent, *crop size) per crop, in order."""
    out: list[torch.Tensor | None] = [None] * len(crops)
    for group in _by_size(crops):
        for i in range(0, len(group), window_batch):
            batch = group[i:i + window_batch]
            stacked = torch.cat([x[:, :, f, r, c] for f, r, c in (crops[j] for j in batch)])  # (k b) c t h w
            for j, eps in zip(batch, _run_window(model, stacked, t.repeat(len(batch))).chunk(len(batch))):
                out[j] = eps
    return out


def _distributed_eps(model, x: torch.Tensor, t: torch.Tensor, crops: list[Crop],
                     window_batch: int) -> list[torch.Tensor]:
    """``_crops_eps`` with the crops of each size split across the process group's ranks and the eps all-gathered."""
    from cascadev.pipelines.distributed import gather_eps, share, world

    rank, size = world()
    if size == 1:
        return _crops_eps(model, x, t, crops, window_batch)
    out: list[torch.Tensor | None] = [None] * len(crops)
    for group in _by_size(crops):      # gather_eps all-gathers one shape at a time
        mine = _crops_eps(model, x, t, [crops[j] for j in share(group, rank, size)], window_batch)
        for j, eps in zip(group, gather_eps(mine, len(group), size)):
            out[j] = eps
    return out


def predict_noise(model, x: torch.Tensor, t: torch.Tensor | float, tiling: str | Tiling = "blend",
                  window_batch: int = 1, distributed: bool = False, step: int = 0) -> torch.Tensor:
    """Eps for a whole clip. x: (B, C_in, T, H, W) = cat([noisy latent, cond]), any size; t: scalar or (B,).

    Returns (B, C_latent, T, H, W): the eps channels of the model output (the learned variance is
    not used by the schedulers); for a rectified-flow model, its velocity. ``window_batch`` windows and
    tiles go through the model per forward (same result as one by one, within rounding; faster on a GPU).
    ``distributed``: with an initialised process group of several ranks, each holding the same x, every rank runs
    its share of the windows/tiles and all-gathers the others' (``cascadev.pipelines.distributed``); all ranks
    return the same eps. A no-op without such a group; every rank must call it (a collective).
    ``step``: the denoising step's index, where ``shifted`` tiling places its grid (``window_crops``).
    """
    net = getattr(model, "module", model)   # a DDP-wrapped student: settings from inside, calls through the wrapper
    c = net.config
    tiling = Tiling(tiling) if isinstance(tiling, str) else tiling
    if x.ndim != 5 or x.shape[1] != net.in_channels:
        raise ValueError(f"predict_noise expects (B, {net.in_channels}, T, H, W) = noisy latent + condition, "
                         f"got {tuple(x.shape)}")
    if window_batch < 1:
        raise ValueError(f"window_batch must be >= 1, got {window_batch}")
    B, _, T, H, W = x.shape
    if tiling.mode == "official" and (T < c.window_frames or min(H, W) < c.window_size):
        raise ValueError(f"official tiling needs at least {c.window_frames} latent frames and {c.window_size}x"
                         f"{c.window_size} latents, got {T}x{H}x{W}; use tiling='blend' for smaller clips")
    t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(B)

    crops = window_crops(net.window, (T, H, W), tiling, step)
    if len(crops) == 1:
        return _run_window(model, x, t)
    eps = iter(_distributed_eps(model, x, t, crops, window_batch) if distributed
               else _crops_eps(model, x, t, crops, window_batch))
    out = x.new_zeros(B, c.latent_channels, T, H, W)

    if tiling.mode == "shifted":    # the windows partition the clip: each latent has one eps
        for (f, r, col), e in zip(crops, eps):
            out[:, :, f, r, col] = e
        return out

    if tiling.mode == "official":
        starts = list(dict.fromkeys(f.start for f, _, _ in crops))        # window starts, in order
        tiles, size = len(crops) // len(starts), _crop_size(crops[0])[0]
        last_end = 0
        for k, start in enumerate(starts):
            window = x.new_zeros(B, c.latent_channels, size, H, W)
            for _, r, col in crops[k * tiles:(k + 1) * tiles]:
                window[..., r, col] = next(eps)  # later tiles overwrite earlier ones
            overlap = last_end - start
            w = torch.ones(size, device=x.device)
            if overlap >= 2:  # the release blends the overlap of consecutive windows linearly, 0 -> 1
                w[:overlap] = torch.linspace(0, 1, overlap, device=x.device)
            w = w.to(x.dtype).reshape(1, 1, size, 1, 1)
            out[:, :, start:start + size] = out[:, :, start:start + size] * (1 - w) + window * w
            last_end = start + size
        return out

    # blend: each crop weighted by the product of its ramps over frames, rows and columns, then normalised; with
    # central detail, the detail band from the deepest window instead (Tiling's docstring)
    frame_stride, tile_stride = _strides(net.window, tiling)
    eps = list(eps)
    weight = x.new_zeros(1, 1, T, H, W)
    for (f, r, col), e in zip(crops, eps):
        size, th, tw = _crop_size((f, r, col))
        w = (axis_ramp(T, size, f.start, frame_stride, x.device)[:, None, None]
             * axis_ramp(H, th, r.start, tile_stride, x.device)[None, :, None]
             * axis_ramp(W, tw, col.start, tile_stride, x.device)[None, None, :]).to(x.dtype)  # t h w
        out[:, :, f, r, col] += e * w
        weight[:, :, f, r, col] += w
    out = out / weight
    return _central_blend(out, crops, eps) if tiling.detail == "central" else out


@torch.no_grad()
def sample(model, cond: torch.Tensor, noise: torch.Tensor, scheduler: str | SchedulerMixin = "euler_a",
           steps: int = 8, tiling: str | Tiling = "blend", generator: torch.Generator | None = None,
           scheduler_config: dict | None = None,
           callback: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
           window_batch: int = 1, distributed: bool = False) -> torch.Tensor:
    """Denoise ``noise`` (B, C_latent, T, H, W) given ``cond`` (B, C_cond, T, H, W); both already scaled.

    The release's loop (recon/refine_latent.py): scale the noise by ``init_noise_sigma``, then at each
    timestep predict eps on cat([scaled input, cond]) and take a scheduler step. The step runs on
    frames as a batch, (B*T, C, H, W), the release's layout, so a seeded ancestral sampler draws the
    same noise as the released code. ``callback(i, t, latents)`` runs after step i with the latents
    (B, C_latent, T, H, W) and may return replacements (a pipeline advances its progress bar there).
    ``window_batch``: windows/tiles per forward.
    ``distributed``: split each step's windows/tiles across the process group's ranks (``predict_noise``); every
    rank must pass the same noise, cond and generator seed, so that all step identically.
    Returns the denoised latents (B, C_latent, T, H, W).
    """
    c = model.config
    if noise.ndim != 5 or noise.shape[1] != c.latent_channels:
        raise ValueError(f"noise must be (B, {c.latent_channels}, T, H, W), got {tuple(noise.shape)}")
    if cond.shape[0] != noise.shape[0] or cond.shape[2:] != noise.shape[2:] or cond.shape[1] != c.cond_channels:
        raise ValueError(f"cond must be (B, {c.cond_channels}, T, H, W) matching noise {tuple(noise.shape)}, "
                         f"got {tuple(cond.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if distributed:
        from cascadev.pipelines.distributed import broadcast, world

        if world()[1] > 1:   # every rank steps from rank 0's inputs, so all stay identical
            cond, noise = broadcast(cond), broadcast(noise)
    scheduler = make_scheduler(scheduler, scheduler_config)
    set_steps(scheduler, steps, noise.device)
    predict = window_predictor(model, cond, scheduler, tiling, window_batch, distributed)
    return denoise_loop(predict, noise, scheduler, generator, callback)


def window_predictor(model, cond: torch.Tensor, scheduler: SchedulerMixin, tiling: str | Tiling = "blend",
                     window_batch: int = 1, distributed: bool = False
                     ) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """``predict(x, t, i)`` for ``denoise_loop``: the model's eps (B, C_latent, T, H, W) on cat([x, cond]) over the
    clip's windows and tiles at step i (``predict_noise``; ``shifted`` tiling blends the scheduler's finishing step,
    so call it after ``set_timesteps``). Differentiable: step distillation trains through it."""
    tiling = Tiling(tiling) if isinstance(tiling, str) else tiling
    finishing = finishing_step(scheduler)

    def predict(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        return predict_noise(model, torch.cat([x, cond.to(x)], dim=1), t, tiling.at_step(i, finishing), window_batch,
                             distributed, step=i)
    return predict


def denoise_loop(predict: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], noise: torch.Tensor,
                 scheduler: SchedulerMixin, generator: torch.Generator | None = None,
                 callback: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None
                 ) -> torch.Tensor:
    """The release's loop (recon/refine_latent.py) over a scheduler after ``set_timesteps``: noise (B, C, T, H, W)
    -> latents (B, C, T, H, W). ``predict(x, t, i)``: the model's eps (or velocity) for the scaled input x
    (B, C, T, H, W) at timestep t, step i. Steps run on frames as a batch, (B*T, C, H, W), the release's layout.
    Differentiable: ``sample`` runs it without gradients over windows and tiles, step distillation
    (``cascadev.training.distillation``) with gradients through a student's steps."""
    T = noise.shape[2]

    def to_frames(z: torch.Tensor) -> torch.Tensor:
        return rearrange(z, "b c t h w -> (b t) c h w")

    def from_frames(z: torch.Tensor) -> torch.Tensor:
        return rearrange(z, "(b t) c h w -> b c t h w", t=T)

    # flow matching starts from unit noise and has no input scaling
    latents = to_frames(noise * getattr(scheduler, "init_noise_sigma", 1.0))
    for i, t in enumerate(scheduler.timesteps):
        scaled = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        eps = predict(from_frames(scaled), t, i)
        latents = scheduler.step(to_frames(eps), t, latents, generator=generator, return_dict=False)[0]
        if callback is not None and (replaced := callback(i, t, from_frames(latents))) is not None:
            latents = to_frames(replaced)
    return from_frames(latents)
