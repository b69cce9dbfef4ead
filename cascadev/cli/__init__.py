"""CascadeV: latent-cascade video generation (LDM-VAE decoding up to 2K, training, evaluation).

The ``cascadev`` command. Each subcommand imports its heavy modules only when it runs.
"""

from __future__ import annotations

import argparse
import sys


class UserError(Exception):
    """A problem with the user's input; printed as one line, without a traceback."""


def run_info(args: argparse.Namespace) -> None:
    import platform

    import torch

    import cascadev
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"cascadev     {cascadev.__version__}")
    print(f"python       {platform.python_version()}")
    print(f"torch        {torch.__version__}")
    for name in ("torchvision", "diffusers", "timm", "accelerate", "open_clip", "av", "einops"):
        try:
            module = __import__(name)
            print(f"{name:<12} {getattr(module, '__version__', '?')}")
        except ImportError:
            print(f"{name:<12} not installed")
    print(f"device       {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    backend = _AttentionBackendRegistry.get_active_backend()[0].value  # what a model without set_attention_backend uses
    print(f"attention    {backend} (diffusers dispatcher; DIFFUSERS_ATTN_BACKEND or model.set_attention_backend)")


# --- eval (eval/cli.py) -------------------------------------------------------------------------
def run_eval(args: argparse.Namespace) -> None:
    from eval.cli import run

    run(args)
# --- end eval --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascadev", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="versions, device and attention backend in use")
    p.set_defaults(func=run_info)

    # --- reconstruct / decode (cascadev/cli/decode.py) ---
    from cascadev.cli import decode as decode_cli

    p = sub.add_parser("reconstruct", help="video -> semantic latents -> LDM-VAE decode -> video")
    decode_cli.add_reconstruct_arguments(p)
    p.set_defaults(func=decode_cli.run_reconstruct)
    p = sub.add_parser("decode", help="decode latents (ours, or SD/SVD-family VAE latents) to video, up to 2K")
    decode_cli.add_decode_arguments(p)
    p.set_defaults(func=decode_cli.run_decode)
    # --- end reconstruct / decode ---

    # --- generate (cascadev/cli/generate.py) ---
    from cascadev.cli import generate as generate_cli

    p = sub.add_parser("generate", help="text -> video: the Stage C base model, then the LDM-VAE decoder")
    generate_cli.add_generate_arguments(p)
    p.set_defaults(func=generate_cli.run_generate)
    # --- end generate ---

    # --- eval (eval/cli.py) ---
    from eval.cli import add_arguments as add_eval_arguments

    p = sub.add_parser("eval", help="PSNR/SSIM/LPIPS between paired videos, FVD between two sets")
    add_eval_arguments(p)
    p.set_defaults(func=run_eval)
    # --- end eval ---

    # --- train / cache-latents (cascadev/training/train.py, cascadev/training/cache_latents.py) ---
    from cascadev.training import args as train_args

    p = sub.add_parser("train", help="train a stage (Stage B DiT or Stage A VAE) from a config; "
                                     "several GPUs: accelerate launch -m cascadev.training.train")
    train_args.add_train_arguments(p)
    p.set_defaults(func=train_args.run_train)
    p = sub.add_parser("cache-latents", help="precompute Stage A latents and DiT conditions of a dataset")
    train_args.add_cache_arguments(p)
    p.set_defaults(func=train_args.run_cache)
    # --- end train / cache-latents ---

    # --- demo (cascadev/cli/demo.py) ---
    from cascadev.cli import demo

    p = sub.add_parser("demo", help="the built-in tiny cascade on held-out clips vs the Previewer baseline")
    demo.add_arguments(p)
    p.set_defaults(func=demo.run)
    # --- end demo ---

    # --- convert (cascadev/pipelines/convert.py) ---
    from cascadev.pipelines import convert

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
