"""How the DiT's windows cover a large clip: DiT work, fidelity, detail and seams per tiling, on held-out clips.

    python benchmarks/tiling.py                                   # 8x512x512 and 16x512x896, 3 seeds, the tiny cascade
    python benchmarks/tiling.py --sizes 8x256x256 --seeds 1 --steps 2 --json /tmp/tiling.json

Tilings: ``blend`` at the release's spacing (tiles 3/4 of a window apart, windows half a window apart), ``stride =
window`` (blend with no overlap: one grid of whole windows at every step) and ``shifted`` (whole windows on a grid
moved at each step). Per tiling and size, means over the seeds:

- ``work``: latent voxels (frames x latent pixels, padding to the attention partitions included) through the DiT
  over all steps, as a multiple of the clip's latent volume x steps (1.0: the area once per step), and relative
  to blend's;
- PSNR and SSIM of the cascade's output (the shipped colour fix applied, as ``cascadev demo``) against the input;
- ``sharpness``: spectral energy above 1/16 cycle per pixel as a fraction of the input's (``eval.metrics``);
- ``seam``: gradient energy across the lines where windows meet (any step's, space and time) over the gradient
  energy elsewhere, divided by the same ratio of the input: 1.0 is no seam; measured without the colour fix, whose
  low band (the Previewer's) would hide a seam of the DiT's.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cascadev.pipelines.cascade import TINY_CASCADE
from cascadev.pipelines.frames import fix_colour
from cascadev.pipelines.sampling import finishing_step
from cascadev.pipelines.tiling import Tiling, dit_work, window_crops
from cascadev.synthetic import HELD_OUT_SEED0, make_clip
from eval.metrics import psnr, sharpness, ssim

STAGE_A_DOWNSAMPLE = 8      # Stage A latent pixel -> pixels


def tilings(spec) -> dict[str, Tiling]:
    return {"blend": Tiling("blend"),
            "stride = window": Tiling("blend", frame_stride=spec.window_frames, tile_stride=spec.window_size),
            "shifted": Tiling("shifted")}


def window_edges(spec, size: tuple[int, int, int], tiling: Tiling, steps: int,
                 finishing: int) -> tuple[set[int], ...]:
    """Latent positions (frames, rows, columns) where a window starts or ends inside the clip, at any step of a
    sampler whose finishing step is ``finishing`` (``sampling.finishing_step``: shifted tiling blends it)."""
    edges: tuple[set[int], ...] = (set(), set(), set())
    for step in range(steps):
        for crop in window_crops(spec, size, tiling.at_step(step, finishing), step):
            for axis, (s, n) in enumerate(zip(crop, size)):
                edges[axis].update(e for e in (s.start, s.stop) if 0 < e < n)
    return edges


def gradient_ratio(video: torch.Tensor, dim: int, lines: list[int]) -> float | None:
    """Mean squared difference across ``lines`` (between index i - 1 and i along ``dim`` of (B, 3, T, H, W)) over the
    mean squared difference across every other position."""
    if not lines:
        return None
    energy = video.double().diff(dim=dim).pow(2).mean(dim=[d for d in range(5) if d != dim])   # one per gap
    on = torch.zeros_like(energy, dtype=torch.bool)
    on[[i - 1 for i in lines]] = True
    return float(energy[on].mean() / energy[~on].mean())


def seam(output: torch.Tensor, target: torch.Tensor, edges: tuple[set[int], ...]) -> float:
    """Gradient energy on window edges vs elsewhere, relative to the input's, averaged over the axes with edges
    (``edges`` in Stage A latents: frames as the pixels', rows and columns x8)."""
    scales = (1, STAGE_A_DOWNSAMPLE, STAGE_A_DOWNSAMPLE)
    ratios = []
    for axis, (lines, scale) in enumerate(zip(edges, scales)):
        pixels = sorted(e * scale for e in lines)
        out, ref = gradient_ratio(output, axis + 2, pixels), gradient_ratio(target, axis + 2, pixels)
        if out is not None:
            ratios.append(out / ref)
    return sum(ratios) / len(ratios) if ratios else 1.0


def main(argv: list[str] | None = None) -> dict:
    from cascadev.pipelines.cascade import CascadeVPipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=str(TINY_CASCADE), help="a cascade folder (default: the built-in tiny cascade)")
    p.add_argument("--sizes", nargs="+", default=["8x512x512", "16x512x896"], help="FRAMESxHEIGHTxWIDTH in pixels")
    p.add_argument("--seeds", type=int, default=3, help="held-out clips per size")
    p.add_argument("--steps", type=int, default=None, help="DiT steps (default: the folder's)")
    p.add_argument("--kind", default=None, help="procedural clip kind (default: the folder's demo kind)")
    p.add_argument("--json", help="also write the table here")
    args = p.parse_args(argv)

    torch.set_grad_enabled(False)
    pipe = CascadeVPipeline.from_pretrained(args.weights)
    pipe.set_progress_bar_config(disable=True)
    spec, steps = pipe.dit.window, args.steps or pipe.config.num_inference_steps
    sampler = pipe.resolve_scheduler(None)
    sampler.set_timesteps(steps)
    finishing = finishing_step(sampler)       # the step the decode blends under shifted tiling
    kind, fix = args.kind or (pipe.config.demo or {}).get("kind", "mixed"), pipe.config.colour_fix
    rows = []
    for size in args.sizes:
        T, H, W = (int(n) for n in size.split("x"))
        scores = {name: {"psnr": [], "ssim": [], "sharpness": [], "seam": [], "seconds": []} for name in tilings(spec)}
        for k in range(args.seeds):
            video = make_clip(HELD_OUT_SEED0 + k, T, H, W, kind)[None]
            latents = pipe.encode(video)
            baseline = pipe.preview(latents) if fix else None
            for name, tiling in tilings(spec).items():
                start = time.perf_counter()
                raw = pipe.decode(latents, steps=steps, seed=k, tiling=tiling, colour_fix=0)
                seconds = time.perf_counter() - start
                out = fix_colour(raw, baseline, fix) if fix else raw
                latent_size = (T, H // STAGE_A_DOWNSAMPLE, W // STAGE_A_DOWNSAMPLE)   # Stage A keeps the frames
                edges = window_edges(spec, latent_size, tiling, steps, finishing)
                for metric, value in (("psnr", psnr(out, video).mean().item()),
                                      ("ssim", ssim(out, video).mean().item()),
                                      ("sharpness", sharpness(out, video)),
                                      ("seam", seam(raw, video, edges)),
                                      ("seconds", seconds)):
                    scores[name][metric].append(value)
            print(f"{size} seed {k}: " + ", ".join(f"{n} {s['psnr'][-1]:.2f} dB" for n, s in scores.items()),
                  flush=True)
        _, blend_work = dit_work(spec, latent_size, tilings(spec)["blend"], steps, finishing)
        for name, tiling in tilings(spec).items():
            forwards, voxels = dit_work(spec, latent_size, tiling, steps, finishing)
            mean = {metric: sum(v) / len(v) for metric, v in scores[name].items()}
            rows.append({"size": size, "tiling": name, "steps": steps, "dit_forwards": forwards,
                         "work_x_area": voxels / (steps * latent_size[0] * latent_size[1] * latent_size[2]),
                         "work_vs_blend": voxels / blend_work, **mean})
    print(f"\n{args.seeds} held-out {kind} clips per size, {steps} steps, colour fix {fix or 'off'}, {args.weights}")
    header = f"{'size':<12}{'tiling':<17}{'forwards':>9}{'work/area':>10}{'vs blend':>9}{'PSNR':>8}{'SSIM':>8}" \
             f"{'sharp':>8}{'seam':>8}{'s':>7}"
    print(header)
    for r in rows:
        print(f"{r['size']:<12}{r['tiling']:<17}{r['dit_forwards']:>9}{r['work_x_area']:>10.2f}{r['work_vs_blend']:>9.2f}"
              f"{r['psnr']:>8.2f}{r['ssim']:>8.3f}{r['sharpness']:>8.3f}{r['seam']:>8.3f}{r['seconds']:>7.1f}")
    report = {"weights": args.weights, "kind": kind, "seeds": args.seeds, "colour_fix": fix, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
