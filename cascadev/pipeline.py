"""The LDM-VAE pipeline: video <-> semantic latents (f32, 16 ch) through the cascade.

``encode``: frames -> semantic encoder -> (B, 16, T, H/32, W/32).
``decode``: semantic latents -> upsampled x4 and scaled condition -> DiT sampling of Stage A latents
(B, 4, T, H/8, W/8) -> Stage A decode -> video (B, 3, T, H, W) in [-1, 1].
``preview``: the no-LDM baseline, the Previewer (x8) then bilinear x4 to full size.
``decode(..., colour_fix=f)``: the cascade's detail above the band of f x f pixel blocks over the Previewer's band
below it (``fix_colour``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file

from cascadev.conditioning import semantic_small, upsample_condition
from cascadev.config import from_dict, to_dict
from cascadev.sampling import Tiling, sample
from cascadev.weights import atomic_write
from dit.video_dit import VideoDiT
from vae.previewer import Previewer
from vae.semantic_encoder import SemanticEncoder, check_video, resolve_official_file
from vae.stage_a import PRESETS as STAGE_A_PRESETS
from vae.stage_a import KIND_OF_CLASS, StageAConfig, StageAVAE

SEMANTIC_DOWNSAMPLE = 32        # Stage B latent: f32
COND_UPSAMPLE = 4               # semantic latent grid -> Stage A latent grid (f32 -> f8)
SEMANTIC_CHANNELS = 16
DIT_REPO, DIT_FILE = "ByteDance/CascadeV", "s1024.effn-f32.pth"
STABLE_CASCADE_REPO = "stabilityai/StableWurst"   # effnet_encoder / previewer, as the release downloads them
PIPELINE_FILE = "pipeline.json"


def timed(timings: dict[str, float], phase: str, device: torch.device, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run ``fn`` and add its wall time (synchronised on CUDA) to ``timings[phase]``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start
    return out


def seeded_noise(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Gaussian noise (B, C, T, H, W) drawn in the release's frames-first order (T, C, H, W) per video,
    so a seed gives the released code's noise."""
    B, C, T, H, W = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(B, T, C, H, W, generator=g)
    return rearrange(noise, "b t c h w -> b c t h w").to(device)


def round_size(height: int, width: int, long_side: int | None = None, multiple: int = SEMANTIC_DOWNSAMPLE) -> tuple[int, int]:
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


def low_band(video: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, 3, T, H, W) -> the same size, holding only the band of ``factor`` x ``factor`` pixel blocks:
    antialiased bilinear down by ``factor``, bilinear back up."""
    H, W = video.shape[-2:]
    if factor < 1 or H % factor or W % factor:
        raise ValueError(f"colour fix: frames {H}x{W} are not divisible by its factor {factor}")
    return resize_video(resize_video(video, (H // factor, W // factor)), (H, W))


def fix_colour(video: torch.Tensor, reference: torch.Tensor, factor: int) -> torch.Tensor:
    """``video``'s detail above the ``factor`` band on ``reference``'s band below it, both (B, 3, T, H, W).

    StableSR's wavelet colour fix (Wang et al. 2023), with the Previewer's decoding of the same
    semantic latents as the low-resolution reference: a diffusion decoder's samples drift in colour and
    brightness over whole regions, the regression-trained Previewer does not."""
    return (video - low_band(video, factor) + low_band(reference, factor)).clamp(-1, 1)


# -- latents files -------------------------------------------------------------------------------

def save_latents(path: str | Path, latents: torch.Tensor, **metadata: str) -> None:
    """Write (B, C, T, h, w) latents as safetensors (key ``latents``), atomically."""
    tensors = {"latents": latents.detach().float().contiguous().cpu()}
    meta = {"layout": "B C T H W", **{k: str(v) for k, v in metadata.items()}}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_latents(path: str | Path, channels: int = SEMANTIC_CHANNELS) -> torch.Tensor:
    """Read latents saved by us or anyone: .safetensors (key ``latents`` or a single tensor) or .pt
    (a tensor or a dict with ``latents``); (C, T, h, w) or (B, C, T, h, w). Returns (B, C, T, h, w) float32."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: latents file not found")
    try:
        if path.suffix == ".safetensors":
            blob = load_file(str(path))
        elif path.suffix in (".pt", ".pth"):
            blob = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"{path}: latents must be a .safetensors or .pt file")
    except ValueError:
        raise
    except Exception as e:  # corrupt file: one line, not a pickle traceback
        raise ValueError(f"{path}: cannot read latents ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if isinstance(blob, dict):
        if "latents" in blob:
            blob = blob["latents"]
        elif len(blob) == 1:
            blob = next(iter(blob.values()))
        else:
            raise ValueError(f"{path}: expected one tensor or a 'latents' entry, found keys {sorted(blob)}")
    if not isinstance(blob, torch.Tensor):
        raise ValueError(f"{path}: expected a tensor, found {type(blob).__name__}")
    z = blob.float()
    if z.ndim == 4:
        z = z[None]
    if z.ndim != 5 or z.shape[1] != channels:
        hint = " (is T before C? expected B C T H W)" if z.ndim == 5 and z.shape[2] == channels else ""
        raise ValueError(f"{path}: expected latents ({channels}, T, h, w) or (B, {channels}, T, h, w), "
                         f"got {tuple(blob.shape)}{hint}")
    if not torch.isfinite(z).all():
        raise ValueError(f"{path}: latents contain NaN or inf values")
    return z


# -- loading the parts -----------------------------------------------------------------------------

def _is_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not Path(source).exists() and not source.startswith((".", "/", "~"))


def load_dit(source: str | Path | None) -> VideoDiT:
    """Our directory (config.json + weights), the released .pth, a folder holding it, or a hub id."""
    if source is None or _is_hub_id(str(source)):
        return VideoDiT.from_single_file(resolve_official_file(None, DIT_FILE, str(source or DIT_REPO)))
    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file():
        return VideoDiT.from_folder(path)
    return VideoDiT.from_single_file(resolve_official_file(path, DIT_FILE, DIT_REPO))


def _load_released_or_ours(cls, source: str | Path | None, filename: str):
    """Previewer / SemanticEncoder: our directory, the released safetensors (file, folder or hub id)."""
    if source is None or _is_hub_id(str(source)):
        return cls.from_single_file(resolve_official_file(None, filename, str(source or STABLE_CASCADE_REPO)))
    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file():
        return cls.from_folder(path)
    return cls.from_single_file(path)


def resolve_stage_a_config(source: str | Path | None, config: StageAConfig | None) -> StageAConfig:
    """The Stage A config for ``source``: a diffusers folder (kind read from its config) or hub id."""
    base = config or STAGE_A_PRESETS["official"]
    if source is None:
        return base
    path = Path(source)
    if path.is_dir():
        cfg_file = path / "config.json" if (path / "config.json").is_file() else path / "vae" / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path}: no diffusers VAE config.json (expected a folder written by save_pretrained)")
        name = json.loads(cfg_file.read_text()).get("_class_name")
        kind = KIND_OF_CLASS.get(name)
        if kind is None:
            raise ValueError(f"{cfg_file}: {name!r} is not a supported Stage A VAE (one of {', '.join(KIND_OF_CLASS)})")
        subfolder = None if cfg_file.parent == path else "vae"
        return StageAConfig(**{**to_dict(base), "kind": kind, "pretrained": str(path), "subfolder": subfolder,
                               "block_out_channels": tuple(base.block_out_channels)})
    return StageAConfig(**{**to_dict(base), "pretrained": str(source), "block_out_channels": tuple(base.block_out_channels)})


class CascadeVPipeline:
    """Semantic encoder + DiT + Stage A VAE (+ Previewer baseline). Videos are (B, 3, T, H, W) in [-1, 1]."""

    def __init__(self, dit: VideoDiT, semantic_encoder: SemanticEncoder, stage_a: StageAVAE,
                 previewer: Previewer | None = None, device: str | torch.device | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dit = dit.eval().requires_grad_(False).to(self.device)
        self.semantic_encoder = semantic_encoder.eval().requires_grad_(False).to(self.device)
        self.stage_a = stage_a.eval().requires_grad_(False).to(self.device)
        self.previewer = previewer.eval().requires_grad_(False).to(self.device) if previewer is not None else None
        self.timings: dict[str, float] = {}
        if dit.config.latent_channels != self.stage_a.latent_channels:
            raise ValueError(f"the DiT makes {dit.config.latent_channels}-channel latents but the Stage A VAE decodes "
                             f"{self.stage_a.latent_channels}")

    @property
    def scale_factor(self) -> float:
        """Stage A's latent scale; the semantic condition is multiplied by the same factor (as released)."""
        return self.stage_a.config.scale_factor

    @property
    def pixel_multiple(self) -> int:
        return SEMANTIC_DOWNSAMPLE

    @classmethod
    def from_pretrained(cls, root: str | Path | None = None, *, dit=None, semantic_encoder=None, previewer=None,
                        stage_a=None, stage_a_config: StageAConfig | None = None,
                        device: str | torch.device | None = None, load_previewer: bool = True) -> "CascadeVPipeline":
        """Load the four parts. ``root``: a folder written by ``save_pretrained`` (dit/, semantic_encoder/,
        previewer/, stage_a/) or holding the released files (s1024.effn-f32.pth, effnet_encoder.safetensors,
        previewer.safetensors). Each part can be given on its own as a path or hub id; what is not given
        comes from the hub (ByteDance/CascadeV, stabilityai/StableWurst, the SVD VAE) with a clear error offline.
        """
        if root is not None:
            root = Path(root)
            if not root.is_dir():
                raise FileNotFoundError(f"{root}: weights folder not found")
            if (root / PIPELINE_FILE).is_file():
                meta = json.loads((root / PIPELINE_FILE).read_text())
                stage_a_config = stage_a_config or from_dict(StageAConfig, meta["stage_a"])

            def pick(given, *names):
                if given is not None:
                    return given
                found = [root / n for n in names if (root / n).exists()]
                return found[0] if found else None
            dit = pick(dit, "dit", DIT_FILE)
            semantic_encoder = pick(semantic_encoder, "semantic_encoder", "effnet_encoder.safetensors")
            previewer = pick(previewer, "previewer", "previewer.safetensors")
            stage_a = pick(stage_a, "stage_a")
        stage_a_model = StageAVAE.from_config(resolve_stage_a_config(stage_a, stage_a_config))
        return cls(
            dit=load_dit(dit),
            semantic_encoder=_load_released_or_ours(SemanticEncoder, semantic_encoder, "effnet_encoder.safetensors"),
            stage_a=stage_a_model,
            previewer=_load_released_or_ours(Previewer, previewer, "previewer.safetensors") if load_previewer else None,
            device=device,
        )

    def save_pretrained(self, root: str | Path) -> None:
        """Write every part in our format: root/{dit,semantic_encoder,previewer,stage_a} + pipeline.json."""
        root = Path(root)
        self.dit.save_pretrained(root / "dit")
        self.semantic_encoder.save_pretrained(root / "semantic_encoder")
        if self.previewer is not None:
            self.previewer.save_pretrained(root / "previewer")
        self.stage_a.save_pretrained(root / "stage_a")
        meta = {"stage_a": {**to_dict(self.stage_a.config), "pretrained": None, "subfolder": None}}
        text = json.dumps(meta, indent=2)
        atomic_write(root / PIPELINE_FILE, lambda tmp: Path(tmp).write_text(text))

    def _timed(self, phase: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        return timed(self.timings, phase, self.device, fn)

    # -- the cascade ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1], H and W multiples of 32 -> semantic latents (B, 16, T, H/32, W/32)."""
        check_video(video, 3, SEMANTIC_DOWNSAMPLE, "CascadeVPipeline.encode")
        return self._timed("encode", lambda: self.semantic_encoder.encode(video.to(self.device), progress))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, steps: int = 8, seed: int = 0, scheduler: str = "euler_a",
                       tiling: str | Tiling = "blend", progress: bool = True,
                       scheduler_config: dict | None = None) -> torch.Tensor:
        """Semantic latents (B, 16, T, h, w) -> Stage A latents (B, 4, T, 4h, 4w), scaled.
        ``scheduler_config`` overrides the scheduler's defaults (e.g. ``{"shift": 3.0}`` for flow)."""
        check_video(latents, self.dit.config.cond_channels, 1, "CascadeVPipeline.decode")
        T, h, w = latents.shape[2:]
        small = semantic_small(latents.to(self.device).float(), self.scale_factor)   # as the DiT was trained
        cond = upsample_condition(small, (T, COND_UPSAMPLE * h, COND_UPSAMPLE * w))
        B, _, T, H, W = cond.shape
        noise = seeded_noise((B, self.dit.config.latent_channels, T, H, W), seed, self.device)
        dtype = next(self.dit.parameters()).dtype
        generator = torch.Generator(device=self.device).manual_seed(seed + 1)  # ancestral steps
        return self._timed("dit", lambda: sample(self.dit, cond.to(dtype), noise.to(dtype), scheduler, steps, tiling,
                                                 generator=generator, scheduler_config=scheduler_config,
                                                 progress=progress).float())

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, steps: int = 8, seed: int = 0, scheduler: str = "euler_a",
               tiling: str | Tiling = "blend", progress: bool = True,
               scheduler_config: dict | None = None, colour_fix: int | None = None) -> torch.Tensor:
        """Semantic latents (B, 16, T, h, w) -> video (B, 3, T, 32h, 32w) in [-1, 1].

        ``colour_fix=f`` takes the band of f x f pixel blocks and below from the Previewer (``fix_colour``)."""
        if colour_fix is not None and self.previewer is None:
            raise ValueError("colour_fix needs the Previewer: load the pipeline with one")
        z = self.decode_latents(latents, steps, seed, scheduler, tiling, progress, scheduler_config)
        video = self._timed("stage_a", lambda: self.stage_a.decode(z, progress)).clamp(-1, 1)
        if colour_fix is None:
            return video
        return fix_colour(video, self.preview(latents), colour_fix)

    @torch.no_grad()
    def reconstruct(self, video: torch.Tensor, **decode_kwargs) -> torch.Tensor:
        """Encode then decode: (B, 3, T, H, W) -> (B, 3, T, H, W)."""
        return self.decode(self.encode(video), **decode_kwargs)

    @torch.no_grad()
    def preview(self, latents: torch.Tensor, full_size: bool = True) -> torch.Tensor:
        """The no-LDM baseline: Previewer (x8), then bilinear x4 to the cascade's size when ``full_size``."""
        if self.previewer is None:
            raise ValueError("this pipeline was loaded without a Previewer")
        video = self._timed("preview", lambda: self.previewer.decode(latents.to(self.device)))
        if full_size:
            h, w = latents.shape[-2:]
            video = resize_video(video, (h * SEMANTIC_DOWNSAMPLE, w * SEMANTIC_DOWNSAMPLE)).clamp(-1, 1)
        return video


def saved_settings(weights: str | Path | None) -> dict:
    """What a cascade folder says about its use (``pipeline.json``'s "demo" entry: sampler, clip kind and size),
    or {}: the released weights carry none."""
    path = Path(weights) / "pipeline.json" if weights else None
    return json.loads(path.read_text()).get("demo", {}) if path is not None and path.is_file() else {}


def resolve_sampler(weights: str | Path | None, steps: int | None, scheduler: str | None) -> dict:
    """``steps``, ``scheduler`` and ``scheduler_config`` for ``decode``: the ones given, else the folder's saved
    sampler (the tiny cascade is a flow model), else the release's (8 steps, ancestral Euler)."""
    settings = saved_settings(weights)
    scheduler = scheduler or settings.get("scheduler", "euler_a")
    # e.g. the flow shift the DiT was trained at; it belongs to the saved scheduler only
    config = settings.get("scheduler_config") if scheduler == settings.get("scheduler") else None
    return {"steps": steps or settings.get("steps", 8), "scheduler": scheduler, "scheduler_config": config}


def resolve_colour_fix(weights: str | Path | None, given: int | None) -> int | None:
    """The ``colour_fix`` factor for ``decode``: the one given (0: off), else the folder's saved one, else off."""
    if given is not None and given < 0:
        raise ValueError(f"colour fix factor must be >= 0 (0: off), got {given}")
    factor = saved_settings(weights).get("colour_fix") if given is None else given
    return factor or None


def infer_size(height: int, width: int, size: str | None, multiple: int = SEMANTIC_DOWNSAMPLE) -> tuple[int, int]:
    """Parse ``--size``: None (keep), "N" (long side N, aspect kept) or "WxH"; rounded to ``multiple``."""
    if size is None:
        return round_size(height, width, None, multiple)
    if "x" in size.lower():
        w, h = (int(v) for v in size.lower().split("x"))
        return round_size(h, w, None, multiple)
    return round_size(height, width, int(size), multiple)
