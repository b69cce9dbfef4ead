"""Train the built-in tiny text-to-video model (Stage C) from configs/demo_base.yaml and export it into the package.

    python scripts/build_demo_text.py                  # all steps (~45 min on 2 CPU cores)
    python scripts/build_demo_text.py --from export    # only re-export the finished run

Steps: captioned procedural clips (``cascadev.captioned``: 2400 clips, 8 frames at 256 x 256, the held-out
colour-shape pairs left out) -> their semantic latents by the shipped tiny cascade's semantic encoder (cached) ->
the TextDiT (configs/demo_base.yaml; resumes by itself if interrupted) -> cascadev/assets/tiny_text2video:
``text_encoder/``, ``base_dit/`` (weights stored as fp16 to keep the package small; they load as float32),
``base_scheduler/`` (the objective's sampler) and ``demo.json`` (the demo's steps, guidance and size). The decoder
is the tiny cascade beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("data", "cache", "train", "more", "export")
CONFIG = "configs/demo_base.yaml"
MORE = "configs/demo_base_more.yaml"     # trained on from CONFIG's EMA weights
DATA = "runs/demo_text_data"
CACHE = "runs/demo_text_cache"
FINAL = "runs/demo_base_more/final"
OUT = ROOT / "cascadev" / "assets" / "tiny_text2video"
# the demo's sampler: guidance 5 had the direction right on 90 % of held-out and 100 % of seen prompts, against 80 and
# 83 % at guidance 1 (docs/text-to-video.md, scripts/eval_text2video.py)
DEMO_SETTINGS = {"steps": 20, "guidance": 5.0, "frames": 8, "size": 256}    # the sampler: final/base_scheduler


def run(*argv: str) -> None:
    """A python step in its own process, one at a time (two CPU trainings with 2 threads each on 2 cores ran 20-40x
    slower than one)."""
    print("$", " ".join(argv), flush=True)
    if subprocess.call([sys.executable, *argv], cwd=ROOT):
        sys.exit(f"step failed: {' '.join(argv)}")


def export(out: Path) -> None:
    """``final/`` (EMA weights) -> ``out``: the two model folders with fp16 tensors, and the demo settings."""
    import shutil

    from safetensors.torch import load_file, save_file

    if out.exists():
        shutil.rmtree(out)
    for part in ("text_encoder", "base_dit", "base_scheduler"):
        shutil.copytree(ROOT / FINAL / part, out / part)
        for file in (out / part).glob("*.safetensors"):
            save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(file).items()}, file)
    (out / "demo.json").write_text(json.dumps(DEMO_SETTINGS, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"exported to {out}: {size / 2**20:.2f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="start", default="data", choices=STEPS, help="first step to run")
    args = parser.parse_args()
    todo = STEPS[STEPS.index(args.start):]
    if "data" in todo:
        run("-m", "cascadev.captioned", DATA, "--n", "2400", "--frames", "8", "--size", "256")
    if "cache" in todo:
        run("-m", "cascadev.training.cache_latents", "--config", CONFIG, "--out", CACHE)
    if "train" in todo:
        run("-m", "cascadev.training.train", "--config", CONFIG, "--set", f"data.latents={CACHE}")
    if "more" in todo:
        run("-m", "cascadev.training.train", "--config", MORE, "--set", f"data.latents={CACHE}")
    export(OUT)


if __name__ == "__main__":
    main()
