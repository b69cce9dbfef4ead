"""``cascadev train`` and ``cascadev cache-latents``: the same command lines as ``python -m cascadev.training.train``
and ``python -m cascadev.training.cache_latents`` (what ``accelerate launch -m`` runs), whose ``main`` declares and
parses them; these hand over the arguments after the command (the modules load when the command runs)."""

from __future__ import annotations

import argparse


def run_train(args: argparse.Namespace) -> None:
    from cascadev.training.train import main
    main(args.forwarded, prog="cascadev train")


def run_cache(args: argparse.Namespace) -> None:
    from cascadev.training.cache_latents import main
    main(args.forwarded, prog="cascadev cache-latents")
