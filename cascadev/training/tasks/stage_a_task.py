"""Stage A's training task (stage "stage_a"): the diffusers autoencoder, with LPIPS and a patch discriminator."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from cascadev.config import ConfigError
from cascadev.training.config import TrainConfig
from cascadev.training.losses import PatchDiscriminator, hinge_d_loss, hinge_g_loss, kl_standard_normal, load_lpips_loss
from cascadev.training.tasks.common import export_trained_and_ema, reconstruction_scores, seeded
from cascadev.weights import save_state_dict
from vae.stage_a import drop_unloadable_config_keys


class VAEReconstruction(nn.Module):
    """The diffusers autoencoder as one module for DDP: video (B, 3, T, H, W) -> (reconstruction, posterior mean,
    log var)."""

    def __init__(self, vae: nn.Module, temporal: bool):
        super().__init__()
        self.vae, self.temporal = vae, temporal

    def forward(self, video: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True):
        """The log variance is None for a deterministic autoencoder (``AutoencoderTiny``): no KL term."""
        B, _, T = video.shape[:3]
        encoded = self.vae.encode(rearrange(video, "b c t h w -> (b t) c h w"))
        if hasattr(encoded, "latents"):                                      # AutoencoderTiny
            z = mean = encoded.latents
            logvar = None
        else:
            posterior = encoded.latent_dist                                  # (b t) 4 h w diagonal Gaussian
            z = posterior.sample(generator) if sample else posterior.mode()
            mean, logvar = posterior.mean, posterior.logvar
        frames = self.vae.decode(z, num_frames=T).sample if self.temporal else self.vae.decode(z).sample
        return rearrange(frames, "(b t) c h w -> b c t h w", b=B), mean, logvar


class StageATask:
    """Stage A: L1 + MSE + LPIPS (when its weights are on disk) + KL, and a hinge patch discriminator from
    ``vae.disc_start``."""

    name = "stage_a"

    def __init__(self, config: TrainConfig, load_weights: bool = True):
        from vae.stage_a import StageAVAE

        self.config = config
        stage_a_config = config.stage_a.model_config()
        if stage_a_config.dtype != "float32":
            raise ConfigError("stage stage_a trains float32 weights: set stage_a.overrides.dtype=float32 "
                              "(use run.mixed_precision for bf16/fp16 compute)")
        with seeded(config.run.seed, 1):
            vae = StageAVAE.from_config(stage_a_config, load_weights=load_weights).model
        vae.requires_grad_(False)
        patterns = config.stage_a_training.trainable
        trainable = [p for n, p in vae.named_parameters() if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
        if not trainable:
            raise ConfigError(f"vae.trainable {list(patterns)} matches no parameter of {type(vae).__name__} "
                              f"(names look like {next(iter(dict(vae.named_parameters())))!r})")
        for p in trainable:
            p.requires_grad_(True)
        self.model = VAEReconstruction(vae, temporal=stage_a_config.kind == "svd_temporal").train()
        with seeded(config.run.seed, 3):
            losses = config.stage_a_training
            self.discriminator = (PatchDiscriminator(losses.disc_channels, losses.disc_layers)
                                  if losses.disc_start is not None else None)
        self.lpips = None

    def to(self, device: torch.device) -> "StageATask":
        if self.config.stage_a_training.lpips_weight > 0:
            self.lpips = load_lpips_loss(device)
        return self

    def generator_loss(self, model: nn.Module, discriminator: nn.Module | None, video: torch.Tensor,
                       generator: torch.Generator, use_disc: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
        c = self.config.stage_a_training
        recon, mean, logvar = model(video, generator, sample=c.sample_posterior)
        error = recon.float() - video
        l1, mse = error.abs().mean(), error.square().mean()
        kl = kl_standard_normal(mean.float(), logvar.float()).mean() if logvar is not None else error.new_zeros(())
        loss = c.l1_weight * l1 + c.mse_weight * mse + c.kl_weight * kl
        logs = {"l1": l1.detach(), "mse": mse.detach(), "kl": kl.detach()}
        frames = rearrange(recon, "b c t h w -> (b t) c h w")
        target = rearrange(video, "b c t h w -> (b t) c h w")
        if c.lowpass_weight > 0:
            # block means of the f8 grid: a tiny TAESD trained on L1 + MSE alone missed flat colours by ~0.1
            lowpass = (F.avg_pool2d(frames.float(), 8) - F.avg_pool2d(target, 8)).square().mean()
            loss = loss + c.lowpass_weight * lowpass
            logs["lowpass"] = lowpass.detach()
        if self.lpips is not None:
            lp = self.lpips(frames.float(), target).mean()
            loss = loss + c.lpips_weight * lp
            logs["lpips"] = lp.detach()
        if use_disc:
            # the discriminator's weights are constants here: its own step trains it
            params = {n: p.detach() for n, p in discriminator.named_parameters()}
            g_adv = hinge_g_loss(torch.func.functional_call(discriminator, params, (frames,)).float())
            loss = loss + c.disc_weight * g_adv
            logs["g_adv"] = g_adv.detach()
        logs["loss"] = loss.detach()
        return loss, recon, logs

    def micro_step(self, accelerator, prepared: dict, batch: dict, generator: torch.Generator, as_images: bool,
                   step: int, accum: int) -> dict:
        video = batch["video"].to(accelerator.device)
        use_disc = self.discriminator is not None and step >= self.config.stage_a_training.disc_start
        disc = prepared.get("discriminator")
        with accelerator.autocast():
            loss, recon, logs = self.generator_loss(prepared["model"],
                                                    accelerator.unwrap_model(disc) if use_disc else None,
                                                    video, generator, use_disc)
        accelerator.backward(loss / accum)
        if use_disc:
            real = rearrange(video, "b c t h w -> (b t) c h w")
            fake = rearrange(recon.detach(), "b c t h w -> (b t) c h w")
            logits = disc(torch.cat([real, fake.to(real.dtype)]))          # one forward for DDP
            d_loss = hinge_d_loss(*logits.float().chunk(2))
            accelerator.backward(d_loss / accum)
            logs["d_loss"] = d_loss.detach()
        return logs

    @torch.no_grad()
    def validate(self, accelerator, prepared: dict, clips: list[dict], step: int, run_dir: Path) -> dict:
        """Reconstruction (posterior mode) of held-out clips: PSNR and L1; the first saved as a sample video."""
        model = prepared["model"]
        return reconstruction_scores(accelerator, model, clips, step, run_dir,
                                     lambda video: (video, model(video, None, sample=False)[0]))

    def save_model_config(self, directory: Path) -> None:
        """Nothing beside accelerate's state in a checkpoint."""

    def export_final(self, final: Path, state_dict: dict, ema_state: dict | None) -> None:
        """``final/model`` (trained weights) and ``final/ema`` (EMA weights, when on)."""
        export_trained_and_ema(self, final, state_dict, ema_state)

    def export(self, state_dict: dict, directory: Path) -> None:
        """A diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``): load it with
        ``stage_a.overrides.pretrained=DIR`` (``subfolder: null``) or ``from_pretrained``."""
        vae_state = {k.removeprefix("vae."): v for k, v in state_dict.items()}
        save_state_dict(vae_state, directory / "diffusion_pytorch_model.safetensors")
        self.model.vae.save_config(str(directory))
        drop_unloadable_config_keys(directory / "config.json")
