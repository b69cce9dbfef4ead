"""Reconstruct a generated clip through a tiny random-weight cascade: checks the whole pipeline runs.

    python examples/tiny_reconstruct.py
"""

import time

import torch

from cascadev.pipeline import CascadeVPipeline
from cascadev.synthetic import make_clip
from dit import build_dit
from vae import build_previewer, build_semantic_encoder, build_stage_a

torch.manual_seed(0)
pipe = CascadeVPipeline(dit=build_dit("tiny"), semantic_encoder=build_semantic_encoder("tiny"),
                        stage_a=build_stage_a("tiny"), previewer=build_previewer("tiny"), device="cpu")
video = make_clip(seed=0, frames=4, height=128, width=128)[None]   # (1, 3, T, H, W) in [-1, 1]
start = time.perf_counter()
latents = pipe.encode(video)
recon = pipe.decode(latents, steps=2, progress=False)
print(f"video {tuple(video.shape)} -> semantic latents {tuple(latents.shape)} -> video {tuple(recon.shape)} "
      f"in {time.perf_counter() - start:.1f} s (random weights: the output is noise-like)")
