"""``cascadev train`` and ``cascadev cache-latents``: the entry points of ``cascadev.training`` behind the
``cascadev`` command (their arguments are ``cascadev.training.args``; the modules load when the command runs)."""

from __future__ import annotations

import argparse


def run_train(args: argparse.Namespace) -> None:
    from cascadev.training.train import run_training
    run_training(args)


def run_cache(args: argparse.Namespace) -> None:
    from cascadev.training.cache_latents import run_caching
    run_caching(args)
