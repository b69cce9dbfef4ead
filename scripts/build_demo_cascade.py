"""Train the built-in tiny cascade from the committed configs and export it into the package.

    python scripts/build_demo_cascade.py                              # all steps
    python scripts/build_demo_cascade.py --from export                # only re-export finished runs
    python scripts/build_demo_cascade.py --only fps4x                 # the 4x frame-rate model (after "data")
    python scripts/build_demo_cascade.py --only distill               # the 2-step distilled decoder

Steps: procedural training clips (396 clips, seeds < 100000, striped shapes over gradients, 16 frames at
256x256) -> Stage A (configs/demo_vae.yaml, then its decoder with MSE: configs/demo_vae_mse.yaml) and
semantic encoder + Previewer (configs/demo_semantic.yaml), side by side, one CPU thread each -> cached
latents of random 128x128 crops -> the LDM-VAE DiT (configs/demo_dit.yaml, then trained on from its EMA weights:
configs/demo_dit_more.yaml) -> cascadev/assets/tiny_cascade.
Each training run resumes by itself if interrupted.

``--only fps4x``: the tiny 4x frame-rate model of the resize route, on the shipped tiny cascade's Stage A and the
same clips: cached latents of random 128x128 crops of 16 frames (configs/demo_fps4x.yaml) -> its DiT, started
from the shipped tiny DiT -> cascadev/assets/tiny_fps4x (the DiT in fp16 and the pipeline's config; Stage A is
the tiny cascade's, named by ``vae_source``).

``--only distill``: the 2-step distilled decoder of the shipped tiny cascade (configs/distill_tiny.yaml), in two
runs. First a 1-step student: 160 procedural clips of its own, cached latents of 4 random 128x128 crops each (one
DiT window; Stage A and the semantic encoder are the shipped cascade's), a student started from the shipped DiT and
trained to land in 1 flow step where the teacher lands in its 4. Then, started from it, the 2-step student (second
step at sigma 0.5) on random 192x192 crops of the clips (2 x 2 overlapping windows, so it learns to reconcile them
as the teacher's later steps do) -> cascadev/assets/tiny_distilled (the DiT in fp16, the pipeline's config and
``shared_parts.json`` naming the tiny cascade's semantic encoder, Stage A and Previewer). ``--distill-step N``:
export checkpoint N's EMA weights instead of the final ones.
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
SEMANTIC = "runs/demo_semantic/final"      # semantic_encoder/ + previewer/
# sampler: the best of flow 1/2/4/8 steps on seeds 200000+; colour fix: x16 beat x4 and x8 there
DEMO_SETTINGS = {"steps": 4, "scheduler": "flow", "colour_fix": 16, "kind": "shapes", "size": 256}
FPS4X_CONFIG, FPS4X_CACHE, FPS4X_DIT = "configs/demo_fps4x.yaml", "runs/demo_fps4x_cache", "runs/demo_fps4x/final/ema"
# on held-out seeds 200000+ (the demo scores seeds 100000+), PSNR between input frames: flow 4 steps 22.10 dB (1: 21.91,
# 2: 21.91, 8: 21.94); with the colour fix x16 23.58 (x8 23.58, x32 23.42; SSIM best at x16); linear blending 22.16
FPS4X_SETTINGS = {"steps": 4, "colour_fix": 16, "kind": "shapes", "size": 256}


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
    """The tiny cascade: the DiT run's EMA weights, the semantic run's encoder and Previewer, the MSE-tuned Stage A at
    configs/demo_dit.yaml's latent scale, and the demo's sampler and colour fix (``DEMO_SETTINGS``)."""
    import dataclasses
    import shutil

    import torch

    from cascadev.pipelines.cascade import (CascadeVPipeline, load_dit, load_previewer, load_semantic_encoder,
                                            stage_a_settings)
    from cascadev.pipelines.sampling import make_scheduler
    from cascadev.training.config import load_train_config
    from vae.stage_a import StageAVAE

    config = load_train_config("configs/demo_dit.yaml")
    stage_a = StageAVAE.from_config(dataclasses.replace(config.stage_a.model_config(), pretrained=STAGE_A,
                                                        subfolder=None))
    pipe = CascadeVPipeline(
        dit=load_dit(DIT), semantic_encoder=load_semantic_encoder(f"{SEMANTIC}/semantic_encoder"), vae=stage_a.model,
        scheduler=make_scheduler(DEMO_SETTINGS["scheduler"], {"shift": config.diffusion.sigma_shift}),
        previewer=load_previewer(f"{SEMANTIC}/previewer"), stage_a=stage_a_settings(stage_a.config),
        num_inference_steps=DEMO_SETTINGS["steps"], colour_fix=DEMO_SETTINGS["colour_fix"],
        demo={k: DEMO_SETTINGS[k] for k in ("kind", "size")})
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out)
    # AutoencoderTiny registers block_out_channels when built, then warns on every load that the saved key is unexpected
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    vae_config.pop("block_out_channels", None)
    (out / "vae" / "config.json").write_text(json.dumps(vae_config, indent=2, sort_keys=True) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"exported to {out}: {size / 2**20:.1f} MiB, torch {torch.__version__}")


def export_fps4x(out: Path) -> None:
    """The resize-route pipeline of the fps4x run: its DiT (EMA) in fp16, the route's factors from the config."""
    import shutil

    import torch

    from vae.stage_a import stage_a_settings
    from cascadev.pipelines.upscale import CascadeVUpscalePipeline
    from cascadev.pipelines.sampling import make_scheduler
    from cascadev.training.config import load_train_config
    from dit.video_dit import VideoDiT
    from vae.stage_a import StageAVAE

    config = load_train_config(FPS4X_CONFIG)
    stage_a = StageAVAE.from_config(config.stage_a.model_config())
    pipe = CascadeVUpscalePipeline(
        dit=VideoDiT.from_pretrained(FPS4X_DIT), vae=stage_a.model,
        scheduler=make_scheduler("flow", {"shift": config.diffusion.sigma_shift}),
        spatial_factor=config.condition.spatial_factor, temporal_factor=config.condition.temporal_factor,
        stage_a=stage_a_settings(stage_a.config), num_inference_steps=FPS4X_SETTINGS["steps"],
        colour_fix=FPS4X_SETTINGS["colour_fix"], vae_source="../tiny_cascade/vae",
        demo={k: FPS4X_SETTINGS[k] for k in ("kind", "size")})
    pipe.dit.half()                 # fp16 storage: half the bytes; load_upscale runs it in fp32
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out)
    shutil.rmtree(out / "vae")      # shared with the tiny cascade
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"exported to {out}: {size / 2**20:.1f} MiB, torch {torch.__version__}")


# training the 1-step student on with 3x or 10x the detail weight (100 steps) did not raise the demo's sharpness,
# nor did 300-400 more steps on 192x192 crops (0.205-0.208); a second step over overlapping windows did
# (docs/fast-decoding.md)
DISTILL_CONFIG, DISTILL_1STEP = "configs/distill_tiny.yaml", "runs/distill_tiny"
DISTILL_RUN = "runs/distill_tiny_2step"
# the second run: configs/distill_tiny.yaml's 1-step student trained on to 2 steps over overlapping windows
DISTILL_2STEP = ("distill.student_steps=2", "distill.student_last_sigma=0.5", "data.height=192", "data.width=192",
                 f"dit.init_from={DISTILL_1STEP}/final/dit", f"run.dir={DISTILL_RUN}")
DISTILL_DATA, DISTILL_CACHE = "runs/distill_data256/train", "runs/distill_cache"
SHARED = ("semantic_encoder", "vae", "previewer")       # what tiny_distilled takes from tiny_cascade


def export_distill(out: Path, step: int | None = None) -> None:
    """The distill run's student (EMA; of checkpoint ``step`` if given) in fp16 as a cascade folder at the student's
    sampler, its other parts named in ``shared_parts.json`` (``CascadeVPipeline.from_pretrained`` loads them)."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from cascadev.pipelines.cascade import SHARED_PARTS_FILE, CascadeVPipeline
    from dit.video_dit import VideoDiT

    if step is None:
        pipe = CascadeVPipeline.from_pretrained(f"{DISTILL_RUN}/final")
    else:      # a checkpoint: its EMA weights into the final export's layout
        folder = Path(DISTILL_RUN) / "checkpoints" / f"step_{step:08d}"
        dit = VideoDiT.from_pretrained(f"{DISTILL_RUN}/final/dit")
        dit.load_state_dict({**dit.state_dict(), **load_file(str(folder / "ema.safetensors"))})
        pipe = CascadeVPipeline.from_pretrained(f"{DISTILL_RUN}/final", dit=dit)
    pipe.dit.half()                 # fp16 storage: half the bytes; from_pretrained runs it in fp32
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out)
    for part in SHARED:
        shutil.rmtree(out / part)
    index = json.loads((out / "model_index.json").read_text())
    index.pop("_name_or_path", None)                  # the run's folder, meaningless in the package
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for file in out.rglob("*"):
        file.chmod(0o755 if file.is_dir() else 0o644)  # safetensors writes its files 0600
    cascade = Path(__file__).resolve().parents[1] / "cascadev" / "assets" / "tiny_cascade"
    shared = {part: os.path.relpath(cascade / part, out.resolve()) for part in SHARED}   # ../tiny_cascade/... in assets
    (out / SHARED_PARTS_FILE).write_text(json.dumps(shared, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"exported to {out}: {size / 2**20:.1f} MiB, torch {torch.__version__}")


def build_distill(assets: Path, step: int | None) -> None:
    if not Path(f"{DISTILL_1STEP}/final").is_dir():
        wait(run("-m", "cascadev.synthetic", DISTILL_DATA, "--n", "160", "--frames", "16", "--size", "256",
                 "--kind", "shapes"))
        wait(run("-m", "cascadev.training.cache_latents", "--config", DISTILL_CONFIG, "--out", DISTILL_CACHE,
                 "--clips-per-video", "4", "--crop", "random", threads=2))
        wait(run("-m", "cascadev.training.train", "--config", DISTILL_CONFIG, "--set", f"data.latents={DISTILL_CACHE}",
                 threads=2))
    if not Path(f"{DISTILL_RUN}/final").is_dir():
        wait(run("-m", "cascadev.training.train", "--config", DISTILL_CONFIG, "--set", *DISTILL_2STEP, threads=2))
    export_distill(assets / "tiny_distilled", step)


def build_fps4x(assets: Path) -> None:
    wait(run("-m", "cascadev.training.cache_latents", "--config", FPS4X_CONFIG, "--out", FPS4X_CACHE,
             "--clips-per-video", "1", "--crop", "random"))
    wait(run("-m", "cascadev.training.train", "--config", FPS4X_CONFIG, "--set", f"data.latents={FPS4X_CACHE}"))
    export_fps4x(assets / "tiny_fps4x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="start", default="data", choices=STEPS, help="first step to run")
    parser.add_argument("--only", choices=["fps4x", "distill"],
                        help="build only this extra model (fps4x: after the data step)")
    parser.add_argument("--distill-step", type=int, default=None, help="--only distill: export this checkpoint")
    args = parser.parse_args()
    assets = Path(__file__).resolve().parents[1] / "cascadev" / "assets"
    if args.only == "fps4x":
        build_fps4x(assets)
        return
    if args.only == "distill":
        build_distill(assets, args.distill_step)
        return
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
    export(assets / "tiny_cascade")


if __name__ == "__main__":
    main()
