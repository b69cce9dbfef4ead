"""What the cascade's command-line options (declared in ``arguments.py``) do: check them, load and prepare the
pipeline, and the ``decode`` arguments they give. ``cascadev reconstruct`` / ``decode`` (``cascadev/cli/decode.py``)
and ``cascadev bench-recon`` (``eval/bench_recon.py``) use all of it; ``cascadev generate`` and ``upscale`` the
tiling, device, precision and speed parts (``check_runtime_args``, ``prepare_pipeline``, ``tiling_of``) over any
``DecoderRuntimeMixin`` pipeline."""

from __future__ import annotations

import torch

from cascadev.errors import UserError
from cascadev.pipelines.arguments import DTYPE_NAMES
from cascadev.pipelines.cascade import load_cascade, resolve_colour_fix
from cascadev.pipelines.sampling import Tiling

DTYPES = {name: getattr(torch, attr) for name, attr in DTYPE_NAMES.items()}


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``--dtype``: as given, else bf16 on CUDA (the kernels' precision) and fp32 on a CPU (exact release numerics)."""
    if name is not None:
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def processes():
    """accelerate's view of this run (``accelerate launch --multi_gpu --num_processes N``, else one process); creating
    it in a plain process initialises nothing. ACCELERATE_USE_CPU (``accelerate launch --cpu``) asks for CPU processes
    over gloo, as Accelerator reads it."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def default_device() -> torch.device:
    """This process's device under ``accelerate launch`` with several processes; else cuda when available."""
    state = processes()
    if state.num_processes > 1:
        return state.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


CPU_STAGE_A_GIB = 1.0       # a CPU's default Stage A budget: 2048 x 1152 in full-height tiles, smaller frames whole


def stage_a_budget(given: float | None, device: torch.device) -> float:
    """``--max-memory`` in GiB: as given, else 80% of the GPU's free memory (after loading), else 1 GiB on a CPU."""
    if given is not None:
        return given
    if device.type == "cuda":
        return 0.8 * torch.cuda.mem_get_info(device)[0] / 2 ** 30
    return CPU_STAGE_A_GIB


def set_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA (a process-wide torch setting, set once by the CLI)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled


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
    if args.max_memory is not None and args.max_memory < 0:
        raise UserError(f"--max-memory must be >= 0 GiB (0: the saved tiles), got {args.max_memory}")
    if args.offload and resolve_device(args.device).type != "cuda":
        raise UserError("--offload moves models to a GPU and back: it needs --device cuda")


def check_crf(crf: int) -> None:
    """``--crf``: a quality the encoders take (H.264 0-51; lower is better)."""
    if not 0 <= crf <= 51:
        raise UserError(f"--crf {crf}: the encoders take 0 (lossless) to 51 (worst); 18 is visually lossless")


def resolve_device(name: str | None) -> torch.device:
    """``--device``: the one named, checked (``check_device``), else this process's default (``default_device``)."""
    check_device(name)
    return torch.device(name) if name else default_device()


def check_device(name: str | None) -> None:
    """``--device``: a torch device this machine has (None: chosen later)."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available here (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")


def tiling_of(args, config) -> Tiling:
    """``--tiling``, ``--tile-stride`` and ``--frame-stride``, checked against the loaded DiT's window (its ``config``): a stride
    longer than the window would leave latents no window covers."""
    for option, stride, size in (("--tile-stride", args.tile_stride, config.window_size),
                                 ("--frame-stride", args.frame_stride, config.window_frames)):
        if stride is not None and stride > size:
            raise UserError(f"{option} {stride} is longer than the DiT's window ({size}): it would leave gaps; "
                            f"use 1 to {size}")
    return Tiling(args.tiling, frame_stride=args.frame_stride, tile_stride=args.tile_stride)


def decode_kwargs(args, pipe) -> dict:
    """``decode`` arguments: what was given, else the loaded pipeline's saved sampler and colour fix; under
    ``accelerate launch`` with several processes, the DiT's windows/tiles split across them."""
    generator = (torch.Generator(device=pipe._execution_device).manual_seed(args.seed) if args.noise == "device"
                 else None)      # one stream for the noise and the steps, as the release's global generator
    return dict(seed=args.seed, generator=generator, tiling=tiling_of(args, pipe.dit.config), steps=args.steps,
                scheduler=pipe.scheduler_for(args.scheduler, force=args.force_scheduler),
                colour_fix=resolve_colour_fix(pipe, args.colour_fix), window_batch=args.window_batch,
                distributed=processes().num_processes > 1)
