"""What trains in each stage of the cascade: one task object per stage, picked by ``build_task``.

A task holds what differs between stages -- the models (the one that trains, the frozen encoders around it, a
discriminator), the loss, validation and the export of final weights -- so that the loop in ``cascadev.training.train``
is the same for all of them: ``DiTTask`` (stage "dit", Stage B), ``VAETask`` ("vae", Stage A), ``SemanticTask``
("semantic", Stage B's semantic encoder with the Previewer) and ``BaseTask`` ("base", Stage C).

What the loop uses of a task:

- ``name``: the stage; ``model``: the module that trains (the loop prepares it, its optimizer and EMA);
  ``discriminator``: a second trained module with its own optimizer, or None.
- ``to(device)``: move what the task keeps outside ``model`` (frozen encoders, LPIPS); returns the task.
- ``micro_step(accelerator, prepared, batch, generator, as_images, step, accum)``: loss and backward of one
  micro-batch (``prepared`` holds the prepared "model" and "discriminator"); returns the values to log.
- ``validate(accelerator, prepared, clips, step, run_dir)``: metrics on held-out clips, and a sample under
  ``run_dir/samples``.
- ``export(state_dict, directory)``: final weights in our formats (``cascadev.training.train.export_final`` decides
  which state dict goes where; for stage base it also saves ``text_encoder``).

``DiTTask`` and ``BaseTask`` also ``encode`` videos into what ``cascadev.training.cache_latents`` stores, built with
``build_model=False`` (frozen encoders only). Every model is initialised under ``seeded(seed, part)``, so each
process and command builds the same random-init weights.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from cascadev.config import ConfigError
from cascadev.pipelines.conditioning import downsample_video, resize_small_from_latent, semantic_small, upsample_condition
from cascadev.training.config import TrainConfig
from cascadev.training.data import mix_seed
from cascadev.training.diffusion import build_diffusion, mean_flat
from cascadev.training.losses import (PatchDiscriminator, base_training_loss, hinge_d_loss, hinge_g_loss,
                                      kl_standard_normal, load_lpips_loss)
from cascadev.weights import CONFIG_NAME, atomic_write, save_model_weights, save_state_dict


# -- models: one task per stage ---------------------------------------------------------------------

@contextlib.contextmanager
def seeded(seed: int, part: int):
    """Initialise a model from (seed, part) without touching the global RNG: every process and every
    command (train, cache_latents) builds the same random-init weights, whatever else it builds."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(seed, part))
        yield


def load_semantic_encoder(weights: str, config, load_weights: bool, key: str) -> nn.Module:
    """A ``SemanticEncoder``: the released file ("hub", or a path to/holding ``effnet_encoder.safetensors``), our
    formats (a folder with ``config.json``, e.g. ``RUN/final/semantic_encoder`` of a "semantic" run: its own
    config wins over ``config`` but must give as many channels), or random ("random", or ``load_weights`` False)."""
    from vae.semantic_encoder import SemanticEncoder

    if not load_weights or weights == "random":
        return SemanticEncoder.from_spec(config)
    if weights == "hub":
        return SemanticEncoder.from_single_file(None, config)
    if (Path(weights) / CONFIG_NAME).is_file():
        encoder = SemanticEncoder.from_folder(weights)
        if encoder.config.latent_channels != config.latent_channels:
            raise ConfigError(f"{key}={weights}: that encoder gives {encoder.config.latent_channels} channels, "
                              f"this config expects {config.latent_channels}")
        return encoder
    return SemanticEncoder.from_single_file(weights, config)


def build_semantic_encoder(config: TrainConfig, load_weights: bool) -> nn.Module:
    """The frozen semantic encoder of the condition (stages dit and base), in eval mode (running BatchNorm stats)."""
    from vae.semantic_encoder import PRESETS

    c = config.condition
    encoder = load_semantic_encoder(c.semantic_weights, PRESETS[c.semantic_preset], load_weights,
                                    "condition.semantic_weights")
    return encoder.eval().requires_grad_(False)


def init_weights(model: nn.Module, folder: str | Path, key: str, new_condition: bool = False) -> None:
    """Load the weights of a model folder (either layout ``from_folder`` takes) into ``model``, built from this run's config.
    ``new_condition``: ``dit.init_new_condition`` (a DiT trained with another condition)."""
    if not (Path(folder) / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{key}: {Path(folder) / CONFIG_NAME} not found (expected a folder written by "
                                "save_pretrained or a checkpoint of a run)")
    state = type(model).from_folder(folder).state_dict()
    if new_condition:   # DiT: the noisy-latent input channels of the patch embedding kept, the condition's zeroed
        key_w, n = "x_embedder.proj.weight", model.spec.latent_channels
        fresh = torch.zeros_like(model.state_dict()[key_w])
        fresh[:, :n] = state[key_w][:, :n]
        state[key_w] = fresh
    model.load_state_dict(state, strict=True)


def build_dit(config: TrainConfig, load_weights: bool) -> nn.Module:
    """The DiT that trains: fresh, from the release (``official:PATH``), or from a folder in our formats."""
    from dit.video_dit import VideoDiT

    section = config.dit
    dit_config = section.model_config()
    init = section.init_from if load_weights else None
    if init and init.startswith("official:"):
        model = VideoDiT.from_single_file(init.removeprefix("official:"), dit_config)
    else:
        model = VideoDiT.from_spec(dit_config)
        if init:
            init_weights(model, init, "dit.init_from (or official:PATH for s1024.effn-f32.pth)", section.init_new_condition)
    if section.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def encode_frames(encoder: nn.Module, video: torch.Tensor) -> torch.Tensor:
    """A semantic encoder on every frame, differentiably: (B, 3, T, H, W) -> (B, 16, T, H/32, W/32)."""
    latent = encoder(rearrange(video, "b c t h w -> (b t) c h w"))                    # (b t) 16 H/32 W/32
    return rearrange(latent, "(b t) c h w -> b c t h w", b=video.shape[0])


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
            self.semantic = build_semantic_encoder(config, load_weights) if config.condition.route == "semantic" else None
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
            cond = self.stage_a.encode(downsample_video(video, c.spatial_factor, c.temporal_factor), generator=generator)
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

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator, as_images: bool) -> tuple[torch.Tensor, dict]:
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
        if accelerator.is_main_process and clips and steps > 0 and not is_fsdp(accelerator):
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
                z = sample(unwrapped, cond, noise, scheduler, steps=steps, generator=g, progress=False)
            recon = self.stage_a.decode(z.float()).clamp(-1, 1)
            reference = self.stage_a.decode(x0).clamp(-1, 1)
            logs["val/psnr_sampled_vs_input"] = psnr(recon.cpu(), clips[0]["video"][None].cpu()).mean().item()
            logs["val/psnr_stage_a_vs_input"] = psnr(reference.cpu(), clips[0]["video"][None].cpu()).mean().item()
            write_sample(run_dir, step, [clips[0]["video"][None].cpu(), reference.cpu(), recon.cpu()])
        model.train()
        return logs

    def export(self, state_dict: dict, directory: Path) -> None:
        """Weights in diffusers' layout (``config.json`` + ``diffusion_pytorch_model.safetensors``);
        ``VideoDiT.from_pretrained`` reads it. A trained encoder goes to ``semantic_encoder/`` beside them (``SemanticEncoder.from_pretrained``)."""
        if not self.joint:
            save_module(state_dict, self.model, directory)
            return
        save_module(state_dict, self.model.dit, directory, "dit.")
        save_module(state_dict, self.model.encoder, directory / PART_DIRS["encoder"], "encoder.")


class VAEReconstruction(nn.Module):
    """The diffusers autoencoder as one module for DDP: video (B, 3, T, H, W) -> (reconstruction, posterior mean, log var)."""

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


class VAETask:
    """Stage A: L1 + MSE + LPIPS (when its weights are on disk) + KL, and a hinge patch discriminator from
    ``vae.disc_start``."""

    name = "vae"

    def __init__(self, config: TrainConfig, load_weights: bool = True):
        from vae.stage_a import StageAVAE

        self.config = config
        stage_a_config = config.stage_a.model_config()
        if stage_a_config.dtype != "float32":
            raise ConfigError("stage vae trains float32 weights: set stage_a.overrides.dtype=float32 "
                              "(use run.mixed_precision for bf16/fp16 compute)")
        with seeded(config.run.seed, 1):
            vae = StageAVAE.from_config(stage_a_config, load_weights=load_weights).model
        vae.requires_grad_(False)
        patterns = config.vae.trainable
        trainable = [p for n, p in vae.named_parameters() if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
        if not trainable:
            raise ConfigError(f"vae.trainable {list(patterns)} matches no parameter of {type(vae).__name__} "
                              f"(names look like {next(iter(dict(vae.named_parameters())))!r})")
        for p in trainable:
            p.requires_grad_(True)
        self.model = VAEReconstruction(vae, temporal=stage_a_config.kind == "svd_temporal").train()
        with seeded(config.run.seed, 3):
            self.discriminator = (PatchDiscriminator(config.vae.disc_channels, config.vae.disc_layers)
                                  if config.vae.disc_start is not None else None)
        self.lpips = None

    def to(self, device: torch.device) -> "VAETask":
        if self.config.vae.lpips_weight > 0:
            self.lpips = load_lpips_loss(device)
        return self

    def generator_loss(self, model: nn.Module, discriminator: nn.Module | None, video: torch.Tensor,
                       generator: torch.Generator, use_disc: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
        c = self.config.vae
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
        use_disc = self.discriminator is not None and step >= self.config.vae.disc_start
        disc = prepared.get("discriminator")
        with accelerator.autocast():
            loss, recon, logs = self.generator_loss(prepared["model"], accelerator.unwrap_model(disc) if use_disc else None,
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
        from eval.metrics import psnr

        model = prepared["model"]
        model.eval()
        values, l1 = [], []
        for i, clip in enumerate(clips):
            video = clip["video"][None].to(accelerator.device)
            recon = model(video, None, sample=False)[0].float().clamp(-1, 1)
            values.append(psnr(recon.cpu(), video.cpu()).mean())
            l1.append((recon - video).abs().mean().cpu())
            if i == 0 and accelerator.is_main_process:
                write_sample(run_dir, step, [video.cpu(), recon.cpu()])
        model.train()
        return {"val/psnr": torch.stack(values).mean().item(), "val/l1": torch.stack(l1).mean().item()} if values else {}

    def export(self, state_dict: dict, directory: Path) -> None:
        """A diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``): load it with
        ``stage_a.overrides.pretrained=DIR`` (``subfolder: null``) or ``from_pretrained``."""
        vae_state = {k.removeprefix("vae."): v for k, v in state_dict.items()}
        save_state_dict(vae_state, directory / "diffusion_pytorch_model.safetensors")
        self.model.vae.save_config(str(directory))


class SemanticAutoencoder(nn.Module):
    """The semantic encoder and the Previewer as one module (one DDP wrapper), every frame an image:
    video (B, 3, T, H, W) in [-1, 1] -> (preview (B, 3, T, H/4, W/4) in about [-1, 1], latent (B, 16, T, H/32, W/32))."""

    def __init__(self, encoder: nn.Module, previewer: nn.Module, train_encoder: bool):
        super().__init__()
        self.encoder, self.previewer, self.train_encoder = encoder, previewer, train_encoder
        self.encoder.requires_grad_(train_encoder)
        self.previewer.requires_grad_(True)

    def train(self, mode: bool = True) -> "SemanticAutoencoder":
        super().train(mode)
        if not self.train_encoder:      # frozen: its BatchNorm keeps normalising with the given running statistics
            self.encoder.eval()
        return self

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent = encode_frames(self.encoder, video)
        return self.previewer(latent), latent                                            # b 3 t h/4 w/4


class SemanticTask:
    """Stage B's semantic encoder and the Previewer trained jointly as an autoencoder of frames (or the Previewer
    alone on a given encoder, ``semantic.train_encoder: false``, as Stable Cascade released it).

    The encoder's latent is normalised by its mapper's BatchNorm (no affine): batch statistics while it trains,
    running statistics (buffers: checkpointed, resumed and exported with the weights) otherwise. The Previewer
    predicts the frame at 1/4 resolution (f32 latent, x8 decoder), so the target is the frame downsampled x4
    (bilinear, antialiased). Loss: ``l1_weight`` L1 + ``mse_weight`` MSE, per pixel.
    """

    name = "semantic"

    def __init__(self, config: TrainConfig, load_weights: bool = True):
        from vae.previewer import Previewer

        self.config = config
        s = config.semantic
        with seeded(config.run.seed, 2):
            encoder = load_semantic_encoder(s.encoder_weights, s.encoder_config(), load_weights, "semantic.encoder_weights")
        with seeded(config.run.seed, 4):
            previewer_config = s.previewer_config()
            if not load_weights or s.previewer_weights == "random":
                previewer = Previewer.from_spec(previewer_config)
            elif s.previewer_weights == "hub":
                previewer = Previewer.from_single_file(None, previewer_config)
            elif (Path(s.previewer_weights) / CONFIG_NAME).is_file():
                previewer = Previewer.from_folder(s.previewer_weights)
            else:
                previewer = Previewer.from_single_file(s.previewer_weights, previewer_config)
        self.model = SemanticAutoencoder(encoder, previewer, s.train_encoder).train()
        self.discriminator = None

    def to(self, device: torch.device) -> "SemanticTask":
        return self                                          # nothing frozen outside the model

    @staticmethod
    def target(video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> the frames the Previewer should output, (B, 3, T, H/4, W/4)."""
        from vae.previewer import UPSAMPLE
        from vae.semantic_encoder import DOWNSAMPLE
        return downsample_video(video, DOWNSAMPLE // UPSAMPLE, 1)

    def loss(self, model: nn.Module, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(loss, preview, logs) of a batch of frames (B, 3, T, H, W) in [-1, 1]."""
        c = self.config.semantic
        preview, latent = model(video)
        error = preview.float() - self.target(video)
        l1, mse = error.abs().mean(), error.square().mean()
        loss = c.l1_weight * l1 + c.mse_weight * mse
        logs = {"loss": loss.detach(), "l1": l1.detach(), "mse": mse.detach(),
                "latent_std": latent.detach().float().std()}
        return loss, preview, logs

    def micro_step(self, accelerator, prepared: dict, batch: dict, generator: torch.Generator, as_images: bool,
                   step: int, accum: int) -> dict:
        loss, _, logs = self.loss(prepared["model"], batch["video"].to(accelerator.device))
        accelerator.backward(loss / accum)
        return logs

    @torch.no_grad()
    def validate(self, accelerator, prepared: dict, clips: list[dict], step: int, run_dir: Path) -> dict:
        """PSNR and L1 of the previews (eval mode: running BatchNorm statistics) against the x4-downsampled
        held-out clips; the first saved as ``samples/step_N.mp4``, target beside preview."""
        from eval.metrics import psnr

        model = prepared["model"]
        model.eval()
        values, l1 = [], []
        for i, clip in enumerate(clips):
            video = clip["video"][None].to(accelerator.device)
            preview = model(video)[0].float().clamp(-1, 1)
            target = self.target(video)
            values.append(psnr(preview.cpu(), target.cpu()).mean())
            l1.append((preview - target).abs().mean().cpu())
            if i == 0 and accelerator.is_main_process:
                write_sample(run_dir, step, [target.cpu(), preview.cpu()])
        model.train()
        return {"val/psnr": torch.stack(values).mean().item(), "val/l1": torch.stack(l1).mean().item()} if values else {}

    def export(self, state_dict: dict, directory: Path) -> None:
        """``semantic_encoder/`` and ``previewer/`` in our format (``SemanticEncoder/Previewer.from_pretrained``;
        ``condition.semantic_weights=DIR/semantic_encoder`` for stages dit and base). The BatchNorm running
        statistics are the model's (EMA averages parameters only)."""
        for part in ("encoder", "previewer"):
            save_module(state_dict, getattr(self.model, part), directory / PART_DIRS[part], f"{part}.")


PART_DIRS = {"encoder": "semantic_encoder", "previewer": "previewer"}


def build_base_dit(config: TrainConfig, load_weights: bool) -> nn.Module:
    """The TextDiT that trains: fresh, or from a folder in our formats (``base.init_from``)."""
    from dit.text_dit import TextDiT

    section = config.base
    model = TextDiT.from_spec(section.model_config())
    if section.init_from and load_weights:
        init_weights(model, section.init_from, "base.init_from (e.g. a base run's final/base_dit or a checkpoint)")
    if section.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def build_text_encoder(config: TrainConfig, load_weights: bool) -> nn.Module:
    """The frozen text encoder of stage base: our folder (``base.text_encoder_weights`` holding config.json), or the
    preset (+ overrides) with its open_clip weights, a checkpoint path, or random weights."""
    from dit.text_encoder import TextEncoder

    b = config.base
    text_config = b.text_encoder_config()
    if text_config is None:
        encoder = TextEncoder.from_pretrained(b.text_encoder_weights)
    else:
        encoder = TextEncoder.build(text_config, load_weights=load_weights)
    return encoder.eval().requires_grad_(False)


class BaseTask:
    """Stage C: the TextDiT denoises semantic latents (B, 16, T, H/32, W/32) given the caption; the semantic encoder
    (``condition`` section) and the text encoder are frozen.

    Latents come from a cache of this stage (``cascadev.training.cache_latents``: "semantic", unscaled, and the caption)
    or are encoded on the fly. Captions are encoded per batch by the frozen text encoder (no caption cache: a
    bigG embedding is 77 x 1280 floats, too large to keep for a real dataset, and cheap beside the DiT); the
    empty prompt once. ``cascadev.training.losses.base_training_loss`` does the rest: the latent scale, ``caption_dropout``
    of the captions replaced by the empty prompt (for classifier-free guidance), IDDPM with per-video timesteps.
    """

    name = "base"

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
            c = self.model.spec
            widths = (self.text_encoder.width, self.text_encoder.embed_dim)
            if (c.caption_channels, c.pooled_channels) != widths:        # a text encoder folder with other widths
                raise ConfigError(f"the text encoder gives widths {widths}, the base model reads "
                                  f"{(c.caption_channels, c.pooled_channels)} (base.overrides.caption_channels / "
                                  "pooled_channels)")
        self.diffusion = build_diffusion(config.diffusion)
        self.discriminator = None
        self._null_text = None

    def to(self, device: torch.device) -> "BaseTask":
        self.semantic.to(device)
        if self.text_encoder is not None:
            self.text_encoder.to(device)
        self._null_text = None
        return self

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """(B, 3, T, H, W) in [-1, 1] -> {"semantic": (B, 16, T, H/32, W/32)}, unscaled: what a cache of this stage stores."""
        return {"semantic": self.semantic.encode(video)}

    def latents(self, batch: dict) -> torch.Tensor:
        """A batch of pixels ("video") or of cached latents ("semantic") -> semantic latents (B, 16, T, h, w), unscaled."""
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

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator, as_images: bool) -> tuple[torch.Tensor, dict]:
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
        from cascadev.pipelines.text_to_video import DEFAULT_GUIDANCE, from_model, sample_base, scheduler_for, to_model
        from cascadev.pipelines.cascade import save_latents

        model = prepared["model"]
        model.eval()
        config = accelerator.unwrap_model(model).spec
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
        if accelerator.is_main_process and clips and steps > 0 and not is_fsdp(accelerator):
            unwrapped = accelerator.unwrap_model(model)
            shape = self.latents({"video": clips[0]["video"][None]}).shape
            g = torch.Generator(accelerator.device).manual_seed(self.config.run.seed)
            noise = torch.randn(shape, generator=g, device=g.device).to(accelerator.device)
            with accelerator.autocast():
                z = sample_base(unwrapped, noise, self.text([clips[0]["caption"]]), self.null_text, DEFAULT_GUIDANCE,
                                scheduler=scheduler_for(self.config.diffusion), steps=steps, generator=g, progress=False)
            z = from_model(z, config)
            logs["val/sample_std"] = z.std().item()
            save_latents(run_dir / "samples" / f"step_{step:08d}.safetensors", z.cpu(), prompt=clips[0]["caption"])
        model.train()
        return logs

    def export(self, state_dict: dict, directory: Path) -> None:
        """``base_dit/`` in our format (``TextDiT.from_pretrained``); ``export_final`` adds ``text_encoder/``, so the
        folder is a ``TextToVideoPipeline.from_pretrained`` root (with a cascade given apart)."""
        from cascadev.pipelines.text_to_video import BASE_DIR
        save_module(state_dict, self.model, directory / BASE_DIR)


def save_module(state_dict: dict, module: nn.Module, folder: Path, prefix: str = "") -> None:
    """``save_pretrained`` of ``module`` with the entries of ``state_dict`` under ``prefix`` (prefix removed): the
    folder its ``from_pretrained`` reads."""
    save_model_weights(module, {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)},
                       folder)


def build_task(config: TrainConfig, load_weights: bool = True) -> DiTTask | VAETask | SemanticTask | BaseTask:
    """The one factory of what trains."""
    if config.stage == "dit":
        return DiTTask(config, load_weights)
    elif config.stage == "vae":
        return VAETask(config, load_weights)
    elif config.stage == "semantic":
        return SemanticTask(config, load_weights)
    elif config.stage == "base":
        return BaseTask(config, load_weights)
    raise ConfigError(f"unknown stage {config.stage!r}; expected 'dit', 'vae', 'semantic' or 'base'")


# -- small helpers (the loop uses them too) -------------------------------------------------------

def write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_sample(run_dir: Path, step: int, videos: list[torch.Tensor]) -> None:
    """Videos (1, 3, T, H, W) side by side as ``samples/step_N.mp4``."""
    from cascadev.video_io import write_video
    write_video(run_dir / "samples" / f"step_{step:08d}.mp4", torch.cat([v.float() for v in videos], dim=-1))


def is_fsdp(accelerator) -> bool:
    """Whether the model is sharded (FSDP): no EMA, no sampled validation."""
    return accelerator.distributed_type.name == "FSDP"
