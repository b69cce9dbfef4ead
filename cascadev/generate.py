"""Stage C: text -> semantic latents with the base model, then the LDM-VAE cascade -> video.

``TextToVideoPipeline``: prompts -> ``dit.text_encoder`` -> the base ``TextDiT`` sampled over a diffusers
scheduler with classifier-free guidance -> semantic latents (B, 16, T, H/32, W/32), unscaled, exactly as
the semantic encoder makes them -> ``CascadeVPipeline.decode`` -> video (B, 3, T, H, W) in [-1, 1].

The base model works on latents times ``TextDiTConfig.latent_scale``; ``to_model`` and ``from_model``
are the only places that apply it, for sampling here and for training (``base_training_loss``, which
phase-2 training calls with the same conventions: eps prediction, empty-caption dropout for CFG).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tqdm.auto import tqdm

from cascadev.pipeline import SEMANTIC_DOWNSAMPLE, CascadeVPipeline, timed
from cascadev.sampling import make_scheduler
from cascadev.weights import atomic_write
from dit.text_dit import TextDiT, TextDiTConfig
from dit.text_encoder import PRESETS as TEXT_ENCODER_PRESETS
from dit.text_encoder import TextEmbedding, TextEncoder, build_text_encoder

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 4.0          # Stable Cascade's Stage C default
DEFAULT_SCHEDULER = "dpmpp"
CAPTION_DROPOUT = 0.1           # share of captions trained as the empty prompt, for CFG
TEXT_ENCODER_DIR, BASE_DIR, CASCADE_DIR = "text_encoder", "base_dit", "cascade"
PIPELINE_FILE = "text_to_video.json"


# -- the latent scale ----------------------------------------------------------------------------

def to_model(latents: torch.Tensor, config: TextDiTConfig) -> torch.Tensor:
    """Semantic latents (B, 16, T, h, w) as the encoder makes them -> the base model's space."""
    return latents * config.latent_scale


def from_model(latents: torch.Tensor, config: TextDiTConfig) -> torch.Tensor:
    """The base model's latents (B, 16, T, h, w) -> semantic latents as ``CascadeVPipeline.decode`` takes them."""
    return latents / config.latent_scale


# -- text embeddings -----------------------------------------------------------------------------

def repeat_text(text: TextEmbedding, n: int) -> TextEmbedding:
    """Every prompt's row n times in a row: B rows -> B*n (prompt-major)."""
    return TextEmbedding(*(z.repeat_interleave(n, dim=0) for z in text))


def cat_text(*texts: TextEmbedding) -> TextEmbedding:
    """Stack embeddings of the same context length on the batch dimension."""
    return TextEmbedding(*(torch.cat(zs) for zs in zip(*texts)))


def drop_captions(text: TextEmbedding, null_text: TextEmbedding, drop: torch.Tensor) -> TextEmbedding:
    """Replace the rows where ``drop`` (B,) is True by ``null_text`` (1 row: the empty prompt's encoding)."""
    if null_text.context.shape[1:] != text.context.shape[1:]:
        raise ValueError(f"null text {tuple(null_text.context.shape)} does not match the captions {tuple(text.context.shape)}")
    return TextEmbedding(*(torch.where(drop.view(-1, *[1] * (z.ndim - 1)), n.to(z), z) for z, n in zip(text, null_text)))


def _config_of(model: torch.nn.Module) -> TextDiTConfig:
    """The TextDiTConfig of a model, also when wrapped (DDP ``.module``, torch.compile ``._orig_mod``)."""
    while not hasattr(model, "spec"):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model.spec


# -- sampling with classifier-free guidance ------------------------------------------------------

def guided_noise(model: TextDiT, x: torch.Tensor, t: torch.Tensor | float, text: TextEmbedding,
                 null_text: TextEmbedding | None = None, guidance: float = 1.0) -> torch.Tensor:
    """Eps for latents x (B, C, T, h, w) at timestep t, guided by ``text`` (B rows).

    Classifier-free guidance (Ho & Salimans 2022, Eq. 6): eps = eps(null) + w * (eps(text) - eps(null)),
    with both passes in one batch of 2B. ``guidance == 1`` is the conditional pass alone. Returns the
    eps channels (B, C, T, h, w) in float32 (a learned variance is not used by the schedulers).
    """
    C = _config_of(model).latent_channels
    B = x.shape[0]
    dtype = next(model.parameters()).dtype
    t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(B)
    if guidance == 1.0:
        return model(x.to(dtype), t, *text)[:, :C].float()
    if null_text is None:
        raise ValueError(f"guidance {guidance} needs the unconditional (negative prompt) embedding")
    eps_null, eps_text = model(torch.cat([x, x]).to(dtype), torch.cat([t, t]), *cat_text(null_text, text))[:, :C].float().chunk(2)
    return eps_null + guidance * (eps_text - eps_null)


@torch.no_grad()
def sample_base(model: TextDiT, noise: torch.Tensor, text: TextEmbedding, null_text: TextEmbedding | None = None,
                guidance: float = DEFAULT_GUIDANCE, scheduler: str | SchedulerMixin = DEFAULT_SCHEDULER,
                steps: int = DEFAULT_STEPS, generator: torch.Generator | None = None,
                scheduler_config: dict | None = None, progress: bool = True) -> torch.Tensor:
    """Denoise ``noise`` (B, C, T, h, w) into the base model's latents, given ``text`` (B rows) and, for
    ``guidance != 1``, the negative prompt's ``null_text`` (B rows).

    The loop: scale the noise by ``init_noise_sigma``; at each timestep predict guided eps on the
    scheduler-scaled input and take a scheduler step (``generator`` feeds ancestral samplers).
    Returns float32 latents (B, C, T, h, w) in the model's space (see ``from_model``).
    """
    c = _config_of(model)
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

    latents = noise.float() * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, desc="generating", disable=not progress, leave=False):
        eps = guided_noise(model, scheduler.scale_model_input(latents, t), t, text, null_text, guidance)
        latents = scheduler.step(eps, t, latents, generator=generator, return_dict=False)[0]
    return latents


# -- training (called by the training script, stage base) ----------------------------------------

def base_training_loss(model: torch.nn.Module, diffusion, latents: torch.Tensor, text: TextEmbedding,
                       null_text: TextEmbedding, generator: torch.Generator, drop_prob: float = CAPTION_DROPOUT,
                       as_images: bool = False) -> tuple[torch.Tensor, dict]:
    """Diffusion loss of the base model on one micro-batch.

    latents: (B, 16, T, h, w) semantic latents as the encoder makes them (unscaled; cached ones too).
    text: the captions' ``TextEmbedding`` (B rows); null_text: the empty prompt's (1 row), which
        replaces a ``drop_prob`` share of the captions so the model also learns eps(null) for CFG.
    diffusion: a ``cascadev.diffusion`` objective (per-video timesteps; eps + learned variance for iddpm).
    Returns (mean loss, {"loss", "mse", "vb"} detached means), as the Stage B task does.
    """
    x0 = to_model(latents, _config_of(model))
    B = x0.shape[0]
    drop = torch.rand(B, generator=generator, device=generator.device) < drop_prob
    text = drop_captions(TextEmbedding(*(z.to(x0.device) for z in text)), null_text, drop.to(x0.device))
    t = diffusion.sample_t(B, generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    x_t = diffusion.noise(x0, t, eps)
    out = model(x_t, diffusion.model_time(t), *text, as_images=as_images)  # b c_out t h w
    losses = diffusion.losses(out, x0, x_t, t, eps)
    return losses["loss"].mean(), {k: v.detach().mean() for k, v in losses.items()}


# -- the pipeline --------------------------------------------------------------------------------

def check_request(prompts: list[str], frames: int, size: tuple[int, int], steps: int, guidance: float,
                  num_per_prompt: int) -> None:
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
    if num_per_prompt < 1:
        raise ValueError(f"num_per_prompt must be >= 1, got {num_per_prompt}")


class TextToVideoPipeline:
    """Text encoder + base TextDiT + the LDM-VAE cascade. Videos are (N, 3, T, H, W) in [-1, 1]."""

    def __init__(self, text_encoder: TextEncoder, base: TextDiT, cascade: CascadeVPipeline,
                 device: str | torch.device | None = None):
        c = base.spec
        if (c.caption_channels, c.pooled_channels) != (text_encoder.width, text_encoder.embed_dim):
            raise ValueError(f"the base model reads text of width {c.caption_channels} / pooled {c.pooled_channels}, "
                             f"the text encoder gives {text_encoder.width} / {text_encoder.embed_dim}")
        self.device = torch.device(device) if device is not None else cascade.device
        self.text_encoder = text_encoder.eval().requires_grad_(False).to(self.device)
        self.base = base.eval().requires_grad_(False).to(self.device)
        self.cascade = cascade
        self.timings: dict[str, float] = {}

    @classmethod
    def from_pretrained(cls, root: str | Path | None = None, *, text_encoder: str | Path | None = None,
                        base: str | Path | None = None, cascade: str | Path | None = None,
                        device: str | torch.device | None = None) -> "TextToVideoPipeline":
        """Load the parts. ``root``: a folder written by ``save_pretrained`` (text_encoder/, base_dit/, cascade/).

        Each part can be given on its own: ``base`` a TextDiT folder (required: no weights are released);
        ``text_encoder`` our folder or a preset of ``dit.text_encoder`` ("bigG", "H") loaded through
        open_clip (default "bigG"); ``cascade`` anything ``CascadeVPipeline.from_pretrained`` takes
        (default: the released files from the hub).
        """
        if root is not None:
            root = Path(root)
            if not root.is_dir():
                raise FileNotFoundError(f"{root}: weights folder not found")
            pick = lambda given, name: given if given is not None else (root / name if (root / name).exists() else None)  # noqa: E731
            text_encoder, base, cascade = pick(text_encoder, TEXT_ENCODER_DIR), pick(base, BASE_DIR), pick(cascade, CASCADE_DIR)
        if base is None or not Path(base).is_dir():
            where = base if base is not None else (root / BASE_DIR if root is not None else "(no --weights folder)")
            raise FileNotFoundError(f"{where}: no base model (Stage C) weights; none are released: train them (cascadev "
                                    "train, stage base) or pass a folder written by TextToVideoPipeline.save_pretrained")
        base_model = TextDiT.from_pretrained(base)
        text_encoder = text_encoder if text_encoder is not None else "bigG"
        if str(text_encoder) in TEXT_ENCODER_PRESETS:
            encoder = build_text_encoder(str(text_encoder))
        else:
            encoder = TextEncoder.from_pretrained(text_encoder)
        cascade_pipe = CascadeVPipeline.from_pretrained(cascade, device=device, load_previewer=False)
        return cls(encoder, base_model, cascade_pipe, device=device)

    def save_pretrained(self, root: str | Path) -> None:
        """Write every part in our format: root/{text_encoder,base_dit,cascade} (+ a small index file)."""
        root = Path(root)
        self.text_encoder.save_pretrained(root / TEXT_ENCODER_DIR)
        self.base.save_pretrained(root / BASE_DIR)
        self.cascade.save_pretrained(root / CASCADE_DIR)
        text = json.dumps({"text_encoder": TEXT_ENCODER_DIR, "base": BASE_DIR, "cascade": CASCADE_DIR}, indent=2)
        atomic_write(root / PIPELINE_FILE, lambda tmp: Path(tmp).write_text(text))

    def _timed(self, phase: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        return timed(self.timings, phase, self.device, fn)

    def default_size(self) -> tuple[int, int]:
        """(W, H) pixels of the base model's trained clips."""
        side = self.base.spec.window_size * SEMANTIC_DOWNSAMPLE
        return side, side

    @torch.no_grad()
    def generate_latents(self, prompt: str | list[str], frames: int | None = None, size: tuple[int, int] | None = None,
                         steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, negative: str | list[str] = "",
                         seed: int = 0, num_per_prompt: int = 1, scheduler: str | SchedulerMixin = DEFAULT_SCHEDULER,
                         progress: bool = True) -> torch.Tensor:
        """Prompts -> semantic latents (N, 16, T, H/32, W/32), N = prompts x num_per_prompt (prompt-major),
        unscaled as ``CascadeVPipeline.decode`` takes them.

        frames: T (default: the base model's trained clip length); size: (W, H) pixels, multiples of 32
            (default: its trained size). Sizes the attention partitions do not divide are generated on the
            next larger latent grid and cropped.
        negative: the prompt guided away from (one for all, or one per prompt); empty by default.
        seed: video k starts from the noise of ``seed + k``, so it can be regenerated alone.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        c = self.base.spec
        frames = c.window_frames if frames is None else frames
        W, H = size if size is not None else self.default_size()
        check_request(prompts, frames, (W, H), steps, guidance, num_per_prompt)
        negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")

        text = self._timed("text", lambda: repeat_text(self.text_encoder.encode(prompts), num_per_prompt))
        null_text = None
        if guidance != 1.0:
            null_text = self._timed("text", lambda: repeat_text(self.text_encoder.encode(negatives), num_per_prompt))
        h, w = H // SEMANTIC_DOWNSAMPLE, W // SEMANTIC_DOWNSAMPLE
        grid = (math.ceil(frames / c.frame_multiple) * c.frame_multiple,
                *(math.ceil(n / c.spatial_multiple) * c.spatial_multiple for n in (h, w)))
        N = len(prompts) * num_per_prompt
        noise = torch.cat([torch.randn(1, c.latent_channels, *grid, generator=torch.Generator().manual_seed(seed + k))
                           for k in range(N)]).to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed)  # ancestral steps
        z = self._timed("base", lambda: sample_base(self.base, noise, text, null_text, guidance, scheduler, steps,
                                                    generator=generator, progress=progress))
        return from_model(z[:, :, :frames, :h, :w], c)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, seed: int = 0, progress: bool = True, **decode_kwargs) -> torch.Tensor:
        """Semantic latents (N, 16, T, h, w) -> video (N, 3, T, 32h, 32w) on the CPU, one video at a time
        (Stage B seed ``seed + k`` for video k); ``decode_kwargs`` go to ``CascadeVPipeline.decode``."""
        videos = [self.cascade.decode(latents[k:k + 1], seed=seed + k, progress=progress, **decode_kwargs).cpu()
                  for k in range(latents.shape[0])]
        return torch.cat(videos)

    @torch.no_grad()
    def generate(self, prompt: str | list[str], frames: int | None = None, size: tuple[int, int] | None = None,
                 steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, negative: str | list[str] = "",
                 seed: int = 0, num_per_prompt: int = 1, scheduler: str | SchedulerMixin = DEFAULT_SCHEDULER,
                 progress: bool = True, decode_kwargs: dict | None = None) -> torch.Tensor:
        """Prompts -> video (N, 3, T, H, W) in [-1, 1] on the CPU: ``generate_latents`` then ``decode``."""
        latents = self.generate_latents(prompt, frames, size, steps, guidance, negative, seed, num_per_prompt,
                                        scheduler, progress)
        return self.decode(latents, seed, progress, **(decode_kwargs or {}))
