"""Training: ``train`` (the loop, run as ``python -m cascadev.training.train`` or through ``accelerate launch -m``)
and ``cache_latents`` (the latent cache it can read) are the entry points; below them ``tasks`` (what differs
between stages), ``losses``, ``diffusion`` (the training objectives), ``data``, ``config`` (the YAML as frozen
dataclasses) and ``args`` (the command-line arguments, also used by ``cascadev train``).

From Python (the function lives in the script's module, whose name it cannot share in this package)::

    from cascadev.training.train import train
    run_dir = train("configs/dit_tiny.yaml", overrides=["data.videos=clips/"], max_steps=20)
"""
