"""Train the built-in tiny cascade from the committed configs and export it into the package.

    OMP_NUM_THREADS=1 python scripts/build_demo_cascade.py            # all steps (about 35 min on 2 CPU cores)
    python scripts/build_demo_cascade.py --from export                # only re-export finished runs

Steps: procedural training clips (seeds < 100000, shapes over gradients) -> Stage A VAE
(configs/demo_vae.yaml) and semantic encoder + Previewer (configs/demo_semantic.yaml), side by side
-> cached latents -> the LDM-VAE DiT (configs/demo_dit.yaml) and, beside it, a decoder-only
fine-tune of Stage A on full frames (configs/demo_vae_decoder.yaml; the latent space stays fixed)
-> cascadev/assets/tiny_cascade. Each training run resumes by itself if interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

STEPS = ("data", "stages", "cache", "dit", "export")
STAGE_A = "runs/demo_vae_decoder/final/ema"
DATA = "runs/demo_data/train"
DEMO_SETTINGS = {"steps": 8, "scheduler": "flow", "kind": "shapes"}   # best of flow 1/2/4/8 on seeds 200000+


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

    from cascadev.train_config import load_train_config

    stage_a_config = load_train_config("configs/demo_dit.yaml").stage_a.model_config()   # tiny, latent scale 0.30
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
        wait(run("-m", "cascadev.synthetic", DATA, "--n", "396", "--frames", "16", "--size", "128", "--kind", "shapes"))
    if "stages" in todo:  # independent: one core each
        wait(run("-m", "cascadev.train", "--config", "configs/demo_vae.yaml"),
             run("-m", "cascadev.train", "--config", "configs/demo_semantic.yaml"))
    if "cache" in todo:
        wait(run("-m", "cascadev.cache_latents", "--config", "configs/demo_dit.yaml", "--out", "runs/demo_cache",
                 "--clips-per-video", "4"))
    if "dit" in todo:
        wait(run("-m", "cascadev.train", "--config", "configs/demo_dit.yaml", "--set", "data.latents=runs/demo_cache"),
             run("-m", "cascadev.train", "--config", "configs/demo_vae_decoder.yaml"))
    export(Path(__file__).resolve().parents[1] / "cascadev" / "assets" / "tiny_cascade")


if __name__ == "__main__":
    main()
