"""Autoencoders of the cascade: Stage A pixel VAE (f8, 4 ch), Stage B semantic encoder (f32, 16 ch),
and the Previewer (16 ch -> RGB, x8). Layouts: video (B, 3, T, H, W) in [-1, 1], latents (B, C, T, h, w)."""

from vae.previewer import Previewer, build_previewer
from vae.semantic_encoder import SemanticEncoder, build_semantic_encoder
from vae.stage_a import LATENT_SCALE, StageAConfig, StageAVAE, build_stage_a

__all__ = [
    "LATENT_SCALE",
    "Previewer", "build_previewer",
    "SemanticEncoder", "build_semantic_encoder",
    "StageAConfig", "StageAVAE", "build_stage_a",
]
