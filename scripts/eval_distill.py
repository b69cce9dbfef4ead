"""Score decoders on the demo's held-out clips as ``cascadev demo`` does: PSNR, SSIM and sharpness of the cascade
with the colour fix, at chosen steps, beside the Previewer baseline.

    python scripts/eval_distill.py --weights cascadev/assets/tiny_cascade:4,2,1 \\
        --weights cascadev/assets/tiny_distilled:1,2

Each ``--weights FOLDER:STEPS`` is a cascade folder and the step counts to score it at; results print as a table
and go to ``--out`` (JSON). The clips, noise seeds and colour fix are the demo's (seeds 100000+, noise seed i for
clip i, the folder's saved colour fix).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def score(weights: str, steps: list[int], clips: int, frames: int, png: str | None) -> list[dict]:
    from cascadev.pipelines.cascade import CascadeVPipeline, resolve_colour_fix
    from cascadev.pipelines.frames import fix_colour
    from cascadev.synthetic import HELD_OUT_SEED0, make_clip
    from eval.metrics import psnr, sharpness, ssim

    pipe = CascadeVPipeline.from_pretrained(weights).to("cpu").set_precision(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    settings = pipe.config.demo or {}
    size, kind, fix = settings.get("size", 128), settings.get("kind", "shapes"), resolve_colour_fix(pipe, None)
    videos = [make_clip(HELD_OUT_SEED0 + i, frames, size, size, kind)[None] for i in range(clips)]
    rows, previews = [], []
    for video in videos:
        previews.append(pipe.preview(pipe.encode(video)))
    for k in [0, *steps]:                               # 0: the Previewer baseline
        outs, tic = [], time.perf_counter()
        for i, video in enumerate(videos):
            latents = pipe.encode(video)
            if k == 0:
                outs.append(previews[i])
                continue
            out = pipe.decode(latents, steps=k, seed=i, colour_fix=0)
            outs.append(fix_colour(out, previews[i], fix) if fix else out)
        seconds = time.perf_counter() - tic
        pred, target = torch.cat(outs, dim=2), torch.cat(videos, dim=2)
        rows.append({"weights": weights, "steps": k, "dit_forwards_per_window": k,
                     "psnr": torch.cat([psnr(o, v) for o, v in zip(outs, videos)]).mean().item(),
                     "ssim": torch.cat([ssim(o, v) for o, v in zip(outs, videos)]).mean().item(),
                     "sharpness": sharpness(pred, target), "seconds": round(seconds, 1)})
        if png and k:
            from cascadev.video_io import write_png_strip
            write_png_strip(Path(png) / f"{Path(weights).name}_{k}.png",
                            torch.cat([videos[0], outs[0]], dim=-2), max_frames=4)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", action="append", required=True, metavar="FOLDER:STEPS")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--png", default=None, help="folder for input-over-output frame strips")
    parser.add_argument("--out", default=None, help="JSON file for the table")
    args = parser.parse_args()
    rows = []
    for item in args.weights:
        folder, _, steps = item.rpartition(":")
        rows += score(folder, [int(s) for s in steps.split(",")], args.clips, args.frames, args.png)
    print(f"\n{'weights':<40}{'steps':>6}{'PSNR':>8}{'SSIM':>8}{'sharp':>8}")
    for r in rows:
        name = "Previewer" if r["steps"] == 0 else r["weights"]
        print(f"{name:<40}{r['steps']:>6}{r['psnr']:>8.2f}{r['ssim']:>8.3f}{r['sharpness']:>8.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
