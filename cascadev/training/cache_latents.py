r"""Precompute a stage's inputs for a dataset, one file per clip: for the DiT (stage dit) the Stage A latents and
the compact condition, for the base model (stage stage_c) the semantic latents; the caption goes along.

    python -m cascadev.training.cache_latents --config configs/dit_official_finetune.yaml --out cache/ \
        [--clips-per-video 4]
    accelerate launch -m cascadev.training.cache_latents --config ... --out cache/      (clips split over processes)
    cascadev cache-latents --config configs/base.yaml --out cache/base --set data.videos=train.jsonl

From Python: ``cache_latents(config, out, overrides=..., clips_per_video=...)``; ``main`` is the command line over it.

Clips are cut deterministically from the training split of ``data.videos`` (validation clips stay
pixels): ``--clips-per-video`` first frames evenly spaced over the video, centre crop (or, with ``--crop
random``, a crop placed by the clip's own seeded generator; with ``--crop context``, the whole frame is
encoded and the latents are cut on the semantic grid, so border cells of a window see their real
neighbours, as when a large frame is decoded in windows), no flip. Each
``{video:06d}_{clip:02d}.safetensors`` holds, for stage dit, "latent" (4, T, h, w) and "cond" (the compact
condition: semantic latent or low-resolution Stage A latent, already scaled), as ``DiTTask.encode`` makes
them; for stage stage_c, "semantic" (16, T, H/32, W/32) unscaled, as ``StageCTask.encode`` makes it. The source
path, start frame and caption are in its metadata (``LatentDataset`` returns the caption with the tensors).
Files are written atomically and existing ones are kept, so an interrupted run continues. ``cache.yaml``
records what the latents depend on; training with ``data.latents=DIR`` checks it against the training config.

Training from the cache sees no crop/flip/start augmentation and, when ``stage_a.sample_posterior``
is on, one fixed posterior sample per clip (the cache stores what the encoder returned).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from cascadev.config import ConfigError
from cascadev.errors import run_guarded
from cascadev.training.config import (CACHE_CONFIG, TrainConfig, cache_signature, check_cache, check_weight_files,
                                      config_parser)
from cascadev.training.data import LOAD_ERRORS, clip_starts, load_clip, mix_seed, split_validation
from cascadev.video_io import VideoReadError, check_output_folder, video_info
from cascadev.weights import atomic_write, save_state_dict
from vae.semantic_encoder import DOWNSAMPLE as CELL
from vae.stage_a import DOWNSAMPLE as LATENT

log = logging.getLogger("cascadev.training.cache_latents")

CACHED_STAGES = ("dit", "stage_c", "distill")   # distill: the DiT's inputs
CROPS = ("center", "random", "context")


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


def cache_latents(config: TrainConfig | str | Path, out: str | Path, *, overrides: Sequence[str] = (),
                  clips_per_video: int = 1, crop: str = "center", windows_per_clip: int = 1) -> Path:
    """Write the cache of ``config``'s stage (a YAML file or a ``TrainConfig``, with ``overrides`` as ``--set`` takes
    them) into ``out``; returns it. ``clips_per_video`` clips with evenly spaced first frames; ``crop``: "center",
    "random" or "context" (whole frames encoded, ``windows_per_clip`` windows cut from each), as the module says.
    Under ``accelerate launch`` every process calls this (the clips are split over them)."""
    from accelerate import Accelerator

    from cascadev.training.tasks import StageCTask, DiTTask
    from cascadev.training.train import resolve_config

    config = resolve_config(config, overrides)
    if config.stage not in CACHED_STAGES:
        raise ConfigError(f"latent caching is for stages {' and '.join(CACHED_STAGES)}, "
                          f"the config says {config.stage!r}")
    if clips_per_video < 1:
        raise ConfigError("--clips-per-video must be >= 1")
    if crop not in CROPS:
        raise ConfigError(f"--crop must be one of {', '.join(CROPS)}, got {crop!r}")
    if crop == "context" and (config.stage == "stage_c" or config.condition.route != "semantic"):
        raise ConfigError("--crop context is for stage dit on the semantic route")
    if windows_per_clip < 1:
        raise ConfigError("--windows-per-clip must be >= 1")
    out = Path(out)
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

    task = (StageCTask if config.stage == "stage_c" else DiTTask)(config, build_model=False).to(accelerator.device)
    # cache.yaml once the models load (a failed start leaves no cache behind), and before the first clip
    if accelerator.is_main_process:
        text = yaml.safe_dump(cache_signature(config), sort_keys=False)
        atomic_write(out / CACHE_CONFIG, lambda tmp: Path(tmp).write_text(text))
    accelerator.wait_for_everyone()
    # the loader's training crop (random or centre) without flips; start frames are given explicitly
    data = dataclasses.replace(config.data, crop="center" if crop == "context" else crop, flip_prob=0.0)
    windows = windows_per_clip if crop == "context" else 1     # whole frames are encoded once
    rank, world = accelerator.process_index, accelerator.num_processes
    written = kept = skipped = 0
    for index in range(rank, len(samples), world):
        sample = samples[index]
        try:
            starts = clip_starts(video_info(sample.path).frames, config.data, clips_per_video)
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
                if crop == "context":
                    whole = encode_whole(task, sample.path, config, start, g, accelerator)
                    items = [context_window(whole, config.data.height, config.data.width, g) for _ in paths]
                else:
                    video = load_clip(sample.path, data, g, start=start, train=crop == "random")
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


def command_parser(prog: str = "python -m cascadev.training.cache_latents"):
    """The options of the caching command (``main``)."""
    parser = config_parser(prog, __doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="cache folder (then train with --set data.latents=OUT)")
    parser.add_argument("--clips-per-video", type=int, default=1, help="clips with evenly spaced first frames")
    parser.add_argument("--crop", choices=CROPS, default="center",
                        help="where each clip is cropped to data.height x data.width: the centre, a seeded random "
                             "place per clip (e.g. tiles of larger frames with data.resize false), or 'context': "
                             "encode the whole frame, then cut a random crop on the semantic grid (stage dit, "
                             "semantic route), so a window's condition is what a whole frame gives it")
    parser.add_argument("--windows-per-clip", type=int, default=1,
                        help="--crop context: windows cut from each encoded clip (one file each)")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m cascadev.training.cache_latents") -> Path:
    """The command line over ``cache_latents`` (``cascadev cache-latents`` hands its arguments here): parse ``argv``
    (default: ``sys.argv``), write the cache, return its folder."""
    args = command_parser(prog).parse_args(argv)
    return cache_latents(args.config, args.out, overrides=args.overrides, clips_per_video=args.clips_per_video,
                         crop=args.crop, windows_per_clip=args.windows_per_clip)


if __name__ == "__main__":
    run_guarded("cascadev.training.cache_latents", main, "--debug" in sys.argv[1:])
