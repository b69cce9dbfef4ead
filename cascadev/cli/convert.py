"""``cascadev convert OLD NEW``: a cascade or text-to-video folder saved by cascadev < 0.2 -> diffusers' layout."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("old", help="a cascade (pipeline.json) or text-to-video folder (text_to_video.json) written by "
                               "cascadev < 0.2")
    p.add_argument("new", help="where to write it in diffusers' layout (model_index.json)")


def run(args: argparse.Namespace) -> None:
    from cascadev.pipelines.convert import convert

    convert(args.old, args.new)
    print(f"{args.old} -> {args.new} (load it with CascadeVPipeline.from_pretrained or --weights)")
