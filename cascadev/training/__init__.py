"""Training: ``train`` (the loop, run as ``python -m cascadev.training.train`` or through ``accelerate launch -m``)
and ``cache_latents`` (the latent cache it can read) are the entry points; below them ``tasks`` (what differs
between stages), ``losses``, ``diffusion`` (the training objectives), ``data``, ``config`` (the YAML as frozen
dataclasses) and ``args`` (the command-line arguments, also used by ``cascadev train``).

From Python::

    from cascadev.training import train
    run_dir = train("configs/dit_tiny.yaml", overrides=["data.videos=clips/"], max_steps=20)

``cascadev.training.train`` is the module of the script and, called, its ``train`` function (the module is
callable: the function cannot take the module's name in this package). It loads on first use, so importing
``cascadev.training`` (or ``.args``, as the ``cascadev`` parser does) stays light."""

__all__ = ["train"]


def __getattr__(name: str):
    if name == "train":                  # importing the submodule makes it this package's attribute
        import importlib
        return importlib.import_module("cascadev.training.train")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
