"""Train the built-in tiny cascade from the committed configs and export it into the package.

    python scripts/build_demo_cascade.py                              # all steps
    python scripts/build_demo_cascade.py --from export                # only re-export finished runs

Steps: procedural training clips (396 clips, seeds < 100000, striped shapes over gradients, 16 frames at
256x256) -> Stage A (configs/demo_vae.yaml, then its decoder with MSE: configs/demo_vae_mse.yaml) and
semantic encoder + Previewer (configs/demo_semantic.yaml), side by side, one CPU thread each -> cached
latents of random 128x128 crops -> the LDM-VAE DiT (configs/demo_dit.yaml, then trained on from its EMA weights:
configs/demo_dit_more.yaml) -> cascadev/assets/tiny_cascade.
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
STAGE_A = "runs/demo_vae_mse/final/ema"    # its encoder is configs/demo_dit.yaml's, the decoder fine-tuned with MSE
DATA = "runs/demo_data256/train"
CACHE = "runs/demo_cache"
DIT = "runs/demo_dit_more/final/ema"
# sampler: the best of flow 1/2/4/8 steps on seeds 200000+; colour fix: x16 beat x4 and x8 there
DEMO_SETTINGS = {"steps": 4, "scheduler": "flow", "colour_fix": 16, "kind": "shapes", "size": 256}


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

    from cascadev.pipelines.cascade import CascadeVPipeline
    from cascadev.training.config import load_train_config

    stage_a_config = load_train_config("configs/demo_dit.yaml").stage_a.model_config()     # with its latent scale
    pipe = CascadeVPipeline.from_pretrained(
        dit=DIT, semantic_encoder="runs/demo_semantic/final/semantic_encoder",
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
    if "stages" in todo:  # independent: one core each; Stage A, then its decoder fine-tuned with MSE
        semantic = run("-m", "cascadev.training.train", "--config", "configs/demo_semantic.yaml")
        wait(run("-m", "cascadev.training.train", "--config", "configs/demo_vae.yaml"))
        wait(run("-m", "cascadev.training.train", "--config", "configs/demo_vae_mse.yaml"), semantic)
    if "cache" in todo:
        wait(run("-m", "cascadev.training.cache_latents", "--config", "configs/demo_dit.yaml", "--out", CACHE,
                 "--clips-per-video", "6", "--crop", "random", threads=2))
    if "dit" in todo:
        for config in ("configs/demo_dit.yaml", "configs/demo_dit_more.yaml"):
            wait(run("-m", "cascadev.training.train", "--config", config, "--set", f"data.latents={CACHE}", threads=2))
    export(Path(__file__).resolve().parents[1] / "cascadev" / "assets" / "tiny_cascade")


if __name__ == "__main__":
    main()
