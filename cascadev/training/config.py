"""``TrainConfig``: everything one training run reads, as frozen dataclasses loaded from one flat YAML file.

Sections (each a mapping in the YAML; a key left out keeps its default):

- ``stage``: what trains. "dit" (Stage B decoder), "stage_a" (the Stage A VAE), "semantic" (Stage B semantic
  encoder + Previewer as an autoencoder), "stage_c" (the Stage C text-to-video base DiT) or "distill"; one branch
  each in ``cascadev.training.tasks.build_task``.
- ``dit``: DiT preset name + field overrides, ``init_from``, gradient checkpointing, the weight of a loss on
  decoded pixels (stage "dit").
- ``semantic``: encoder and Previewer presets + overrides, initial weights, which train, loss weights
  (stage "semantic").
- ``base``: TextDiT preset + overrides, ``init_from``, gradient checkpointing, the frozen text encoder
  (preset + overrides + weights), caption dropout (stage "stage_c"; its semantic latents come from the
  ``condition`` section's encoder, or from a latent cache).
- ``stage_a``: Stage A VAE preset + overrides: frozen for "dit", the model that trains for "stage_a".
- ``condition``: the DiT's condition: semantic encoder (preset, weights) or the resize route; stage stage_c
  takes its semantic encoder from here too.
- ``diffusion``: the objective (``cascadev.training.diffusion.DiffusionConfig``).
- ``distill``: stage "distill": the teacher (a cascade or DiT folder, or the released file), its sampler and steps,
  the student's steps and the weight of the detail loss (``cascadev.training.tasks.distill_task``); the student is
  a DiT as the ``dit`` section describes it, started from the teacher's weights (or ``dit.init_from``, a folder).
- ``stage_a_training``: stage "stage_a": which parameters train, loss weights, discriminator.

Earlier names still load, with a logged note: stage "vae" (now "stage_a"), "base" (now "stage_c"), and
the section ``vae`` (now ``stage_a_training``), in the YAML and in overrides (``RENAMED_STAGES``,
``RENAMED_SECTIONS``).
- ``data`` (``cascadev.training.data.DataConfig``), ``optim``, ``run``.

Load with ``load_train_config(path, ["optim.lr=1e-4", ...])``; every override is type-checked. A latent
cache's ``cache.yaml`` holds the part of the config its latents depend on (``cache_signature``); training from
the cache checks it (``check_cache``).
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cascadev.config import ConfigError, _check_type, from_dict, load_config, to_dict
from cascadev.errors import OneLineParser
from cascadev.training.data import DataConfig
from cascadev.training.diffusion import DiffusionConfig
from cascadev.video_io import VIDEO_EXTENSIONS

log = logging.getLogger(__name__)

Stage = Literal["dit", "stage_a", "semantic", "stage_c", "distill"]
STAGES = ("dit", "stage_a", "semantic", "stage_c", "distill")
# earlier names that still load (``upgrade_config``, ``upgrade_overrides``), with a logged note
RENAMED_STAGES = {"vae": "stage_a", "base": "stage_c"}
RENAMED_SECTIONS = {"vae": "stage_a_training"}


def resolve_preset(presets: dict, preset: str, overrides: dict[str, Any], what: str, key: str | None = None,
                   model: type | None = None):
    """``presets[preset]`` with ``overrides`` applied through the config loader (types checked, lists to tuples).
    ``key``: the overrides' config key in messages (default ``{what}.overrides``). ``model``: the presets are
    dicts of this model's ``__init__`` keywords; the result is such a dict, every keyword checked against the
    signature's names and types (values are checked when the model builds: ``build_on_meta``)."""
    if preset not in presets:
        raise ConfigError(f"unknown {what} preset {preset!r}; choose from {sorted(presets)}")
    base, prefix = presets[preset], f"{key or what + '.overrides'}."
    if model is None:
        return from_dict(type(base), {**to_dict(base), **overrides}, prefix=prefix)
    from cascadev.weights import init_keywords
    names, hints = init_keywords(model), typing.get_type_hints(model.__init__)
    renamed = getattr(model, "legacy_config_keys", {})              # YAML written before a key was renamed
    overrides = {renamed.get(k, k): v for k, v in overrides.items()}
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"{model.__name__} has: {', '.join(names)}")
    return {k: _check_type(v, hints[k], prefix + k) for k, v in {**base, **overrides}.items()}


def semantic_latent_channels(preset: str) -> int:
    """The latent channels of a semantic encoder preset (its value, else ``SemanticEncoder``'s default)."""
    from cascadev.weights import init_keywords
    from vae.semantic_encoder import PRESETS, SemanticEncoder
    return PRESETS[preset].get("latent_channels", init_keywords(SemanticEncoder)["latent_channels"].default)


def build_on_meta(model: type, config: dict, where: str):
    """``model(**config)`` on the meta device (no memory, no initialisation cost): what the config checks read;
    the model's own ValueError becomes a ConfigError naming ``where``."""
    import torch
    try:
        with torch.device("meta"):
            return model(**config)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


@dataclass(frozen=True)
class DiTSection:
    preset: str = "official"                       # dit.PRESETS
    overrides: dict[str, Any] = field(default_factory=dict)  # VideoDiT keywords, e.g. {depth: 2}
    init_from: str | None = None                   # "official:PATH" (s1024.effn-f32.pth) or a save_pretrained DIR
    # init_from a DiT of another condition (e.g. a semantic-route DiT for the resize route): every weight is
    # loaded but the patch embedding's condition channels, which start at zero (the model starts unconditional)
    init_new_condition: bool = False
    gradient_checkpointing: bool = False
    # + w * MSE between the model's x0 estimate and the clean latent, both decoded by the frozen Stage A: a
    # latent-space loss makes high-noise x0 the mean latent, whose decoding is blurrier than the mean frame
    decoded_loss_weight: float = 0.0
    decoded_loss_frames: int = 1                   # frames of each window decoded for it, at random (costly)

    def __post_init__(self):
        if self.decoded_loss_weight < 0:
            raise ValueError(f"dit.decoded_loss_weight must be >= 0, got {self.decoded_loss_weight}")
        if self.decoded_loss_frames < 1:
            raise ValueError(f"dit.decoded_loss_frames must be >= 1, got {self.decoded_loss_frames}")
        if self.init_new_condition and not self.init_from:
            raise ValueError("dit.init_new_condition needs dit.init_from (the DiT whose weights start this one)")

    def model_config(self) -> dict:
        """``VideoDiT`` keywords: the preset with the overrides."""
        from dit.video_dit import PRESETS, VideoDiT
        return resolve_preset(PRESETS, self.preset, self.overrides, "dit", model=VideoDiT)


@dataclass(frozen=True)
class StageASection:
    preset: str = "official"                       # vae.stage_a.PRESETS ("official" = the SVD VAE)
    overrides: dict[str, Any] = field(default_factory=dict)  # StageAConfig fields

    def model_config(self):
        from vae.stage_a import PRESETS
        return resolve_preset(PRESETS, self.preset, self.overrides, "stage_a")


@dataclass(frozen=True)
class ConditionSection:
    route: Literal["semantic", "resize"] = "semantic"
    semantic_preset: str = "official"              # vae.semantic_encoder.PRESETS
    semantic_weights: str = "hub"                  # "hub" (released file, HF cache), "random" (tests), or a path
    spatial_factor: int = 4                        # resize route: latent frames shrunk by this (4x resolution)
    temporal_factor: int = 1                       # resize route: 1 frame in this kept (4x frame rate with 4)
    resize_from: Literal["pixels", "latent"] = "pixels"   # encode the small video (release) or shrink the latent
    # semantic route: the encoder trains with the DiT, Stage B as Wuerstchen's diffusion autoencoder; needs
    # pixel batches (no latent cache) and optim.ema_decay 0 (its BatchNorm statistics belong to its weights)
    train_encoder: bool = False

    def __post_init__(self):
        if self.spatial_factor < 1 or self.temporal_factor < 1:
            raise ValueError("condition.spatial_factor and temporal_factor must be >= 1")


@dataclass(frozen=True)
class DistillSection:
    """Stage "distill": a student DiT that samples in ``student_steps`` learns the teacher's samples from the same
    noise (``cascadev.training.tasks.distill_task``)."""

    # a cascade folder (model_index.json: its dit/, scheduler and num_inference_steps), a DiT folder (config.json),
    # or official:PATH (s1024.effn-f32.pth)
    teacher: str | None = None
    teacher_scheduler: str | None = None           # SCHEDULERS name; None: the cascade's, else the objective's ODE
    teacher_steps: int | None = None               # None: the cascade's num_inference_steps, else 8 (the release's)
    student_steps: int = 1                         # the student's sampler steps (its exported num_inference_steps)
    # rf, student_steps >= 2: the noise level of the student's last step (its flow scheduler's shift_terminal); None:
    # diffusers' spacing, whose step before the last starts at sigma 0.001 (a second step that changes almost nothing)
    student_last_sigma: float | None = None
    # + w * distance between the amplitude spectra above detail_cutoff of the student's and the teacher's decoded
    # frames: phase-free, so a blurred guess cannot lower it (the MSE alone prefers the blur where it is unsure)
    detail_weight: float = 0.0
    detail_frames: int = 1                         # frames of each window decoded for it, at random (costly)
    detail_size: int = 0                           # a random square of this many latent px decoded for it; 0: all
    detail_cutoff: float = 0.0625                  # cycles per pixel: eval.metrics.sharpness's band
    # how the exported decoder combines overlapping windows (its saved tile_detail, tiling.Tiling): at 1-2 steps no
    # later step reconciles the windows' fine detail, and averaging it blurs (docs/fast-decoding.md)
    tile_detail: str = "central"

    def __post_init__(self):
        if self.student_steps < 1 or (self.teacher_steps is not None and self.teacher_steps < 1):
            raise ValueError("distill.student_steps and distill.teacher_steps must be >= 1")
        if (self.detail_weight < 0 or self.detail_frames < 1 or self.detail_size < 0
                or not 0 <= self.detail_cutoff < 0.5):
            raise ValueError("need distill.detail_weight >= 0, detail_frames >= 1, detail_size >= 0, "
                             "0 <= detail_cutoff < 0.5")
        if self.student_last_sigma is not None and not (0 < self.student_last_sigma < 1 and self.student_steps >= 2):
            raise ValueError("distill.student_last_sigma: a noise level in (0, 1), for student_steps >= 2")
        from cascadev.pipelines.sampling import SCHEDULERS
        from cascadev.pipelines.tiling import TILE_DETAILS
        if self.tile_detail not in TILE_DETAILS:
            raise ValueError(f"distill.tile_detail {self.tile_detail!r}: choose from {', '.join(TILE_DETAILS)}")
        if self.teacher_scheduler is not None and self.teacher_scheduler not in SCHEDULERS:
            raise ValueError(f"distill.teacher_scheduler {self.teacher_scheduler!r}: choose from {sorted(SCHEDULERS)}")


@dataclass(frozen=True)
class StageATrainingSection:
    """Stage "stage_a": which of the Stage A VAE's parameters train, the loss weights and the discriminator."""

    trainable: tuple[str, ...] = ("*",)            # fnmatch patterns of parameter names that train
    l1_weight: float = 1.0
    mse_weight: float = 0.0                        # PSNR is an MSE: weight it when PSNR is what is judged
    lowpass_weight: float = 0.0                    # MSE of 8x8 block means: colour the per-pixel losses underweight
    lpips_weight: float = 0.1                      # used only when the LPIPS weights are on disk
    kl_weight: float = 1e-6                        # on the per-element mean KL
    sample_posterior: bool = True
    disc_start: int | None = None                  # step from which the hinge patch discriminator trains; None = off
    disc_weight: float = 0.5
    disc_lr: float = 1e-4
    disc_channels: int = 64
    disc_layers: int = 3

    def __post_init__(self):
        if not self.trainable:
            raise ValueError("stage_a_training.trainable needs at least one pattern (e.g. ['*'] or ['decoder.*'])")
        if min(self.l1_weight, self.mse_weight, self.lowpass_weight, self.lpips_weight, self.kl_weight,
               self.disc_weight) < 0:
            raise ValueError("stage_a_training loss weights must be >= 0")


@dataclass(frozen=True)
class SemanticSection:
    """Stage "semantic": frame -> encoder -> (16, H/32, W/32) latent -> Previewer -> RGB at H/4 x W/4, trained
    against the frame downsampled x4 (Stable Cascade's previewer predicts low-resolution previews)."""

    encoder_preset: str = "official"               # vae.semantic_encoder.PRESETS
    encoder_overrides: dict[str, Any] = field(default_factory=dict)   # SemanticEncoder keywords
    encoder_weights: str = "hub"                   # "hub" (effnet_encoder.safetensors), "random", or a path
    train_encoder: bool = True                     # False: the release's setting, only the Previewer trains
    previewer_preset: str = "official"             # vae.previewer.PRESETS
    previewer_overrides: dict[str, Any] = field(default_factory=dict)  # Previewer keywords
    previewer_weights: str = "random"              # "random", "hub" (previewer.safetensors), or a path
    l1_weight: float = 1.0
    mse_weight: float = 0.0

    def __post_init__(self):
        if min(self.l1_weight, self.mse_weight) < 0 or self.l1_weight + self.mse_weight == 0:
            raise ValueError("semantic.l1_weight and mse_weight must be >= 0, and not both 0")

    def encoder_config(self) -> dict:
        from vae.semantic_encoder import PRESETS, SemanticEncoder
        return resolve_preset(PRESETS, self.encoder_preset, self.encoder_overrides, "semantic encoder",
                              "semantic.encoder_overrides", model=SemanticEncoder)

    def previewer_config(self) -> dict:
        from vae.previewer import PRESETS, Previewer
        return resolve_preset(PRESETS, self.previewer_preset, self.previewer_overrides, "Previewer",
                              "semantic.previewer_overrides", model=Previewer)


@dataclass(frozen=True)
class BaseSection:
    """Stage "stage_c": the text-to-video ``TextDiT`` (the base model) denoises semantic latents given captions."""

    preset: str = "base"                           # dit.text_dit.PRESETS
    overrides: dict[str, Any] = field(default_factory=dict)  # TextDiT keywords, e.g. {depth: 2}
    init_from: str | None = None                   # a TextDiT folder: a base run's final/base_dit or checkpoint
    gradient_checkpointing: bool = False
    text_encoder_preset: str = "bigG"              # cascadev.pipelines.text_encoder.PRESETS (frozen)
    text_encoder_overrides: dict[str, Any] = field(default_factory=dict)  # TextEncoder keywords
    text_encoder_weights: str = "preset"           # "preset" (its open_clip tag), "random", our folder, or a checkpoint
    caption_dropout: float = 0.1                   # captions trained as the empty prompt, for guidance (CFG)

    def __post_init__(self):
        if not 0 <= self.caption_dropout <= 1:
            raise ValueError(f"base.caption_dropout must be in [0, 1], got {self.caption_dropout}")

    def model_config(self) -> dict:
        """``TextDiT`` keywords: the preset with the overrides."""
        from dit.text_dit import PRESETS, TextDiT
        return resolve_preset(PRESETS, self.preset, self.overrides, "base", model=TextDiT)

    def text_encoder_config(self) -> dict | None:
        """The text encoder's ``TextEncoder`` keywords; None when ``text_encoder_weights`` is our folder (its
        config.json rules)."""
        from cascadev.pipelines.text_encoder import PRESETS, TextEncoder
        from cascadev.weights import CONFIG_NAME
        if (Path(self.text_encoder_weights) / CONFIG_NAME).is_file():
            return None
        config = resolve_preset(PRESETS, self.text_encoder_preset, self.text_encoder_overrides, "text encoder",
                                "base.text_encoder_overrides", model=TextEncoder)
        if self.text_encoder_weights == "preset":
            return config
        pretrained = None if self.text_encoder_weights == "random" else self.text_encoder_weights
        return {**config, "pretrained": pretrained}

    def text_widths(self) -> tuple[int, int]:
        """(token width, pooled width) of the text encoder, without building it."""
        import json

        from cascadev.weights import CONFIG_NAME, init_keywords
        from cascadev.pipelines.text_encoder import TextEncoder, text_tower_config
        config = self.text_encoder_config()
        if config is None:   # our folder: its config.json (diffusers' keys such as _class_name aside)
            config = json.loads((Path(self.text_encoder_weights) / CONFIG_NAME).read_text())
        c = {**{k: p.default for k, p in init_keywords(TextEncoder).items()}, **config}
        try:
            embed_dim, text_cfg, _ = text_tower_config(c["model_name"], c["hidden_layer"], c["text_overrides"],
                                                       c["embed_dim"])
        except ValueError as e:
            raise ConfigError(f"base.text_encoder: {e}") from None
        return text_cfg.width, embed_dim


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-5                               # release: 2e-5 (CAME); we use AdamW
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 1000                       # linear from 0
    schedule: Literal["constant", "cosine"] = "constant"   # after warmup; cosine decays to 0 at run.max_steps
    grad_clip: float = 0.01                        # release: 0.01; 0 disables
    grad_accum: int = 1                            # micro-batches per optimizer step
    ema_decay: float = 0.9999                      # 0 disables EMA

    def __post_init__(self):
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0 or self.grad_accum < 1:
            raise ValueError("need lr > 0, warmup_steps >= 0, grad_clip >= 0, grad_accum >= 1")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"                      # checkpoints, logs, samples; a run resumes from here
    max_steps: int = 100_000                       # optimizer steps
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    log_every: int = 10
    save_every: int = 1000
    keep_checkpoints: int = 3                      # newest kept; 0 keeps all
    val_every: int = 1000                          # 0 disables validation
    val_timesteps: int = 4                         # DiT: validation loss at this many evenly spaced t per clip
    val_sample_steps: int = 8                      # DiT: sampler steps of the validation reconstruction; 0 = none
    tensorboard: bool = True

    def __post_init__(self):
        if self.max_steps < 0 or self.log_every < 1 or self.save_every < 1 or self.keep_checkpoints < 0:
            raise ValueError("need max_steps >= 0, log_every >= 1, save_every >= 1, keep_checkpoints >= 0")


@dataclass(frozen=True)
class TrainConfig:
    stage: Stage = "dit"
    dit: DiTSection = DiTSection()
    stage_a: StageASection = StageASection()
    condition: ConditionSection = ConditionSection()
    diffusion: DiffusionConfig = DiffusionConfig()
    distill: DistillSection = DistillSection()
    stage_a_training: StageATrainingSection = StageATrainingSection()
    semantic: SemanticSection = SemanticSection()
    base: BaseSection = BaseSection()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; expected one of {', '.join(STAGES)}")
        self.stage_a.model_config()                           # fails early on a bad preset or override
        if self.stage in ("dit", "distill"):
            self.check_dit()
        if self.stage == "distill" and not self.distill.teacher:
            raise ValueError("stage distill needs distill.teacher: a cascade folder (e.g. "
                             "cascadev/assets/tiny_cascade), a DiT folder, or official:PATH to s1024.effn-f32.pth")
        if self.stage == "distill" and self.condition.train_encoder:
            raise ValueError("stage distill trains the DiT only: set condition.train_encoder=false")
        elif self.stage == "semantic":
            self.check_semantic()
        elif self.stage == "stage_c":
            self.check_base()

    def check_dit(self) -> None:
        """The DiT's channels, window and latent grid fit the condition route and the clip size."""
        from vae.semantic_encoder import PRESETS as SEMANTIC_PRESETS
        from vae.stage_a import DOWNSAMPLE
        from dit.video_dit import VideoDiT
        dit = build_on_meta(VideoDiT, self.dit.model_config(), "dit.overrides")
        latent_channels = self.stage_a.model_config().latent_channels
        if dit.config.latent_channels != latent_channels:
            raise ValueError(f"the Stage A VAE has {latent_channels} latent channels but the DiT has latent_channels="
                             f"{dit.config.latent_channels}; set dit.overrides.latent_channels={latent_channels}")
        if self.condition.route == "semantic":
            if self.condition.semantic_preset not in SEMANTIC_PRESETS:
                raise ValueError(f"unknown semantic encoder preset {self.condition.semantic_preset!r}; "
                                 f"choose from {sorted(SEMANTIC_PRESETS)}")
            cond_channels = semantic_latent_channels(self.condition.semantic_preset)
            multiple = 32                                     # the semantic latent is f32
        else:
            cond_channels = latent_channels                  # a Stage A latent
            multiple = DOWNSAMPLE * self.condition.spatial_factor
        if dit.config.cond_channels != cond_channels:
            raise ValueError(f"condition route {self.condition.route!r} gives {cond_channels} channels but the DiT "
                             f"has cond_channels={dit.config.cond_channels}; "
                             f"set dit.overrides.cond_channels={cond_channels}")
        d = self.data
        if d.height % multiple or d.width % multiple:
            raise ValueError(f"data.height/width {d.height}x{d.width} must be multiples of {multiple} for the "
                             f"{self.condition.route} route")
        if self.condition.route == "resize" and d.num_frames % self.condition.temporal_factor:
            raise ValueError(f"data.num_frames={d.num_frames} must be a multiple of condition.temporal_factor")
        dit.check_window(d.num_frames, d.height // DOWNSAMPLE, d.width // DOWNSAMPLE)
        if self.condition.train_encoder:
            if self.condition.route != "semantic":
                raise ValueError("condition.train_encoder needs condition.route 'semantic'")
            if d.latents:
                raise ValueError("condition.train_encoder encodes pixels as it trains: drop data.latents (a cache)")
            if self.optim.ema_decay > 0:
                raise ValueError("condition.train_encoder trains the encoder's BatchNorm: set optim.ema_decay=0; "
                                 "EMA weights do not match the BatchNorm running statistics")


    def check_semantic(self) -> None:
        """The encoder's latent fits the Previewer, and frames are multiples of the encoder's stride."""
        from vae.semantic_encoder import DOWNSAMPLE
        from vae.previewer import Previewer
        from vae.semantic_encoder import SemanticEncoder
        encoder = build_on_meta(SemanticEncoder, self.semantic.encoder_config(), "semantic.encoder_overrides").config
        previewer = build_on_meta(Previewer, self.semantic.previewer_config(), "semantic.previewer_overrides").config
        if encoder.latent_channels != previewer.latent_channels:
            raise ValueError(f"the semantic encoder gives {encoder.latent_channels} channels, the Previewer reads "
                             f"{previewer.latent_channels}: set semantic.previewer_overrides.latent_channels")
        d = self.data
        if d.height % DOWNSAMPLE or d.width % DOWNSAMPLE:
            raise ValueError(f"data.height/width {d.height}x{d.width} must be multiples of {DOWNSAMPLE} for the "
                             "semantic encoder")
        if self.optim.ema_decay > 0:
            # EMA averages parameters; BatchNorm running statistics belong to the trained weights, so an EMA
            # export would pair averaged weights with mismatched statistics (measured: 21.0 -> 11.0 dB)
            raise ValueError("stage semantic trains BatchNorm layers (encoder mapper, Previewer): set "
                             "optim.ema_decay=0; EMA weights do not match the BatchNorm running statistics")


    def check_base(self) -> None:
        """IDDPM (DDPM-family samplers) or rectified flow (the "flow" sampler); the TextDiT reads the semantic encoder's
        channels and the text encoder's widths, and its attention partitions fit the clip's latent grid."""
        from vae.semantic_encoder import DOWNSAMPLE
        from vae.semantic_encoder import PRESETS as SEMANTIC_PRESETS
        if self.diffusion.objective == "iddpm":
            # cascadev.pipelines.text_to_video samples with diffusers' default schedule, which this is
            sampler = DiffusionConfig()
            schedule = ("num_timesteps", "beta_start", "beta_end")
            if any(getattr(self.diffusion, k) != getattr(sampler, k) for k in schedule):
                raise ValueError("stage stage_c: the base model's sampler (cascadev.pipelines.text_to_video) uses "
                                 f"diffusers' default schedule, so diffusion.{'/'.join(schedule)} must stay "
                                 f"{'/'.join(str(getattr(sampler, k)) for k in schedule)}")
        if self.condition.route != "semantic":
            raise ValueError("stage stage_c generates semantic latents: condition.route must be 'semantic'")
        if self.condition.semantic_preset not in SEMANTIC_PRESETS:
            raise ValueError(f"unknown semantic encoder preset {self.condition.semantic_preset!r}; "
                             f"choose from {sorted(SEMANTIC_PRESETS)}")
        from dit.text_dit import TextDiT
        model = build_on_meta(TextDiT, self.base.model_config(), "base.overrides")
        c = model.config
        channels = semantic_latent_channels(self.condition.semantic_preset)
        if c.latent_channels != channels:
            raise ValueError(f"the semantic encoder gives {channels} channels but the base model has "
                             f"latent_channels={c.latent_channels}; set base.overrides.latent_channels={channels}")
        width, pooled = self.base.text_widths()
        if (c.caption_channels, c.pooled_channels) != (width, pooled):
            raise ValueError(f"the text encoder gives tokens of width {width} and pooled {pooled}, "
                             f"the base model reads {c.caption_channels} / {c.pooled_channels}: "
                             "set base.overrides.caption_channels="
                             f"{width} and base.overrides.pooled_channels={pooled}")
        d = self.data
        if d.height % DOWNSAMPLE or d.width % DOWNSAMPLE:
            raise ValueError(f"data.height/width {d.height}x{d.width} must be multiples of {DOWNSAMPLE} "
                             "(semantic latents)")
        model.check_window(d.num_frames, d.height // DOWNSAMPLE, d.width // DOWNSAMPLE)


def check_config_file(path: str | Path) -> None:
    """Refuse, in one line naming ``path``, a file that cannot be a training config: a folder, an unreadable
    file, binary data (a video given to --config by mistake would otherwise end in a codec error) or YAML
    whose top level is not a mapping of sections. Broken YAML is left to ``load_config``, which names the line."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a YAML config file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        hint = (": videos go in data.videos (--set data.videos=FOLDER_OR_LIST)"
                if path.suffix.lower() in VIDEO_EXTENSIONS else "")
        raise ConfigError(f"{path} is not a YAML config (binary data, not text){hint}")
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):       # load_config names the line, or the nesting
        return
    if data is not None and not isinstance(data, dict):
        kind = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(data), "value")
        raise ConfigError(f"{path} is not a training config: its top level is a {kind}, expected a mapping of "
                          "sections (stage:, data:, run:, ...)")


def upgrade_config(data: dict) -> dict:
    """A training config's mapping with earlier names replaced by today's (``RENAMED_STAGES``,
    ``RENAMED_SECTIONS``), a note logged for each."""
    data = dict(data)
    for old, new in RENAMED_SECTIONS.items():
        if old in data:
            if new in data:
                raise ConfigError(f"the config has both {old}: and {new}: (its new name): keep {new}:")
            log.warning("config section %s: is now %s: (the old name still loads)", old, new)
            data[new] = data.pop(old)
    if isinstance(data.get("stage"), str) and data["stage"] in RENAMED_STAGES:
        log.warning("stage %s is now %s (the old name still loads)", data["stage"], RENAMED_STAGES[data["stage"]])
        data["stage"] = RENAMED_STAGES[data["stage"]]
    return data


def upgrade_overrides(overrides: Sequence[str]) -> list[str]:
    """``key=value`` overrides with earlier names replaced, as ``upgrade_config`` does for a file."""
    upgraded = []
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, rest = key.partition(".")
        if dot and section in RENAMED_SECTIONS:
            log.warning("config section %s is now %s (the old name still loads)", section, RENAMED_SECTIONS[section])
            key = f"{RENAMED_SECTIONS[section]}.{rest}"
        if key == "stage" and value.strip() in RENAMED_STAGES:
            log.warning("stage %s is now %s (the old name still loads)", value.strip(), RENAMED_STAGES[value.strip()])
            value = RENAMED_STAGES[value.strip()]
        upgraded.append(f"{key}{sep}{value}")
    return upgraded


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a training YAML with dotted overrides (``run.max_steps=10``); older names load (``upgrade_config``)."""
    check_config_file(path)
    try:
        return load_config(TrainConfig, path, upgrade_overrides(overrides), upgrade=upgrade_config)
    except ValueError as e:
        message = str(e)        # load_config's own messages name the file already
        raise ConfigError(message if str(path) in message else f"{path}: {message}") from None


def config_parser(prog: str, description: str) -> OneLineParser:
    """The command line of a training entry point's ``main`` (``train``, ``cache_latents``): the config, its
    overrides and ``--debug``; the entry point adds its own options."""
    parser = OneLineParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="training YAML (configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config fields, e.g. --set optim.lr=1e-4 data.videos=clips/")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an internal error")
    return parser


def check_weight_files(config: TrainConfig, model: bool = True) -> None:
    """Raise FileNotFoundError naming the first local weights file or folder the config names that is not there
    (``init_from``, encoder/Previewer/text encoder weights given as paths), so a run fails before it builds models
    or writes its run dir. Hub ids, "hub", "random" and "preset" are not paths; those fail when they load.
    ``model=False``: the trained model (and the text encoder) is not built, as when caching latents."""
    from cascadev.weights import CONFIG_NAME

    def folder(key: str, value: str | None) -> None:           # our formats: a folder with config.json
        if value and not (Path(value) / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{key}: {Path(value) / CONFIG_NAME} not found (expected a folder written by "
                                    "save_pretrained or a checkpoint of a run)")

    def path(key: str, value: str, keywords: tuple[str, ...]) -> None:     # a file, or a folder holding it
        if value not in keywords and not Path(value).exists():
            raise FileNotFoundError(f"{key}: {value} not found (a file or folder of weights, or one of "
                                    f"{', '.join(keywords)})")

    stage, c = config.stage, config.condition
    if stage == "dit" and model:
        init = config.dit.init_from or ""
        if init.startswith("official:"):
            check_released_dit("dit.init_from", Path(init.removeprefix("official:")))
        else:
            folder("dit.init_from", init)
    if stage == "distill" and model:
        check_teacher(config.distill.teacher)
        folder("dit.init_from", config.dit.init_from)
    if stage == "stage_c" and model:
        folder("base.init_from", config.base.init_from)
        path("base.text_encoder_weights", config.base.text_encoder_weights, ("preset", "random"))
    if stage in ("dit", "stage_c", "distill") and c.route == "semantic":
        path("condition.semantic_weights", c.semantic_weights, ("hub", "random"))
    if stage == "semantic":
        path("semantic.encoder_weights", config.semantic.encoder_weights, ("hub", "random"))
        path("semantic.previewer_weights", config.semantic.previewer_weights, ("hub", "random"))


def check_released_dit(option: str, file: Path) -> None:
    """Raise FileNotFoundError, in one line naming ``option``, the file and where to get it, for a released DiT
    (``s1024.effn-f32.pth``) that is not there."""
    if not file.is_file():
        raise FileNotFoundError(f"{option}: {file} not found: download s1024.effn-f32.pth from the CascadeV release "
                                f"(hf download ByteDance/CascadeV s1024.effn-f32.pth --local-dir {file.parent})")


def check_teacher(teacher: str) -> None:
    """Raise FileNotFoundError, in one line naming the file and where to get it, for a distill.teacher not there."""
    if teacher.startswith("official:"):
        check_released_dit("distill.teacher", Path(teacher.removeprefix("official:")))
        return
    folder = Path(teacher)
    if not (folder / "model_index.json").is_file() and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"distill.teacher: {folder / 'model_index.json'} not found (expected a cascade folder "
                                "written by CascadeVPipeline.save_pretrained, such as the built-in "
                                "cascadev/assets/tiny_cascade, a DiT folder with config.json, or official:PATH)")


def replace(config: TrainConfig, **sections: dict) -> TrainConfig:
    """A copy of ``config`` with fields of sections changed: ``replace(c, run={"max_steps": 5})``."""
    changes = {name: dataclasses.replace(getattr(config, name), **fields) for name, fields in sections.items()}
    return dataclasses.replace(config, **changes)


# -- latent caches (written by cascadev.training.cache_latents, checked by cascadev.training.train) ----------

CACHE_CONFIG = "cache.yaml"


def cache_signature(config: TrainConfig) -> dict:
    """What cached latents depend on: the clip geometry, the condition (semantic encoder or resize route) and,
    for stage dit, the Stage A model; a stage_c cache also names its stage (a dit cache holds other tensors)."""
    d = config.data
    signature = {
        "data": {"num_frames": d.num_frames, "frame_stride": d.frame_stride, "height": d.height, "width": d.width},
        "condition": to_dict(config.condition),
    }
    if config.stage == "stage_c":
        return {"cache": {"stage": "stage_c"}, **signature}
    return {**signature, "stage_a": to_dict(config.stage_a.model_config())}


def check_cache(folder: str | Path, config: TrainConfig) -> None:
    """Raise ConfigError naming every setting where the cache in ``folder`` differs from ``config``."""
    path = Path(folder) / CACHE_CONFIG
    if not path.is_file():
        raise ConfigError(f"{path} not found: write the cache with python -m cascadev.training.cache_latents")
    try:
        cached = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, yaml.YAMLError):
        raise ConfigError(f"{path} is not a cache.yaml written by cascadev.training.cache_latents") from None
    if not isinstance(cached, dict) or not all(isinstance(v, dict) for v in cached.values()):
        raise ConfigError(f"{path} is not a cache.yaml written by cascadev.training.cache_latents")
    stage = cached.get("cache", {}).get("stage", "dit")                     # dit caches predate the field
    stage = RENAMED_STAGES.get(stage, stage)                                # caches written before the rename
    if stage != {"distill": "dit"}.get(config.stage, config.stage):        # distill reads the DiT's inputs
        raise ConfigError(f"latent cache {folder} holds stage {stage} inputs, the config trains stage {config.stage}")
    wanted = yaml.safe_load(yaml.safe_dump(cache_signature(config)))      # tuples -> lists, as in the file
    diffs = [f"{section}.{key}: cache {cached.get(section, {}).get(key)!r} != config {value!r}"
             for section, fields in wanted.items() for key, value in fields.items()
             if cached.get(section, {}).get(key) != value]
    if diffs:
        raise ConfigError(f"latent cache {folder} was made with other settings: " + "; ".join(diffs))

