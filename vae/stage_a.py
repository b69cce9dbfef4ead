"""Stage A: the pixel VAE (f8, 4 channels) around a diffusers autoencoder. It owns the latent scale.

``StageAVAE.encode``: video (B, 3, T, H, W) in [-1, 1] -> latents (B, 4, T, H/8, W/8) already multiplied
by ``scale_factor`` (CascadeV: 0.13025); ``decode`` divides by it and returns the video. Three kinds:

- ``"svd_temporal"``: Stable Video Diffusion's ``AutoencoderKLTemporalDecoder`` (per-frame encoder, a
  decoder with temporal layers that mixes the ``num_frames`` frames of one call). The default, as in
  CascadeV, loaded from ``stabilityai/stable-video-diffusion-img2vid-xt`` subfolder ``vae``.
- ``"kl"``: an image ``AutoencoderKL`` (SD family); frames are independent.
- ``"taesd"``: diffusers' ``AutoencoderTiny`` (TAESD's architecture): a deterministic autoencoder of plain
  convolutions, no normalisation, frames independent. Small ones train quickly, and with no GroupNorm their
  tiles decode close to the whole frame (GroupNorm's per-tile statistics shift a small VAE's colours and
  contrast): max 0.023 off on the tiny preset vs 0.49 for the tiny "kl"; the built-in tiny cascade uses one.

Memory is bounded by the config, whatever the clip: frames go through the decoder ``chunk_frames`` at a
time, and frames larger than ``tile_size`` pixels go through in spatial tiles sharing ``tile_overlap``
pixels. Chunks and tiles always have the full size (the temporal decoder sees the window length it was
trained on); they are spaced evenly, neighbours share at least ``chunk_overlap`` frames / ``tile_overlap``
pixels, and overlaps are blended with linear ramps (no seams). T a multiple of ``chunk_frames`` with no
overlap gives CascadeV's disjoint chunks. A clip that fits in one chunk and one tile takes the plain
path, bit for bit. Tiles are ours, not diffusers' ``enable_tiling`` (measured worse: see ``tiled_apply``'s
neighbour comment).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from einops import rearrange

from cascadev.blend import ramp
from cascadev.checks import check_video
from cascadev.errors import first_line
from cascadev.progress import progress_bar

LATENT_SCALE = 0.13025          # CascadeV's latent scale (both latents are multiplied by it before the DiT)
DOWNSAMPLE = 8                  # Stage A: f8
LATENT_CHANNELS = 4
SVD_VAE_REPO = "stabilityai/stable-video-diffusion-img2vid-xt"
KIND_OF_CLASS = {"AutoencoderKLTemporalDecoder": "svd_temporal", "AutoencoderKL": "kl", "AutoencoderTiny": "taesd"}
KINDS = tuple(KIND_OF_CLASS.values())
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class StageAConfig:
    kind: Literal["svd_temporal", "kl", "taesd"] = "svd_temporal"
    pretrained: str | None = SVD_VAE_REPO   # local diffusers folder or hub id; None = random init (arch below)
    subfolder: str | None = "vae"
    variant: str | None = None              # hub file variant, e.g. "fp16"
    dtype: str = "float32"                  # float32 | float16 | bfloat16
    scale_factor: float = LATENT_SCALE
    sample_posterior: bool = False          # encode: posterior mode (default) or a sample; "taesd" has no posterior
    encode_frame_batch: int = 8             # frames per encoder call
    chunk_frames: int = 8                   # frames per decoder call (the temporal decoder's window); 0 = all
    chunk_overlap: int = 0                  # min frames shared by consecutive decode chunks, blended linearly
    tile_size: int = 1024                   # pixels per tile side; larger frames are tiled; 0 = never tile
    tile_overlap: int = 128                 # min pixels shared by neighbouring tiles, blended linearly
    # ramp kept this many px off each tile's shared edge (``blend_ramp``); None: the kind's (``TILE_MARGIN``)
    tile_margin: int | None = None
    # GiB for one decoder (or encoder) call; > 0: tile size and frames per call chosen from it (``plan``), whole
    # frames when they fit; 0: ``tile_size`` as given
    max_memory: float = 0.0
    # architecture when built without pretrained weights (tiny presets, meta-device builds)
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)    # "taesd": encoder and decoder both
    layers_per_block: int = 2               # "taesd" keeps TAESD's blocks per stage (1, 3, 3, 3)
    latent_channels: int = LATENT_CHANNELS  # 4 as SVD's VAE; a pretrained folder brings its own
    norm_num_groups: int = 32               # "kl" only; the temporal decoder always uses 32 groups
    # "kl" only: self-attention in the middle blocks (diffusers' default). Off, nothing looks across the
    # whole frame, so what small training crops teach carries over to large frames.
    mid_attention: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown Stage A kind {self.kind!r}; expected one of {', '.join(map(repr, KINDS))}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.scale_factor <= 0:
            raise ValueError(f"scale_factor must be positive, got {self.scale_factor}")
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {self.latent_channels}")
        if 2 ** (len(self.block_out_channels) - 1) != DOWNSAMPLE:
            raise ValueError(f"block_out_channels needs 4 entries for an f{DOWNSAMPLE} VAE, "
                             f"got {self.block_out_channels}")
        if self.kind == "svd_temporal" and any(c % 32 for c in self.block_out_channels):
            raise ValueError(f"svd_temporal block_out_channels must be multiples of 32 (its GroupNorms use 32 groups), "
                             f"got {self.block_out_channels}")
        if self.kind == "kl" and any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"block_out_channels {self.block_out_channels} must be multiples of "
                             f"norm_num_groups={self.norm_num_groups}")
        if self.encode_frame_batch < 1 or self.chunk_frames < 0:
            raise ValueError("encode_frame_batch must be >= 1 and chunk_frames >= 0")
        if self.chunk_frames and not 0 <= self.chunk_overlap < self.chunk_frames:
            raise ValueError(f"chunk_overlap must be in [0, chunk_frames={self.chunk_frames}), "
                             f"got {self.chunk_overlap}")
        if self.tile_size:
            if self.tile_size % DOWNSAMPLE or self.tile_overlap % DOWNSAMPLE:
                raise ValueError(f"tile_size and tile_overlap must be multiples of {DOWNSAMPLE} pixels, "
                                 f"got {self.tile_size} and {self.tile_overlap}")
            if not 0 <= self.tile_overlap < self.tile_size:
                raise ValueError(f"tile_overlap must be in [0, tile_size={self.tile_size}), got {self.tile_overlap}")
        if self.tile_margin is not None and self.tile_margin < 0:
            raise ValueError(f"tile_margin must be >= 0 (or None: the kind's), got {self.tile_margin}")
        if self.max_memory < 0:
            raise ValueError(f"max_memory must be >= 0 GiB (0: tile_size as given), got {self.max_memory}")


# Ramp margin (px) by kind. "taesd" has no normalisation, so a tile is exact a few dozen px inside its edges (its
# receptive field is finite); keeping the ramp there makes tiles match the whole frame: the shipped tiny one, 256 px
# tiles sharing 64 on random latents, max |tiled - untiled| 0.044 with a full ramp, 0.0007 with a 32 px margin
# (0.0001 at 48). GroupNorm kinds see per-tile statistics everywhere (no margin helps): a full ramp hides the offset.
TILE_MARGIN = {"taesd": 32, "kl": 0, "svd_temporal": 0}
# Memory model of one decoder/encoder call: peak bytes = frames x tile pixels x channels at full resolution x
# itemsize x MEMORY_FACTOR (the live full-resolution activations). Measured on CPU (ru_maxrss, fp32, 8 x 512 x
# 512): taesd 4.0-4.1 (48 and 16 channels), kl 6.2, svd_temporal 7.1; on an H100 the official SVD decoder in bf16
# (128 channels), 8 x 1152 x 2048: 7.7 for 1024 px tiles, 1536 px and whole frames (16.5 / 27.7 / 36.4 GiB).
MEMORY_FACTOR = {"taesd": 4.5, "kl": 6.5, "svd_temporal": 8.0}
TILE_STEP = 64                  # px: tile sizes a memory budget chooses from

PRESETS: dict[str, StageAConfig] = {
    # the release decodes 4 latent frames per temporal-decoder call (recon/lat2vid.py: 5 for 25-frame clips), which
    # the decoder's temporal layers see together: its output depends on the chunk
    "official": StageAConfig(chunk_frames=4),
    # CPU tests and the demo: random-init f8 VAEs with a few hundred K parameters
    "tiny": StageAConfig(kind="kl", pretrained=None, subfolder=None, block_out_channels=(16, 32, 32, 32),
                         layers_per_block=1, norm_num_groups=8, tile_size=256, tile_overlap=64),
    "tiny_taesd": StageAConfig(kind="taesd", pretrained=None, subfolder=None, block_out_channels=(16, 16, 16, 16),
                               tile_size=256, tile_overlap=64),
    "tiny_temporal": StageAConfig(kind="svd_temporal", pretrained=None, subfolder=None,
                                  block_out_channels=(32, 32, 32, 32), layers_per_block=1,
                                  tile_size=256, tile_overlap=64),
}


# -- tiles and chunks -------------------------------------------------------------------------------

# Stage A config fields a pipeline keeps (the rest describe an architecture, which the VAE brings itself)
PIPELINE_SETTINGS = ("scale_factor", "sample_posterior", "encode_frame_batch", "chunk_frames", "chunk_overlap",
                     "tile_size", "tile_overlap")


def stage_a_settings(config: StageAConfig) -> dict:
    """What a pipeline keeps of a Stage A config: the latent scale and how to chunk and tile."""
    return {name: getattr(config, name) for name in PIPELINE_SETTINGS}


def vae_dtype(config, dtype: torch.dtype) -> torch.dtype:
    """The dtype a diffusers VAE with ``config`` runs in when the pipeline runs in ``dtype``: fp32 instead of fp16 where
    the config sets diffusers' ``force_upcast`` (VAEs that overflow in fp16)."""
    return torch.float32 if dtype == torch.float16 and config.get("force_upcast") else dtype


def spans(length: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Windows ``[start, end)`` of ``size`` covering ``range(length)``, evenly spaced, neighbours sharing
    at least ``overlap``; one window ``(0, length)`` when it fits (or ``size`` is 0)."""
    if size <= 0 or length <= size:
        return [(0, length)]
    n = math.ceil((length - overlap) / (size - overlap))
    starts = [round(i * (length - size) / (n - 1)) for i in range(n)]
    return [(s, s + size) for s in starts]


def blend_ramp(windows: list[tuple[int, int]], index: int, factor: int = 1, margin: int = 0) -> torch.Tensor:
    """Weights (in output units, ``factor`` per input unit) of window ``index`` of ``windows``: ``cascadev.blend.ramp``
    across its actual overlap with each neighbour, kept ``margin`` output units off the shared edges."""
    start, end = windows[index]
    before = max(windows[index - 1][1] - start, 0) if index > 0 else 0
    after = max(end - windows[index + 1][0], 0) if index + 1 < len(windows) else 0
    return ramp((end - start) * factor, before * factor, after * factor, margin)


@functools.lru_cache(maxsize=64)
def _ramps(windows: tuple[tuple[int, int], ...], factor: int, device: torch.device,
           margin: int = 0) -> tuple[torch.Tensor, ...]:
    """``blend_ramp`` of every window of one layout, built once on ``device``."""
    return tuple(blend_ramp(list(windows), i, factor, margin).to(device) for i in range(len(windows)))


@functools.lru_cache(maxsize=64)
def _ramp_total(windows: tuple[tuple[int, int], ...], factor: int, device: torch.device,
                margin: int = 0) -> torch.Tensor:
    """Summed ramps of a layout (what the blended output is divided by), in output units, built once on ``device``."""
    total = torch.zeros(windows[-1][1] * factor, device=device)
    for (start, end), weight in zip(windows, _ramps(windows, factor, device, margin)):
        total[start * factor:end * factor] += weight
    return total


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grid: tuple[int, int],
                tile: int | tuple[int, int], overlap: int, in_factor: int, out_factor: int,
                margin: int = 0) -> torch.Tensor:
    """Apply ``fn`` to overlapping spatial tiles of ``x`` and blend the results.

    x: (N, C, h * in_factor, w * in_factor) on a (h, w) = ``grid`` of latent cells; ``fn`` maps a tile of
    (th * in_factor, tw * in_factor) to (N, C', th * out_factor, tw * out_factor). Tiles of ``tile`` cells
    (square, or (rows, columns)) share at least ``overlap`` cells and are blended with linear ramps kept ``margin``
    output units off each tile's shared edges (``blend_ramp``); one tile = ``fn(x)`` unchanged. The output is
    accumulated in ``fn``'s dtype and normalised in place: besides it, only one tile's output is held.
    """
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    rows, cols = tuple(spans(grid[0], th, overlap)), tuple(spans(grid[1], tw, overlap))
    if len(rows) == 1 and len(cols) == 1:
        return fn(x)
    row_ramps, col_ramps = _ramps(rows, out_factor, x.device, margin), _ramps(cols, out_factor, x.device, margin)
    out = None
    for (r0, r1), wr in zip(rows, row_ramps):
        for (c0, c1), wc in zip(cols, col_ramps):
            y = fn(x[..., r0 * in_factor:r1 * in_factor, c0 * in_factor:c1 * in_factor])
            if out is None:
                out = y.new_zeros(*y.shape[:2], grid[0] * out_factor, grid[1] * out_factor)
            region = out[..., r0 * out_factor:r1 * out_factor, c0 * out_factor:c1 * out_factor]
            region.addcmul_(y, wr[:, None] * wc[None, :])                                 # th tw weights
            del y
    # the weights are outer products of row and column ramps, so their sum is the product of the sums
    out.div_(_ramp_total(rows, out_factor, x.device, margin)[:, None])
    return out.div_(_ramp_total(cols, out_factor, x.device, margin))


def drop_unloadable_config_keys(config_file: str | Path) -> None:
    """Remove from a saved VAE ``config.json`` the key ``block_out_channels`` that diffusers' ``AutoencoderTiny``
    registers when built (a copy of ``decoder_block_out_channels``, which diffusers' pipelines read) and saves, but
    does not take: each load of the folder would warn "config attributes {'block_out_channels': ...} were passed to
    AutoencoderTiny". Other VAEs' configs are left as they are."""
    from cascadev.weights import write_json

    config_file = Path(config_file)
    config = json.loads(config_file.read_text())
    if config.get("_class_name") == "AutoencoderTiny" and "block_out_channels" in config:
        del config["block_out_channels"]
        write_json(config_file, config, sort_keys=True)


# -- the wrapper ----------------------------------------------------------------------------------

def _is_local(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().exists()


def _architecture(config: StageAConfig) -> tuple[type, dict]:
    """The diffusers class for ``config.kind`` and its constructor arguments for a random-init build."""
    from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder, AutoencoderTiny

    channels = tuple(config.block_out_channels)
    if config.kind == "taesd":
        return AutoencoderTiny, dict(encoder_block_out_channels=channels, decoder_block_out_channels=channels,
                                     latent_channels=config.latent_channels, scaling_factor=config.scale_factor)
    arch = dict(in_channels=3, out_channels=3, block_out_channels=channels, layers_per_block=config.layers_per_block,
                latent_channels=config.latent_channels, scaling_factor=config.scale_factor,
                down_block_types=("DownEncoderBlock2D",) * len(channels))
    if config.kind == "svd_temporal":
        return AutoencoderKLTemporalDecoder, arch
    return AutoencoderKL, dict(arch, up_block_types=("UpDecoderBlock2D",) * len(channels),
                               norm_num_groups=config.norm_num_groups, mid_block_add_attention=config.mid_attention)


def _diffusers_model(config: StageAConfig, load_weights: bool) -> nn.Module:
    """The diffusers autoencoder for ``config``: loaded from ``config.pretrained`` or built from the arch fields."""
    from diffusers.utils import logging as diffusers_logging

    cls, arch = _architecture(config)
    if not (load_weights and config.pretrained):
        return cls(**arch)
    source, subfolder = config.pretrained, config.subfolder
    kwargs = {}
    if _is_local(source):
        root = Path(source).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"Stage A VAE folder {root} not found (expected a diffusers model folder)")
        if subfolder and not (root / subfolder).is_dir() and (root / "config.json").is_file():
            subfolder = None                  # the folder is the VAE itself (e.g. from save_pretrained)
        source, kwargs = str(root), {"local_files_only": True}
    level = diffusers_logging.get_verbosity()
    if config.kind == "taesd":     # AutoencoderTiny saves block_out_channels itself, then warns that it is unexpected
        diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():     # diffusers still passes the hub an argument it has retired
            warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")
            model = cls.from_pretrained(source, subfolder=subfolder, variant=config.variant,
                                        torch_dtype=DTYPES[config.dtype], **kwargs)
    except (OSError, ValueError) as e:   # offline / missing files / bad repo id, incl. huggingface_hub errors
        where = f"{source!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        raise FileNotFoundError(
            f"cannot load the Stage A VAE ({cls.__name__}) from {where}: {first_line(e, typed=False, limit=200)} "
            f"-- give a local diffusers folder (stage_a.pretrained in a config; --stage-a or --vae on the command "
            f"line), or download it once online "
            f"(hf download {config.pretrained} --include '{subfolder or ''}*')") from None
    finally:
        diffusers_logging.set_verbosity(level)
    if type(model) is not cls:
        raise ValueError(f"{config.pretrained!r}: expected a {cls.__name__} for kind={config.kind!r}, "
                         f"got {type(model).__name__}")
    return model


# Spatial tiles are ours (``tiled_apply``) for every kind. diffusers' ``enable_tiling`` was measured on the tiny
# presets and is worse where it exists: AutoencoderKL at tile 256 / overlap 64, 384 px frames: decode max |tiled -
# untiled| 0.207 vs ours 0.107, encode cosine to untiled 0.923 vs 0.966 (its tile steps come from int() of float
# products, inexact for e.g. 136 / 40 px); AutoencoderTiny tiles every frame once on (a frame that fits one tile
# decodes 0.0105 off instead of bit for bit), is 2-5x further from untiled (0.049 vs 0.023 at 192 px, 96 / 48) and
# its tiled encode gives NaN below 16 px of overlap; AutoencoderKLTemporalDecoder has no tiling.


class StageAVAE(nn.Module):
    """Frozen Stage A VAE: (B, 3, T, H, W) in [-1, 1] <-> scaled latents (B, 4, T, H/8, W/8)."""

    def __init__(self, config: StageAConfig, model: nn.Module):
        super().__init__()
        self.config = config
        self.model = model.eval().requires_grad_(False)

    def _tiled(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grid: tuple[int, int],
               in_factor: int, out_factor: int, tile: tuple[int, int]) -> torch.Tensor:
        """``fn`` on frames x (n, C, h * in_factor, w * in_factor) in spatial tiles of ``tile`` px (0: whole)."""
        c = self.config
        margin = TILE_MARGIN[c.kind] if c.tile_margin is None else c.tile_margin
        return tiled_apply(fn, x, grid, (tile[0] // DOWNSAMPLE, tile[1] // DOWNSAMPLE), c.tile_overlap // DOWNSAMPLE,
                           in_factor, out_factor, margin * out_factor // DOWNSAMPLE)

    def _full_channels(self) -> int:
        """Channels of the autoencoder's full-resolution layers (what its peak memory scales with)."""
        cfg = self.model.config
        return min(cfg.get("decoder_block_out_channels") or cfg.block_out_channels)

    def plan(self, frames: int, height: int, width: int) -> tuple[tuple[int, int], int]:
        """((tile rows, tile columns) px, 0 = whole frames; frames per call) for ``frames`` frames of ``height`` x
        ``width`` px.

        Without ``max_memory``: the config's square ``tile_size``, all frames at once. With it: whole frames when the
        memory model (``MEMORY_FACTOR``) fits them in the budget, as many per call as fit (the temporal decoder needs
        all ``frames`` in one call); else, of the tiles (multiples of ``TILE_STEP``, or the whole height / width)
        that fit beside the blended output, the one that decodes the fewest pixels in all."""
        c = self.config
        if not c.max_memory:
            return (c.tile_size, c.tile_size), frames
        budget = c.max_memory * 2 ** 30
        per_pixel = MEMORY_FACTOR[c.kind] * self._full_channels() * self.dtype.itemsize     # bytes per pixel-frame
        independent = c.kind != "svd_temporal"
        fit = int(budget // (per_pixel * height * width))
        if fit >= frames or (independent and fit >= 1):
            return (0, 0), min(fit, frames)
        n = 1 if independent else frames
        room = budget - n * 3 * height * width * self.dtype.itemsize                      # the blended output
        smallest = c.tile_overlap + TILE_STEP

        def sizes(length):
            return sorted({length} | set(range(smallest, length, TILE_STEP)))
        best = None
        for th in sizes(height):
            for tw in sizes(width):
                if n * per_pixel * th * tw > room or (th, tw) == (height, width):
                    continue
                rows = spans(height // DOWNSAMPLE, th // DOWNSAMPLE, c.tile_overlap // DOWNSAMPLE)
                cols = spans(width // DOWNSAMPLE, tw // DOWNSAMPLE, c.tile_overlap // DOWNSAMPLE)
                cost = (len(rows) * th * len(cols) * tw, len(rows) * len(cols))    # pixels decoded, then tiles
                if best is None or cost < best[0]:
                    best = (cost, (th if len(rows) > 1 else 0, tw if len(cols) > 1 else 0))
        if best is None:                                                 # nothing fits: the smallest tile
            return (min(smallest, height), min(smallest, width)), n
        return best[1], n

    @classmethod
    def around(cls, vae: nn.Module, settings: dict | None = None) -> "StageAVAE":
        """A pipeline's Stage A: the loaded diffusers autoencoder ``vae`` (the same object, no copy of its weights)
        with the official preset's settings updated by ``settings`` (``stage_a_settings``' fields, as saved)."""
        kind = KIND_OF_CLASS.get(type(vae).__name__)
        if kind is None:
            raise ValueError(f"Stage A VAE {type(vae).__name__} is not supported (one of {', '.join(KIND_OF_CLASS)})")
        settings = {**stage_a_settings(PRESETS["official"]), **(settings or {})}
        return cls(StageAConfig(kind=kind, pretrained=None, subfolder=None,
                                latent_channels=vae.config.latent_channels, **settings), vae)

    @classmethod
    def from_config(cls, config: StageAConfig, load_weights: bool = True) -> "StageAVAE":
        """The one factory. ``load_weights=False`` (or ``pretrained=None``) builds the architecture from the
        config's fields with random weights: the tiny presets, or a meta-device build of the official one."""
        model = _diffusers_model(config, load_weights)
        if next(model.parameters()).dtype != DTYPES[config.dtype]:      # random init is float32
            model = model.to(DTYPES[config.dtype])
        return cls(config, model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the diffusers model (``config.json`` + ``diffusion_pytorch_model.safetensors``); load it back
        with ``StageAConfig(kind=..., pretrained=directory, subfolder=None)``."""
        self.model.save_pretrained(str(directory))

    # -- encode ------------------------------------------------------------------------------------

    def _encode_frames(self, x: torch.Tensor, sample: bool, generator: torch.Generator | None) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)          # the convolutions follow (1.4x on 2 CPU cores)
        if self.config.kind == "taesd":
            return self.model.encode(x).latents                       # deterministic: no posterior to sample
        posterior = self.model.encode(x).latent_dist                  # (n, 4, h, w) diagonal Gaussian
        return posterior.sample(generator) if sample else posterior.mode()

    @torch.no_grad()
    def encode(self, video: torch.Tensor, sample: bool | None = None,
               generator: torch.Generator | None = None, device: torch.device | None = None) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, 4, T, H/8, W/8) float32, times ``scale_factor``.

        ``sample=None`` follows ``config.sample_posterior`` (default: the posterior mode, deterministic).
        ``device``: where to run (default: the model's; a pipeline with offload hooks passes its execution device).
        """
        check_video(video, 3, DOWNSAMPLE, "StageAVAE.encode", pixels=True)
        c = self.config
        B, _, _, H, W = video.shape
        grid = (H // DOWNSAMPLE, W // DOWNSAMPLE)
        sample = c.sample_posterior if sample is None else sample
        frames = rearrange(video, "b c t h w -> (b t) c h w")
        tile, per_call = self.plan(c.encode_frame_batch, H, W)
        out = []
        for chunk in frames.split(per_call):
            chunk = chunk.to(device=device or self.device, dtype=self.dtype)
            z = self._tiled(lambda x: self._encode_frames(x, sample, generator), chunk, grid, DOWNSAMPLE, 1, tile)
            out.append(z.float())
        latents = rearrange(torch.cat(out), "(b t) c h w -> b c t h w", b=B)
        return latents * c.scale_factor

    # -- decode ------------------------------------------------------------------------------------

    def _decode_frames(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """(n, 4, h, w) unscaled latents, n = videos x num_frames in "(b t)" order -> (n, 3, 8h, 8w)."""
        z = z.contiguous(memory_format=torch.channels_last)          # the convolutions follow (1.4x on 2 CPU cores)
        if self.config.kind == "svd_temporal":
            return self.model.decode(z, num_frames=num_frames).sample
        return self.model.decode(z).sample

    @property
    def latent_channels(self) -> int:
        """Channels of the latent, as the loaded (or built) autoencoder has them."""
        return self.model.config.latent_channels

    def decode_window(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, T, h, w) scaled latents -> (B, 3, T, 8h, 8w) in one pass, with gradients: for losses on decoded
        pixels of a training window (``decode`` chunks, tiles and blends, under no_grad)."""
        z = latents.to(self.dtype) / self.config.scale_factor
        frames = self._decode_frames(rearrange(z, "b c t h w -> (b t) c h w"), num_frames=latents.shape[2])
        return rearrange(frames.float(), "(b t) c h w -> b c t h w", b=latents.shape[0])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, progress: bool = False, device: torch.device | None = None) -> torch.Tensor:
        """(B, C, T, h, w) scaled latents, C = ``latent_channels`` (4 for SVD) -> (B, 3, T, 8h, 8w) float32 in
        about [-1, 1] (not clamped).

        Frames go through the decoder ``chunk_frames`` at a time and in spatial tiles of ``tile_size`` px;
        ``progress`` shows a bar over the chunks. ``device``: where to run (default: the model's; a pipeline with
        offload hooks passes its execution device, and diffusers' hook on ``decode`` brings the weights there).
        """
        return torch.cat(list(self.decode_pieces(latents, progress, device)), dim=2)

    @torch.no_grad()
    def decode_pieces(self, latents: torch.Tensor, progress: bool = False,
                      device: torch.device | None = None) -> Iterator[torch.Tensor]:
        """``decode`` in pieces (B, 3, t, 8h, 8w), in frame order, each yielded as soon as every chunk covering it
        is decoded: only one chunk and its overlap with the next are held, whatever the clip's length."""
        check_video(latents, self.latent_channels, 1, "StageAVAE.decode")
        c = self.config
        B, _, T, h, w = latents.shape
        z = latents.to(device=device or self.device, dtype=torch.float32) / c.scale_factor
        windows = tuple(spans(T, c.chunk_frames, c.chunk_overlap))
        tile, per_call = self.plan(B * (windows[0][1] - windows[0][0]), DOWNSAMPLE * h, DOWNSAMPLE * w)
        pending = None      # weighted sums of the frames this chunk shares with the next ones
        for index, (t0, t1) in enumerate(progress_bar(windows, desc="Stage A decode", disable=not progress)):
            frames = rearrange(z[:, :, t0:t1], "b c t h w -> (b t) c h w").to(self.dtype)
            # frame-independent kinds may go through in fewer frames per call; the temporal decoder's plan keeps all
            parts = frames.split(per_call)

            def decode(part):
                return self._tiled(lambda x: self._decode_frames(x, num_frames=t1 - t0), part, (h, w), 1, DOWNSAMPLE,
                                   tile).float()
            if len(windows) == 1 and B == 1:   # nothing to blend: each call's frames are final (one 2K frame on a CPU)
                yield from (rearrange(decode(part), "t c h w -> 1 c t h w") for part in parts)
                return
            decoded = rearrange(torch.cat([decode(part) for part in parts]), "(b t) c h w -> b c t h w", b=B)
            if len(windows) == 1:
                yield decoded
                return
            weighted = decoded.mul_(_ramps(windows, 1, decoded.device)[index].view(1, 1, -1, 1, 1))
            if pending is not None:
                weighted[:, :, :pending.shape[2]] += pending
            final = (windows[index + 1][0] if index + 1 < len(windows) else t1) - t0   # frames no later chunk touches
            pending = weighted[:, :, final:].clone()
            total = _ramp_total(windows, 1, decoded.device)[t0:t0 + final]
            yield weighted[:, :, :final].div_(total.view(1, 1, -1, 1, 1))
            del weighted, decoded


def build_stage_a(preset: str = "official", load_weights: bool = True, **overrides) -> StageAVAE:
    """A preset name plus field overrides, e.g. ``build_stage_a("tiny", tile_size=128)``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown Stage A preset {preset!r}; choose from {sorted(PRESETS)}")
    return StageAVAE.from_config(dataclasses.replace(PRESETS[preset], **overrides), load_weights=load_weights)
