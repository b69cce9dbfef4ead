"""CascadeV: a Wuerstchen-style latent cascade for video.

Stage A: pixel VAE (f8, 4 ch) in ``vae``; Stage B: semantic encoder (f32, 16 ch) in ``vae`` and the
LDM-VAE DiT decoder in ``dit``; Stage C: text-to-video DiT in ``dit``. This package joins them:
sampling, pipelines, configs, CLI and training.
"""

__version__ = "0.2.0"      # 0.2: pipelines saved in diffusers' layout (`cascadev convert` reads 0.1 folders)
