"""Command-line arguments of ``cascadev.training.train`` and ``cascadev.training.cache_latents`` (also
``cascadev train`` and ``cascadev cache-latents``). No heavy imports here, so building the ``cascadev`` parser
stays fast."""

from __future__ import annotations

import argparse


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training YAML (configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config fields, e.g. --set optim.lr=1e-4 data.videos=clips/")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--max-steps", type=int, default=None, help="same as --set run.max_steps=N")
    parser.add_argument("--run-dir", default=None, help="same as --set run.dir=DIR")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--fresh", action="store_true",
                        help="start at step 0 in a run dir that has checkpoints (they are moved aside, not deleted)")
    resume.add_argument("--resume-from", type=int, default=None, metavar="STEP",
                        help="resume from this checkpoint instead of the newest (later ones are moved aside)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume although the config differs from the checkpoint's (the model must not change)")


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--out", required=True, help="cache folder (then train with --set data.latents=OUT)")
    parser.add_argument("--clips-per-video", type=int, default=1, help="clips with evenly spaced first frames")
    parser.add_argument("--crop", choices=("center", "random", "context"), default="center",
                        help="where each clip is cropped to data.height x data.width: the centre, a seeded random "
                             "place per clip (e.g. tiles of larger frames with data.resize false), or 'context': "
                             "encode the whole frame, then cut a random crop on the semantic grid (stage dit, "
                             "semantic route), so a window's condition is what a whole frame gives it")
    parser.add_argument("--windows-per-clip", type=int, default=1,
                        help="--crop context: windows cut from each encoded clip (one file each)")
