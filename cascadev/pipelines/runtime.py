"""How a pipeline that decodes with the LDM-VAE's DiT and Stage A runs: precision, Stage A's memory budget,
compilation and the sampler. ``CascadeVPipeline``, ``CascadeVUpscalePipeline`` and ``TextToVideoPipeline`` share it,
so the command-line options of one (``options.prepare_pipeline``) mean the same on all three."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from cascadev.errors import UserError
from cascadev.pipelines import DTYPE_NAMES
from cascadev.pipelines.sampling import make_scheduler
from vae.stage_a import drop_unloadable_config_keys, vae_dtype


def timed(timings: dict[str, float], phase: str, device: torch.device, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run ``fn`` and add its wall time (synchronised on CUDA) to ``timings[phase]``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start
    return out


StepCallback = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]   # (i, t, latents) -> replacement


# A compiled block's cache entries (one per token layout x windows per forward x window size) all belong to the one
# DiTBlock.forward, so a process decoding several sizes or batches passes dynamo's default of 8 (seen on the tiny
# cascade with window_batch 1, 2 and 3) and the rest runs eagerly.
RECOMPILE_LIMIT = 64


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile each of ``model.blocks`` with static shapes: each attention layout compiles once, for all blocks.
    Raises dynamo's process-wide recompile limit to ``RECOMPILE_LIMIT`` (it has no per-function setting)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in model.blocks:
        block.compile(dynamic=False)


class DecoderRuntimeMixin:
    """For a ``DiffusionPipeline`` with components ``dit`` (a ``VideoDiT``), ``vae`` (Stage A's autoencoder) and
    ``scheduler`` (the sampler the DiT was trained for), ``self.stage_a`` (the ``StageAVAE`` around ``vae``) and
    ``self.timings`` (seconds by phase, ``_timed``)."""

    def _timed(self, phase: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        return timed(self.timings, phase, self._execution_device, fn)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' ``save_pretrained``, with the Stage A VAE's config cleaned of a key its class saves but does not
        take (``drop_unloadable_config_keys``: AutoencoderTiny's ``block_out_channels``)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        vae_config = Path(save_directory) / "vae" / "config.json"
        if vae_config.is_file():
            drop_unloadable_config_keys(vae_config)

    def progress_enabled(self) -> bool:
        """Whether this pipeline shows progress bars: diffusers' ``set_progress_bar_config(disable=True)`` turns them
        off. Its models' own bars (Stage A's chunks, the semantic encoder's frames) follow it."""
        return not getattr(self, "_progress_bar_config", {}).get("disable", False)

    @contextmanager
    def step_progress(self, steps: int, callback: StepCallback | None = None) -> Iterator[StepCallback]:
        """A step callback for a sampling loop (``sampling.sample``, ``text_to_video.sample_base``) that advances
        ``self.progress_bar`` (diffusers' bar, as ``set_progress_bar_config`` sets it) over ``steps`` steps, then runs
        ``callback(i, t, latents)`` and returns what it returns."""
        with self.progress_bar(total=steps) as bar:
            def on_step(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor | None:
                bar.update()
                return None if callback is None else callback(i, t, latents)
            yield on_step

    def set_precision(self, dtype: torch.dtype, attn_fp32: bool | None = None):
        """Run the models in ``dtype`` (fp32, bf16 or fp16). Kept in fp32: the latents and the scheduler's arithmetic
        (``sampling.sample``), the latent scale (``StageAVAE``), and in fp16 a Stage A VAE whose config sets
        diffusers' ``force_upcast`` (VAEs that overflow in fp16). ``attn_fp32``: upcast the DiT's q, k, v as the
        release did (default: only in fp32, where it changes nothing); off, half precision uses the flash / cuDNN
        kernels."""
        for name, module in self.components.items():
            if isinstance(module, torch.nn.Module) and name != "vae":
                torch.nn.Module.to(module, dtype)   # torch's cast: diffusers' to(dtype) warns about no fp32 modules
        torch.nn.Module.to(self.vae, vae_dtype(self.vae.config, dtype))
        self.dit.set_attn_fp32(dtype == torch.float32 if attn_fp32 is None else attn_fp32)
        return self

    def set_stage_a_memory(self, gib: float):
        """Choose Stage A's tiles and frames per call from ``gib`` GiB (``StageAVAE.plan``; 0: the saved tiles). A
        setting of this run, not saved with the pipeline."""
        self.stage_a.config = dataclasses.replace(self.stage_a.config, max_memory=gib)
        return self

    def compile_models(self):
        """torch.compile the DiT blocks and the Stage A decoder, shapes static: each window layout (and Stage A chunk
        size) compiles once, on its first call."""
        compile_blocks(self.dit)
        self.vae.decoder.compile(dynamic=False)
        return self

    def resolve_scheduler(self, scheduler: str | SchedulerMixin | None, force: bool = False) -> SchedulerMixin:
        """The saved scheduler (None), a scheduler object, or one by short name (``make_scheduler``); a named one of
        the saved one's class keeps its saved config (e.g. the flow shift the DiT was trained at). A named one of
        the other family (flow matching vs eps prediction) than the saved one is refused unless ``force``: the DiT
        predicts one or the other (an ancestral sampler on the flow-trained tiny cascade gives 8 dB instead of 21)."""
        if scheduler is None or isinstance(scheduler, SchedulerMixin):
            return scheduler or self.scheduler
        wanted = make_scheduler(scheduler)
        if type(wanted) is type(self.scheduler):
            return type(wanted).from_config(self.scheduler.config)
        flow = [isinstance(s, FlowMatchEulerDiscreteScheduler) for s in (self.scheduler, wanted)]
        if flow[0] != flow[1] and not force:
            trained = "flow matching (velocity)" if flow[0] else "eps prediction"
            raise ValueError(f"scheduler {scheduler!r} does not fit this DiT, trained for {trained} (its saved "
                             f"scheduler is {type(self.scheduler).__name__}); force it with --force-scheduler")
        return wanted


# -- device and precision, as the commands' options name them ------------------------------------

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
