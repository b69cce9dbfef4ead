r"""Precompute a stage's inputs for a dataset, one file per clip: for the DiT (stage dit) the Stage A latents and
the compact condition, for the base model (stage base) the semantic latents; the caption goes along.

    python -m cascadev.training.cache_latents --config configs/dit_official_finetune.yaml --out cache/ \
        [--clips-per-video 4]
    accelerate launch -m cascadev.training.cache_latents --config ... --out cache/      (clips split over processes)
    cascadev cache-latents --config configs/base.yaml --out cache/base --set data.videos=train.jsonl

Clips are cut deterministically from the training split of ``data.videos`` (validation clips stay
pixels): ``--clips-per-video`` first frames evenly spaced over the video, centre crop (or, with ``--crop
random``, a crop placed by the clip's own seeded generator; with ``--crop context``, the whole frame is
encoded and the latents are cut on the semantic grid, so border cells of a window see their real
neighbours, as when a large frame is decoded in windows), no flip. Each
``{video:06d}_{clip:02d}.safetensors`` holds, for stage dit, "latent" (4, T, h, w) and "cond" (the compact
condition: semantic latent or low-resolution Stage A latent, already scaled), as ``DiTTask.encode`` makes
them; for stage base, "semantic" (16, T, H/32, W/32) unscaled, as ``StageCTask.encode`` makes it. The source
path, start frame and caption are in its metadata (``LatentDataset`` returns the caption with the tensors).
Files are written atomically and existing ones are kept, so an interrupted run continues. ``cache.yaml``
records what the latents depend on; training with ``data.latents=DIR`` checks it against the training config.

Training from the cache sees no crop/flip/start augmentation and, when ``stage_a.sample_posterior``
is on, one fixed posterior sample per clip (the cache stores what the encoder returned).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import torch
import yaml

from cascadev.config import ConfigError
from cascadev.errors import OneLineParser, run_guarded
from cascadev.training.args import add_cache_arguments
from cascadev.training.config import (CACHE_CONFIG, TrainConfig, cache_signature, check_cache, check_weight_files,
                                      load_train_config)
from cascadev.training.data import LOAD_ERRORS, clip_starts, load_clip, mix_seed, split_validation
from cascadev.video_io import VideoReadError, check_output_folder, video_info
from cascadev.weights import atomic_write, save_state_dict
from vae.semantic_encoder import DOWNSAMPLE as CELL
from vae.stage_a import DOWNSAMPLE as LATENT

log = logging.getLogger("cascadev.training.cache_latents")

CACHED_STAGES = ("dit", "base", "distill")   # distill: the DiT's inputs


def encode_whole(task, path: Path, config: TrainConfig, start: int, g: torch.Generator, accelerator) -> dict:
    """Encode a clip's whole frames (``--crop context``):
    {"latent": (1, 4, T, H/8, W/8), "cond": (1, 16, T, H/32, W/32)}."""
    d = config.data
    info = video_info(path)
    if info.height % CELL or info.width % CELL or info.height < d.height or info.width < d.width:
        raise ValueError(f"{path}: {info.height}x{info.width} frames must be multiples of {CELL} and at least "
                         f"{d.height}x{d.width} for --crop context")
    whole = dataclasses.replace(d, resize=False, height=info.height, width=info.width)
    video = load_clip(path, whole, g, start=start, train=False)
    with accelerator.autocast():
        return task.encode(video[None].to(accelerator.device), g)


def context_window(encoded: dict, height: int, width: int, g: torch.Generator) -> dict:
    """A random ``height x width`` window of whole-frame encodings whose edges lie on the semantic grid."""
    H, W = encoded["cond"].shape[-2:]                                          # semantic cells
    h, w = height // CELL, width // CELL
    top = int(torch.randint(H - h + 1, (1,), generator=g))
    left = int(torch.randint(W - w + 1, (1,), generator=g))
    f = CELL // LATENT                                                         # latent pixels per cell
    return {"latent": encoded["latent"][..., top * f:(top + h) * f, left * f:(left + w) * f],
            "cond": encoded["cond"][..., top:top + h, left:left + w]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m cascadev.training.cache_latents", description=__doc__.splitlines()[0])
    add_cache_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an internal error")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    """Write the cache (``argv`` as on the command line); returns its folder."""
    return run_caching(parse_args(argv))


def run_caching(args: argparse.Namespace) -> Path:
    """The caching command, from parsed arguments (``cascadev cache-latents`` calls this)."""
    from accelerate import Accelerator

    from cascadev.training.tasks import StageCTask, DiTTask

    config = load_train_config(args.config, args.overrides)
    if config.stage not in CACHED_STAGES:
        raise ConfigError(f"latent caching is for stages {' and '.join(CACHED_STAGES)}, "
                          f"the config says {config.stage!r}")
    if args.clips_per_video < 1:
        raise ConfigError("--clips-per-video must be >= 1")
    if args.crop == "context" and (config.stage == "base" or config.condition.route != "semantic"):
        raise ConfigError("--crop context is for stage dit on the semantic route")
    if args.windows_per_clip < 1:
        raise ConfigError("--windows-per-clip must be >= 1")
    out = Path(args.out)
    check_output_folder(out, "--out")
    if (out / CACHE_CONFIG).is_file():      # continuing a cache: its clips must be of these settings
        try:
            check_cache(out, config)
        except ConfigError as e:
            raise ConfigError(f"{e}: give another --out, or continue it with its settings") from None
    samples, _ = split_validation(config.data)                 # the videos list, before any model loads
    check_weight_files(config, model=False)                    # the trained model is not built here
    accelerator = Accelerator(mixed_precision=config.run.mixed_precision)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")

    task = (StageCTask if config.stage == "base" else DiTTask)(config, build_model=False).to(accelerator.device)
    # cache.yaml once the models load (a failed start leaves no cache behind), and before the first clip
    if accelerator.is_main_process:
        text = yaml.safe_dump(cache_signature(config), sort_keys=False)
        atomic_write(out / CACHE_CONFIG, lambda tmp: Path(tmp).write_text(text))
    accelerator.wait_for_everyone()
    # the loader's training crop (random or centre) without flips; start frames are given explicitly
    data = dataclasses.replace(config.data, crop="center" if args.crop == "context" else args.crop, flip_prob=0.0)
    windows = args.windows_per_clip if args.crop == "context" else 1     # whole frames are encoded once
    rank, world = accelerator.process_index, accelerator.num_processes
    written = kept = skipped = 0
    for index in range(rank, len(samples), world):
        sample = samples[index]
        try:
            starts = clip_starts(video_info(sample.path).frames, config.data, args.clips_per_video)
            if not starts:
                raise VideoReadError(f"{sample.path}: too short for {config.data.num_frames} frames at stride "
                                     f"{config.data.frame_stride}")
            for clip, start in enumerate(starts):
                name = f"{index:06d}_{clip:02d}"
                names = [name] if windows == 1 else [f"{name}_{k}" for k in range(windows)]
                paths = [out / f"{name}.safetensors" for name in names]
                if all(path.is_file() for path in paths):
                    kept += len(paths)
                    continue
                g = torch.Generator(accelerator.device).manual_seed(mix_seed(config.run.seed, index, clip))
                if args.crop == "context":
                    whole = encode_whole(task, sample.path, config, start, g, accelerator)
                    items = [context_window(whole, config.data.height, config.data.width, g) for _ in paths]
                else:
                    video = load_clip(sample.path, data, g, start=start, train=args.crop == "random")
                    with accelerator.autocast():
                        items = [task.encode(video[None].to(accelerator.device), g)]
                for path, encoded in zip(paths, items):
                    save_state_dict({k: v[0].float().cpu() for k, v in encoded.items()}, path,
                                    metadata={"path": str(sample.path), "start": str(start), "caption": sample.caption})
                    written += 1
        except LOAD_ERRORS as e:
            skipped += 1
            log.warning("skipping video %s: %s", sample.path, str(e).splitlines()[0] if str(e) else type(e).__name__)
    counts = accelerator.reduce(torch.tensor([written, kept, skipped], device=accelerator.device), "sum").tolist()
    log.info("latent cache %s: %d clip(s) written, %d already there, %d video(s) skipped", out, *counts)
    accelerator.wait_for_everyone()
    return out


if __name__ == "__main__":
    args = parse_args(None)
    run_guarded("cascadev.training.cache_latents", lambda: run_caching(args), args.debug)
