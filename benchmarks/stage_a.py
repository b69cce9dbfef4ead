"""Stage A decode: ours against diffusers' untiled and tiled decode, and what the CLI's peak memory does with the frame.

    python benchmarks/stage_a.py table [--sizes 512 1024 2048] [--frames 2]    # time and peak RSS, each in a process
    python benchmarks/stage_a.py closeness                                       # max |tiled - untiled| per kind
    python benchmarks/stage_a.py rss [--sizes 1024x576 2048x1152] [--frames 8]   # cascadev reconstruct's peak RSS

``table`` decodes random latents with the shipped tiny cascade's Stage A (AutoencoderTiny, 48 channels, fp32): ours
(``StageAVAE.decode`` with the CLI's default 1 GiB budget, and with the saved 256 px tiles), diffusers' ``decode``
of the whole frames, and diffusers' own ``enable_tiling`` (its 512 px default tiles). Each row is a fresh process
reporting ``ru_maxrss``. ``closeness``: 256 px tiles sharing 64 at 384 px against the whole frame, per kind (the
shipped VAE, and the random-init tiny presets). ``rss``: ``cascadev reconstruct`` of a generated clip.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from cascadev.pipelines.cascade import TINY_CASCADE

REPORT = "import resource; print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
DECODE = """
import sys, time, dataclasses, torch
from cascadev.pipelines.cascade import CascadeVPipeline
from vae.stage_a import StageAVAE
way, size, frames = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stage_a = CascadeVPipeline.from_pretrained(sys.argv[4]).stage_a
z = torch.randn(1, 4, frames, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
raw = z[0].transpose(0, 1) / stage_a.config.scale_factor
start = time.perf_counter()
with torch.no_grad():
    if way == "ours (1 GiB)":
        StageAVAE(dataclasses.replace(stage_a.config, max_memory=1.0), stage_a.model).decode(z)
    elif way == "ours (256 px tiles)":
        stage_a.decode(z)
    else:
        if way == "diffusers tiled":
            stage_a.model.enable_tiling()
        stage_a.model.decode(raw)
print('SECONDS', time.perf_counter() - start)
""" + REPORT
WAYS = ("ours (1 GiB)", "ours (256 px tiles)", "diffusers untiled", "diffusers tiled")


def run(code: str, *args: str) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    found = dict(line.split()[:2] for line in result.stdout.splitlines() if line.startswith(("MAXRSS", "SECONDS")))
    return {"rss_mib": int(found["MAXRSS"]) / 1024, **({"s": float(found["SECONDS"])} if "SECONDS" in found else {})}


def table(sizes: list[int], frames: int) -> None:
    print(f"| frames x px | {' | '.join(WAYS)} |\n|---|" + "---|" * len(WAYS))
    for size in sizes:
        cells = [run(DECODE, way, str(size), str(frames), str(TINY_CASCADE)) for way in WAYS]
        print(f"| {frames} x {size}^2 | " + " | ".join(f"{c['s']:.1f} s, {c['rss_mib']:.0f} MiB" for c in cells) + " |",
              flush=True)


def closeness() -> None:
    import torch

    from cascadev.pipelines.cascade import CascadeVPipeline
    from vae.stage_a import StageAVAE, build_stage_a

    torch.manual_seed(0)
    vaes = {"taesd (shipped)": CascadeVPipeline.from_pretrained(str(TINY_CASCADE)).stage_a,
            "taesd (tiny_taesd)": build_stage_a("tiny_taesd"), "kl (tiny)": build_stage_a("tiny"),
            "svd_temporal (tiny_temporal)": build_stage_a("tiny_temporal", chunk_frames=2)}
    z = torch.randn(1, 4, 2, 48, 48, generator=torch.Generator().manual_seed(1))        # 2 x 384 x 384 px
    print("| Stage A kind | margin px | max abs tiled - untiled (256 px tiles sharing 64) | frame std | "
          "diffusers enable_tiling (same tiles) |\n|---|---|---|---|---|")
    for name, vae in vaes.items():
        def change(**kw):
            return StageAVAE(__import__("dataclasses").replace(vae.config, **kw), vae.model)
        plain = change(tile_size=0).decode(z)
        ours = (change(tile_size=256, tile_overlap=64).decode(z) - plain).abs().max().item()
        full = (change(tile_size=256, tile_overlap=64, tile_margin=0).decode(z) - plain).abs().max().item()
        model = vae.model
        if vae.config.kind != "svd_temporal":
            model.tile_sample_min_size, model.tile_latent_min_size, model.tile_overlap_factor = 256, 32, 0.25
            model.enable_tiling()
            theirs = f"{(change(tile_size=0).decode(z) - plain).abs().max().item():.4f}"
            model.disable_tiling()
        else:
            theirs = "none (diffusers has no tiling for it)"
        margin = change().config.tile_margin
        from vae.stage_a import TILE_MARGIN
        print(f"| {name} | {TILE_MARGIN[vae.config.kind] if margin is None else margin} | {ours:.4f} "
              f"(full ramp {full:.4f}) | {plain.std().item():.3f} | {theirs} |", flush=True)


RECONSTRUCT = ("import sys, time; from cascadev.cli import main; start = time.perf_counter(); "
               "main(['reconstruct', sys.argv[1], '-o', sys.argv[2], '--weights', sys.argv[3]] + sys.argv[4:]); "
               "print('SECONDS', time.perf_counter() - start); " + REPORT)


def rss(sizes: list[str], frames: int, extra: list[str]) -> None:
    from cascadev.synthetic import make_clip
    from cascadev.video_io import VideoWriter

    with tempfile.TemporaryDirectory() as tmp:
        print("| clip | time s | peak RSS MiB |\n|---|---|---|")
        for size in sizes:
            W, H = (int(v) for v in size.split("x"))
            clip = Path(tmp) / f"clip{size}.mp4"
            with VideoWriter(clip, fps=8) as writer:
                writer.write(make_clip(seed=0, frames=frames, height=H, width=W)[None])
            got = run(RECONSTRUCT, str(clip), str(Path(tmp) / "out.mp4"), str(TINY_CASCADE), *extra)
            print(f"| {frames} x {H} x {W} | {got['s']:.1f} | {got['rss_mib']:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["table", "closeness", "rss"])
    parser.add_argument("--sizes", nargs="+")
    parser.add_argument("--frames", type=int)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="rss: more reconstruct arguments")
    args = parser.parse_args()
    if args.what == "table":
        table([int(s) for s in args.sizes or (512, 1024, 2048)], args.frames or 2)
    elif args.what == "closeness":
        closeness()
    else:
        rss(args.sizes or ["1024x576", "2048x1152"], args.frames or 8, args.extra)


if __name__ == "__main__":
    main()
