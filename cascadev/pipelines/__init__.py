"""Inference: the diffusers pipelines and what they are made of.

``cascade``: ``CascadeVPipeline``, video <-> semantic latents through the LDM-VAE cascade (Stage B and A).
``text_to_video``: ``TextToVideoPipeline``, prompts -> the Stage C base model -> the cascade -> video.
``sampling`` (the DiT over diffusers schedulers, windows and tiles) and ``conditioning`` (the semantic condition on
the Stage A grid) are their parts; ``convert`` rewrites folders of cascadev < 0.2; ``options`` holds the command-line
options of a cascade, shared by ``cascadev decode`` and ``eval/bench_recon.py``.

Nothing is imported here, so the cascade loads without the text side's dependencies (open_clip).
"""
