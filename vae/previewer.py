"""Previewer: semantic latents (16 ch, f32) -> RGB at 8x the latent size, no diffusion.

Stable Cascade's fast Stage C decoder, used by CascadeV as the "no LDM" baseline (Fig. 5) and for
quick looks at Stage C output. One ``nn.Sequential`` named ``blocks`` whose indices match the released
``previewer.safetensors`` (``blocks.0`` 1x1 conv 16 -> c, then (conv | transposed conv x2) -> GELU ->
BatchNorm triples, ``blocks.24`` 1x1 conv c/4 -> 3):

    c_hidden:  16 -1x1-> c -3x3-> c -up-> c/2 -3x3-> c/2 -up-> c/4 -3x3-> c/4 -up-> c/4 -3x3-> c/4 -1x1-> 3

The released network outputs images in [0, 1]; ``forward`` maps them to this project's [-1, 1] at
the edge (``2 x - 1``) and ``decode`` also clamps.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ModelMixin  # noqa: F401  DiffusionPipeline.from_pretrained finds the load method by this name here
import torch.nn as nn
from diffusers.configuration_utils import register_to_config
from einops import rearrange

from cascadev.weights import CascadeModel, build_preset
from cascadev.checks import check_video
from vae.semantic_encoder import load_official_weights, resolve_official_file

UPSAMPLE = 8                    # three stride-2 transposed convs
OFFICIAL_FILE = "previewer.safetensors"


PRESETS: dict[str, dict] = {
    "official": {},                     # Previewer's defaults: Stable Cascade's previewer.safetensors
    "tiny": dict(hidden_channels=32),
}


def _stage(layer: nn.Module, channels: int) -> list[nn.Module]:
    return [layer, nn.GELU(), nn.BatchNorm2d(channels)]


class Previewer(CascadeModel):
    """(B, 16, T, h, w) semantic latents -> (B, 3, T, 8h, 8w) video in about [-1, 1].

    The keywords of ``__init__`` are its config; the defaults are the released Previewer. A diffusers model.
    """

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 16,
        hidden_channels: int = 512,     # "c_hidden" of Stable Cascade; stages use c, c/2, c/4
        out_channels: int = 3,
        frame_batch: int = 16,          # frames per call in ``forward``
    ):
        super().__init__()
        if hidden_channels < 4 or hidden_channels % 4:
            raise ValueError(f"hidden_channels must be a positive multiple of 4, got {hidden_channels}")
        if frame_batch < 1:
            raise ValueError(f"frame_batch must be >= 1, got {frame_batch}")
        c, c2, c4 = hidden_channels, hidden_channels // 2, hidden_channels // 4
        self.blocks = nn.Sequential(
            *_stage(nn.Conv2d(latent_channels, c, kernel_size=1), c),
            *_stage(nn.Conv2d(c, c, kernel_size=3, padding=1), c),
            *_stage(nn.ConvTranspose2d(c, c2, kernel_size=2, stride=2), c2),        # x2
            *_stage(nn.Conv2d(c2, c2, kernel_size=3, padding=1), c2),
            *_stage(nn.ConvTranspose2d(c2, c4, kernel_size=2, stride=2), c4),       # x4
            *_stage(nn.Conv2d(c4, c4, kernel_size=3, padding=1), c4),
            *_stage(nn.ConvTranspose2d(c4, c4, kernel_size=2, stride=2), c4),       # x8
            *_stage(nn.Conv2d(c4, c4, kernel_size=3, padding=1), c4),
            nn.Conv2d(c4, out_channels, kernel_size=1),
        )
        self.eval()

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 16, T, h, w) -> (B, 3, T, 8h, 8w) in about [-1, 1] (not clamped), ``frame_batch`` frames per call.
        Runs where ``latents`` are (as diffusers models do, so offload hooks can place the weights)."""
        check_video(latents, self.config.latent_channels, 1, "Previewer")
        B = latents.shape[0]
        frames = rearrange(latents, "b c t h w -> (b t) c h w").to(self.dtype)
        images = torch.cat([self.blocks(chunk) for chunk in frames.split(self.config.frame_batch)])
        images = images.float() * 2.0 - 1.0                      # released output range [0, 1] -> [-1, 1]
        return rearrange(images, "(b t) c h w -> b c t h w", b=B)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``forward`` without grad, clamped to [-1, 1]: a video ready for ``write_video``."""
        return self(latents).clamp_(-1.0, 1.0)

    # -- weights -------------------------------------------------------------------------------

    @classmethod
    def from_single_file(cls, path: str | Path | None = None, config: dict | None = None) -> "Previewer":
        """Load Stable Cascade's ``previewer.safetensors`` (a file, a folder holding it, or None for the
        Hugging Face cache / hub); eval mode. ``config`` (``__init__`` keywords or a model's ``config``):
        None is the ``official`` preset."""
        file = resolve_official_file(path, OFFICIAL_FILE)
        model = cls.from_config_dict(config or PRESETS["official"])
        load_official_weights(model, file)
        return model.eval()


def build_previewer(preset: str = "official", **overrides) -> Previewer:
    """A preset name plus keyword overrides."""
    return build_preset(Previewer, PRESETS, preset, "previewer", **overrides)
