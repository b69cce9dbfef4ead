"""CPU ratios on the shipped tiny cascade (trained weights, no download): what half precision costs and what
batching windows gives.

    python benchmarks/cpu.py                 # about a minute on 2 cores

Rows: one DiT forward and a whole decode in bf16 against fp32 (relative L2 error, PSNR of the decoded clip
against the fp32 one, seconds); decode with windows one by one against batched.
"""

from __future__ import annotations

import argparse
import time

import torch

from cascadev.pipelines.cascade import TINY_CASCADE
from cascadev.pipelines.cascade import CascadeVPipeline
from eval.metrics import psnr


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", default="256x256", help="WxH pixels (multiples of 32)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    W, H = (int(n) for n in args.size.split("x"))
    torch.manual_seed(0)
    fp32 = CascadeVPipeline.from_pretrained(str(TINY_CASCADE))
    bf16 = CascadeVPipeline.from_pretrained(str(TINY_CASCADE)).set_precision(torch.bfloat16)
    for pipe in (fp32, bf16):
        pipe.set_progress_bar_config(disable=True)
    video = torch.rand(1, 3, args.frames, H, W) * 2 - 1
    latents = fp32.encode(video)

    c = fp32.dit.config
    x = torch.randn(1, fp32.dit.in_channels, c.window_frames, c.window_size, c.window_size)
    t = torch.full((1,), 500.0)
    with torch.no_grad():
        want, got = fp32.dit(x, t), bf16.dit(x.bfloat16(), t)
    print(f"DiT forward, one {c.window_frames}x{c.window_size}x{c.window_size} window: bf16 vs fp32 relative error "
          f"{rel_err(got, want):.2e}")

    decode = dict(seed=0, colour_fix=0)
    for pipe in (fp32, bf16):       # warm-up: first calls pay for allocation and kernel selection
        pipe.decode(latents[:, :, :4], **decode)
    ref, s32 = timed(lambda: fp32.decode(latents, **decode))
    half, s16 = timed(lambda: bf16.decode(latents, **decode))
    print(f"decode {args.frames}x{H}x{W}: fp32 {s32:.2f} s, bf16 {s16:.2f} s (x{s32 / s16:.2f}); bf16 vs fp32 "
          f"relative error {rel_err(half, ref):.2e}, PSNR {psnr(half, ref).mean().item():.1f} dB")

    one, s1 = timed(lambda: fp32.decode(latents, window_batch=1, **decode))
    batched, sb = timed(lambda: fp32.decode(latents, window_batch=8, **decode))
    print(f"decode, windows one by one {s1:.2f} s vs 8 per forward {sb:.2f} s (x{s1 / sb:.2f}); max difference "
          f"{(batched - one).abs().max().item():.1e}")


if __name__ == "__main__":
    main()
