"""What the cascade's command-line options (declared in ``arguments.py``) do: check them, load and prepare the
pipeline, and the ``decode`` arguments they give (the device and precision they name: ``pipelines/runtime.py``).
``cascadev reconstruct`` / ``decode`` (``cascadev/cli/decode.py``) and ``cascadev bench-recon``
(``cli/bench_recon.py``) use all of it; ``cascadev generate`` and ``upscale`` the tiling, device, precision and speed
parts (``check_runtime_args``, ``prepare_pipeline``, ``tiling_of``) over any ``DecoderRuntimeMixin`` pipeline."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from cascadev.errors import UserError
from cascadev.pipelines.cascade import ASSETS, TINY_CASCADE, DecodeOptions, load_cascade, resolve_colour_fix
from cascadev.pipelines.runtime import check_device, processes, resolve_device, resolve_dtype, set_tf32, stage_a_budget
from cascadev.pipelines.tiling import Tiling
from cascadev.weights import is_hub_id, offline_if_unreachable


def load_pipeline(args, with_previewer: bool | None = None):
    """The cascade the options name, ready to run (``prepare_pipeline``); the Previewer when asked, else only for the
    colour fix (given, or the folder's saved one). Where the hub cannot be reached, what it would give comes from the
    Hugging Face cache or fails at once in one line (``offline_if_unreachable``), on every process of a launch."""
    print("loading weights ...", flush=True)
    if with_previewer is None and args.colour_fix is not None:
        with_previewer = args.colour_fix > 0
    offline = needs_hub(args) and offline_if_unreachable()
    try:
        pipe = load_cascade(args.weights, dit=args.dit, semantic_encoder=args.semantic_encoder,
                            previewer=args.previewer, vae=args.stage_a, with_previewer=with_previewer)
    except FileNotFoundError as e:
        if not offline:
            raise
        raise FileNotFoundError(f"{e} -- the Hugging Face hub cannot be reached from here; the built-in cascade needs "
                                f"no network: --weights {builtin_name(TINY_CASCADE)}") from None
    return prepare_pipeline(pipe, args)


def needs_hub(args) -> bool:
    """Whether the cascade the options name takes anything from the hub: no ``--weights`` (the release), a hub id, a
    folder of the released files without ``--stage-a`` (the SVD VAE), or a part given as a hub id."""
    parts = [getattr(args, name, None) for name in ("dit", "semantic_encoder", "previewer", "stage_a")]
    if any(part is not None and is_hub_id(str(part)) for part in parts):
        return True
    weights = args.weights
    if weights is None or is_hub_id(str(weights)):
        return True
    folder = Path(weights)      # a missing one fails in the loader, without asking the hub
    return folder.is_dir() and not (folder / "model_index.json").is_file() and args.stage_a is None


# -- which cascade made a latents file: recorded by reconstruct / generate, the default of decode ---------------

DECODER_KEY = "decoder"          # the latents file's metadata entry naming the cascade that can decode it
BUILTIN_PREFIX = "builtin:"      # a built-in cascade (cascadev/assets/NAME): found in whatever install reads it


def builtin_name(folder: Path) -> str:
    """How a user names a built-in folder on the command line (relative to the current folder where it is below it)."""
    with contextlib.suppress(ValueError):
        return str(folder.relative_to(Path.cwd()))
    return str(folder)


def decoder_record(weights: str | Path | None, parts=()) -> dict[str, str]:
    """The metadata recording the cascade ``weights`` (as ``--weights`` named it) that made latents: a built-in one by
    name, a folder by its absolute path, a hub id as is. Nothing for the release from the hub (decode's default
    already), nor when ``parts`` replaced some of the cascade's models (no one folder made them)."""
    if weights is None or any(part is not None for part in parts):
        return {}
    if is_hub_id(str(weights)):
        return {DECODER_KEY: str(weights)}
    folder = Path(weights).resolve()
    if folder.parent == ASSETS:
        return {DECODER_KEY: BUILTIN_PREFIX + folder.name}
    return {DECODER_KEY: str(folder)}


def recorded_decoder(metadata: dict[str, str], path: str | Path) -> str | None:
    """The cascade a latents file's metadata says made it (``decoder_record``), as ``--weights`` takes it; None when
    the file has no record (decode's default: the release). A recorded folder that is gone is a one-line error."""
    record = metadata.get(DECODER_KEY)
    if not record:
        return None
    if record.startswith(BUILTIN_PREFIX):
        name = record.removeprefix(BUILTIN_PREFIX)
        if name != Path(name).name or not (ASSETS / name / "model_index.json").is_file():     # a plain name only
            raise UserError(f"{path} was made by the built-in cascade {name!r}, which this install does not have: "
                            "give --weights")
        return str(ASSETS / name)
    if is_hub_id(record) or Path(record).is_dir():
        return record
    raise UserError(f"{path} was made by the cascade in {record}, which is not there any more: give --weights (that "
                    "cascade, or one with the same semantic encoder)")


def prepare_pipeline(pipe, args):
    """A loaded pipeline (any ``DecoderRuntimeMixin``) set up as ``add_runtime_arguments``' options say: precision,
    on the device or offloaded to it, TF32, Stage A's memory budget, compiled."""
    device = resolve_device(args.device)
    if not processes().is_main_process:            # under a launch, the main process alone shows progress
        pipe.set_progress_bar_config(disable=True)
    pipe.set_precision(resolve_dtype(args.dtype, device), attn_fp32=True if args.attn_fp32 else None)
    if args.offload:
        getattr(pipe, f"enable_{args.offload}_cpu_offload")(device=device)
    else:
        pipe.to(device)
    set_tf32(device, not args.no_tf32)
    pipe.set_stage_a_memory(stage_a_budget(args.max_memory, device))
    return pipe.compile_models() if args.compile else pipe


def check_decode_args(args) -> None:
    """What can be checked before any weights load."""
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.colour_fix is not None and args.colour_fix < 0:
        raise UserError(f"--colour-fix must be >= 0 (0: off), got {args.colour_fix}")
    check_crf(args.crf)
    check_runtime_args(args)


def check_runtime_args(args) -> None:
    """``add_tiling_arguments`` and ``add_runtime_arguments``' options, before any weights load."""
    check_device(args.device)
    for option in ("window_batch", "tile_stride", "frame_stride"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise UserError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if args.tiling == "shifted" and (args.tile_stride or args.frame_stride):
        raise UserError("--tile-stride and --frame-stride apply to --tiling blend and official; shifted windows "
                        "are a whole window apart")
    if args.tiling == "official" and args.tile_detail == "central":
        raise UserError("--tile-detail central applies to --tiling blend and shifted; official is the release's rule")
    if args.max_memory is not None and args.max_memory < 0:
        raise UserError(f"--max-memory must be >= 0 GiB (0: the saved tiles), got {args.max_memory}")
    if args.offload and resolve_device(args.device).type != "cuda":
        raise UserError("--offload moves models to a GPU and back: it needs --device cuda")


def check_crf(crf: int) -> None:
    """``--crf``: a quality the encoders take (H.264 0-51; lower is better)."""
    if not 0 <= crf <= 51:
        raise UserError(f"--crf {crf}: the encoders take 0 (lossless) to 51 (worst); 18 is visually lossless")


def tiling_of(args, config) -> Tiling:
    """``--tiling``, ``--tile-detail``, ``--tile-stride`` and ``--frame-stride``, checked against the loaded DiT's
    window (its ``config``): a stride longer than the window would leave latents no window covers."""
    for option, stride, size in (("--tile-stride", args.tile_stride, config.window_size),
                                 ("--frame-stride", args.frame_stride, config.window_frames)):
        if stride is not None and stride > size:
            raise UserError(f"{option} {stride} is longer than the DiT's window ({size}): it would leave gaps; "
                            f"use 1 to {size}")
    return Tiling(args.tiling, frame_stride=args.frame_stride, tile_stride=args.tile_stride, detail=args.tile_detail)


def decode_kwargs(args, pipe) -> dict:
    """``decode`` arguments: what was given, else the loaded pipeline's saved sampler and colour fix; under
    ``accelerate launch`` with several processes, the DiT's windows/tiles split across them."""
    generator = (torch.Generator(device=pipe._execution_device).manual_seed(args.seed) if args.noise == "device"
                 else None)      # one stream for the noise and the steps, as the release's global generator
    scheduler = pipe.resolve_scheduler(args.scheduler, force=args.force_scheduler)
    # a step count the scheduler cannot space (a 2-step student's at 1): said now, before anything is encoded
    pipe.decode_sampler(DecodeOptions(steps=args.steps, scheduler=scheduler))
    return dict(seed=args.seed, generator=generator, tiling=tiling_of(args, pipe.dit.config), steps=args.steps,
                scheduler=scheduler,
                colour_fix=resolve_colour_fix(pipe, args.colour_fix), window_batch=args.window_batch,
                distributed=processes().num_processes > 1)
