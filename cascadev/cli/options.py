"""What the cascade's command-line options (declared in ``arguments.py``) do: check them, load and prepare the
pipeline, and the ``decode`` arguments they give (the device and precision they name: ``pipelines/runtime.py``).
``cascadev reconstruct`` / ``decode`` (``cascadev/cli/decode.py``) and ``cascadev bench-recon``
(``cli/bench_recon.py``) use all of it; ``cascadev generate`` and ``upscale`` the tiling, device, precision and speed
parts (``check_runtime_args``, ``prepare_pipeline``, ``tiling_of``) over any ``DecoderRuntimeMixin`` pipeline."""

from __future__ import annotations

import torch

from cascadev.errors import UserError
from cascadev.pipelines.cascade import load_cascade, resolve_colour_fix
from cascadev.pipelines.runtime import check_device, processes, resolve_device, resolve_dtype, set_tf32, stage_a_budget
from cascadev.pipelines.sampling import Tiling


def load_pipeline(args, with_previewer: bool | None = None):
    """The cascade the options name, ready to run (``prepare_pipeline``); the Previewer when asked, else only for the
    colour fix (given, or the folder's saved one)."""
    print("loading weights ...", flush=True)
    if with_previewer is None and args.colour_fix is not None:
        with_previewer = args.colour_fix > 0
    pipe = load_cascade(args.weights, dit=args.dit, semantic_encoder=args.semantic_encoder, previewer=args.previewer,
                        vae=args.stage_a, with_previewer=with_previewer)
    return prepare_pipeline(pipe, args)


def prepare_pipeline(pipe, args):
    """A loaded pipeline (any ``DecoderRuntimeMixin``) set up as ``add_runtime_arguments``' options say: precision,
    on the device or offloaded to it, TF32, Stage A's memory budget, compiled."""
    device = resolve_device(args.device)
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
    return dict(seed=args.seed, generator=generator, tiling=tiling_of(args, pipe.dit.config), steps=args.steps,
                scheduler=pipe.resolve_scheduler(args.scheduler, force=args.force_scheduler),
                colour_fix=resolve_colour_fix(pipe, args.colour_fix), window_batch=args.window_batch,
                distributed=processes().num_processes > 1)
