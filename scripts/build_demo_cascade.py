"""Train the built-in tiny cascade from the committed configs and export it into the package.

    OMP_NUM_THREADS=1 python scripts/build_demo_cascade.py            # all steps (about 35 min on 2 CPU cores)
    python scripts/build_demo_cascade.py --from export                # only re-export finished runs

Steps: procedural training clips (seeds < 100000, shapes over gradients) -> Stage A VAE
(configs/demo_vae.yaml) and semantic encoder + Previewer (configs/demo_semantic.yaml), run side by
side -> cached latents -> LDM-VAE DiT (configs/demo_dit.yaml) -> cascadev/assets/tiny_cascade.
Each training run resumes by itself if interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

STEPS = ("data", "stages", "cache", "dit", "export")
DATA = "runs/demo_data/train"
DEMO_SETTINGS = {"steps": 4, "scheduler": "ddim"}   # the sampler the demo uses by default


def run(*argv: str, env: dict | None = None) -> subprocess.Popen:
    print("$", " ".join(argv), flush=True)
    return subprocess.Popen([sys.executable, *argv], env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def wait(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.wait():
            sys.exit(f"step failed: {' '.join(p.args)}")


def export(out: Path) -> None:
    import torch

    from cascadev.pipeline import CascadeVPipeline

    pipe = CascadeVPipeline.from_pretrained(
        dit="runs/demo_dit/final/ema", semantic_encoder="runs/demo_semantic/final/semantic_encoder",
        previewer="runs/demo_semantic/final/previewer", stage_a="runs/demo_vae/final/ema", device="cpu")
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
        wait(run("-m", "cascadev.synthetic", DATA, "--n", "96", "--frames", "16", "--size", "128", "--kind", "shapes"))
    if "stages" in todo:  # independent: one core each
        wait(run("-m", "cascadev.train", "--config", "configs/demo_vae.yaml"),
             run("-m", "cascadev.train", "--config", "configs/demo_semantic.yaml"))
    if "cache" in todo:
        wait(run("-m", "cascadev.cache_latents", "--config", "configs/demo_dit.yaml", "--out", "runs/demo_cache",
                 "--clips-per-video", "4"))
    if "dit" in todo:
        wait(run("-m", "cascadev.train", "--config", "configs/demo_dit.yaml", "--set", "data.latents=runs/demo_cache",
                 env={"OMP_NUM_THREADS": "2"}))
    export(Path(__file__).resolve().parents[1] / "cascadev" / "assets" / "tiny_cascade")


if __name__ == "__main__":
    main()
