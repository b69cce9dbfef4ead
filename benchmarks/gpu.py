"""GPU benchmark of the cascade's decode: the official architectures with random weights (no download).

    python benchmarks/gpu.py --out gpu.json                  # everything, about 5 minutes on one H100
    python benchmarks/gpu.py --preset tiny --device cpu --sizes 8x64x64 --steps 2    # dry run on a CPU

Sections, each timed after a warm-up and reported as it finishes (a failing section prints one line and
the rest still run):
1. ``dit_forward``: one DiT forward on one window (8x128x128 latents for ``official``): FLOPs (counted on the
   meta device), time per attention backend in bf16, the release's fp32 path, torch.compile of the blocks;
   achieved TFLOP/s against the card's dense bf16 peak.
   Kernels for the 72-wide heads beyond diffusers' backends: flash-attn-4 (``flash_attn.cute``, a pre-release PyPI
   wheel; an 80-wide tile where FA2/FA3 and torch's flash pad to 96), and torchao float8 (dynamic activations and
   weights) for the linears.
2. ``profile``: the operators with the most device time in one bf16 DiT forward.
3. ``decode``: reconstruct a random clip of each size, per phase (semantic encode, DiT steps, Stage A
   decode, whose tiles the CLI's memory planner picks): seconds and peak device memory; bf16 with windows one
   by one and batched, fp32 as released (first size only), bf16 with ``enable_model_cpu_offload``, bf16 compiled as
   ``--compile`` does (DiT blocks and Stage A's decoder), and compiled with DiT tiles a whole window apart
   (``--tile-stride 128``); fast decoding (issue 31): compiled with ``--tiling shifted`` at the release's steps, and
   compiled at 1 and 2 steps (a distilled decoder's; random weights time the same as trained ones).
4. ``stage_a``: Stage A alone on the last size, per tile size, with and without cuDNN autotuning.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from cascadev.pipelines.cascade import CascadeVPipeline
from cascadev.pipelines.runtime import stage_a_budget
from cascadev.pipelines.runtime import compile_blocks
from cascadev.pipelines.sampling import make_scheduler
from cascadev.pipelines.tiling import Tiling
from dit import build_dit
from vae import build_semantic_encoder, build_stage_a
from vae.stage_a import PRESETS as STAGE_A_PRESETS
from vae.stage_a import stage_a_settings

BACKENDS = ("native", "_native_flash", "_native_cudnn", "_native_efficient", "flash", "flash_varlen", "_flash_3")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 tensor-core peak of the card, from its name (None when unknown or on a CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device: torch.device, fn: Callable[[], object], repeats: int = 1) -> tuple[float, float, object]:
    """Mean seconds of ``fn`` over ``repeats`` calls, peak device memory (GiB; 0 on a CPU), the last output."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    synchronize(device)
    seconds = (time.perf_counter() - start) / repeats
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return seconds, peak, out


def dit_flops(preset: str, window: tuple[int, int, int]) -> float:
    """FLOPs of one DiT forward on one window (T, H, W latents), counted on the meta device."""
    with torch.device("meta"):
        dit = build_dit(preset, attn_fp32=False)
        x = torch.empty(1, dit.in_channels, *window)
        t = torch.empty(1)
        with FlopCounterMode(display=False) as counter:
            dit(x, t)
    return float(counter.get_total_flops())


def build_pipeline(preset: str, dtype: torch.dtype, stage_a_tile: int | None = None) -> CascadeVPipeline:
    """The cascade with random weights: ``official`` is the released architectures (EfficientNetV2-S encoder,
    PixArt-XL/2 DiT, SVD's temporal VAE) and sampler (Euler-ancestral); fp32 keeps the release's fp32 attention.
    ``stage_a_tile``: Stage A's tile size in pixels (None: the preset's, or the memory planner's once
    ``set_stage_a_memory`` is called; 0: whole frames)."""
    stage_a = "tiny_taesd" if preset == "tiny" else "official"
    settings = stage_a_settings(STAGE_A_PRESETS[stage_a])
    if stage_a_tile is not None:
        settings["tile_size"] = stage_a_tile
    pipe = CascadeVPipeline(dit=build_dit(preset), semantic_encoder=build_semantic_encoder(preset),
                            vae=build_stage_a(stage_a, load_weights=False).model, scheduler=make_scheduler("euler_a"),
                            stage_a=settings)
    pipe.set_progress_bar_config(disable=True)
    return pipe.set_precision(dtype)        # as the CLI: attention in fp32 only for fp32, the release's numerics


def warm_up(pipe: CascadeVPipeline, frames: int, device: torch.device) -> None:
    """One small decode, so the timed runs find kernels loaded and the allocator warm."""
    video = torch.rand(1, 3, frames, 256, 256) * 2 - 1
    z = pipe.decode_latents(pipe.encode(video), steps=1)
    pipe.stage_a.decode(z, device=device)
    synchronize(device)


class Report:
    """Rows printed as they come and rewritten to ``out`` (JSON) after each, so a cut-off run keeps its figures."""

    def __init__(self, out: Path | None):
        self.out, self.rows = out, []

    def add(self, **row) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if self.out is not None:
            self.out.write_text(json.dumps(self.rows, indent=1))


def time_fp32_forward(preset: str, dit, x: torch.Tensor, t: torch.Tensor, device: torch.device):
    """The release's fp32 forward (fp32 weights, fp32 attention) with ``dit``'s weights: seconds, GiB, output."""
    fp32 = build_dit(preset, attn_fp32=True).to(device).eval()
    fp32.load_state_dict(dit.state_dict())   # the same (bf16-rounded) weights in fp32
    measure(device, lambda: fp32(x, t))
    return measure(device, lambda: fp32(x, t))


def bench_dit_forward(args, device: torch.device, report: Report) -> None:
    window = (8, 128, 128) if args.preset == "official" else (4, 16, 16)
    flops = dit_flops(args.preset, window)
    peak = peak_tflops(device)
    report.add(section="dit_forward", case="flops", window=list(window), tflop=round(flops / 1e12, 4))

    def row(case, seconds, mem, **extra):
        tflops = flops / seconds / 1e12
        report.add(section="dit_forward", case=case, seconds=round(seconds, 4), peak_gib=round(mem, 2),
                   tflops=round(tflops, 1), peak_fraction=None if peak is None else round(tflops / peak, 3), **extra)

    torch.manual_seed(0)
    dit = build_dit(args.preset, attn_fp32=False).eval()
    # every weight nonzero (the DiT zero-initialises its output layers), so errors mean something
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.02)
    dit = dit.to(device, torch.bfloat16)
    x = torch.randn(1, dit.in_channels, *window, device=device, dtype=torch.bfloat16)
    t = torch.full((1,), 500.0, device=device)
    reference = None
    with torch.no_grad():
        for backend in BACKENDS:
            try:
                dit.set_attention_backend(backend)
                measure(device, lambda: dit(x, t))                     # warm-up
                seconds, mem, out = measure(device, lambda: dit(x, t), repeats=args.repeats)
            except Exception as e:  # a kernel this machine lacks (flash-attn not installed, ...)
                report.add(section="dit_forward", case=f"bf16 {backend}", error=f"{type(e).__name__}: {str(e)[:160]}")
                continue
            reference = out.float() if reference is None else reference
            rel = ((out.float() - reference).norm() / reference.norm()).item()
            row(f"bf16 {backend}", seconds, mem, rel_err_vs_native=round(rel, 5))
        # diffusers also sets the global default: back to torch SDPA for what follows
        dit.set_attention_backend("native")

        seconds, mem, out = time_fp32_forward(args.preset, dit, x.float(), t, device)
        rel = ((reference - out).norm() / out.norm()).item()
        row("fp32 (release: fp32 weights and attention)", seconds, mem, bf16_rel_err=round(rel, 5))

        compile_blocks(dit)
        compile_s, _, _ = measure(device, lambda: dit(x, t))
        seconds, mem, out = measure(device, lambda: dit(x, t), repeats=args.repeats)
        rel = ((out.float() - reference).norm() / reference.norm()).item()
        row("bf16 native, compiled blocks", seconds, mem, first_call_s=round(compile_s, 1),
            rel_err_vs_eager=round(rel, 5))

    bench_kernels(args, device, report, window, reference, row)


def attention_shapes(preset: str, window: tuple[int, int, int]) -> tuple[int, int, int]:
    """Tokens of one full-attention window, heads and head width of the preset's DiT."""
    with torch.device("meta"):
        config = build_dit(preset).config
    T, H, W = window
    tokens = T * (H // config.patch_size) * (W // config.patch_size)
    return tokens, config.num_heads, config.hidden_size // config.num_heads


def bench_kernels(args, device: torch.device, report: Report, window, reference, row) -> None:
    """Full 3D attention of one window (the DiT's widest) per kernel, and the DiT forward with float8 linears."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tokens, heads, width = attention_shapes(args.preset, window)
    q, k, v = (torch.randn(1, tokens, heads, width, device=device, dtype=torch.bfloat16) for _ in range(3))

    def attention_row(case, fn):
        try:
            measure(device, fn)
            seconds, mem, out = measure(device, fn, repeats=args.repeats)
        except Exception as e:    # a kernel this machine lacks
            report.add(section="kernels", case=case, error=f"{type(e).__name__}: {str(e)[:160]}")
            return None
        flops = 4 * tokens * tokens * width * heads           # QK^T and PV, 2 FLOPs per multiply-add
        report.add(section="kernels", case=case, tokens=tokens, heads=heads, head_dim=width,
                   seconds=round(seconds, 5), tflops=round(flops / seconds / 1e12, 1), peak_gib=round(mem, 2))
        return out

    bhnd = [x.transpose(1, 2) for x in (q, k, v)]              # b h n d for torch SDPA
    for name, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(*bhnd)
        attention_row(f"attention {name}", sdpa)

    def flash4():
        from flash_attn.cute import flash_attn_func     # flash-attn-4 (pip install flash-attn-4 --pre)
        out = flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    attention_row("attention flash-attn-4 (cute)", flash4)

    try:      # torchao float8: dynamic per-row scaled activations and weights for every Linear of the DiT
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        dit = build_dit(args.preset, attn_fp32=False).eval()
        with torch.no_grad():
            for p in dit.parameters():
                p.normal_(0, 0.02)
        dit = dit.to(device, torch.bfloat16)
        quantize_(dit, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        x = torch.randn(1, dit.in_channels, *window, device=device, dtype=torch.bfloat16)
        t = torch.full((1,), 500.0, device=device)
        with torch.no_grad():
            compile_blocks(dit)
            measure(device, lambda: dit(x, t))
            seconds, mem, _ = measure(device, lambda: dit(x, t), repeats=args.repeats)
        row("bf16 native, compiled blocks, torchao float8 linears", seconds, mem)
    except Exception as e:
        report.add(section="kernels", case="torchao float8 linears", error=f"{type(e).__name__}: {str(e)[:160]}")


def decode_phases(pipe: CascadeVPipeline, video: torch.Tensor, steps: int, window_batch: int, device, report: Report,
                  tiling: Tiling = Tiling(), **labels) -> None:
    """Encode, DiT sampling, Stage A decode of ``video`` (B, 3, T, H, W): one row per phase and the total."""
    rows, total = [], 0.0
    seconds, mem, latents = measure(device, lambda: pipe.encode(video))
    rows.append(("encode", seconds, mem))
    seconds, mem, z = measure(device, lambda: pipe.decode_latents(latents, steps=steps,
                                                                 window_batch=window_batch, tiling=tiling))
    rows.append(("dit", seconds, mem))
    seconds, mem, _ = measure(device, lambda: pipe.stage_a.decode(z, device=pipe._execution_device))
    rows.append(("stage_a", seconds, mem))
    (th, tw), frames = pipe.stage_a.plan(*video.shape[2:])
    labels.setdefault("stage_a_plan", "whole frames" if th == tw == 0 else f"tiles {th or 'full'}x{tw or 'full'}")
    for phase, seconds, mem in rows:
        total += seconds
        report.add(section="decode", phase=phase, seconds=round(seconds, 3), peak_gib=round(mem, 2),
                   window_batch=window_batch, **labels)
    report.add(section="decode", phase="total", seconds=round(total, 3), peak_gib=round(max(r[2] for r in rows), 2),
               window_batch=window_batch, **labels)


def run_variant(args, device: torch.device, report: Report, sizes: list[tuple[int, int, int]],
                dtype: torch.dtype = torch.bfloat16, batches: tuple[int, ...] = (1,), offload: bool = False,
                compiled: bool = False, tiling: Tiling = Tiling(), labels: dict | None = None,
                steps: int | None = None) -> None:
    """Build one pipeline as asked, warm it up, and decode each size with each window batch; ``labels`` go in the
    rows."""
    torch.manual_seed(0)
    pipe = build_pipeline(args.preset, dtype, args.stage_a_tile)
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if args.stage_a_tile is None:          # as the CLI: tiles from the memory budget, whole frames when they fit
        pipe.set_stage_a_memory(stage_a_budget(args.max_memory, device))
    if compiled:   # as --compile: the DiT blocks and Stage A's decoder, each shape compiled once, untimed in later rows
        pipe.compile_models()
        # every step of the timed schedule: shifted tiling's partial windows change shape from step to step, and
        # each new shape compiles on its first call
        warm_steps = steps or args.steps
        for T, H, W in sizes:
            video = torch.rand(1, 3, T, H, W) * 2 - 1
            seconds, _, _ = measure(device, lambda: pipe.decode(pipe.encode(video), steps=warm_steps,
                                                                window_batch=batches[0], tiling=tiling))
            report.add(section="decode", phase=f"compile (first call, {warm_steps} steps)", seconds=round(seconds, 1),
                       size=f"{T}x{H}x{W}")
    warm_up(pipe, sizes[0][0], device)
    for T, H, W in sizes:
        video = torch.rand(1, 3, T, H, W) * 2 - 1
        for batch in batches:
            decode_phases(pipe, video, steps or args.steps, batch, device, report, tiling, size=f"{T}x{H}x{W}",
                          sampling_steps=steps or args.steps,
                          **(labels or {}))


def bench_decode(args, device: torch.device, report: Report) -> None:
    sizes = [tuple(int(n) for n in s.split("x")) for s in args.sizes]   # T x H x W pixels
    tile = {} if args.stage_a_tile is None else {"stage_a_tile": args.stage_a_tile or "whole frame"}
    variants = args.decode_variants
    if "plain" in variants:
        run_variant(args, device, report, sizes, batches=tuple(dict.fromkeys((1, args.window_batch))),
                    labels={"dtype": "bf16", **tile})
    if "offload" in variants and device.type == "cuda":
        run_variant(args, device, report, sizes, batches=(args.window_batch,), offload=True,
                    labels={"dtype": "bf16", "offload": "model", **tile})
    if "compiled" in variants:
        run_variant(args, device, report, sizes[:1], batches=(args.window_batch,), compiled=True,
                    labels={"dtype": "bf16", "compiled": "dit+stage_a", **tile})
    if "widest-tiles" in variants:   # DiT tiles a whole window apart (--tile-stride 128): fewer, less overlap
        stride = 128 if args.preset == "official" else 16
        run_variant(args, device, report, sizes, batches=(args.window_batch,), compiled=True,
                    tiling=Tiling(tile_stride=stride),
                    labels={"dtype": "bf16", "compiled": "dit+stage_a", "tile_stride": stride, **tile})
    if "shifted" in variants:        # windows a window apart on a grid moved at each step; the finishing step blended
        run_variant(args, device, report, sizes, batches=(args.window_batch,), compiled=True, tiling=Tiling("shifted"),
                    labels={"dtype": "bf16", "compiled": "dit+stage_a", "grid": "shifted", **tile})
    # what a distilled decoder runs: 1 step (blend), 2 steps (shifted, finishing blended)
    if "few-steps" in variants:
        for steps, tiling in ((1, Tiling()), (2, Tiling("shifted"))):
            run_variant(args, device, report, sizes, batches=(args.window_batch,), compiled=True, tiling=tiling,
                        steps=steps, labels={"dtype": "bf16", "compiled": "dit+stage_a", "grid": tiling.mode, **tile})
    if "fp32" in variants:
        run_variant(args, device, report, sizes[:1], dtype=torch.float32, labels={"dtype": "fp32 (release)", **tile})


def bench_stage_a(args, device: torch.device, report: Report) -> None:
    """Stage A alone on the last size's latents: spatial tile size x cuDNN autotuning (bf16)."""
    T, H, W = (int(n) for n in args.sizes[-1].split("x"))
    name = "tiny_taesd" if args.preset == "tiny" else "official"
    torch.manual_seed(0)
    stage_a = build_stage_a(name, load_weights=False)
    stage_a.model.to(device, torch.bfloat16)
    z = torch.randn(1, stage_a.latent_channels, T, H // 8, W // 8, device=device) * 0.5
    for tile in args.stage_a_tiles:
        for autotune in (False, True):
            stage_a.config = dataclasses.replace(stage_a.config, tile_size=tile)
            with torch.backends.cudnn.flags(enabled=True, benchmark=autotune):
                measure(device, lambda: stage_a.decode(z))          # warm-up (and the autotuner's trials)
                seconds, mem, _ = measure(device, lambda: stage_a.decode(z))
            report.add(section="stage_a", size=f"{T}x{H}x{W}", tile_size=tile or "whole frame",
                       cudnn_benchmark=autotune, seconds=round(seconds, 3), peak_gib=round(mem, 2))


def bench_profile(args, device: torch.device, report: Report) -> None:
    """Where one bf16 DiT forward's time goes: the operators with the most device time (self time, one forward)."""
    window = (8, 128, 128) if args.preset == "official" else (4, 16, 16)
    dit = build_dit(args.preset, attn_fp32=False).eval().to(device, torch.bfloat16)
    x = torch.randn(1, dit.in_channels, *window, device=device, dtype=torch.bfloat16)
    t = torch.full((1,), 500.0, device=device)
    activities = ([torch.profiler.ProfilerActivity.CPU]
                  + ([torch.profiler.ProfilerActivity.CUDA] * (device.type == "cuda")))
    with torch.no_grad():
        dit(x, t)
        synchronize(device)
        with torch.profiler.profile(activities=activities) as prof:
            dit(x, t)
            synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events)
    for e in events[:args.profile_top]:
        report.add(section="profile", op=e.key[:90], calls=e.count, ms=round(getattr(e, key) / 1e3, 2),
                   share=round(getattr(e, key) / total, 3))


VARIANTS = ("plain", "offload", "compiled", "widest-tiles", "shifted", "few-steps", "fp32")
SECTIONS = {"dit_forward": bench_dit_forward, "profile": bench_profile, "decode": bench_decode,
            "stage_a": bench_stage_a}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="official", choices=["official", "tiny"])
    parser.add_argument("--sizes", nargs="+", default=["8x1024x1024", "8x1152x2048"],
                        help="clips as TxHxW pixels (H, W multiples of 32)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--window-batch", type=int, default=6, help="DiT windows/tiles per forward, batched rows")
    parser.add_argument("--repeats", type=int, default=3, help="timed DiT forwards per backend")
    parser.add_argument("--decode-variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="decode section: bf16 (all sizes), model offload (all sizes), compiled as --compile "
                             "(first size), compiled with --tile-stride 128 (all sizes), the release's fp32 "
                             "(first size)")
    parser.add_argument("--stage-a-tile", type=int, default=None,
                        help="decode section: Stage A tile size in pixels (default: the preset's 1024; "
                             "0: whole frames)")
    parser.add_argument("--max-memory", type=float, default=None,
                        help="decode section: Stage A memory budget in GiB, as the CLI's "
                             "(default: 80%% of free memory)")
    parser.add_argument("--profile-top", type=int, default=15, help="profile section: operators listed")
    parser.add_argument("--stage-a-tiles", nargs="+", type=int, default=[1024, 1536, 0],
                        help="Stage A tile sizes in pixels for the stage_a section (0: whole frames)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    report = Report(args.out)
    report.add(section="env", device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               torch=torch.__version__, preset=args.preset, steps=args.steps, peak_bf16_tflops=peak_tflops(device))
    for name in args.sections:
        bench = SECTIONS[name]
        try:
            bench(args, device, report)
        except Exception as e:  # keep what the other sections measure
            report.add(section=name, error=f"{type(e).__name__}: {str(e)[:300]}")
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
