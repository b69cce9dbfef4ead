"""Stage C's training task (stage "stage_c"): the TextDiT denoises semantic latents given the caption."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from cascadev.config import ConfigError
from cascadev.training.config import TrainConfig
from cascadev.training.data import mix_seed
from cascadev.training.diffusion import build_diffusion
from cascadev.training.losses import base_training_loss
from cascadev.training.tasks.common import (build_semantic_encoder, draws_samples, export_for_inference, init_weights,
                                            save_module, seeded)
from cascadev.weights import CascadeModel


def build_base_dit(config: TrainConfig, load_weights: bool) -> nn.Module:
    """The TextDiT that trains: fresh, or from a folder in our formats (``base.init_from``)."""
    from dit.text_dit import TextDiT

    section = config.base
    model = TextDiT(**section.model_config())
    if section.init_from and load_weights:
        init_weights(model, section.init_from, "base.init_from (e.g. a base run's final/base_dit or a checkpoint)")
    if section.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def build_text_encoder(config: TrainConfig, load_weights: bool) -> nn.Module:
    """The frozen text encoder of stage stage_c: our folder (``base.text_encoder_weights`` holding config.json), or the
    preset (+ overrides) with its open_clip weights, a checkpoint path, or random weights."""
    from cascadev.pipelines.text_encoder import TextEncoder

    b = config.base
    text_config = b.text_encoder_config()
    if text_config is None:
        encoder = TextEncoder.from_pretrained(b.text_encoder_weights)
    else:
        encoder = TextEncoder.build(text_config, load_weights=load_weights)
    return encoder.eval().requires_grad_(False)


class StageCTask:
    """Stage C: the TextDiT denoises semantic latents (B, 16, T, H/32, W/32) given the caption; the semantic encoder
    (``condition`` section) and the text encoder are frozen.

    Latents come from a cache of this stage (``cascadev.training.cache_latents``: "semantic", unscaled, and the caption)
    or are encoded on the fly. Captions are encoded per batch by the frozen text encoder (no caption cache: a
    bigG embedding is 77 x 1280 floats, too large to keep for a real dataset, and cheap beside the DiT); the
    empty prompt once. ``cascadev.training.losses.base_training_loss`` does the rest: the latent scale,
    ``caption_dropout`` of the captions replaced by the empty prompt (for classifier-free guidance), the
    ``diffusion`` objective (IDDPM or rectified flow) with per-video timesteps.
    """

    name = "stage_c"

    def __init__(self, config: TrainConfig, load_weights: bool = True, build_model: bool = True):
        self.config = config
        seed = config.run.seed
        with seeded(seed, 0):
            self.model = build_base_dit(config, load_weights) if build_model else None   # None: encoder only (caching)
        with seeded(seed, 2):
            self.semantic = build_semantic_encoder(config, load_weights)
        with seeded(seed, 5):
            self.text_encoder = build_text_encoder(config, load_weights) if build_model else None
        if self.model is not None:
            c = self.model.config
            widths = (self.text_encoder.width, self.text_encoder.embed_dim)
            if (c.caption_channels, c.pooled_channels) != widths:        # a text encoder folder with other widths
                raise ConfigError(f"the text encoder gives widths {widths}, the base model reads "
                                  f"{(c.caption_channels, c.pooled_channels)} (base.overrides.caption_channels / "
                                  "pooled_channels)")
        self.diffusion = build_diffusion(config.diffusion)
        self.discriminator = None
        self._null_text = None

    def to(self, device: torch.device) -> "StageCTask":
        self.semantic.to(device)
        if self.text_encoder is not None:
            self.text_encoder.to(device)
        self._null_text = None
        return self

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """(B, 3, T, H, W) in [-1, 1] -> {"semantic": (B, 16, T, H/32, W/32)}, unscaled: what a cache of this
        stage stores."""
        return {"semantic": self.semantic.encode(video)}

    def latents(self, batch: dict) -> torch.Tensor:
        """A batch of pixels ("video") or of cached latents ("semantic") -> semantic latents (B, 16, T, h, w),
        unscaled."""
        device = self.semantic.mapper[0].weight.device
        if "semantic" in batch:
            return batch["semantic"].to(device)
        return self.encode(batch["video"].to(device))["semantic"]

    @torch.no_grad()
    def text(self, captions: list[str]):
        """Captions -> ``TextEmbedding`` (context (B, L, width), pooled (B, embed_dim), mask (B, L))."""
        return self.text_encoder.encode(list(captions))

    @property
    def null_text(self):
        """The empty prompt's ``TextEmbedding`` (1 row): what dropped captions become, and CFG's unconditional side."""
        if self._null_text is None:
            self._null_text = self.text([""])
        return self._null_text

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator,
             as_images: bool) -> tuple[torch.Tensor, dict]:
        latents = self.latents(batch)
        loss, logs = base_training_loss(model, self.diffusion, latents, self.text(batch["caption"]), self.null_text,
                                        generator, drop_prob=self.config.base.caption_dropout, as_images=as_images)
        return loss, {**logs, "latent_std": latents.detach().float().std()}   # ~1 from a calibrated encoder

    def micro_step(self, accelerator, prepared: dict, batch: dict, generator: torch.Generator, as_images: bool,
                   step: int, accum: int) -> dict:
        loss, logs = self.loss(prepared["model"], batch, generator, as_images)
        accelerator.backward(loss / accum)
        return logs

    @torch.no_grad()
    def validate(self, accelerator, prepared: dict, clips: list[dict], step: int, run_dir: Path) -> dict:
        """Loss at fixed timesteps and noise on held-out clips with their captions (none dropped); on the main
        process, latents sampled for the first clip's caption (``val_sample_steps`` steps, default guidance) saved
        as ``samples/step_N.safetensors``: ``cascadev decode`` turns them into video."""
        from cascadev.pipelines.text_to_video import (DEFAULT_GUIDANCE, from_model, sample_base, stage_c_scheduler,
                                                      to_model)
        from cascadev.pipelines.latents import save_latents

        model = prepared["model"]
        model.eval()
        config = accelerator.unwrap_model(model).config
        d, n_t = self.diffusion, self.config.run.val_timesteps
        losses = []
        for i, clip in enumerate(clips):
            g = torch.Generator(accelerator.device).manual_seed(mix_seed(self.config.run.seed, i, 3))
            x0 = to_model(self.latents({"video": clip["video"][None]}), config)
            text = self.text([clip["caption"]])
            for k in range(n_t):
                t = torch.tensor([(k + 0.5) / n_t], device=x0.device)      # rf: sigma; iddpm: the integer step
                t = t if self.config.diffusion.objective == "rf" else (t * d.num_timesteps).long()
                eps = torch.randn(x0.shape, generator=g, device=g.device).to(x0.device)
                x_t = d.noise(x0, t, eps)
                out = model(x_t, d.model_time(t), *text)
                losses.append(d.losses(out, x0, x_t, t, eps)["loss"].mean())
        logs = {"val/loss": torch.stack(losses).mean().item()} if losses else {}
        steps = self.config.run.val_sample_steps
        if clips and steps > 0 and draws_samples(accelerator):      # under FSDP on every rank, written by the main
            unwrapped = accelerator.unwrap_model(model)
            shape = self.latents({"video": clips[0]["video"][None]}).shape
            g = torch.Generator(accelerator.device).manual_seed(self.config.run.seed)
            noise = torch.randn(shape, generator=g, device=g.device).to(accelerator.device)
            with accelerator.autocast():
                z = sample_base(unwrapped, noise, self.text([clips[0]["caption"]]), self.null_text, DEFAULT_GUIDANCE,
                                scheduler=stage_c_scheduler(self.config.diffusion), steps=steps, generator=g)
            z = from_model(z, config)
            logs["val/sample_std"] = z.std().item()
        if clips and steps > 0 and accelerator.is_main_process:
            save_latents(run_dir / "samples" / f"step_{step:08d}.safetensors", z.cpu(), prompt=clips[0]["caption"])
        model.train()
        return logs

    def save_model_config(self, directory: Path) -> None:
        """A checkpoint's ``config.json``, so it loads with ``TextDiT.from_legacy_folder``."""
        if isinstance(self.model, CascadeModel):
            self.model.save_config(directory)

    def export_final(self, final: Path, state_dict: dict, ema_state: dict | None) -> None:
        """``final/`` as ``export`` writes it, with the EMA weights when on (the trained ones then in ``final/model``),
        and once (``final/model`` shares it) the frozen text encoder and the objective's sampler."""
        from cascadev.pipelines.text_to_video import SCHEDULER_DIR, TEXT_ENCODER_DIR, stage_c_scheduler
        export_for_inference(self, final, state_dict, ema_state)
        self.text_encoder.save_pretrained(final / TEXT_ENCODER_DIR)
        stage_c_scheduler(self.config.diffusion).save_pretrained(final / SCHEDULER_DIR)

    def export(self, state_dict: dict, directory: Path) -> None:
        """``base_dit/`` in our format (``TextDiT.from_pretrained``); ``export_final`` adds ``text_encoder/`` and
        ``base_scheduler/``, which ``load_text_to_video`` reads with a cascade given apart."""
        from cascadev.pipelines.text_to_video import BASE_DIR
        save_module(state_dict, self.model, directory / BASE_DIR)
