"""The LDM-VAE pipeline: video <-> semantic latents (f32, 16 ch) through the cascade, a diffusers ``DiffusionPipeline``.

``encode``: frames -> semantic encoder -> (B, 16, T, H/32, W/32).
``decode``: semantic latents -> upsampled x4 and scaled condition -> DiT sampling of Stage A latents
(B, 4, T, H/8, W/8) -> Stage A decode -> video (B, 3, T, H, W) in [-1, 1].
``preview``: the no-LDM baseline, the Previewer (x8) then bilinear x4 to full size.
``decode(..., colour_fix=f)``: the cascade's detail above the band of f x f pixel blocks over the Previewer's band
below it (``fix_colour``).
``__call__``: the same in diffusers' vocabulary (``num_inference_steps``, ``generator``, ``output_type``,
``callback_on_step_end``, an output dataclass).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.video_processor import VideoProcessor
from diffusers.utils.torch_utils import randn_tensor
from einops import rearrange

from cascadev.checks import check_video
from cascadev.config import from_dict, to_dict
from cascadev.errors import first_line
from cascadev.pipelines.conditioning import semantic_small, upsample_condition
from cascadev.pipelines.sampling import build_saved_scheduler, make_scheduler, sample, set_steps
from cascadev.pipelines.tiling import TILE_DETAILS, Tiling
from cascadev.progress import bar_settings
from cascadev.pipelines.runtime import DecoderRuntimeMixin
from cascadev.pipelines.frames import SEMANTIC_DOWNSAMPLE, check_colour_fix, fix_colour, resize_video
from cascadev.weights import is_hub_id, read_json_object
from dit.video_dit import VideoDiT
from vae.previewer import Previewer
from vae.semantic_encoder import SemanticEncoder, resolve_official_file
from vae.stage_a import PRESETS as STAGE_A_PRESETS
from vae.stage_a import KIND_OF_CLASS, StageAConfig, StageAVAE, stage_a_settings

COND_UPSAMPLE = 4               # semantic latent grid -> Stage A latent grid (f32 -> f8)
RELEASE_STEPS = 8               # the release's recon: 8 Euler-ancestral steps
DIT_REPO, DIT_FILE = "ByteDance/CascadeV", "s1024.effn-f32.pth"
STABLE_CASCADE_REPO = "stabilityai/StableWurst"   # effnet_encoder / previewer, as the release downloads them
ENCODER_FILE, PREVIEWER_FILE = "effnet_encoder.safetensors", "previewer.safetensors"
LEGACY_PIPELINE_FILE = "pipeline.json"   # cascades saved by cascadev < 0.2
ASSETS = Path(__file__).resolve().parents[1] / "assets"
TINY_CASCADE = ASSETS / "tiny_cascade"          # the built-in tiny cascade (scripts/build_demo_cascade.py)
TINY_DISTILLED = ASSETS / "tiny_distilled"      # its 2-step distilled decoder, sharing its other parts
# a cascade folder that takes some parts from another folder names them here, {part: path relative to the folder}
# (as tiny_fps4x's ``vae_source``): ``CascadeVPipeline.from_pretrained`` loads them from there
SHARED_PARTS_FILE = "shared_parts.json"


def seeded_noise(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Gaussian noise (B, C, T, H, W) drawn on a CPU generator in the release's frames-first order (T, C, H, W) per
    video: the same on every device. (The release drew from the global CUDA generator: pass a CUDA ``generator``
    to ``decode`` for its stream.)"""
    B, C, T, H, W = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(B, T, C, H, W, generator=g)
    return rearrange(noise, "b t c h w -> b c t h w").to(device)


def initial_noise(shape: tuple[int, ...], seed: int | None, generator: torch.Generator | None,
                  device: torch.device | str) -> tuple[torch.Tensor, torch.Generator]:
    """The sampler's starting noise (B, C, T, H, W), frames first as the release drew it, and the generator of its
    ancestral steps: from ``seed`` (``seeded_noise``; the steps from ``seed + 1``), or both from one ``generator``
    (the release's global generator: a CUDA one gives its stream)."""
    if generator is None:
        return seeded_noise(shape, seed, device), torch.Generator(device=device).manual_seed(seed + 1)
    B, C, T, H, W = shape
    noise = randn_tensor((B, T, C, H, W), generator=generator, device=torch.device(device))
    return rearrange(noise, "b t c h w -> b c t h w"), generator


def format_frames(frames: torch.Tensor, output_type: str):
    """Video (B, 3, T, H, W) in [-1, 1] as diffusers' ``output_type`` gives it: "pt" as is, "np" (B, T, H, W, 3) in
    [0, 1], "pil" lists of images."""
    if output_type == "pt":
        return frames
    return VideoProcessor(do_resize=False).postprocess_video(frames, output_type=output_type)


@dataclass(frozen=True)
class DecodeOptions:
    """How ``CascadeVPipeline`` decodes semantic latents (B, 16, T, h, w): one value for every decode method.

    ``steps`` and ``scheduler`` (a short name or a diffusers scheduler) default to the folder's saved sampler; a named
    one of the saved class keeps its saved config, ``scheduler_config`` overrides it (e.g. ``{"shift": 3.0}``).
    Noise: ``seed`` draws it frames first, as the release did, on a CPU generator (ancestral steps from ``seed + 1``);
    a ``generator`` replaces both with one stream, as the release's global generator
    (``torch.Generator("cuda").manual_seed(42)`` on a GPU is the released code's). ``tiling``: how windows and tiles
    cover a large clip (``tiling.Tiling``; its ``detail`` defaults to the folder's ``tile_detail``).
    ``colour_fix=f`` takes the band of f x f pixel blocks and below from the Previewer (``fix_colour``; 0: off;
    None: the folder's setting where the Previewer is loaded).
    ``window_batch``: DiT windows/tiles per forward (faster on a GPU, same result within rounding).
    ``distributed``: under ``accelerate launch``, every rank decodes the same latents and each step's windows/tiles
    are split across the ranks (``sampling.predict_noise``). ``callback(i, t, latents)`` runs after each DiT step and
    may return replacement latents (B, 4, T, H/8, W/8). Progress bars are the pipeline's (``set_progress_bar_config``).
    """

    steps: int | None = None
    scheduler: str | SchedulerMixin | None = None
    scheduler_config: dict | None = None
    seed: int | None = 0
    generator: torch.Generator | None = None
    tiling: str | Tiling = "blend"
    colour_fix: int | None = None
    window_batch: int = 1
    distributed: bool = False
    callback: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None


# -- loading the parts -----------------------------------------------------------------------------

def _load_model(cls, source: str | Path | None, filename: str, repo: str, torch_dtype: torch.dtype | None):
    """One model of the cascade from: a folder we wrote (diffusers' layout, or the previous one with
    ``model.safetensors``), the released file, a folder holding it, or a hub id (None: the release's repo)."""
    if source is None or is_hub_id(str(source)):
        model = cls.from_single_file(resolve_official_file(None, filename, str(source or repo)))
    else:
        path = Path(source)
        if path.is_dir() and (path / "config.json").is_file():
            model = cls.from_folder(path)          # diffusers' layout or the previous one (model.safetensors)
        else:
            model = cls.from_single_file(resolve_official_file(path, filename, repo))
    return model if torch_dtype is None else model.to(torch_dtype)


def load_dit(source: str | Path | None, torch_dtype: torch.dtype | None = None) -> VideoDiT:
    """The DiT: our folder, the released .pth, a folder holding it, or a hub id (None: ByteDance/CascadeV)."""
    return _load_model(VideoDiT, source, DIT_FILE, DIT_REPO, torch_dtype)


def load_semantic_encoder(source: str | Path | None, torch_dtype: torch.dtype | None = None) -> SemanticEncoder:
    return _load_model(SemanticEncoder, source, ENCODER_FILE, STABLE_CASCADE_REPO, torch_dtype)


def load_previewer(source: str | Path | None, torch_dtype: torch.dtype | None = None) -> Previewer:
    return _load_model(Previewer, source, PREVIEWER_FILE, STABLE_CASCADE_REPO, torch_dtype)


def load_vae(source: str | Path | None, torch_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Stage A: a diffusers autoencoder folder or hub id (None: the SVD VAE, as released)."""
    vae = StageAVAE.from_config(resolve_stage_a_config(source, None)).model
    return vae if torch_dtype is None else vae.to(torch_dtype)


def resolve_stage_a_config(source: str | Path | None, config: StageAConfig | None) -> StageAConfig:
    """The Stage A config for ``source``: a diffusers folder (kind read from its config) or hub id."""
    base = config or STAGE_A_PRESETS["official"]
    if source is None:
        return base
    path = Path(source)
    if path.is_dir():
        cfg_file = path / "config.json" if (path / "config.json").is_file() else path / "vae" / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path}: no diffusers VAE config.json "
                                    "(expected a folder written by save_pretrained)")
        name = read_json_object(cfg_file, "a diffusers VAE config").get("_class_name")
        kind = KIND_OF_CLASS.get(name)
        if kind is None:
            raise ValueError(f"{cfg_file}: {name!r} is not a supported Stage A VAE (one of {', '.join(KIND_OF_CLASS)})")
        subfolder = None if cfg_file.parent == path else "vae"
        return StageAConfig(**{**to_dict(base), "kind": kind, "pretrained": str(path), "subfolder": subfolder,
                               "block_out_channels": tuple(base.block_out_channels)})
    return StageAConfig(**{**to_dict(base), "pretrained": str(source),
                           "block_out_channels": tuple(base.block_out_channels)})


def load_shared_parts(folder: str | Path, given: dict, torch_dtype: torch.dtype | None = None) -> dict:
    """The parts a local cascade folder takes from another (``SHARED_PARTS_FILE``), loaded, except those ``given``:
    {part: module}. Empty for a folder that holds all its parts."""
    file = Path(folder) / SHARED_PARTS_FILE
    if not file.is_file():
        return {}
    loaders = {"semantic_encoder": load_semantic_encoder, "previewer": load_previewer, "vae": load_vae, "dit": load_dit}
    shared = json.loads(file.read_text())
    unknown = sorted(set(shared) - set(loaders))
    if unknown:
        raise ValueError(f"{file}: cannot share {', '.join(unknown)} (only {', '.join(loaders)})")
    parts = {}
    for name, relative in shared.items():
        if name in given:
            continue
        source = (Path(folder) / relative).resolve()
        if not source.is_dir():
            raise FileNotFoundError(f"{file}: its {name} is {relative}, and {source} is not there")
        parts[name] = loaders[name](source, torch_dtype)
    return parts


def read_pipeline_index(folder: str | Path) -> dict:
    """A saved pipeline folder's ``model_index.json`` (empty if it has none); one line naming it if it is not a JSON
    object."""
    index = Path(folder) / "model_index.json"
    return read_json_object(index, "a pipeline's model_index.json") if index.is_file() else {}


def check_cascade_settings(folder: str | Path) -> None:
    """The settings a cascade folder's ``model_index.json`` registers, checked before anything loads."""
    index = read_pipeline_index(folder)
    steps, colour_fix = index.get("num_inference_steps"), index.get("colour_fix")
    problems = [f"{key} is {index[key]!r}, expected a mapping" for key in ("stage_a", "demo")
                if index.get(key) is not None and not isinstance(index[key], dict)]
    if steps is not None and (type(steps) is not int or steps < 1):
        problems.append(f"num_inference_steps is {steps!r}, expected a step count >= 1")
    if colour_fix is not None and (type(colour_fix) is not int or colour_fix < 0):
        problems.append(f"colour_fix is {colour_fix!r}, expected a block size >= 0 (0: off) or null")
    if isinstance(index.get("stage_a"), dict) and not problems:
        try:               # typed as StageAVAE.around reads them: a word for a number fails here, not in a decode
            from_dict(StageAConfig, {**to_dict(STAGE_A_PRESETS["official"]), **index["stage_a"]})
        except ValueError as e:
            problems.append(f"stage_a: {first_line(e)}")
    if problems:
        raise ValueError(f"{Path(folder) / 'model_index.json'}: {problems[0]}")


def load_saved_scheduler(folder: Path) -> SchedulerMixin | None:
    """The sampler a cascade folder saved (a diffusers class, as its ``model_index.json`` names it), checked
    (``build_saved_scheduler``). None where the index names none of diffusers' schedulers (diffusers' loader then
    says what is wrong)."""
    import diffusers

    entry = read_pipeline_index(folder).get("scheduler")
    library, name = entry if isinstance(entry, list) and len(entry) == 2 else (None, None)
    cls = getattr(diffusers, name, None) if library == "diffusers" and isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        return None
    return build_saved_scheduler(cls, folder / "scheduler")


def check_pipeline_class(folder: str | Path, expected: type) -> None:
    """Refuse, in one line naming the command that fits, a saved pipeline folder of another class than ``expected``."""
    name = read_pipeline_index(folder).get("_class_name")
    if name is not None and name != expected.__name__:
        fits = PIPELINE_COMMANDS.get(name, "its own loader")
        raise ValueError(f"{folder} holds a {name}, not a {expected.__name__}: use it with {fits}")


PIPELINE_COMMANDS = {"CascadeVPipeline": "cascadev reconstruct / decode / demo (--weights)",
                     "CascadeVUpscalePipeline": "cascadev upscale (the resize route)",
                     "TextToVideoPipeline": "cascadev generate (--weights)"}


def is_legacy_cascade(folder: str | Path) -> bool:
    """A cascade saved by cascadev < 0.2 (``pipeline.json``, ``stage_a/``, ``model.safetensors`` per part)."""
    folder = Path(folder)
    return (folder / LEGACY_PIPELINE_FILE).is_file() and not (folder / "model_index.json").is_file()


def load_cascade(weights: str | Path | None = None, *, dit=None, semantic_encoder=None, previewer=None, vae=None,
                 with_previewer: bool | None = None, torch_dtype: torch.dtype | None = None) -> "CascadeVPipeline":
    """The cascade as the CLI finds it: ``weights`` is a folder or hub id written by ``save_pretrained``, a folder
    holding the released files, or None (the released files from the hub); ``dit``, ``semantic_encoder``,
    ``previewer``, ``vae`` replace one part each (a path or hub id, as ``load_dit`` etc. take them).
    ``with_previewer``: load the Previewer (None: only when the saved ``colour_fix`` needs it as its reference)."""
    if weights is not None and is_legacy_cascade(weights):
        raise FileNotFoundError(f"{weights} is a cascade in the previous format (pipeline.json, model.safetensors); "
                                f"convert it once with: cascadev convert {weights} NEW_FOLDER")
    ours = weights is not None and ((Path(weights) / "model_index.json").is_file() or is_hub_id(str(weights)))
    if ours and not is_hub_id(str(weights)):
        check_pipeline_class(weights, CascadeVPipeline)
        check_cascade_settings(weights)
    try:
        saved = CascadeVPipeline.load_config(str(weights)) if ours else {}
        if with_previewer is None:
            with_previewer = bool(saved.get("colour_fix"))
        parts = {name: load(source, torch_dtype) for name, load, source in (
            ("dit", load_dit, dit), ("semantic_encoder", load_semantic_encoder, semantic_encoder),
            ("previewer", load_previewer, previewer), ("vae", load_vae, vae)) if source is not None}
        if not with_previewer:
            parts["previewer"] = None
        if ours:
            return CascadeVPipeline.from_pretrained(str(weights), torch_dtype=torch_dtype, **parts)
    except OSError as e:   # offline, or no such repo / file: one line, with what to do
        raise FileNotFoundError(f"cannot load the cascade {weights!r}: "
                                f"{first_line(e, typed=False, limit=200)}") from None
    return CascadeVPipeline.from_release(weights, torch_dtype=torch_dtype, **parts)


# -- the pipeline ----------------------------------------------------------------------------------

@dataclass
class CascadeVPipelineOutput(BaseOutput):
    """``frames``: (B, 3, T, H, W) in [-1, 1] for ``output_type="pt"``; (B, T, H, W, 3) in [0, 1] for "np";
    a list of B lists of T PIL images for "pil"; Stage A latents (B, 4, T, H/8, W/8) for "latent"."""

    frames: torch.Tensor | np.ndarray | list


class CascadeVPipeline(DecoderRuntimeMixin, DiffusionPipeline):
    """The LDM-VAE cascade: semantic encoder + DiT + Stage A VAE (+ the Previewer baseline) and the sampler the
    DiT was trained for. Videos are (B, 3, T, H, W) in [-1, 1]; semantic latents (B, 16, T, H/32, W/32).

    Components: ``dit`` (``VideoDiT``), ``semantic_encoder``, ``vae`` (Stage A: a diffusers autoencoder),
    ``scheduler``, ``previewer`` (optional). Registered settings: ``stage_a`` (latent scale, chunks and tiles
    of Stage A decoding), ``num_inference_steps``, ``colour_fix`` and ``tile_detail`` (the defaults these weights
    were tuned for: a 1-2 step distilled decoder saves ``"central"``, ``tiling.Tiling``) and ``demo`` (what
    ``cascadev demo`` shows them on).
    """

    model_cpu_offload_seq = "semantic_encoder->dit->vae->previewer"
    _optional_components = ["semantic_encoder", "previewer"]

    def __init__(self, dit: VideoDiT, semantic_encoder: SemanticEncoder | None, vae: torch.nn.Module,
                 scheduler: SchedulerMixin, previewer: Previewer | None = None, stage_a: dict | None = None,
                 num_inference_steps: int = RELEASE_STEPS, colour_fix: int | None = None, demo: dict | None = None,
                 tile_detail: str = "average"):
        super().__init__()
        if tile_detail not in TILE_DETAILS:
            raise ValueError(f"tile_detail must be one of {', '.join(TILE_DETAILS)}, got {tile_detail!r}")
        stage_a_vae = StageAVAE.around(vae, stage_a)     # chunked, tiled decoding and the latent scale
        if dit.config.latent_channels != vae.config.latent_channels:
            raise ValueError(f"the DiT makes {dit.config.latent_channels}-channel latents but the Stage A VAE decodes "
                             f"{vae.config.latent_channels}")
        self.register_modules(dit=dit, semantic_encoder=semantic_encoder, vae=vae, scheduler=scheduler,
                              previewer=previewer)
        self.register_to_config(stage_a=stage_a_settings(stage_a_vae.config), num_inference_steps=num_inference_steps,
                                colour_fix=colour_fix, demo=demo, tile_detail=tile_detail)
        for module in (dit, semantic_encoder, vae, previewer):
            if module is not None:
                module.eval().requires_grad_(False)
        self.stage_a = stage_a_vae
        self.timings: dict[str, float] = {}
        self.set_progress_bar_config(desc="denoising", **bar_settings())     # the DiT's steps

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "CascadeVPipeline":
        """diffusers' ``from_pretrained``, plus the parts a local folder takes from another (``SHARED_PARTS_FILE``:
        the built-in distilled decoder shares the tiny cascade's); such a folder's half-precision weights (kept
        small) run in fp32 unless ``torch_dtype`` says otherwise."""
        folder = Path(str(pretrained_model_name_or_path))
        shared = load_shared_parts(folder, kwargs, kwargs.get("torch_dtype")) if folder.is_dir() else {}
        if folder.is_dir() and "scheduler" not in kwargs and (scheduler := load_saved_scheduler(folder)):
            shared["scheduler"] = scheduler
        pipe = super().from_pretrained(pretrained_model_name_or_path, **{**shared, **kwargs})
        if (folder / SHARED_PARTS_FILE).is_file() and kwargs.get("torch_dtype") is None:
            pipe.set_precision(torch.float32)           # as load_upscale does for the same kind of shipped folder
        return pipe

    @classmethod
    def from_release(cls, folder: str | Path | None = None, *, torch_dtype: torch.dtype | None = None,
                     **components) -> "CascadeVPipeline":
        """The released cascade: ``s1024.effn-f32.pth``, ``effnet_encoder.safetensors`` and ``previewer.safetensors``
        from ``folder`` (those it lacks, and all when None, from the hub), the SVD VAE from the hub, and the
        release's sampler (8 steps of ``EulerAncestralDiscreteScheduler()``). ``components`` (loaded modules,
        or ``previewer=None``) replace parts."""
        files = {"dit": DIT_FILE, "semantic_encoder": ENCODER_FILE, "previewer": PREVIEWER_FILE}
        if folder is not None:
            if not Path(folder).is_dir():
                raise FileNotFoundError(f"{folder}: weights folder not found")
            wanted = [file for name, file in files.items() if name not in components]
            if wanted and not any((Path(folder) / file).is_file() for file in wanted):   # surely the wrong folder
                raise FileNotFoundError(f"{folder}: neither a cascade saved by save_pretrained (model_index.json) nor "
                                        f"a folder of the released files ({', '.join(wanted)})")

        def local(filename):
            return folder if folder is not None and (Path(folder) / filename).is_file() else None
        loaders = {"dit": lambda: load_dit(local(DIT_FILE), torch_dtype),
                   "semantic_encoder": lambda: load_semantic_encoder(local(ENCODER_FILE), torch_dtype),
                   "previewer": lambda: load_previewer(local(PREVIEWER_FILE), torch_dtype),
                   "vae": lambda: load_vae(None, torch_dtype)}
        parts = {name: components[name] if name in components else load() for name, load in loaders.items()}
        return cls(**parts, scheduler=make_scheduler("euler_a"))

    @property
    def scale_factor(self) -> float:
        """Stage A's latent scale; the semantic condition is multiplied by the same factor (as released)."""
        return self.stage_a.config.scale_factor

    # -- the cascade ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1], H and W multiples of 32 -> semantic latents (B, 16, T, H/32, W/32) float32."""
        check_video(video, 3, SEMANTIC_DOWNSAMPLE, "CascadeVPipeline.encode", pixels=True)
        if self.semantic_encoder is None:
            raise ValueError("this pipeline was loaded without a semantic encoder")
        return self._timed("encode", lambda: self.semantic_encoder.encode(video, self.progress_enabled(),
                                                                                  self._execution_device))

    def decode_options(self, options: DecodeOptions | None = None, **changes) -> DecodeOptions:
        """``options`` (default: ``DecodeOptions()``) with ``changes`` applied (e.g. ``steps=2, tiling="shifted"``)."""
        options = options or DecodeOptions()
        unknown = set(changes) - {f.name for f in fields(DecodeOptions)}
        if unknown:
            raise TypeError(f"unknown decode option(s) {', '.join(sorted(unknown))}; DecodeOptions has "
                            f"{', '.join(f.name for f in fields(DecodeOptions))}")
        return replace(options, **changes) if changes else options

    def tiling(self, tiling: str | Tiling = "blend") -> Tiling:
        """``tiling`` with its ``detail`` (how blended overlaps combine) defaulting to the saved ``tile_detail``;
        official tiling keeps the release's rule."""
        tiling = Tiling.of(tiling)
        if tiling.detail is None and tiling.mode != "official":
            tiling = replace(tiling, detail=self.config.tile_detail)
        return tiling

    def decode_sampler(self, options: DecodeOptions | None = None) -> tuple[SchedulerMixin, int]:
        """The scheduler and step count ``decode_latents`` samples with under ``options``: those given, else the saved
        ones. A step count the scheduler cannot space (a 2-step student's at 1 step) is refused here, so a caller can
        ask before any work."""
        o = options or DecodeOptions()
        scheduler = o.scheduler
        if isinstance(scheduler, str) or scheduler is None:
            scheduler = self.resolve_scheduler(scheduler)
        if o.scheduler_config:
            scheduler = type(scheduler).from_config(scheduler.config, **o.scheduler_config)
        steps = self.config.num_inference_steps if o.steps is None else o.steps
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        set_steps(copy.deepcopy(scheduler), steps)
        return scheduler, steps

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, options: DecodeOptions | None = None, **changes) -> torch.Tensor:
        """Semantic latents (B, 16, T, h, w) -> Stage A latents (B, 4, T, 4h, 4w), scaled. How: ``options``
        (``DecodeOptions``) with ``changes`` applied by keyword (``decode_options``); the colour fix is not used
        here."""
        o = self.decode_options(options, **changes)
        check_video(latents, self.dit.config.cond_channels, 1, "CascadeVPipeline.decode")
        device = self._execution_device
        T, h, w = latents.shape[2:]
        small = semantic_small(latents.to(device).float(), self.scale_factor)   # as the DiT was trained
        cond = upsample_condition(small, (T, COND_UPSAMPLE * h, COND_UPSAMPLE * w))
        B, _, T, H, W = cond.shape
        noise, generator = initial_noise((B, self.dit.config.latent_channels, T, H, W), o.seed, o.generator, device)
        scheduler, steps = self.decode_sampler(o)
        tiling = self.tiling(o.tiling)
        # latents and the scheduler's arithmetic stay fp32; the DiT runs in its own dtype (``_run_window``)
        with self.step_progress(steps, o.callback) as callback:
            return self._timed("dit", lambda: sample(self.dit, cond.float(), noise.float(), scheduler, steps, tiling,
                                                     generator=generator, callback=callback,
                                                     window_batch=o.window_batch, distributed=o.distributed))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, options: DecodeOptions | None = None, **changes) -> torch.Tensor:
        """Semantic latents (B, 16, T, h, w) -> video (B, 3, T, 32h, 32w) in [-1, 1]; ``options`` and ``changes`` as
        ``decode_latents`` (``DecodeOptions``)."""
        return torch.cat(list(self.decode_pieces(latents, options, **changes)), dim=2)

    @torch.no_grad()
    def decode_pieces(self, latents: torch.Tensor, options: DecodeOptions | None = None,
                      **changes) -> Iterator[torch.Tensor]:
        """``decode`` in pieces (B, 3, t, 32h, 32w), in frame order: the DiT samples the whole clip in latent space
        (4 channels at 1/8 of the pixels), then each Stage A chunk is decoded, colour-fixed and yielded as soon as it
        is final, so a long clip's pixels never sit in memory whole (``write_video`` takes the pieces)."""
        o = self.decode_options(options, **changes)
        colour_fix = resolve_colour_fix(self, o.colour_fix)
        if colour_fix and self.previewer is None:
            raise ValueError("colour_fix needs the Previewer: load the pipeline with one")
        check_colour_fix(*(n * SEMANTIC_DOWNSAMPLE for n in latents.shape[-2:]), colour_fix)   # before the DiT runs
        z = self.decode_latents(latents, o)
        # distributed: Stage A and the colour fix's Previewer run replicated on every rank (cheap next to the DiT)
        pieces = self.stage_a.decode_pieces(z, self.progress_enabled(), self._execution_device)
        start = 0
        while (video := self._timed("stage_a", lambda: next(pieces, None))) is not None:
            video, end = video.clamp_(-1, 1), start + video.shape[2]
            if colour_fix:     # per piece (one Stage A chunk), with one temporary of its size at a time
                video = fix_colour(video, self.preview(latents[:, :, start:end]), colour_fix)
            yield video
            start = end

    @torch.no_grad()
    def decode_from(self, latents: torch.Tensor, source_vae, latents_normalised: bool = True,
                    scale: float | None = None, size: str | None = None, options: DecodeOptions | None = None,
                    **changes) -> torch.Tensor:
        """Another model's latents (B, C, T, h, w) -> video (B, 3, T', H, W): ``source_vae`` (a ``SourceVAE``, a
        diffusers autoencoder, or its folder / hub id) decodes them to its pixels (``latents_normalised``: as its
        denoiser makes them, else raw), then the cascade to ``scale`` x those pixels or ``size`` (long side or "WxH";
        default 2048 long side). ``options`` and ``changes`` as ``decode``. See ``pipelines/source_vae.py``."""
        from cascadev.pipelines.source_vae import SourceVAE, encode_resized, target_size

        if isinstance(source_vae, (str, Path)):
            source_vae = SourceVAE.from_pretrained(source_vae).to(self._execution_device)     # fp32, as the CLI
        elif not isinstance(source_vae, SourceVAE):
            source_vae = SourceVAE(source_vae)
        source_vae.check_latents(latents)
        size = target_size(*source_vae.pixel_size(*latents.shape[-2:]), scale, size)
        pixels = self._timed("source_vae", lambda: source_vae.decode(latents, latents_normalised))
        return self.decode(encode_resized(self, pixels, size), options, **changes)

    @torch.no_grad()
    def reconstruct(self, video: torch.Tensor, options: DecodeOptions | None = None, **changes) -> torch.Tensor:
        """Encode then decode: (B, 3, T, H, W) -> (B, 3, T, H, W); ``options`` and ``changes`` as ``decode``."""
        return self.decode(self.encode(video), options, **changes)

    @torch.no_grad()
    def preview(self, latents: torch.Tensor, full_size: bool = True) -> torch.Tensor:
        """The no-LDM baseline: Previewer (x8), then bilinear x4 to the cascade's size when ``full_size``."""
        if self.previewer is None:
            raise ValueError("this pipeline was loaded without a Previewer")
        video = self._timed("preview", lambda: self.previewer.decode(latents.to(self._execution_device)))
        if full_size:
            h, w = latents.shape[-2:]
            video = resize_video(video, (h * SEMANTIC_DOWNSAMPLE, w * SEMANTIC_DOWNSAMPLE)).clamp_(-1, 1)
        return video

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor | None = None, video: torch.Tensor | None = None,
                 num_inference_steps: int | None = None, generator: torch.Generator | None = None,
                 tiling: str | Tiling = "blend", colour_fix: int | None = None, output_type: str = "pt",
                 return_dict: bool = True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",), window_batch: int = 1):
        """Decode semantic ``latents`` (B, 16, T, h, w), or reconstruct ``video`` (B, 3, T, H, W) in [-1, 1].

        num_inference_steps: DiT steps (default: the saved ``num_inference_steps``; 8 for the release).
        generator: seeds the noise (drawn frames first as the release did) and ancestral steps.
        colour_fix: block size of the Previewer's colour fix (default: the saved setting where the Previewer is
            loaded; 0: off).
        output_type: "pt" (B, 3, T, H, W) in [-1, 1], "np" (B, T, H, W, 3) in [0, 1], "pil", or "latent"
            (Stage A latents, scaled).
        callback_on_step_end(pipe, i, t, {"latents": (B, 4, T, H/8, W/8)}): after each DiT step; may return
            {"latents": ...} to replace them.
        window_batch: DiT windows/tiles per forward (faster on a GPU; same result within rounding).
        Returns ``CascadeVPipelineOutput(frames=...)``, or a tuple ``(frames,)`` without ``return_dict``.
        """
        if (latents is None) == (video is None):
            raise ValueError("give either latents= (semantic latents to decode) or video= (to reconstruct)")
        if output_type not in ("pt", "np", "pil", "latent"):
            raise ValueError(f"output_type must be 'pt', 'np', 'pil' or 'latent', got {output_type!r}")
        if set(callback_on_step_end_tensor_inputs) - {"latents"}:
            raise ValueError(f"callback_on_step_end_tensor_inputs can only hold 'latents', got "
                             f"{list(callback_on_step_end_tensor_inputs)}")
        if latents is None:
            latents = self.encode(video)

        def on_step(i, t, z):
            if callback_on_step_end is None:
                return None
            out = callback_on_step_end(self, i, t, {"latents": z}) or {}
            return out.get("latents")
        options = DecodeOptions(steps=num_inference_steps, seed=0 if generator is None else None, tiling=tiling,
                                generator=generator, callback=on_step, window_batch=window_batch,
                                colour_fix=colour_fix)
        if output_type == "latent":
            frames = self.decode_latents(latents, options)
        else:
            frames = format_frames(self.decode(latents, options), output_type)
        self.maybe_free_model_hooks()
        return CascadeVPipelineOutput(frames=frames) if return_dict else (frames,)


def resolve_colour_fix(pipe: CascadeVPipeline, given: int | None) -> int | None:
    """The ``colour_fix`` factor ``decode`` applies: the one given (0: off), else the pipeline's saved one where the
    Previewer it needs is loaded, else off."""
    if given is not None and given < 0:
        raise ValueError(f"colour fix factor must be >= 0 (0: off), got {given}")
    if given is None:
        given = pipe.config.colour_fix if pipe.previewer is not None else None
    return given or None
