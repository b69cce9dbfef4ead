"""CascadeV: latent-cascade video generation (LDM-VAE decoding up to 2K, training, evaluation).

The ``cascadev`` command: ``main`` parses the command line and hands it to a subcommand, one module each in
this package (``info``, ``decode`` for reconstruct and decode, ``generate``, ``train`` for train and cache-latents,
``demo``, ``convert``) or in ``eval/`` (``eval``, ``bench-recon``). Each subcommand imports its heavy modules only
when it runs.
"""

from __future__ import annotations

import argparse
import sys

from cascadev.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascadev", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # --- info (cascadev/cli/info.py) ---
    from cascadev.cli import info

    p = sub.add_parser("info", help="versions, device and attention backend in use")
    p.set_defaults(func=info.run)
    # --- end info ---

    # --- reconstruct / decode (cascadev/cli/decode.py) ---
    from cascadev.cli import decode

    p = sub.add_parser("reconstruct", help="video -> semantic latents -> LDM-VAE decode -> video")
    decode.add_reconstruct_arguments(p)
    p.set_defaults(func=decode.run_reconstruct)
    p = sub.add_parser("decode", help="decode latents (ours, or SD/SVD-family VAE latents) to video, up to 2K")
    decode.add_decode_arguments(p)
    p.set_defaults(func=decode.run_decode)
    # --- end reconstruct / decode ---

    # --- generate (cascadev/cli/generate.py) ---
    from cascadev.cli import generate

    p = sub.add_parser("generate", help="text -> video: the Stage C base model, then the LDM-VAE decoder")
    generate.add_generate_arguments(p)
    p.set_defaults(func=generate.run_generate)
    # --- end generate ---

    # --- eval (eval/cli.py) ---
    from eval import cli as eval_cli

    p = sub.add_parser("eval", help="PSNR/SSIM/LPIPS between paired videos, FVD between two sets")
    eval_cli.add_arguments(p)
    p.set_defaults(func=eval_cli.run)
    # --- end eval ---

    # --- train / cache-latents (cascadev/cli/train.py -> cascadev/training/train.py, cache_latents.py) ---
    from cascadev.cli import train
    from cascadev.training import args as training_args

    p = sub.add_parser("train", help="train a stage (Stage B DiT or Stage A VAE) from a config; "
                                     "several GPUs: accelerate launch -m cascadev.training.train")
    training_args.add_train_arguments(p)
    p.set_defaults(func=train.run_train)
    p = sub.add_parser("cache-latents", help="precompute Stage A latents and DiT conditions of a dataset")
    training_args.add_cache_arguments(p)
    p.set_defaults(func=train.run_cache)
    # --- end train / cache-latents ---

    # --- demo (cascadev/cli/demo.py) ---
    from cascadev.cli import demo

    p = sub.add_parser("demo", help="the built-in tiny cascade on held-out clips vs the Previewer baseline")
    demo.add_arguments(p)
    p.set_defaults(func=demo.run)
    # --- end demo ---

    # --- convert (cascadev/cli/convert.py -> cascadev/pipelines/convert.py) ---
    from cascadev.cli import convert

    p = sub.add_parser("convert", help="rewrite a cascade saved by cascadev < 0.2 in diffusers' pipeline layout")
    convert.add_arguments(p)
    p.set_defaults(func=convert.run)
    # --- end convert ---

    # --- bench-recon (eval/bench_recon.py) ---
    from eval import bench_recon

    p = sub.add_parser("bench-recon", help="reconstruction benchmark: cascade vs Previewer baseline on a folder")
    bench_recon.add_arguments(p)
    p.set_defaults(func=bench_recon.run)
    # --- end bench-recon ---

    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()    # "Loading pipeline components": the commands say "loading weights"
    try:
        args.func(args)
    except (UserError, FileNotFoundError, FileExistsError, ValueError) as e:
        # Bad input is reported as one line; real bugs keep their traceback.
        print(f"cascadev {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
