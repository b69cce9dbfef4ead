"""Training: ``train`` (the loop, run as ``python -m cascadev.training.train`` or through ``accelerate launch -m``)
and ``cache_latents`` (the latent cache it can read) are the entry points; below them ``tasks`` (what differs
between stages), ``losses``, ``diffusion`` (the training objectives), ``data``, ``config`` (the YAML as frozen
dataclasses) and ``args`` (the command-line arguments, also used by ``cascadev train``)."""
