"""CascadeV: latent-cascade video generation (LDM-VAE decoding up to 2K, training, evaluation).

The ``cascadev`` command: ``main`` parses the command line and hands it to a subcommand, one module each in
this package (``info``, ``decode`` for reconstruct and decode, ``upscale``, ``generate``, ``train`` for train and
cache-latents, ``demo``, ``convert``) or in ``eval/`` (``eval``, ``bench-recon``). Each subcommand imports its heavy
modules only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from cascadev import __version__
from cascadev.errors import OneLineParser, run_guarded


# command, help, "module:function" adding its arguments (None: the arguments after the command are handed over as
# ``args.forwarded`` to a command line declared elsewhere), "module:function" running it
COMMANDS = (
    ("info", "versions, device, precision and the attention kernel a decode runs", "cascadev.cli.info:add_arguments",
     "cascadev.cli.info:run"),
    ("reconstruct", "video -> semantic latents -> LDM-VAE decode -> video",
     "cascadev.cli.decode:add_reconstruct_arguments", "cascadev.cli.decode:run_reconstruct"),
    ("decode", "decode latents (ours, or another model's through its diffusers VAE: Wan, LTX-Video, ...) to video, "
               "up to 2K",
     "cascadev.cli.decode:add_decode_arguments", "cascadev.cli.decode:run_decode"),
    ("upscale", "the resize route: 4x resolution or 4x frame rate of a video or Stage A latents",
     "cascadev.cli.upscale:add_arguments", "cascadev.cli.upscale:run"),
    ("generate", "text -> video: the Stage C base model, then the LDM-VAE decoder",
     "cascadev.cli.generate:add_generate_arguments", "cascadev.cli.generate:run_generate"),
    ("eval", "PSNR/SSIM/LPIPS between paired videos, FVD between two sets",
     "cascadev.cli.eval:add_arguments", "cascadev.cli.eval:run"),
    ("train", "train a stage (dit, stage_a, semantic, stage_c or distill) from a config; several GPUs: accelerate "
              "launch -m cascadev.training.train", None, "cascadev.cli.train:run_train"),
    ("cache-latents", "precompute what a stage trains on (Stage A latents and conditions; semantic latents for "
                      "stage_c)",
     None, "cascadev.cli.train:run_cache"),
    ("demo", "the built-in tiny cascade on held-out clips vs the Previewer baseline", "cascadev.cli.demo:add_arguments",
     "cascadev.cli.demo:run"),
    ("convert", "rewrite a cascade saved by cascadev < 0.2 in diffusers' pipeline layout",
     "cascadev.cli.convert:add_arguments", "cascadev.cli.convert:run"),
    ("bench-recon", "reconstruction benchmark: cascade vs Previewer baseline on a folder",
     "cascadev.cli.bench_recon:add_arguments", "cascadev.cli.bench_recon:run"),
)


def _function(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="cascadev", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an internal error")
    parser.add_argument("--version", action="version", version=f"cascadev {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text, add_arguments, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, add_help=add_arguments is not None)   # else --help is handed over
        # also after the command; SUPPRESS keeps the value given before it
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if add_arguments:
            _function(add_arguments)(p)
        p.set_defaults(func=_function(run), forwards=add_arguments is None)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args``, except that a command declared elsewhere (``COMMANDS``' None) gets the arguments after
    it as ``args.forwarded``."""
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "forwards", False):
        args.forwarded = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parse(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return
    if os.environ.get("RANK", "0") != "0":     # a launch's other processes: the main one reports (and writes the files)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()    # "Loading pipeline components": the commands say "loading weights"
    run_guarded(f"cascadev {args.command}", lambda: args.func(args), args.debug)
