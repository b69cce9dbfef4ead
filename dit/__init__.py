"""Diffusion transformers: the Stage B LDM-VAE decoder (``VideoDiT``)."""

from dit.video_dit import PRESETS, DiTConfig, VideoDiT, build_dit

__all__ = ["DiTConfig", "VideoDiT", "PRESETS", "build_dit"]
