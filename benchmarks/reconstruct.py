"""Time and peak memory of each reconstruction phase: semantic encode, DiT steps, Stage A decode.

    python benchmarks/reconstruct.py --preset tiny --frames 8 --size 256x256            # CPU
    python benchmarks/reconstruct.py --preset official --frames 8 --size 1024x1024      # GPU
    python benchmarks/reconstruct.py --preset official --frames 8 --size 2048x1152 --dtype bf16

Random weights (timing only): ``official`` builds the released architectures (EfficientNetV2-S
encoder, PixArt-XL/2 DiT, SVD temporal VAE) without downloading anything.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from cascadev.pipelines.cascade import CascadeVPipeline
from dit import build_dit
from vae import build_semantic_encoder, build_stage_a

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(preset: str, device: str, dtype: torch.dtype) -> CascadeVPipeline:
    stage_a = build_stage_a(preset if preset == "tiny" else "official", load_weights=False)
    dit = build_dit(preset, attn_fp32=dtype == torch.float32) if preset != "tiny" else build_dit("tiny")
    return CascadeVPipeline(dit=dit.to(dtype), semantic_encoder=build_semantic_encoder(preset).to(dtype),
                            stage_a=stage_a, device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "official"])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", default="256x256", help="WxH in pixels (multiples of 32)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tiling", default="blend", choices=["blend", "official"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = parser.parse_args()
    W, H = (int(v) for v in args.size.lower().split("x"))
    torch.manual_seed(0)
    pipe = build(args.preset, args.device, DTYPES[args.dtype])
    video = torch.rand(1, 3, args.frames, H, W) * 2 - 1
    cuda = args.device.startswith("cuda")

    rows = []
    for phase, run in [
        ("encode", lambda: pipe.encode(video)),
        ("dit", lambda: pipe.decode_latents(latents, steps=args.steps, tiling=args.tiling, progress=False)),
        ("stage_a", lambda: pipe.stage_a.decode(z)),
    ]:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = run()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        # GPU: peak allocated in this phase; CPU: the process's peak resident memory so far
        peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
        rows.append((phase, seconds, peak))
        if phase == "encode":
            latents = out
        elif phase == "dit":
            z = out
    print(f"{args.preset} preset, {args.frames}x{H}x{W}, {args.steps} steps, {args.tiling} tiling, "
          f"{args.dtype} on {args.device}" + (f" ({torch.cuda.get_device_name()})" if cuda else ""))
    print(f"{'phase':<10}{'seconds':>10}{'peak GiB':>10}" + ("" if cuda else "  (process peak RSS)"))
    for phase, seconds, peak in rows:
        print(f"{phase:<10}{seconds:>10.2f}{peak:>10.2f}")
    print(f"{'total':<10}{sum(r[1] for r in rows):>10.2f}")


if __name__ == "__main__":
    main()
