"""Content-debiased FVD (issue 29 (2)): our VideoMAE-v2, clip preparation, statistics and distance against the cd-fvd
package's own functions on identical inputs and identical random weights.

The comparisons need the package (``pip install --no-deps cd-fvd``: its code only; torch, numpy, scipy, einops, tqdm,
requests and torchvision are already here) and are skipped without it; nothing is downloaded (the package's loaders
would fetch the 4 GB ViT-g checkpoint and its statistics, so its model classes are built here with small random
weights instead). The checks that need only our code (errors, the statistics file reader) always run. The full-size
figures are in benchmarks/cdfvd_reference.py.
"""

import json
import pickle
from functools import partial

import numpy as np
import pytest
import torch
from einops import rearrange

from cascadev.synthetic import make_clip
from cascadev.video_io import read_video, write_video
from eval import fvd
from eval.videomae import load_videomae
from helpers import run_cli

SIZES = [(96, 160), (120, 90), (64, 64), (300, 200)]


def _cdfvd():
    return pytest.importorskip("cdfvd.fvd", reason="the cd-fvd package is not installed (pip install --no-deps cd-fvd)")


def tiny_reference_model(seed: int = 0):
    """The package's VisionTransformer at a small width (176 = 2 heads of ViT-g's 88), 2 blocks, random weights with
    nonzero biases and norms."""
    from cdfvd.third_party.VideoMAEv2.videomaev2_finetune import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(img_size=224, patch_size=14, embed_dim=176, depth=2, num_heads=2, mlp_ratio=48 / 11,
                              qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=174,
                              all_frames=16, tubelet_size=2, use_mean_pooling=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    _cdfvd()
    path = tmp_path_factory.mktemp("videomae") / "tiny_videomae.pth"
    reference = tiny_reference_model()
    torch.save({"model": reference.state_dict()}, path)        # as the released file: the state under "model"
    return path, reference


@pytest.mark.slow
def test_videomae_equals_the_packages_on_the_same_weights(checkpoint):
    path, reference = checkpoint
    ours = load_videomae(path)
    assert len(ours.blocks) == 2 and ours.embed_dim == 176 and ours.blocks[0].attn.num_heads == 2
    g = torch.Generator().manual_seed(1)
    for frames in (16, 32):               # 32: the position table resampled in time, as the package does
        x = torch.rand(2, 3, frames, 224, 224, generator=g)
        with torch.no_grad():
            theirs, mine = reference.forward_features(x), ours(x)
        assert mine.shape == (2, 176)
        assert (mine - theirs).abs().max() < 1e-5 * theirs.abs().max()      # measured 2.4e-7, 4.8e-7 of values ~3


def _their_clip(cdfvd_utils, levels: torch.Tensor, resolution: int) -> np.ndarray:
    """The package's video-folder path for one clip (T, H, W, 3) uint8: its ``preprocess``, then ``*255 .byte()`` as
    ``compute_real_stats`` does -> (1, T, R, R, 3) uint8."""
    video = cdfvd_utils.preprocess(levels, resolution)["video"][None]        # 1 c t h w in [0, 1]
    return rearrange(video * 255, "b c t h w -> b t h w c").byte().numpy()


@pytest.mark.parametrize("resolution", [128, 224])
def test_clip_preparation_equals_the_packages(resolution):
    _cdfvd()
    from cdfvd.third_party.i3d.utils import preprocess_i3d
    from cdfvd.third_party.VideoMAEv2.utils import preprocess_videomae
    from cdfvd.utils import data_utils

    g = torch.Generator().manual_seed(0)
    for h, w in SIZES:
        levels = torch.randint(0, 256, (16, h, w, 3), generator=g, dtype=torch.uint8)
        clip = _their_clip(data_utils, levels, resolution)
        ours_in = rearrange(levels, "t h w c -> 1 c t h w").float() / 127.5 - 1
        for protocol, theirs in (("cd-fvd", preprocess_videomae(clip)), ("cd-fvd-i3d", preprocess_i3d(clip))):
            mine = fvd.preprocess_clips(ours_in, 224, protocol, resolution=resolution)
            assert mine.shape == theirs.shape == (1, 3, 16, 224, 224)
            assert (mine - theirs).abs().max() < 1e-6, (protocol, h, w)   # measured 0 (2 threads), 1.8e-7 (1)


def test_statistics_and_distance_equal_the_packages(tmp_path):
    cdfvd = _cdfvd()
    from cdfvd.utils.metric_utils import FeatureStats

    rng = np.random.default_rng(0)
    for n, d in ((600, 64), (40, 64)):          # N > D, and N < D (rank-deficient covariance)
        x = rng.normal(size=(n, d)).astype(np.float32)
        y = (rng.normal(size=(n, d)) * 1.1 + 0.05).astype(np.float32)
        stats = []
        for f in (x, y):
            s = FeatureStats(capture_mean_cov=True)
            s.append_torch(torch.from_numpy(f), rank=0, num_gpus=1)
            stats.append(s)
        theirs = float(cdfvd.cdfvd.compute_fvd_from_stats(None, fake_stats=stats[1], real_stats=stats[0]))
        mine = fvd.fvd_from_features(x, y, ddof=fvd.PROTOCOLS["cd-fvd"].ddof)
        assert mine == pytest.approx(theirs, rel=1e-6), n            # measured 1e-13 (N > D), 2e-9 (N < D)

        stats[0].save(tmp_path / "real.pkl")                         # their file format, read by --real
        reference = fvd.load_reference_stats(tmp_path / "real.pkl")
        mean, cov = stats[0].get_mean_cov()
        assert reference.count == n and np.array_equal(reference.mean, mean) and np.array_equal(reference.cov, cov)
        from_file = fvd.frechet_distance(reference.mean, reference.cov, *fvd.gaussian_stats(y, ddof=0))
        assert from_file == pytest.approx(theirs, rel=1e-6)


@pytest.mark.slow
def test_eval_cd_fvd_equals_the_package_on_video_folders(checkpoint, tmp_path, capsys):
    """Two folders of clips, one 16-frame clip each from frame 0: `cascadev eval --fvd-protocol cd-fvd` against the
    package's loader preparation, feature model and statistics on the same stored frames; then the real set as the
    package's statistics file, under its published name form, through --real."""
    cdfvd = _cdfvd()
    from cdfvd.utils import data_utils
    from cdfvd.utils.metric_utils import FeatureStats

    path, reference = checkpoint
    folders = {"real": tmp_path / "real", "fake": tmp_path / "fake"}
    for i in range(3):
        write_video(folders["real"] / f"v{i}.mp4", make_clip(i, 16, 72, 96), fps=8)
        write_video(folders["fake"] / f"v{i}.mp4", make_clip(i + 10, 16, 72, 96, kind="shapes"), fps=8)
    stats = {}
    for name, folder in folders.items():
        stats[name] = FeatureStats(capture_mean_cov=True)
        for video in sorted(folder.iterdir()):
            frames = read_video(video, geometry="stored")[0]                      # c t h w in [-1, 1]
            levels = rearrange(((frames + 1) * 127.5).round().to(torch.uint8), "c t h w -> t h w c")
            clip = _their_clip(data_utils, levels, 128)
            cdfvd.get_videomae_features(stats[name], reference, clip, device="cpu")
    theirs = float(cdfvd.cdfvd.compute_fvd_from_stats(None, fake_stats=stats["fake"], real_stats=stats["real"]))

    out = tmp_path / "report.json"
    code, printed, err = run_cli(capsys, "eval", "--real", folders["real"], "--fake", folders["fake"], "--metrics",
                                 "fvd", "--fvd-protocol", "cd-fvd", "--videomae", path, "--json", out)
    assert code == 0, err
    result = json.loads(out.read_text())["results"]["fvd"]
    assert result["mean"] == pytest.approx(theirs, rel=1e-6)     # measured 3e-9 (N = 3 < D: their sqrtm is the less
    #                                                              exact one on a singular product)
    assert result["protocol"] == "cd-fvd" and result["geometry"] == "stored" and "VideoMAE-v2" in result["detector"]
    assert "[protocol cd-fvd; stored frames]" in printed

    stats_file = tmp_path / "videomae_mine_full_res128_len16_skip1_seed0.pkl"
    stats["real"].save(stats_file)
    code, _, err = run_cli(capsys, "eval", "--real", stats_file, "--fake", folders["fake"], "--metrics", "fvd",
                           "--fvd-protocol", "cd-fvd", "--videomae", path, "--json", out)
    assert code == 0, err
    result = json.loads(out.read_text())["results"]["fvd"]
    assert result["mean"] == pytest.approx(theirs, rel=1e-4) and result["n_real"] == 3
    code, _, err = run_cli(capsys, "eval", "--real", stats_file, "--fake", folders["fake"], "--metrics", "fvd",
                           "--fvd-protocol", "cd-fvd", "--videomae", path, "--fvd-resolution", 256)
    assert code == 2 and "its name says resolution 128, and --fvd-resolution gives 256" in err


def test_cd_fvd_needs_the_users_checkpoint_named_in_one_line(tmp_path, capsys):
    write_video(tmp_path / "a" / "v.mp4", make_clip(0, 16, 32, 32))
    common = ["eval", "--real", tmp_path / "a", "--fake", tmp_path / "a", "--metrics", "fvd", "--fvd-protocol",
              "cd-fvd"]
    code, _, err = run_cli(capsys, *common)
    assert code == 2 and err.count("\n") == 1
    assert "no VideoMAE-v2 checkpoint given; the cd-fvd protocol needs --videomae PATH" in err
    assert "nothing is downloaded" in err
    code, _, err = run_cli(capsys, *common, "--videomae", tmp_path / "missing.pth")
    assert code == 2 and f"VideoMAE-v2 checkpoint not found: {tmp_path / 'missing.pth'}" in err
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=r"^--videomae .*junk.pth: not a VideoMAE-v2 checkpoint \("):
        load_videomae(tmp_path / "junk.pth")
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no patch_embed.proj / blocks.0 weights"):
        load_videomae(tmp_path / "other.pth")


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_statistics_files_are_read_as_arrays_only(tmp_path, capsys):
    good = fvd.save_reference_stats(tmp_path / "i3d_x_full_res256_len16_skip1_seed0.pkl",
                                    np.random.default_rng(0).normal(size=(5, 3)))
    ref = fvd.load_reference_stats(good)
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32).astype(np.float64)
    assert np.allclose(ref.cov, np.cov(x, rowvar=False, ddof=0)) and np.allclose(ref.mean, x.mean(0))
    assert (ref.model, ref.resolution, ref.frames, ref.count) == ("i3d", 256, 16, 5)

    hostile = tmp_path / "hostile.pkl"
    hostile.write_bytes(pickle.dumps({"num_items": 5, "raw_mean": _Payload()}))
    with pytest.raises(ValueError, match=r"not a cd-fvd statistics file \(it holds builtins.print, not only arrays\)"):
        fvd.load_reference_stats(hostile)
    assert "code ran" not in capsys.readouterr().out
    for content, reason in ((b"", "not a cd-fvd statistics file"), (good.read_bytes()[:50], "not a cd-fvd statistics"),
                            (pickle.dumps({"num_items": 1, "raw_mean": np.zeros(3), "raw_cov": np.zeros((3, 3))}),
                             "need N >= 2")):
        hostile.write_bytes(content)
        with pytest.raises(ValueError, match=reason):
            fvd.load_reference_stats(hostile)

    write_video(tmp_path / "f" / "v.mp4", make_clip(0, 16, 32, 32))
    code, _, err = run_cli(capsys, "eval", "--real", good, "--fake", tmp_path / "f", "--metrics", "psnr,fvd")
    assert code == 2 and "holds feature statistics, not videos: only --metrics fvd" in err
    code, _, err = run_cli(capsys, "eval", "--real", good, "--fake", tmp_path / "f", "--metrics", "fvd")
    assert code == 2 and "need --fvd-protocol cd-fvd (VideoMAE-v2) or cd-fvd-i3d" in err
    code, _, err = run_cli(capsys, "eval", "--real", good, "--fake", tmp_path / "f", "--metrics", "fvd",
                           "--fvd-protocol", "cd-fvd", "--videomae", good)
    assert code == 2 and "its name says model i3d, and --fvd-protocol gives videomae" in err
