"""The semantic encoder and the Previewer trained as an autoencoder of frames (stage "semantic")."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from cascadev.pipelines.conditioning import downsample_video
from cascadev.training.config import TrainConfig
from cascadev.training.tasks.common import (PART_DIRS, encode_frames, export_for_inference, load_semantic_encoder,
                                            reconstruction_scores, save_module, seeded)
from cascadev.weights import CONFIG_NAME


class SemanticAutoencoder(nn.Module):
    """The semantic encoder and the Previewer as one module (one DDP wrapper), every frame an image:
    video (B, 3, T, H, W) in [-1, 1] -> (preview (B, 3, T, H/4, W/4) in about [-1, 1],
    latent (B, 16, T, H/32, W/32))."""

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
            encoder = load_semantic_encoder(s.encoder_weights, s.encoder_config(), load_weights,
                                            "semantic.encoder_weights")
        with seeded(config.run.seed, 4):
            previewer_config = s.previewer_config()
            if not load_weights or s.previewer_weights == "random":
                previewer = Previewer(**previewer_config)
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
        model = prepared["model"]
        return reconstruction_scores(accelerator, model, clips, step, run_dir,
                                     lambda video: (self.target(video), model(video)[0]))

    def save_model_config(self, directory: Path) -> None:
        """Nothing beside accelerate's state in a checkpoint."""

    def export_final(self, final: Path, state_dict: dict, ema_state: dict | None) -> None:
        """``final/`` as ``export`` writes it, with the EMA weights when on; then the trained ones in
        ``final/model``."""
        export_for_inference(self, final, state_dict, ema_state)

    def export(self, state_dict: dict, directory: Path) -> None:
        """``semantic_encoder/`` and ``previewer/`` in our format (``SemanticEncoder/Previewer.from_pretrained``;
        ``condition.semantic_weights=DIR/semantic_encoder`` for stages dit and stage_c). The BatchNorm running
        statistics are the model's (EMA averages parameters only)."""
        for part in ("encoder", "previewer"):
            save_module(state_dict, getattr(self.model, part), directory / PART_DIRS[part], f"{part}.")
