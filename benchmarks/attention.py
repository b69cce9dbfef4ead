"""Time one DiT block with full 3D attention and with the CascadeV grid partitions [1,4] and [4,1].

The block (``dit.video_dit.DiTBlock``) runs on one window of ``frames x tokens x tokens`` tokens
(8 x 64 x 64 is the trained window: 8 latent frames of 128 x 128, patch 2), wrapped in
``dit.attention.partition`` / ``unpartition`` exactly as ``VideoDiT.forward`` does, so the timings
include the token reshuffles and the per-part timestep broadcast.

Run from the repository root:

    python -m benchmarks.attention                       # CUDA if available, else a scaled-down CPU run
    python -m benchmarks.attention --device cuda --dtype bf16 --repeats 20
    python -m benchmarks.attention --device cpu --hidden 1152 --tokens 32

Defaults: on CUDA hidden 1152 (PixArt-XL/2), 8 x 64 x 64 tokens, bf16. On CPU hidden 288 and
8 x 32 x 32 tokens, fp32: N and D both a quarter of the real size (N 16x fewer tokens in all, D 4x
smaller), which keeps the attention/linear FLOP balance N / (6 D) of the real block
(attention 4 N^2 D, linears 24 N D^2 at mlp_ratio 4) and runs in well under a minute.

Columns: ms per forward (median of --repeats after --warmup runs); time / full; attention FLOPs
full / this (N^2 over the sum of n_part^2, i.e. the number of parts); whole-block FLOPs full / this
(attention plus the qkv, proj and MLP matmuls; norms, modulation and GELU are not counted).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from einops import repeat

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file from a checkout without installing
    sys.path.insert(0, str(ROOT))

from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry  # noqa: E402

from dit.attention import num_parts, partition, unpartition  # noqa: E402
from dit.video_dit import DiTBlock, VideoDiT  # noqa: E402
from cascadev.weights import init_keywords  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OFFICIAL = {k: p.default for k, p in init_keywords(VideoDiT).items()}  # the released config: VideoDiT's defaults
HEAD_DIM = OFFICIAL["hidden_size"] // OFFICIAL["num_heads"]  # 72, as released
PARTITIONS: tuple[tuple[str, tuple[int, int] | None], ...] = (("full 3D", None), ("[1,4]", (1, 4)), ("[4,1]", (4, 1)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: cuda when available)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size D (default 1152 on CUDA, 288 on CPU)")
    p.add_argument("--heads", type=int, default=None, help=f"attention heads (default hidden / {HEAD_DIM})")
    p.add_argument("--frames", type=int, default=8, help="frames in the window (token grid T)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per side of a frame (default 64 on CUDA, 32 on CPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--backend", choices=sorted(b.value for b in AttentionBackendName), default=None,
                   help="diffusers attention backend, e.g. native (torch SDPA), flash, _native_math "
                        "(default: diffusers' active one, native unless DIFFUSERS_ATTN_BACKEND says otherwise)")
    p.add_argument("--attn-fp32", action="store_true", help="upcast q, k, v as the release's fp32_attention")
    p.add_argument("--batch", type=int, default=1, help="windows per forward")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per config (default 3 CUDA, 1 CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per config (default 10 CUDA, 3 CPU)")
    return p.parse_args(argv)


def flops(n_tokens: int, hidden: int, mlp_ratio: float, strides: tuple[int, int] | None) -> tuple[float, float]:
    """(attention, whole block) FLOPs of one window; a multiply-add counts 2.

    Attention inside a part of n tokens: q k^T and attn v, 2 * 2 n^2 D. Linears on all N tokens:
    qkv 3 D^2, proj D^2, MLP 2 * mlp_ratio D^2, times 2 N.
    """
    parts = num_parts(strides)
    n = n_tokens // parts
    attn = parts * 4 * n * n * hidden
    linear = 2 * n_tokens * hidden * hidden * (3 + 1 + 2 * mlp_ratio)
    return attn, attn + linear


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(block: DiTBlock, x: torch.Tensor, t6: torch.Tensor, grid: tuple[int, int, int],
               strides: tuple[int, int] | None, warmup: int, repeats: int) -> float:
    """Median milliseconds of partition -> block -> unpartition, as in ``VideoDiT.forward``."""
    def step():
        parts = partition(x, grid, strides)  # (b parts) n d
        t_parts = repeat(t6, "b d -> (b n) d", n=num_parts(strides))  # (b parts) 6d
        return unpartition(block(parts, t_parts), grid, strides)  # b (t h w) d

    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            synchronize(x.device)
            start = time.perf_counter()
            step()
            synchronize(x.device)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    on_gpu = device.type == "cuda"
    hidden = args.hidden or (1152 if on_gpu else 288)
    tokens = args.tokens or (64 if on_gpu else 32)
    heads = args.heads or max(1, hidden // HEAD_DIM)
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    repeats = args.repeats or (10 if on_gpu else 3)
    T = args.frames
    for name, strides in PARTITIONS:
        if strides and (T % strides[0] or tokens % strides[1]):
            sys.exit(f"{name} needs frames divisible by {strides[0]} and tokens per side by {strides[1]}; "
                     f"got {T} frames of {tokens}x{tokens}")

    torch.manual_seed(0)
    block = DiTBlock(hidden, heads, OFFICIAL["mlp_ratio"], OFFICIAL["qk_norm"], args.attn_fp32)
    block = block.to(device=device, dtype=dtype).eval()
    for p in block.parameters():  # the scale_shift_table starts at zero; any values do for timing
        torch.nn.init.normal_(p, std=0.02)
    if args.backend:
        block.attn.set_attention_backend(args.backend)  # diffusers' AttentionModuleMixin
    grid = (T, tokens, tokens)
    N = T * tokens * tokens
    x = torch.randn(args.batch, N, hidden, device=device, dtype=dtype)  # b (t h w) d
    t6 = torch.randn(args.batch, 6 * hidden, device=device, dtype=dtype)

    kernel = args.backend or _AttentionBackendRegistry.get_active_backend()[0].value
    scaled = "" if (hidden, tokens, T) == (1152, 64, 8) else "  (scaled down; the trained window: hidden 1152, 8x64x64)"
    where = torch.cuda.get_device_name(device) if on_gpu else f"cpu, {torch.get_num_threads()} threads"
    print(f"DiTBlock: hidden {hidden}, heads {heads}, mlp_ratio {OFFICIAL['mlp_ratio']}, window {T}x{tokens}x{tokens} "
          f"= {N} tokens, batch {args.batch}{scaled}")
    print(f"device {where}, dtype {str(dtype).removeprefix('torch.')}, attention kernel {kernel}"
          f"{' (fp32 q/k/v)' if args.attn_fp32 else ''}, warmup {warmup}, repeats {repeats} (median)")

    rows = []
    for name, strides in PARTITIONS:
        ms = time_block(block, x, t6, grid, strides, warmup, repeats)
        attn, total = flops(N, hidden, OFFICIAL["mlp_ratio"], strides)
        rows.append((name, num_parts(strides), N // num_parts(strides), ms, attn, total))

    full_ms, full_attn, full_total = rows[0][3], rows[0][4], rows[0][5]
    header = (f"{'config':<8} {'parts':>5} {'tokens/part':>11} {'ms/forward':>11} {'time/full':>9} "
              f"{'attn FLOPs full/this':>20} {'block FLOPs full/this':>21} {'block TFLOP/s':>13}")
    print(header)
    print("-" * len(header))
    for name, parts, n, ms, attn, total in rows:
        print(f"{name:<8} {parts:>5} {n:>11} {ms:>11.1f} {ms / full_ms:>9.3f} {full_attn / attn:>20.1f} "
              f"{full_total / total:>21.2f} {total / ms / 1e9:>13.3f}")


if __name__ == "__main__":
    main()
