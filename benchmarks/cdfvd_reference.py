"""Content-debiased FVD against the cd-fvd package itself, on identical inputs and identical random weights.

    pip install --no-deps cd-fvd          # its code only; its dependencies are ours already
    python benchmarks/cdfvd_reference.py [--depth 40] [--device cuda]

Nothing is downloaded: the package's model classes are built here with random weights (its loaders would fetch the
4 GB ViT-g checkpoint). Checked: (1) our VideoMAE-v2 (``eval.videomae``) against the package's ``VisionTransformer``
at ViT-g/14's width (1408, 16 heads, MLP 6144, 224 px, 16 frames) and ``--depth`` blocks (40 is the released model;
the default 2 keeps a CPU run short, every block is the same code), loaded from the package's state dict saved as the
released file is (``{"model": state}``); (2) the clip preparation of the "cd-fvd" and "cd-fvd-i3d" protocols against
the package's video-folder loader (``data_utils.preprocess``, ``*255 .byte()``) then ``preprocess_videomae`` /
``preprocess_i3d``; (3) our I3D (``eval.i3d``) against the package's ``InceptionI3d`` on one state dict; (4) the
statistics and distance (its ``FeatureStats`` and ``compute_fvd_from_stats``, scipy's ``sqrtm``) against
``fvd_from_features(ddof=0)``, and its statistics file read by ``load_reference_stats``.

Measured 2026-12-07 on 2 shared CPU cores, cd-fvd 0.1.1 (benchmarks/results/cdfvd_reference.txt): preparation max
difference 0 (bit-identical) for both protocols at resolutions 128 and 256 on 5 sizes; distances relative 2e-15 to
7e-15 with N > D (600 x 400, 2048 x 1408), 5e-8 / 2e-8 with N < D (256 x 1408, 40 x 64: scipy's sqrtm of a singular
product is the less exact one); ViT-g width, 2 blocks: 4.8e-7 on features up to 3.9; I3D logits identical (0).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from eval import fvd
from eval.i3d import I3D
from eval.videomae import PRESETS, load_videomae


def videomae(depth: int, clips: int, device: str) -> None:
    from cdfvd.third_party.VideoMAEv2.videomaev2_finetune import VisionTransformer

    g = PRESETS["vit_g_14"]
    torch.manual_seed(0)
    theirs = VisionTransformer(img_size=224, patch_size=g["patch_size"], embed_dim=g["embed_dim"], depth=depth,
                               num_heads=g["num_heads"], mlp_ratio=48 / 11, qkv_bias=True,
                               norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=g["num_classes"],
                               all_frames=16, tubelet_size=2, use_mean_pooling=True).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "vit_g_random.pth"
        torch.save({"model": theirs.state_dict()}, path)
        ours = load_videomae(path)
    theirs, ours = theirs.to(device), ours.to(device)
    x = torch.rand(clips, 3, 16, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        start = time.perf_counter()
        a = theirs.forward_features(x)
        t_theirs = time.perf_counter() - start
        start = time.perf_counter()
        b = ours(x)
        t_ours = time.perf_counter() - start
    print(f"VideoMAE-v2 ViT-g/14 width, {depth} block(s), {clips} clip(s) on {device}: max |ours - package| = "
          f"{(a - b).abs().max().item():.2e} (features up to {a.abs().max().item():.2f}); "
          f"forward {t_ours:.1f} s ours, {t_theirs:.1f} s package")


def preparation() -> None:
    from cdfvd.third_party.i3d.utils import preprocess_i3d
    from cdfvd.third_party.VideoMAEv2.utils import preprocess_videomae
    from cdfvd.utils.data_utils import preprocess

    g = torch.Generator().manual_seed(0)
    for resolution in (128, 256):
        worst = {"cd-fvd": 0.0, "cd-fvd-i3d": 0.0}
        for h, w in [(96, 160), (120, 90), (64, 64), (300, 200), (270, 480)]:
            levels = torch.randint(0, 256, (16, h, w, 3), generator=g, dtype=torch.uint8)
            video = preprocess(levels, resolution)["video"][None]
            clip = rearrange(video * 255, "b c t h w -> b t h w c").byte().numpy()
            ours_in = rearrange(levels, "t h w c -> 1 c t h w").float() / 127.5 - 1
            for protocol, theirs in (("cd-fvd", preprocess_videomae(clip)), ("cd-fvd-i3d", preprocess_i3d(clip))):
                mine = fvd.preprocess_clips(ours_in, 224, protocol, resolution=resolution)
                worst[protocol] = max(worst[protocol], (mine - theirs).abs().max().item())
        print(f"clip preparation at resolution {resolution} (5 sizes 64x64 .. 270x480): max |ours - package| = "
              + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def i3d() -> None:
    from cdfvd.third_party.i3d.pytorch_i3d import InceptionI3d

    torch.manual_seed(0)
    ours = I3D()
    for m in ours.modules():
        if isinstance(m, torch.nn.Conv3d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    theirs = InceptionI3d(400, in_channels=3)
    theirs.load_state_dict(ours.state_dict())
    x = torch.rand(1, 3, 16, 224, 224, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        a, b = theirs.eval()(x), ours.eval()(x)
    print(f"I3D (cd-fvd-i3d) on one state dict: max |ours - package| = {(a - b).abs().max().item():.2e} "
          f"(logits up to {a.abs().max().item():.1f})")


def statistics() -> None:
    from cdfvd.fvd import cdfvd
    from cdfvd.utils.metric_utils import FeatureStats

    rng = np.random.default_rng(0)
    for n, d in ((600, 400), (2048, 1408), (256, 1408), (40, 64)):
        x = rng.normal(size=(n, d)).astype(np.float32)
        y = (rng.normal(size=(n, d)) * 1.1 + 0.05).astype(np.float32)
        stats = []
        for f in (x, y):
            s = FeatureStats(capture_mean_cov=True)
            s.append(f)
            stats.append(s)
        start = time.perf_counter()
        theirs = float(cdfvd.compute_fvd_from_stats(None, fake_stats=stats[1], real_stats=stats[0]))
        t_theirs = time.perf_counter() - start
        start = time.perf_counter()
        ours = fvd.fvd_from_features(x, y, ddof=0)
        t_ours = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as folder:
            stats[0].save(f"{folder}/real.pkl")
            ref = fvd.load_reference_stats(f"{folder}/real.pkl")
        from_file = fvd.frechet_distance(ref.mean, ref.cov, *fvd.gaussian_stats(y, ddof=0))
        print(f"distance, N = {n}, D = {d}: package {theirs:.6f}, ours {ours:.6f} (relative "
              f"{abs(ours - theirs) / theirs:.1e}; {t_ours:.2f} s vs {t_theirs:.2f} s), from its statistics file "
              f"relative {abs(from_file - theirs) / theirs:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=2, help="ViT-g blocks to compare (the released model has 40)")
    parser.add_argument("--clips", type=int, default=1, help="clips per forward")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    preparation()
    statistics()
    videomae(args.depth, args.clips, args.device)
    i3d()


if __name__ == "__main__":
    main()
