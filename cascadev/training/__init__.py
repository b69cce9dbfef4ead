"""Training: ``train`` (the loop, run as ``python -m cascadev.training.train`` or through ``accelerate launch -m``)
and ``cache_latents`` (the latent cache it can read) are the entry points, typed functions with a thin ``main`` each
for their command line (``cascadev train`` and ``cache-latents`` hand their arguments to it); below them ``tasks``
(what differs between stages), ``losses``, ``diffusion`` (the training objectives), ``data`` and ``config`` (the YAML
as frozen dataclasses).

From Python (the functions live in the scripts' modules, whose names they cannot share in this package)::

    from cascadev.training.train import train
    run_dir = train("configs/dit_tiny.yaml", overrides=["data.videos=clips/"], max_steps=20)
    from cascadev.training.cache_latents import cache_latents
    cache = cache_latents("configs/dit_tiny.yaml", "cache/", overrides=["data.videos=clips/"])
"""
