"""Time and peak memory of one Stage B DiT training step (IDDPM loss, backward, AdamW), from cached latents.

    python benchmarks/train_step.py                      # tiny preset on CPU; + official 8x128x128 on CUDA
    python benchmarks/train_step.py --preset official --frames 8 --size 128 --batch 1 --bf16 --checkpointing

A step is what ``cascadev.training.train`` does per micro-batch when training from a latent cache: noise the
latent at per-video timesteps, run the DiT on cat([x_t, cond]), MSE + VLB, backward, clip, AdamW.
Frozen encoders are not included (they run once per clip when caching). Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA; on CPU, how far the process's peak resident set size
rose above its level before the model was built (weights, optimizer state, activations; a high-water
mark, so run one case per process for exact numbers). Prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cascadev.training.diffusion import GaussianDiffusion  # noqa: E402
from dit.video_dit import PRESETS, VideoDiT  # noqa: E402


def bench(preset: str, frames: int, size: int, batch: int, steps: int, warmup: int, device: str,
          bf16: bool, checkpointing: bool) -> dict:
    torch.manual_seed(0)
    dev = torch.device(device)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20            # KiB -> GiB (Linux)
    model = VideoDiT(**PRESETS[preset]).to(dev).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    diffusion = GaussianDiffusion()
    x0 = torch.randn(batch, model.config.latent_channels, frames, size, size, device=dev)
    cond = torch.randn(batch, model.config.cond_channels, frames, size, size, device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)

    def step(i: int) -> float:
        g = torch.Generator(dev).manual_seed(i)
        t = diffusion.sample_t(batch, g)
        eps = torch.randn(x0.shape, generator=g, device=dev)
        x_t = diffusion.noise(x0, t, eps)
        with autocast:
            out = model(torch.cat([x_t, cond], dim=1), diffusion.model_time(t))
        loss = diffusion.losses(out.float(), x0, x_t, t, eps)["loss"].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()                                  # synchronises CUDA

    for i in range(warmup):
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    seconds = (time.perf_counter() - start) / steps
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20 - baseline     # above the imports
    return {"preset": preset, "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(),
            "threads": torch.get_num_threads(), "latent": f"{batch}x{frames}x{size}x{size}", "bf16": bf16,
            "checkpointing": checkpointing, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "step_s": round(seconds, 4), "latent_frames_per_s": round(batch * frames / seconds, 2),
            "peak_mem_GiB": round(peak, 3),
            "peak_mem_kind": "cuda allocated" if dev.type == "cuda" else "process peak RSS above its start"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="one case; default: the standard set")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=16, help="latent pixels per side")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args(argv)
    if args.preset:
        cases = [(args.preset, args.frames, args.size, args.batch, args.device, args.bf16, args.checkpointing)]
    else:
        cases = [("tiny", 4, 16, 2, "cpu", False, False)]           # the tiny preset's trained window
        if torch.cuda.is_available():                              # the release's window: 8 x 1024 x 1024 px
            cases.append(("official", 8, 128, 1, "cuda", True, True))
    for preset, frames, size, batch, device, bf16, ckpt in cases:
        print(json.dumps(bench(preset, frames, size, batch, args.steps, args.warmup, device, bf16, ckpt)), flush=True)


if __name__ == "__main__":
    main()
