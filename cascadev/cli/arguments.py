"""The cascade's command-line options, declared without importing torch or diffusers, so that ``cascadev --help``
and a mistyped option answer at once; ``options.py`` checks them and does what they say. ``cascadev reconstruct`` /
``decode`` and ``bench-recon`` take all of them (``add_pipeline_arguments``); ``generate`` and ``upscale`` the
tiling and runtime groups."""

from __future__ import annotations

import argparse

from cascadev.pipelines import DTYPE_NAMES


def add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``reconstruct``, ``decode`` and ``bench-recon``: the cascade's weights, its sampling, and how it
    runs."""
    g = p.add_argument_group("weights and sampling")
    g.add_argument("--weights", help="folder with the released files or one written by save_pretrained "
                                     "(default: for decode, the cascade its latents file names, as reconstruct and "
                                     "generate --latents-out record it; else the release, from the hub)")
    g.add_argument("--dit", help="DiT: s1024.effn-f32.pth, our folder, or a hub id")
    g.add_argument("--semantic-encoder", help="effnet_encoder.safetensors or our folder")
    g.add_argument("--previewer", help="previewer.safetensors or our folder")
    g.add_argument("--stage-a", help="Stage A VAE: diffusers folder or hub id (default: the SVD VAE)")
    g.add_argument("--steps", type=int, help="denoising steps (default: the folder's saved sampler, else 8 as the "
                                             "release)")
    add_scheduler_arguments(g, "default: the folder's saved sampler (flow for the built-in tiny cascade), else euler_a")
    add_tiling_arguments(g)
    add_colour_fix_argument(g, "the Previewer's decoding of the latents")
    g.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    g.add_argument("--noise", default="cpu", choices=["cpu", "device"],
                   help="cpu: drawn on the CPU, the same on every device (default); device: one generator on the "
                        "run's device for the noise and every ancestral step, as the released code (--seed 42 on "
                        "CUDA: its exact stream)")
    add_runtime_arguments(p)
    g.add_argument("--crf", type=int, default=18, help="H.264 quality (lower is better)")


def add_colour_fix_argument(g, reference: str) -> None:
    """``--colour-fix N``: StableSR's colour fix against ``reference`` (in words), the folder's setting by default."""
    g.add_argument("--colour-fix", type=int, metavar="N",
                   help=f"take the band of N x N pixel blocks and below from {reference} (StableSR's colour fix; "
                        "default: the folder's saved setting, 16 for the built-in models; 0: off)")


def add_scheduler_arguments(g, default_help: str) -> None:
    """``--scheduler`` (of the DiT that decodes) and ``--force-scheduler``."""
    g.add_argument("--scheduler", choices=["euler_a", "ddim", "dpmpp", "flow"], help=default_help)
    g.add_argument("--force-scheduler", action="store_true",
                   help="use --scheduler even if it is of the other family (flow vs eps) than the DiT was trained for")


def add_tiling_arguments(g) -> None:
    """How the DiT covers a clip with its windows and tiles (``tiling_of``)."""
    g.add_argument("--tiling", default="blend", choices=["blend", "official", "shifted"],
                   help="blend overlapping windows/tiles smoothly (default), reproduce the release exactly (official), "
                        "or place them a window apart on a grid moved at every step (shifted: no overlap, the DiT "
                        "runs the area once per step; 0.4x blend's work at 2K)")
    g.add_argument("--tile-detail", choices=["average", "central"],
                   help="how blended overlaps combine: average the windows (the default of most weights), or take "
                        "fine detail from the window a latent lies deepest in and average only the low band "
                        "(central: sharper; the default of a distilled 1-2 step decoder)")
    g.add_argument("--tile-stride", type=int, metavar="N",
                   help="latent pixels between DiT tiles of large frames (default: the release's 3/4 of the window, "
                        "96 for the official DiT; up to the window, 128: fewer tiles, a third faster at 2048x1152)")
    g.add_argument("--frame-stride", type=int, metavar="N",
                   help="latent frames between DiT windows of long clips (default: the release's half window)")


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """Device, precision, speed and memory of a pipeline that decodes with the DiT and Stage A (``prepare_pipeline``,
    ``check_runtime_args``)."""
    g = p.add_argument_group("device, precision and speed")
    g.add_argument("--device", help="cuda or cpu (default: cuda when available; under accelerate launch, each "
                                    "process's own GPU)")
    g.add_argument("--dtype", choices=sorted(DTYPE_NAMES),
                   help="the models' precision (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--attn-fp32", action="store_true",
                   help="in bf16/fp16, keep the DiT's attention in fp32 as the release did (slower)")
    g.add_argument("--window-batch", type=int, default=1,
                   help="DiT windows/tiles per forward (same result; on a GPU the 1024 px window already fills it)")
    g.add_argument("--offload", choices=["model", "sequential"],
                   help="keep the models on the CPU and move each to the GPU while it runs (model), or stream the "
                        "weights layer by layer (sequential: least memory, slowest)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the DiT blocks and the Stage A decoder (compiles once per size)")
    g.add_argument("--max-memory", type=float, metavar="GIB",
                   help="memory for one Stage A decoder call: tiles and frames per call chosen from it, whole frames "
                        "when they fit (default: 80%% of the GPU's free memory; 1 GiB on a CPU; 0: the saved tiles)")
    g.add_argument("--no-tf32", action="store_true",
                   help="fp32 on CUDA: exact fp32 matmuls and convolutions (default: TF32 tensor cores, as in bf16 "
                        "the kernels' own precision)")
