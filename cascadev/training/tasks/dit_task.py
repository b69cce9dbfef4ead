"""Stage B's training task (stage "dit"): the DiT denoises Stage A latents given its condition (the semantic or the
resize route)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from cascadev.config import ConfigError
from cascadev.pipelines.conditioning import (downsample_video, resize_small_from_latent, semantic_small,
                                             upsample_condition)
from cascadev.training.config import TrainConfig
from cascadev.training.data import mix_seed
from cascadev.training.diffusion import build_diffusion, mean_flat
from cascadev.training.tasks.common import (PART_DIRS, build_semantic_encoder, encode_frames, export_trained_and_ema,
                                            draws_samples, init_weights, save_module, seeded, write_sample)
from cascadev.weights import CascadeModel


def build_dit(config: TrainConfig, load_weights: bool) -> nn.Module:
    """The DiT that trains: fresh, from the release (``official:PATH``), or from a folder in our formats."""
    from dit.video_dit import VideoDiT

    section = config.dit
    dit_config = section.model_config()
    init = section.init_from if load_weights else None
    if init and init.startswith("official:"):
        model = VideoDiT.from_single_file(init.removeprefix("official:"), dit_config)
    else:
        model = VideoDiT(**dit_config)
        if init:
            init_weights(model, init, "dit.init_from (or official:PATH for s1024.effn-f32.pth)",
                         section.init_new_condition)
    if section.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


class DiffusionAutoencoder(nn.Module):
    """Stage B as Wuerstchen trains it: the semantic encoder and the DiT as one module (one DDP wrapper), so the
    encoder learns what the DiT needs. forward: noisy latents (B, C, T, h, w) and the clean video (B, 3, T, 8h, 8w)
    -> the DiT's output (B, C_out, T, h, w)."""

    def __init__(self, dit: nn.Module, encoder: nn.Module, scale_factor: float):
        super().__init__()
        self.dit, self.encoder, self.scale_factor = dit, encoder.requires_grad_(True), scale_factor

    def condition(self, video: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, 3, T, H, W) -> the DiT's condition on the latent grid (T, h, w), as ``DiTTask.inputs`` builds it."""
        return upsample_condition(semantic_small(encode_frames(self.encoder, video), self.scale_factor), grid)

    def forward(self, x_t: torch.Tensor, video: torch.Tensor, t: torch.Tensor, as_images: bool = False) -> torch.Tensor:
        cond = self.condition(video, tuple(x_t.shape[2:]))
        return self.dit(torch.cat([x_t, cond.to(x_t.dtype)], dim=1), t, as_images=as_images)


class DiTTask:
    """Stage B: the DiT denoises Stage A latents given the condition. Stage A is frozen; so is the semantic
    encoder, unless ``condition.train_encoder`` makes the model a ``DiffusionAutoencoder``."""

    name = "dit"

    def __init__(self, config: TrainConfig, load_weights: bool = True, build_model: bool = True):
        from vae.stage_a import StageAVAE

        self.config = config
        seed = config.run.seed
        with seeded(seed, 0):
            self.model = build_dit(config, load_weights) if build_model else None   # None: encoders only (caching)
        with seeded(seed, 1):
            self.stage_a = StageAVAE.from_config(config.stage_a.model_config(), load_weights=load_weights)
        with seeded(seed, 2):
            self.semantic = (build_semantic_encoder(config, load_weights) if config.condition.route == "semantic"
                             else None)
        self.joint = config.condition.train_encoder
        if self.joint:
            if not build_model:
                raise ConfigError("condition.train_encoder: the encoder trains, so there is nothing to cache")
            self.model = DiffusionAutoencoder(self.model, self.semantic.train(), self.stage_a.config.scale_factor)
            self.semantic = None                                 # part of the model now
        self.diffusion = build_diffusion(config.diffusion)
        self.discriminator = None

    def to(self, device: torch.device) -> "DiTTask":
        """Move the frozen encoders (the trained model is placed by ``accelerator.prepare``)."""
        self.stage_a.to(device)
        if self.semantic is not None:
            self.semantic.to(device)
        return self

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """(B, 3, T, H, W) in [-1, 1] -> {"latent": (B, 4, T, H/8, W/8), "cond": the compact condition}, scaled.

        This is what a latent cache stores (``cascadev.training.cache_latents``).
        """
        c = self.config.condition
        latent = self.stage_a.encode(video, generator=generator)
        if c.route == "semantic":
            cond = semantic_small(self.semantic.encode(video), self.stage_a.config.scale_factor)
        elif c.resize_from == "pixels":
            cond = self.stage_a.encode(downsample_video(video, c.spatial_factor, c.temporal_factor),
                                       generator=generator)
        else:
            cond = resize_small_from_latent(latent, c.spatial_factor, c.temporal_factor)
        return {"latent": latent, "cond": cond}

    def inputs(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of pixels ("video") or of cached latents ("latent", "cond") -> (x0, cond), both (B, C, T, h, w).

        x0 is the scaled Stage A latent; cond the condition upsampled to its grid (bilinear, align_corners
        False), concatenated to the noisy latent on channels by ``loss``.
        """
        device = self.stage_a.device
        if self.joint:                                # the condition comes from the model (DiffusionAutoencoder)
            return self.stage_a.encode(batch["video"].to(device), generator=generator), None
        if "video" in batch:
            encoded = self.encode(batch["video"].to(device), generator)
        else:
            encoded = {k: batch[k].to(device) for k in ("latent", "cond")}
        x0 = encoded["latent"]
        factor = self.config.condition.temporal_factor if self.config.condition.route == "resize" else 1
        return x0, upsample_condition(encoded["cond"], tuple(x0.shape[2:]), factor)

    def denoise(self, model: nn.Module, x_t: torch.Tensor, cond: torch.Tensor | None, t: torch.Tensor,
                batch: dict, as_images: bool = False) -> torch.Tensor:
        """The model's output on cat([x_t, cond]); a ``DiffusionAutoencoder`` builds cond from the batch's video."""
        if self.joint:
            return model(x_t, batch["video"].to(x_t.device), t, as_images=as_images)
        return model(torch.cat([x_t, cond], dim=1), t, as_images=as_images)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator,
             as_images: bool) -> tuple[torch.Tensor, dict]:
        """Diffusion loss of one micro-batch: per-video timesteps, (eps, v) predicted on cat([x_t, cond]).

        A posterior sample in on-the-fly encoding draws from its own generator, so the noise is the same
        whether the batch holds pixels or cached latents.
        """
        seed = int(torch.randint(2 ** 62, (1,), generator=generator, device=generator.device))
        x0, cond = self.inputs(batch, torch.Generator(generator.device).manual_seed(seed))
        d = self.diffusion
        t = d.sample_t(x0.shape[0], generator)
        eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
        x_t = d.noise(x0, t, eps)
        out = self.denoise(model, x_t, cond, d.model_time(t), batch, as_images)            # b c_out t h w
        losses = d.losses(out, x0, x_t, t, eps)
        weight = self.config.dit.decoded_loss_weight
        if weight > 0:
            frames = torch.randperm(x0.shape[2], generator=generator, device=generator.device)
            frames = frames[:self.config.dit.decoded_loss_frames].to(x0.device)
            x0_pred = d.predict_x0(out[:, :, frames].float(), x_t[:, :, frames].float(), t)
            losses["decoded_mse"] = self.decoded_mse(x0_pred, x0[:, :, frames])
            losses["loss"] = losses["loss"] + weight * losses["decoded_mse"]
        return losses["loss"].mean(), {k: v.detach().mean() for k, v in losses.items()}

    def decoded_mse(self, x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Per-video MSE (B,) of two latent batches (B, C, T, h, w) decoded by the frozen Stage A; gradients
        reach ``x0_pred`` only. The target is Stage A's reconstruction: a latent cache holds no pixels."""
        with torch.no_grad():
            target = self.stage_a.decode_window(x0)
        return mean_flat((self.stage_a.decode_window(x0_pred) - target).square())

    def micro_step(self, accelerator, prepared: dict, batch: dict, generator: torch.Generator, as_images: bool,
                   step: int, accum: int) -> dict:
        loss, logs = self.loss(prepared["model"], batch, generator, as_images)
        accelerator.backward(loss / accum)
        return logs

    @torch.no_grad()
    def validate(self, accelerator, prepared: dict, clips: list[dict], step: int, run_dir: Path) -> dict:
        """Loss at fixed timesteps and noise on held-out clips; on the main process, a sampled reconstruction
        of the first clip (``cascadev.pipelines.sampling``, the objective's sampler) saved as ``samples/step_N.mp4``
        next to the input."""
        from eval.metrics import psnr

        model = prepared["model"]
        model.eval()
        d, n_t = self.diffusion, self.config.run.val_timesteps
        losses = []
        for i, clip in enumerate(clips):
            g = torch.Generator(accelerator.device).manual_seed(mix_seed(self.config.run.seed, i, 3))
            batch = {"video": clip["video"][None]}
            x0, cond = self.inputs(batch, g)
            for k in range(n_t):
                frac = (k + 0.5) / n_t
                t = (torch.tensor([int(frac * d.num_timesteps)]) if self.config.diffusion.objective == "iddpm"
                     else torch.tensor([frac])).to(x0.device)
                eps = torch.randn(x0.shape, generator=g, device=g.device).to(x0.device)
                x_t = d.noise(x0, t, eps)
                out = self.denoise(model, x_t, cond, d.model_time(t), batch)
                losses.append(d.losses(out, x0, x_t, t, eps)["loss"].mean())
        logs = {"val/loss": torch.stack(losses).mean().item()} if losses else {}
        steps = self.config.run.val_sample_steps
        if clips and steps > 0 and draws_samples(accelerator):
            from cascadev.pipelines.sampling import sample, scheduler_for_objective

            # the sampler that matches the objective: ancestral Euler (release) or flow Euler at the trained shift
            scheduler = scheduler_for_objective(self.config.diffusion, "euler_a")
            unwrapped = accelerator.unwrap_model(model)
            g = torch.Generator(accelerator.device).manual_seed(self.config.run.seed)
            video = clips[0]["video"][None].to(accelerator.device)
            x0, cond = self.inputs({"video": video}, g)
            if self.joint:
                cond, unwrapped = unwrapped.condition(video, tuple(x0.shape[2:])), unwrapped.dit
            noise = torch.randn(x0.shape, generator=g, device=g.device).to(x0.device)
            with accelerator.autocast():
                z = sample(unwrapped, cond, noise, scheduler, steps=steps, generator=g)
        if clips and steps > 0 and accelerator.is_main_process:
            recon = self.stage_a.decode(z.float()).clamp(-1, 1)
            reference = self.stage_a.decode(x0).clamp(-1, 1)
            logs["val/psnr_sampled_vs_input"] = psnr(recon.cpu(), clips[0]["video"][None].cpu()).mean().item()
            logs["val/psnr_stage_a_vs_input"] = psnr(reference.cpu(), clips[0]["video"][None].cpu()).mean().item()
            write_sample(run_dir, step, [clips[0]["video"][None].cpu(), reference.cpu(), recon.cpu()])
        model.train()
        return logs

    def save_model_config(self, directory: Path) -> None:
        """A checkpoint's ``config.json``, so it loads with ``VideoDiT.from_legacy_folder`` (none for a
        ``DiffusionAutoencoder``)."""
        if isinstance(self.model, CascadeModel):
            self.model.save_config(directory)

    def export_final(self, final: Path, state_dict: dict, ema_state: dict | None) -> None:
        """``final/model`` (trained weights) and ``final/ema`` (EMA weights, when on)."""
        export_trained_and_ema(self, final, state_dict, ema_state)

    def export(self, state_dict: dict, directory: Path) -> None:
        """Weights in diffusers' layout (``config.json`` + ``diffusion_pytorch_model.safetensors``);
        ``VideoDiT.from_pretrained`` reads it. A trained encoder goes to ``semantic_encoder/`` beside them
        (``SemanticEncoder.from_pretrained``)."""
        if not self.joint:
            save_module(state_dict, self.model, directory)
            return
        save_module(state_dict, self.model.dit, directory, "dit.")
        save_module(state_dict, self.model.encoder, directory / PART_DIRS["encoder"], "encoder.")
