"""Diffusion transformers: the Stage B LDM-VAE decoder (``VideoDiT``) and the Stage C text-to-video
base model (``TextDiT``), sharing blocks and grid attention."""

from dit.text_dit import PRESETS as TEXT_PRESETS
from dit.text_dit import TextDiT, build_text_dit
from dit.video_dit import PRESETS, VideoDiT, build_dit

__all__ = ["VideoDiT", "PRESETS", "build_dit", "TextDiT", "TEXT_PRESETS", "build_text_dit"]
