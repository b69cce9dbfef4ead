"""Train the built-in tiny cascade from the committed configs and export it into the package.

    python scripts/build_demo_cascade.py                              # all steps
    python scripts/build_demo_cascade.py --from export                # only re-export finished runs

Steps: procedural training clips (396 clips, seeds < 100000, striped shapes over gradients, 16 frames at
256x256) -> Stage A VAE (configs/demo_vae.yaml) and semantic encoder + Previewer
(configs/demo_semantic.yaml), side by side, one CPU thread each -> cached latents of random 128x128
crops -> the LDM-VAE DiT (configs/demo_dit.yaml) -> cascadev/assets/tiny_cascade. Each training run
resumes by itself if interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

STEPS = ("data", "stages", "cache", "dit", "export")
STAGE_A = "runs/demo_vae/final/ema"
DATA = "runs/demo_data256/train"
CACHE = "runs/demo_cache"
DEMO_SETTINGS = {"steps": 4, "scheduler": "flow", "kind": "shapes", "size": 256}   # best of flow 1/2/4/8 on seeds 200000+
# Stage A decodes the cascade's latents in 128 px tiles: its GroupNorm statistics depend on the area it sees (it
# trained on 64 px crops). Cascade on seeds 200000+, 1 flow step: whole 256 px frames 21.61 dB, tiles of
# 64 / 96 / 128 / 192 px 21.40 / 21.97 / 22.17 / 21.74
STAGE_A_TILES = {"tile_size": 128, "tile_overlap": 32}


def run(*argv: str, threads: int = 1) -> subprocess.Popen:
    """A python step in its own process. One thread each when two run side by side: with default threads,
    two CPU trainings on 2 cores ran 20-40x slower (OpenMP oversubscription)."""
    print("$", " ".join(argv), flush=True)
    return subprocess.Popen([sys.executable, *argv], env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def wait(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.wait():
            sys.exit(f"step failed: {' '.join(p.args)}")


def export(out: Path) -> None:
    import torch

    from cascadev.pipeline import CascadeVPipeline
    from cascadev.train_config import load_train_config

    trained = load_train_config("configs/demo_dit.yaml").stage_a.model_config()     # with its latent scale
    stage_a_config = dataclasses.replace(trained, **STAGE_A_TILES)
    pipe = CascadeVPipeline.from_pretrained(
        dit="runs/demo_dit/final/ema", semantic_encoder="runs/demo_semantic/final/semantic_encoder",
        previewer="runs/demo_semantic/final/previewer", stage_a=STAGE_A, stage_a_config=stage_a_config, device="cpu")
    pipe.save_pretrained(out)
    meta = json.loads((out / "pipeline.json").read_text())
    meta["demo"] = DEMO_SETTINGS
    (out / "pipeline.json").write_text(json.dumps(meta, indent=2))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"exported to {out}: {size / 2**20:.1f} MiB, torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="start", default="data", choices=STEPS, help="first step to run")
    args = parser.parse_args()
    todo = STEPS[STEPS.index(args.start):]
    if "data" in todo:
        wait(run("-m", "cascadev.synthetic", DATA, "--n", "396", "--frames", "16", "--size", "256", "--kind", "shapes"))
    if "stages" in todo:  # independent: one core each
        wait(run("-m", "cascadev.train", "--config", "configs/demo_vae.yaml"),
             run("-m", "cascadev.train", "--config", "configs/demo_semantic.yaml"))
    if "cache" in todo:
        wait(run("-m", "cascadev.cache_latents", "--config", "configs/demo_dit.yaml", "--out", CACHE,
                 "--clips-per-video", "6", "--crop", "random", threads=2))
    if "dit" in todo:
        wait(run("-m", "cascadev.train", "--config", "configs/demo_dit.yaml", "--set", f"data.latents={CACHE}",
                 threads=2))
    export(Path(__file__).resolve().parents[1] / "cascadev" / "assets" / "tiny_cascade")


if __name__ == "__main__":
    main()
