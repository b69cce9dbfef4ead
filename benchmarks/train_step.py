"""Time, peak memory and model FLOP utilisation of one training step of a Stage B DiT or a Stage C TextDiT (diffusion
loss, backward, clipping, AdamW), from latents: what ``cascadev.training.train`` does per micro-batch from a cache.

    python benchmarks/train_step.py                                  # the standard rows (CPU tiny; GPU rows on CUDA)
    python benchmarks/train_step.py --config configs/dit_official_finetune.yaml --precision bf16 --checkpointing off
    python benchmarks/train_step.py --config configs/base.yaml --wrap fsdp          # FSDP2 world 1 (DDP: --wrap ddp)
    python benchmarks/train_step.py --dry-run                        # the GPU rows' sizes and FLOPs, nothing timed

A row's model, window (frames x latent size), batch, precision and gradient checkpointing come from a training
config (``--config``; flags override). Frozen encoders are not included (they run once per clip when caching), nor
is the data. FLOPs are counted with ``torch.utils.flop_counter`` on the meta device (forward + backward, attention
included, the recomputation of checkpointing not: model FLOPs); MFU divides them by step time and the device's dense
bf16/fp16 peak (``PEAK_TFLOPS``; none on CPU). Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA; on CPU,
how far the process's peak resident set rose above its level before the model was built (a high-water mark: one case
per process for exact numbers). ``state_GiB`` is the model state (weights, gradients, AdamW moments: 16 bytes per
parameter); ``est_per_gpu_GiB_fsdp8`` estimates a GPU's peak under FSDP on 8 GPUs as the peak less 7/8 of that state.
``--wrap ddp|fsdp`` runs the step through torch's DDP or FSDP2 (``fully_shard`` per block, as
configs/accelerate/fsdp.yaml) in a process group of one. Mixed precision is autocast, but under FSDP2 the
``MixedPrecisionPolicy`` accelerate sets (weights gathered in bf16/fp16). Prints one JSON line per row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cascadev.training.config import load_train_config  # noqa: E402
from cascadev.training.diffusion import build_diffusion  # noqa: E402
from cascadev.training.tasks import build_base_dit, build_dit  # noqa: E402

# dense bf16/fp16 tensor-core peak per GPU (vendor data sheets, SXM parts), matched in the device name
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "4090": 165.0}
TEXT_TOKENS = 77                                        # open_clip's context length (Stage C's caption tokens)
STATE_BYTES = 16                                        # fp32 weights + gradients + AdamW's two moments


@dataclass(frozen=True)
class Case:
    """One row: a training config's model, and its window, batch, precision and checkpointing (overridable)."""
    config: str
    frames: int
    size: int                   # latent pixels per side
    batch: int
    precision: str              # fp32 | bf16 | fp16
    checkpointing: bool
    wrap: str = "none"          # none | ddp | fsdp (world 1)
    device: str = "cpu"


def case_from_config(path: str, device: str, **changes) -> Case:
    """The row a training config describes: its window in latents, per-GPU batch, mixed precision, checkpointing."""
    config = load_train_config(ROOT / path if not Path(path).is_file() else path)
    stage = config.stage
    section = config.dit if stage == "dit" else config.base
    factor = 8 if stage == "dit" else 32                # Stage A latents (dit) or semantic latents (base)
    precision = {"no": "fp32"}.get(config.run.mixed_precision, config.run.mixed_precision)
    case = Case(str(path), config.data.num_frames, config.data.height // factor, config.data.batch_size, precision,
                section.gradient_checkpointing, device=device)
    return replace(case, **{k: v for k, v in changes.items() if v is not None})


def build(case: Case, device: str | torch.device):
    """(model, inputs builder, diffusion) of a case; the model on ``device`` (meta: for counting)."""
    config = load_train_config(ROOT / case.config if not Path(case.config).is_file() else case.config)
    with torch.device(device):
        model = (build_dit if config.stage == "dit" else build_base_dit)(config, load_weights=False)
    if not case.checkpointing:
        model.disable_gradient_checkpointing()
    elif not model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    c = model.config

    def inputs(generator: torch.Generator, x_t: torch.Tensor) -> tuple:
        """The model's arguments besides (x_t, t): the condition concatenated (dit), or the caption (base)."""
        B, dev = x_t.shape[0], x_t.device
        if config.stage == "dit":
            cond = torch.randn(B, c.cond_channels, *x_t.shape[2:], device=dev)
            return (torch.cat([x_t, cond], dim=1),), ()
        context = torch.randn(B, TEXT_TOKENS, c.caption_channels, device=dev)
        pooled = torch.randn(B, c.pooled_channels, device=dev)
        return (x_t,), (context, pooled, torch.ones(B, TEXT_TOKENS, dtype=torch.bool, device=dev))

    return model.train(), inputs, build_diffusion(config.diffusion)


def model_flops(case: Case) -> float:
    """FLOPs of one forward + backward of the case's model at its window and batch, counted on the meta device
    (attention runs as matmuls there, which the counter sees) without checkpointing's recomputation."""
    from torch.utils.flop_counter import FlopCounterMode

    model, inputs, diffusion = build(replace(case, checkpointing=False), "meta")
    x_t = torch.zeros(case.batch, model.config.latent_channels, case.frames, case.size, case.size, device="meta")
    first, rest = inputs(None, x_t)
    rest = rest[:2]                                     # no caption mask: its check reads values, and costs nothing
    t = torch.zeros(case.batch, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(*first, t, *rest).float().square().mean().backward()
    return float(counter.get_total_flops())


def wrap(model: torch.nn.Module, how: str, device: torch.device, dtype: torch.dtype | None) -> torch.nn.Module:
    """The model under torch's DDP or FSDP2 in a process group of one (made once), or as it is. FSDP2 with ``dtype``
    gathers the weights in it (``MixedPrecisionPolicy``, as accelerate sets it from the mixed precision)."""
    import torch.distributed as dist

    if how == "none":
        return model
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    if how == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (1,))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype)
    for block in model.blocks:                          # the shard units configs/accelerate/fsdp.yaml gives
        fully_shard(block, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def bench(case: Case, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    dev = torch.device(case.device)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20            # KiB -> GiB (Linux)
    model, inputs, diffusion = build(case, dev)
    params = sum(p.numel() for p in model.parameters())
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[case.precision]
    model = wrap(model, case.wrap, dev, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    per_op = dtype is not None and case.wrap != "fsdp"  # autocast; FSDP2 casts through its policy
    autocast = torch.autocast(dev.type, dtype=dtype) if per_op else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(dev.type, enabled=case.precision == "fp16")
    latent_channels = (model.module if case.wrap == "ddp" else model).config.latent_channels
    x0 = torch.randn(case.batch, latent_channels, case.frames, case.size, case.size, device=dev)

    def step(i: int) -> float:
        g = torch.Generator(dev).manual_seed(i)
        t = diffusion.sample_t(case.batch, g).to(dev)
        eps = torch.randn(x0.shape, generator=g, device=dev)
        x_t = diffusion.noise(x0, t, eps)
        first, rest = inputs(g, x_t)
        with autocast:
            out = model(*first, diffusion.model_time(t), *rest)
        loss = diffusion.losses(out.float(), x0, x_t, t, eps)["loss"].mean()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()                                  # synchronises CUDA

    row = {"config": Path(case.config).name, "device": device_name(dev), "threads": torch.get_num_threads(),
           "wrap": case.wrap, "latent": f"{case.batch}x{case.frames}x{case.size}x{case.size}",
           "precision": case.precision, "checkpointing": case.checkpointing, "params_M": round(params / 1e6, 2)}
    try:
        for i in range(warmup):
            step(i)
        start = time.perf_counter()
        for i in range(steps):
            step(warmup + i)
        seconds = (time.perf_counter() - start) / steps
    except torch.OutOfMemoryError:
        return {**row, "oom": True}
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20 - baseline     # above the imports
    flops = model_flops(case)
    achieved = flops / seconds / 1e12
    peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in row["device"]), None)
    state = params * STATE_BYTES / 2 ** 30
    return {**row, "step_s": round(seconds, 4), "samples_per_s": round(case.batch / seconds, 3),
            "latent_frames_per_s": round(case.batch * case.frames / seconds, 2),
            "model_TFLOP_per_step": float(f"{flops / 1e12:.4g}"), "achieved_TFLOPs": float(f"{achieved:.4g}"),
            "mfu": round(achieved / peak_tflops, 4) if peak_tflops and dtype else None,
            "peak_mem_GiB": round(peak, 3), "state_GiB": round(state, 3),
            "est_per_gpu_GiB_fsdp8": round(peak - state * 7 / 8, 2) if dev.type == "cuda" else None,
            "peak_mem_kind": "cuda allocated" if dev.type == "cuda" else "process peak RSS above its start"}


def dry_run(case: Case) -> dict:
    """A row's sizes and FLOPs without running it: what the GPU rows will measure."""
    model, _, _ = build(case, "meta")
    params = sum(p.numel() for p in model.parameters())
    flops = model_flops(case)
    return {"config": Path(case.config).name, "device": case.device, "wrap": case.wrap,
            "latent": f"{case.batch}x{case.frames}x{case.size}x{case.size}", "precision": case.precision,
            "checkpointing": case.checkpointing, "params_M": round(params / 1e6, 2),
            "model_TFLOP_per_step": round(flops / 1e12, 3), "state_GiB": round(params * STATE_BYTES / 2 ** 30, 2),
            "step_s_at_40pct_mfu_H100": round(flops / (0.4 * PEAK_TFLOPS["H100"] * 1e12), 3), "dry_run": True}


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def standard_cases(device: str) -> list[Case]:
    """CPU: the tiny DiT (its preset's window) and the tiny Stage C. GPU: the official DiT fine-tune recipe (its
    8 x 128 x 128 latent window, batch 4; fp16 as released and bf16; checkpointing on and off; plain, DDP and
    FSDP2 in a world of one) and Stage C at configs/base.yaml (bf16, checkpointing on and off)."""
    cases = [case_from_config("configs/dit_tiny.yaml", "cpu", size=16, precision="fp32"),
             case_from_config("configs/base_tiny.yaml", "cpu", size=8, precision="fp32")]
    if device.startswith("cuda"):
        finetune = case_from_config("configs/dit_official_finetune.yaml", device)
        cases += [replace(finetune, precision=p, checkpointing=c) for p in ("fp16", "bf16") for c in (True, False)]
        cases += [replace(finetune, precision="bf16", wrap=w) for w in ("ddp", "fsdp")]
        base = case_from_config("configs/base.yaml", device)
        cases += [replace(base, checkpointing=c) for c in (True, False)] + [replace(base, wrap="fsdp")]
    return cases


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="a training config: one row; default: the standard rows")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="latent pixels per side")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None)
    parser.add_argument("--checkpointing", choices=("on", "off"), default=None)
    parser.add_argument("--wrap", choices=("none", "ddp", "fsdp"), default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the rows' sizes and FLOPs without running them (--device cuda: the GPU rows)")
    args = parser.parse_args(argv)
    if args.config:
        checkpointing = None if args.checkpointing is None else args.checkpointing == "on"
        cases = [case_from_config(args.config, args.device, frames=args.frames, size=args.size, batch=args.batch,
                                  precision=args.precision, checkpointing=checkpointing, wrap=args.wrap)]
    else:
        cases = standard_cases("cuda" if args.dry_run else args.device)
    for case in cases:
        row = dry_run(case) if args.dry_run else bench(case, args.steps, args.warmup)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
