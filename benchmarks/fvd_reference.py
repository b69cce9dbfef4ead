"""Our FVD protocols against the reference code itself, on identical inputs (no detector weights needed).

    git clone https://github.com/wilson1yan/VideoGPT; git clone https://github.com/universome/stylegan-v
    python -m venv tf && tf/bin/pip install tensorflow-cpu           # TensorFlow apart from this environment
    python benchmarks/fvd_reference.py --videogpt VideoGPT --stylegan-v stylegan-v --tf-python tf/bin/python

The reference functions are read from the clones at run time (VideoGPT's ``preprocess`` and ``frechet_distance``,
StyleGAN-V's ``FeatureStats`` and the distance of ``compute_fvd``), without their packages' heavy imports. Checked:
the "videogpt" protocol's clip preparation on square and non-square clips, and both protocols' statistics and
distance on random features (float64). Measured 2026-11-27: VideoGPT preparation max difference 0 (bit-identical)
at 96x160, 120x90, 224x400, 64x64; distances relative 1e-15 (VideoGPT, 64 and 600 clips), StyleGAN-V 4e-15 (600),
1e-16 (2048), 5e-8 (64 clips < 400 dimensions, where the reference's ``sqrtm`` of a singular product is the less
exact one); the "tf" protocol's preparation against the TF original's (``tf.compat.v1.image.resize_bilinear`` to
224, then 2x/255 - 1; TensorFlow 2.21) max difference 0 at 96x160, 120x90, 224x400, 64x64, 300x300.
"""

from __future__ import annotations

import argparse
import copy
import math
import pickle
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from eval import fvd


def source(repo: Path, path: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "show", f"HEAD:{path}"], capture_output=True, text=True,
                          check=True).stdout


def videogpt(repo: Path) -> None:
    data = source(repo, "videogpt/data.py")
    pre = data[data.index("def preprocess(video, resolution"):]
    pre = pre[:pre.index("\n\n\n")]
    ns = {"math": math, "F": F, "torch": torch}
    exec(pre, ns)                                                      # the reference's preprocess (THWC uint8)
    metric = source(repo, "videogpt/fvd/fvd.py").split("def get_logits")[0]
    metric = metric.replace("from ..data import preprocess as preprocess_single", "")
    ns2 = {"torch": torch, "preprocess_single": ns["preprocess"]}
    exec(metric, ns2)
    g = torch.Generator().manual_seed(0)
    for h, w in [(96, 160), (120, 90), (224, 400), (64, 64)]:
        u8 = torch.randint(0, 256, (2, 16, h, w, 3), generator=g, dtype=torch.uint8)
        ref = ns2["preprocess"](u8.numpy(), 224)                       # (B, C, T, H, W) in [-1, 1]
        ours = fvd.preprocess_clips(u8.permute(0, 4, 1, 2, 3).float() / 127.5 - 1, 224, "videogpt")
        print(f"videogpt preparation {h}x{w}: max |ours - reference| = {(ours - ref).abs().max().item():.2e}")
    for n in (64, 600):
        x, y = features(n)
        # it centres in place
        ref = ns2["frechet_distance"](torch.from_numpy(x.copy()), torch.from_numpy(y.copy())).item()
        report("videogpt", n, fvd.fvd_from_features(x, y), ref)


def stylegan_v(repo: Path) -> None:
    utils = source(repo, "src/metrics/metric_utils.py")
    cls = utils[utils.index("class FeatureStats"):]
    ns = {"np": np, "copy": copy, "pickle": pickle, "torch": torch}
    exec(cls[:cls.index("\n#---")], ns)

    def reference(x, y):                                               # compute_fvd's statistics and distance
        (mu_r, sigma_r), (mu_g, sigma_g) = (stats(f) for f in (x, y))
        s, _ = scipy.linalg.sqrtm(np.dot(sigma_g, sigma_r), disp=False)
        return float(np.real(np.square(mu_g - mu_r).sum() + np.trace(sigma_g + sigma_r - s * 2)))

    def stats(f):
        s = ns["FeatureStats"](capture_mean_cov=True)
        s.append(f.astype(np.float32))
        return s.get_mean_cov()
    for n in (64, 600, 2048):
        x, y = features(n)
        report("stylegan-v", n, fvd.fvd_from_features(x.astype(np.float32), y.astype(np.float32), ddof=0),
               reference(x, y))


TF_SIDE = """
import glob, sys, numpy as np, tensorflow as tf
for path in sorted(glob.glob(sys.argv[1] + "/in_*.npy")):
    v = np.load(path)
    frames = tf.reshape(tf.constant(v), [-1] + list(v.shape[-3:]))
    out = tf.compat.v1.image.resize_bilinear(frames, size=(224, 224))
    np.save(path.replace("in_", "tf_"), (2.0 * tf.reshape(out, [v.shape[0], -1, 224, 224, 3]) / 255.0 - 1).numpy())
"""


def tf_original(python: str) -> None:
    """The TF original's clip preparation (frechet_video_distance.py's ``preprocess``), run by ``python``."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        sizes = [(96, 160), (120, 90), (224, 400), (64, 64), (300, 300)]
        for h, w in sizes:
            np.save(f"{d}/in_{h}x{w}.npy", rng.integers(0, 256, (2, 4, h, w, 3), dtype=np.uint8))
        subprocess.run([python, "-c", TF_SIDE, d], check=True, capture_output=True)
        for h, w in sizes:
            u8 = torch.from_numpy(np.load(f"{d}/in_{h}x{w}.npy")).permute(0, 4, 1, 2, 3)
            ref = torch.from_numpy(np.load(f"{d}/tf_{h}x{w}.npy")).permute(0, 4, 1, 2, 3)
            ours = fvd.preprocess_clips(u8.float() / 127.5 - 1, 224, "tf")
            print(f"tf preparation {h}x{w}: max |ours - reference| = {(ours - ref).abs().max().item():.2e}")


def features(n: int, d: int = fvd.NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(n).normal(size=(n, d)).astype(np.float32).astype(np.float64)
    y = (np.random.default_rng(n + 1).normal(size=(n, d)) * 1.1 + 0.05).astype(np.float32).astype(np.float64)
    return x, y


def report(protocol: str, n: int, ours: float, ref: float) -> None:
    print(f"{protocol} distance, {n} clips: ours {ours:.6f} reference {ref:.6f} relative {abs(ours - ref) / ref:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videogpt", type=Path, help="a clone of wilson1yan/VideoGPT")
    parser.add_argument("--stylegan-v", type=Path, help="a clone of universome/stylegan-v")
    parser.add_argument("--tf-python", help="a Python interpreter with TensorFlow")
    args = parser.parse_args()
    if args.videogpt:
        videogpt(args.videogpt)
    if args.stylegan_v:
        stylegan_v(args.stylegan_v)
    if args.tf_python:
        tf_original(args.tf_python)


if __name__ == "__main__":
    main()
