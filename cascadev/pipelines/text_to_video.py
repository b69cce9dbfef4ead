"""Stage C: text -> semantic latents with the base model, then the LDM-VAE cascade -> video.

``TextToVideoPipeline``: prompts -> ``cascadev.pipelines.text_encoder`` -> the base ``TextDiT`` sampled over a diffusers
scheduler with classifier-free guidance -> semantic latents (B, 16, T, H/32, W/32), unscaled, exactly as
the semantic encoder makes them -> ``CascadeVPipeline.decode`` -> video (B, 3, T, H, W) in [-1, 1].

The base model works on latents times its config's ``latent_scale``; ``to_model`` and ``from_model``
are the only places that apply it, for sampling here and for training (``cascadev.training.losses.base_training_loss``,
with the same conventions: the objective's prediction, eps or v for rectified flow; empty-caption dropout for CFG).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from cascadev.pipelines.cascade import (RELEASE_STEPS, SEMANTIC_DOWNSAMPLE, CascadeVPipeline, DecodeOptions,
                                        check_pipeline_class, load_cascade)
from cascadev.pipelines.runtime import DecoderRuntimeMixin, compile_blocks
from cascadev.progress import bar_settings
from cascadev.pipelines.sampling import load_scheduler, make_scheduler, scheduler_for_objective
from cascadev.pipelines.text_encoder import PRESETS as TEXT_ENCODER_PRESETS
from cascadev.pipelines.text_encoder import TextEmbedding, TextEncoder, build_text_encoder
from dit.text_dit import TextDiT
from dit.video_dit import VideoDiT
from vae.previewer import Previewer

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 4.0          # Stable Cascade's Stage C default
DEFAULT_SCHEDULER = "dpmpp"
TEXT_ENCODER_DIR, BASE_DIR, SCHEDULER_DIR = "text_encoder", "base_dit", "base_scheduler"  # a base run's final/
LEGACY_PIPELINE_FILE = "text_to_video.json"             # folders of cascadev < 0.2
# component modules that moved since a folder's model_index.json named them: {old: new}
MOVED_MODULES = {"dit.text_encoder": "cascadev.pipelines.text_encoder"}

log = logging.getLogger(__name__)


# -- the latent scale ----------------------------------------------------------------------------

def to_model(latents: torch.Tensor, config) -> torch.Tensor:
    """Semantic latents (B, 16, T, h, w) as the encoder makes them -> the base model's space."""
    return latents * config.latent_scale


def from_model(latents: torch.Tensor, config) -> torch.Tensor:
    """The base model's latents (B, 16, T, h, w) -> semantic latents as ``CascadeVPipeline.decode`` takes them."""
    return latents / config.latent_scale


# -- text embeddings -----------------------------------------------------------------------------

def repeat_text(text: TextEmbedding, n: int) -> TextEmbedding:
    """Every prompt's row n times in a row: B rows -> B*n (prompt-major)."""
    return TextEmbedding(*(z.repeat_interleave(n, dim=0) for z in text))


def cat_text(*texts: TextEmbedding) -> TextEmbedding:
    """Stack embeddings of the same context length on the batch dimension."""
    return TextEmbedding(*(torch.cat(zs) for zs in zip(*texts)))


def config_of(model: torch.nn.Module):
    """The config of a TextDiT, also when wrapped (DDP ``.module``, torch.compile ``._orig_mod``)."""
    while not hasattr(model, "config"):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model.config


def stage_c_scheduler(diffusion) -> SchedulerMixin:
    """Stage C's sampler for a training objective: flow Euler at the trained shift for rectified flow, else
    DPM-Solver++."""
    return scheduler_for_objective(diffusion, DEFAULT_SCHEDULER)


# -- sampling with classifier-free guidance ------------------------------------------------------

def guided_noise(model: TextDiT, x: torch.Tensor, t: torch.Tensor | float, text: TextEmbedding,
                 null_text: TextEmbedding | None = None, guidance: float = 1.0) -> torch.Tensor:
    """Eps for latents x (B, C, T, h, w) at timestep t, guided by ``text`` (B rows).

    Classifier-free guidance (Ho & Salimans 2022, Eq. 6): eps = eps(null) + w * (eps(text) - eps(null)),
    with both passes in one batch of 2B. ``guidance == 1`` is the conditional pass alone. Returns the
    eps channels (B, C, T, h, w) in float32 (a learned variance is not used by the schedulers).
    """
    C = config_of(model).latent_channels
    B = x.shape[0]
    dtype = next(model.parameters()).dtype
    t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(B)
    if guidance == 1.0:
        return model(x.to(dtype), t, *text)[:, :C].float()
    if null_text is None:
        raise ValueError(f"guidance {guidance} needs the unconditional (negative prompt) embedding")
    eps = model(torch.cat([x, x]).to(dtype), torch.cat([t, t]), *cat_text(null_text, text))
    eps_null, eps_text = eps[:, :C].float().chunk(2)
    return eps_null + guidance * (eps_text - eps_null)


@torch.no_grad()
def sample_base(model: TextDiT, noise: torch.Tensor, text: TextEmbedding, null_text: TextEmbedding | None = None,
                guidance: float = DEFAULT_GUIDANCE, scheduler: str | SchedulerMixin = DEFAULT_SCHEDULER,
                steps: int = DEFAULT_STEPS, generator: torch.Generator | None = None,
                scheduler_config: dict | None = None,
                callback: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None
                ) -> torch.Tensor:
    """Denoise ``noise`` (B, C, T, h, w) into the base model's latents, given ``text`` (B rows) and, for
    ``guidance != 1``, the negative prompt's ``null_text`` (B rows).

    The loop: scale the noise by ``init_noise_sigma``; at each timestep predict guided eps on the
    scheduler-scaled input and take a scheduler step (``generator`` feeds ancestral samplers).
    ``callback(i, t, latents)`` runs after each step and may return replacement latents (a pipeline advances its
    progress bar there).
    Returns float32 latents (B, C, T, h, w) in the model's space (see ``from_model``).
    """
    c = config_of(model)
    if noise.ndim != 5 or noise.shape[1] != c.latent_channels:
        raise ValueError(f"noise must be (B, {c.latent_channels}, T, h, w), got {tuple(noise.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0, got {guidance}")
    B = noise.shape[0]
    device = noise.device
    text = TextEmbedding(*(z.to(device) for z in text))
    null_text = TextEmbedding(*(z.to(device) for z in null_text)) if null_text is not None and guidance != 1.0 else None
    for name, emb in (("text", text), ("null_text", null_text)):
        if emb is not None and emb.context.shape[0] != B:
            raise ValueError(f"{name} has {emb.context.shape[0]} rows for {B} videos")
    scheduler = make_scheduler(scheduler, scheduler_config)
    scheduler.set_timesteps(steps, device=device)

    latents = noise.float() * getattr(scheduler, "init_noise_sigma", 1.0)       # flow matching: unit noise, no scaling
    for i, t in enumerate(scheduler.timesteps):
        scaled = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        eps = guided_noise(model, scaled, t, text, null_text, guidance)   # eps, or the velocity of a flow model
        latents = scheduler.step(eps, t, latents, generator=generator, return_dict=False)[0]
        if callback is not None:
            replaced = callback(i, t, latents)
            latents = latents if replaced is None else replaced
    return latents


# -- the pipeline --------------------------------------------------------------------------------

def check_request(prompts: list[str], frames: int, size: tuple[int, int], steps: int, guidance: float,
                  num_videos_per_prompt: int) -> None:
    """ValueError naming the first bad argument of a generation request."""
    if not prompts:
        raise ValueError("no prompt given")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {p!r} is empty: describe the video to generate")
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    m = SEMANTIC_DOWNSAMPLE
    for name, n in zip(("width", "height"), size, strict=True):
        if not isinstance(n, int) or n < 1 or n % m:
            lo = max(m, n // m * m) if isinstance(n, int) else m
            raise ValueError(f"{name} {n} is not a positive multiple of {m} pixels (e.g. {lo} or {lo + m})")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0, got {guidance}")
    if num_videos_per_prompt < 1:
        raise ValueError(f"num_videos_per_prompt must be >= 1, got {num_videos_per_prompt}")


@dataclass
class TextToVideoPipelineOutput(BaseOutput):
    """``frames`` as ``CascadeVPipelineOutput``; ``latents``: the semantic latents (N, 16, T, H/32, W/32)."""

    frames: torch.Tensor | np.ndarray | list
    latents: torch.Tensor


class TextToVideoPipeline(DecoderRuntimeMixin, DiffusionPipeline):
    """Text encoder + base TextDiT (Stage C) + the LDM-VAE cascade (Stage B and A). Videos are (N, 3, T, H, W)
    in [-1, 1]; N = prompts x ``num_videos_per_prompt``.

    Components: ``text_encoder``, ``base`` (``TextDiT``), ``base_scheduler``, and the cascade's decoding parts
    ``dit``, ``vae``, ``scheduler``, ``previewer`` (optional) with its registered settings (``stage_a``,
    ``num_inference_steps``, ``colour_fix``); ``self.cascade`` is a ``CascadeVPipeline`` over the same modules.
    """

    model_cpu_offload_seq = "text_encoder->base->dit->vae->previewer"
    _optional_components = ["previewer"]

    def __init__(self, text_encoder: TextEncoder, base: TextDiT, base_scheduler: SchedulerMixin, dit: VideoDiT,
                 vae: torch.nn.Module, scheduler: SchedulerMixin, previewer: Previewer | None = None,
                 stage_a: dict | None = None, num_inference_steps: int = RELEASE_STEPS, colour_fix: int | None = None):
        super().__init__()
        c = base.config
        if (c.caption_channels, c.pooled_channels) != (text_encoder.width, text_encoder.embed_dim):
            raise ValueError(f"the base model reads text of width {c.caption_channels} / pooled {c.pooled_channels}, "
                             f"the text encoder gives {text_encoder.width} / {text_encoder.embed_dim}")
        self.register_modules(text_encoder=text_encoder, base=base, base_scheduler=base_scheduler, dit=dit, vae=vae,
                              scheduler=scheduler, previewer=previewer)
        self.register_to_config(stage_a=stage_a, num_inference_steps=num_inference_steps, colour_fix=colour_fix)
        for module in (text_encoder, base):
            module.eval().requires_grad_(False)
        self.cascade = CascadeVPipeline(dit=dit, semantic_encoder=None, vae=vae, scheduler=scheduler,
                                        previewer=previewer, stage_a=stage_a, num_inference_steps=num_inference_steps,
                                        colour_fix=colour_fix)
        self.timings: dict[str, float] = {}
        self.set_progress_bar_config(desc="generating", **bar_settings())    # the base model's steps

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' ``load_config``, with the components of modules that have moved (``MOVED_MODULES``) read from
        their new place, so folders saved before the move keep loading."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        for name, value in config.items():
            if isinstance(value, list) and len(value) == 2 and value[0] in MOVED_MODULES:
                log.info("%s: %s moved to %s", name, value[0], MOVED_MODULES[value[0]])
                config[name] = [MOVED_MODULES[value[0]], value[1]]
        return loaded

    @classmethod
    def from_parts(cls, text_encoder: TextEncoder, base: TextDiT, cascade: CascadeVPipeline,
                   base_scheduler: str | SchedulerMixin = DEFAULT_SCHEDULER) -> "TextToVideoPipeline":
        """Join a text encoder, a base model and a cascade (its decoding parts and settings)."""
        c = cascade.config
        return cls(text_encoder=text_encoder, base=base, base_scheduler=make_scheduler(base_scheduler),
                   dit=cascade.dit, vae=cascade.vae, scheduler=cascade.scheduler, previewer=cascade.previewer,
                   stage_a=c.stage_a, num_inference_steps=c.num_inference_steps, colour_fix=c.colour_fix)

    @property
    def stage_a(self):
        """The cascade's ``StageAVAE`` (``DecoderRuntimeMixin`` sets its memory budget)."""
        return self.cascade.stage_a

    def compile_models(self) -> "TextToVideoPipeline":
        """torch.compile the base model's blocks, then the decoding parts as ``DecoderRuntimeMixin`` does."""
        compile_blocks(self.base)
        return super().compile_models()

    def default_size(self) -> tuple[int, int]:
        """(W, H) pixels of the base model's window (``window_size`` semantic cells per side, 32 px each)."""
        side = self.base.config.window_size * SEMANTIC_DOWNSAMPLE
        return side, side

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_frames: int | None = None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = DEFAULT_STEPS,
                 guidance_scale: float = DEFAULT_GUIDANCE, negative_prompt: str | list[str] = "",
                 num_videos_per_prompt: int = 1, generator: torch.Generator | list[torch.Generator] | None = None,
                 decoder_num_inference_steps: int | None = None, decode_options: DecodeOptions | None = None,
                 output_type: str = "pt", return_dict: bool = True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",)):
        """Prompts -> N = prompts x ``num_videos_per_prompt`` videos (prompt-major): the base model samples semantic
        latents (N, 16, T, H/32, W/32) with ``base_scheduler``, then the cascade decodes them one video at a time.

        num_frames: T (default: the base model's trained clip length); height, width: pixels, multiples of 32
            (default: its trained size). Sizes the attention partitions do not divide are generated on the next
            larger latent grid and cropped.
        negative_prompt: the prompt guided away from (one for all, or one per prompt); empty by default.
        generator: the base model's noise: one ``torch.Generator`` for all videos in turn, or a list of N, video k's
            from the k-th (default: ``seed_generators(0, N)``, video k from seed k); its ancestral steps (if the
            sampler has any) from one generator on the device seeded with the first one's ``initial_seed()``. So
            ``seed_generators(s, N)`` gives exactly what ``seed=s`` gave before.
        decode_options: how the cascade decodes (``DecodeOptions``: tiling, colour fix, window batch, sampler, ...);
            its noise: video k from ``seed + k`` (default seed 0), or one ``generator`` for all videos in turn.
            ``decoder_num_inference_steps`` replaces its ``steps`` (default: the cascade's saved steps).
        output_type: "pt" (N, 3, T, H, W) in [-1, 1] on the CPU, "np" (N, T, H, W, 3) in [0, 1], "pil", or "latent"
            (the semantic latents only, as ``CascadeVPipeline.decode`` takes them).
        callback_on_step_end(pipe, i, t, {"latents": (N, 16, T', h', w')}): after each base model step, on its latents
            (in its scaled space, on the padded grid); may return {"latents": ...} to replace them.
        Progress bars: ``self.progress_bar``; ``set_progress_bar_config(disable=True)`` silences the base model's
        and the decoder's. Returns ``TextToVideoPipelineOutput(frames, latents)`` or, without ``return_dict``,
        ``(frames,)``.
        """
        if output_type not in ("pt", "np", "pil", "latent"):
            raise ValueError(f"output_type must be 'pt', 'np', 'pil' or 'latent', got {output_type!r}")
        if set(callback_on_step_end_tensor_inputs) - {"latents"}:
            raise ValueError(f"callback_on_step_end_tensor_inputs can only hold 'latents', got "
                             f"{list(callback_on_step_end_tensor_inputs)}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        c = self.base.config
        frames = c.window_frames if num_frames is None else num_frames
        default_w, default_h = self.default_size()
        W, H = width or default_w, height or default_h
        check_request(prompts, frames, (W, H), num_inference_steps, guidance_scale, num_videos_per_prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        N = len(prompts) * num_videos_per_prompt
        if isinstance(generator, list) and len(generator) != N:
            raise ValueError(f"{len(generator)} generators for {N} videos (prompts x num_videos_per_prompt)")
        device = self._execution_device
        if output_type != "latent":     # the decoder's options, its step count checked before any sampling
            steps = {} if decoder_num_inference_steps is None else {"steps": decoder_num_inference_steps}
            o = replace(self.cascade.decode_options(decode_options), **steps)
            self.cascade.decode_sampler(o)

        text = self._timed("text", lambda: repeat_text(self.text_encoder.encode(prompts), num_videos_per_prompt))
        null_text = None
        if guidance_scale != 1.0:
            null_text = self._timed("text", lambda: repeat_text(self.text_encoder.encode(negatives),
                                                                num_videos_per_prompt))
        h, w = H // SEMANTIC_DOWNSAMPLE, W // SEMANTIC_DOWNSAMPLE
        fm, sm = self.base.frame_multiple, self.base.spatial_multiple
        grid = (math.ceil(frames / fm) * fm, *(math.ceil(n / sm) * sm for n in (h, w)))
        generators = seed_generators(0, N) if generator is None else generator
        generators = generators if isinstance(generators, list) else [generators] * N
        noise = torch.cat([randn_tensor((1, c.latent_channels, *grid), generator=g, device=device)
                           for g in generators])
        ancestral = torch.Generator(device=device).manual_seed(generators[0].initial_seed())   # one stream, as before

        def on_step(i, t, z):
            out = callback_on_step_end(self, i, t, {"latents": z}) or {}
            return out.get("latents")
        with self.step_progress(num_inference_steps, on_step if callback_on_step_end is not None else None) as step:
            z = self._timed("base", lambda: sample_base(self.base, noise, text, null_text, guidance_scale,
                                                        self.base_scheduler, num_inference_steps, generator=ancestral,
                                                        callback=step))
        latents = from_model(z[:, :, :frames, :h, :w], c)

        frames_out = latents
        if output_type != "latent":
            # the cascade's bars follow this pipeline's setting
            self.cascade.set_progress_bar_config(desc="denoising", disable=not self.progress_enabled(),
                                                 **bar_settings())
            seeded = o.generator is None and o.seed is not None          # video k: Stage B seed ``seed + k``
            frames_out = torch.cat([self.cascade.decode(latents[k:k + 1], o, **({"seed": o.seed + k} if seeded else {}))
                                    .cpu() for k in range(N)])
            if output_type != "pt":      # diffusers' layouts: (N, T, H, W, 3) in [0, 1], or lists of images
                frames_out = VideoProcessor(do_resize=False).postprocess_video(frames_out, output_type=output_type)
        self.maybe_free_model_hooks()
        return TextToVideoPipelineOutput(frames=frames_out, latents=latents) if return_dict else (frames_out,)


def seed_generators(seed: int, n: int) -> list[torch.Generator]:
    """CPU generators seeded ``seed``, ``seed + 1``, ... : ``TextToVideoPipeline``'s ``generator`` for n videos,
    video k's noise from ``seed + k``, as ``cascadev generate --seed`` documents (the pipeline's default: seed 0)."""
    return [torch.Generator().manual_seed(seed + k) for k in range(n)]


def is_legacy_text_to_video(folder: str | Path) -> bool:
    """A text-to-video folder saved by cascadev < 0.2 (``text_to_video.json``, ``base_dit/``, ``cascade/``)."""
    folder = Path(folder)
    return (folder / LEGACY_PIPELINE_FILE).is_file() and not (folder / "model_index.json").is_file()


def load_text_to_video(weights: str | Path, *, text_encoder: str | Path | None = None,
                       cascade: str | Path | None = None, torch_dtype: torch.dtype | None = None,
                       with_previewer: bool | None = None) -> TextToVideoPipeline:
    """The CLI's loader: ``weights`` written by ``TextToVideoPipeline.save_pretrained`` (no base model is released);
    ``text_encoder`` (a folder, or an open_clip preset of ``cascadev.pipelines.text_encoder``: "bigG", "H") and
    ``cascade`` (anything ``load_cascade`` takes, with its Previewer and colour fix as ``with_previewer`` says) replace
    those parts."""
    weights = Path(weights)
    if not weights.is_dir():
        raise FileNotFoundError(f"{weights}: weights folder not found")
    if is_legacy_text_to_video(weights):
        raise FileNotFoundError(f"{weights} is a text-to-video folder in the previous format ({LEGACY_PIPELINE_FILE}); "
                                f"convert it once with: cascadev convert {weights} NEW_FOLDER")
    check_pipeline_class(weights, TextToVideoPipeline)
    if not (weights / "model_index.json").is_file() and (weights / BASE_DIR).is_dir():
        # a base training run's final/: the text encoder, base model and its sampler, with a cascade from elsewhere
        if cascade is None:
            raise FileNotFoundError(f"{weights} holds a base model without a decoder: pass the cascade (--cascade)")
        if not (weights / SCHEDULER_DIR).is_dir():
            raise FileNotFoundError(
                f"{weights}: no {SCHEDULER_DIR}/ (the sampler of the run's objective; final/ folders written before it "
                f"was exported lack it): save cascadev.pipelines.text_to_video.stage_c_scheduler(your config's "
                f"diffusion) there with save_pretrained")
        return TextToVideoPipeline.from_parts(TextEncoder.from_pretrained(weights / TEXT_ENCODER_DIR),
                                              TextDiT.from_folder(weights / BASE_DIR),
                                              load_cascade(cascade, with_previewer=with_previewer,
                                                           torch_dtype=torch_dtype),
                                              load_scheduler(weights / SCHEDULER_DIR))
    if not (weights / "model_index.json").is_file():
        raise FileNotFoundError(f"{weights}: no base model (Stage C) weights; none are released: train them (cascadev "
                                "train, stage stage_c) or pass a folder written by TextToVideoPipeline.save_pretrained")
    parts = {}
    if text_encoder is not None:
        parts["text_encoder"] = (build_text_encoder(str(text_encoder)) if str(text_encoder) in TEXT_ENCODER_PRESETS
                                 else TextEncoder.from_pretrained(text_encoder))
    if cascade is not None:
        pipe = load_cascade(cascade, with_previewer=with_previewer, torch_dtype=torch_dtype)
        parts.update(dit=pipe.dit, vae=pipe.vae, scheduler=pipe.scheduler, previewer=pipe.previewer,
                     stage_a=pipe.config.stage_a, num_inference_steps=pipe.config.num_inference_steps,
                     colour_fix=pipe.config.colour_fix)
    return TextToVideoPipeline.from_pretrained(str(weights), torch_dtype=torch_dtype, **parts)
