"""FVD: Frechet distance, I3D layout and shapes, detectors, preprocessing, clip selection, extraction, cache."""

import ast
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from eval import fvd
from eval.i3d import FEATURE_DIM, I3D, NUM_CLASSES, Unit3D, same_padding

ROOT = Path(__file__).resolve().parents[1]
KEYS_NAME = "i3d_kinetics400_state_dict_keys.tsv"
SHARED_KEYS = ROOT.parent / "shared" / "data" / KEYS_NAME     # ../shared beside the clone (CI, dev boxes)
LOCAL_KEYS = ROOT / "tests" / "data" / KEYS_NAME


def kaiming_i3d(bn_eps=1e-5, seed=0) -> I3D:
    """I3D with variance-preserving random convs, so features differ between inputs (the default
    init shrinks activations to ~1e-7 differences by Mixed_5c)."""
    torch.manual_seed(seed)
    model = I3D(bn_eps=bn_eps).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.Conv3d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model


@pytest.fixture(scope="module")
def model() -> I3D:
    return kaiming_i3d()


# --------------------------------------------------------------------------------------- distance

def _scipy_reference(a, b):
    """FD with scipy.linalg.sqrtm on float64 statistics (np.cov, unbiased)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real)


@pytest.mark.parametrize("n, d", [(300, 32), pytest.param(150, 100, marks=pytest.mark.slow),
                                  (40, 100)])  # last: N < D, low-rank
def test_frechet_distance_matches_scipy_sqrtm(n, d):
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, d))
    b = rng.normal(0.2, 1.0, size=(n, d)) @ (np.eye(d) + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d))
    ours = fvd.fvd_from_features(a, b)
    ref = _scipy_reference(a, b)
    assert ours > 1.0
    assert abs(ours - ref) <= 1e-6 * abs(ref)


@pytest.mark.parametrize("n", [200, 8])                                  # full-rank and low-rank paths
def test_frechet_distance_identical_sets_and_mean_shift(n):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(n, 16)) * rng.uniform(0.5, 2.0, size=16)
    trace = np.trace(np.cov(a, rowvar=False))
    assert abs(fvd.fvd_from_features(a, a)) < 1e-9 * trace
    # same covariance, shifted mean: FD = |shift|^2 exactly
    shift = rng.normal(size=16)
    assert fvd.fvd_from_features(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)


def test_low_rank_path_equals_statistics_path():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(30, 64)), rng.normal(0.1, 1.3, size=(20, 64))
    direct = fvd.frechet_distance(*fvd.gaussian_stats(a), *fvd.gaussian_stats(b))
    # the eigendecomposition path carries ~1e-8 round-off here (square roots of zero eigenvalues)
    assert fvd.fvd_from_features(a, b) == pytest.approx(direct, rel=1e-6)


def test_gaussian_stats_unbiased_and_checked():
    x = np.random.default_rng(1).normal(size=(10, 3)).astype(np.float32)
    mu, sigma = fvd.gaussian_stats(x)
    assert mu.dtype == sigma.dtype == np.float64
    centered = x.astype(np.float64) - x.mean(0, dtype=np.float64)
    assert np.allclose(sigma, centered.T @ centered / 9)
    with pytest.raises(ValueError, match="N >= 2"):
        fvd.gaussian_stats(x[:1])
    with pytest.raises(ValueError, match="shapes do not match"):
        fvd.frechet_distance(mu, sigma, mu[:2], sigma[:2, :2])
    with pytest.raises(ValueError, match="contain NaN or inf"):          # numpy would stop deep in an eigensolver
        fvd.fvd_from_features(np.full((10, 3), np.nan), x)


# -------------------------------------------------------------------------------------------- I3D

def _read_key_file(path):
    rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines() if line.strip()]
    return [(key, tuple(ast.literal_eval(shape))) for key, shape in rows]


def test_i3d_state_dict_matches_reference_layout():
    path = SHARED_KEYS if SHARED_KEYS.is_file() else LOCAL_KEYS
    expected = _read_key_file(path)
    if SHARED_KEYS.is_file() and LOCAL_KEYS.is_file():
        assert _read_key_file(LOCAL_KEYS) == expected, "tests/data copy differs from ../shared/data"
    ours = [(k, tuple(v.shape)) for k, v in I3D().state_dict().items()]
    assert len(expected) == 344
    assert ours == expected                              # same keys, same order, same shapes


@pytest.mark.parametrize("frames", [9, 16, 64])
def test_i3d_output_shape_for_clip_lengths(frames):
    model = I3D().eval()
    with torch.no_grad():
        logits = model(torch.rand(1, 3, frames, 16, 16) * 2 - 1)
    assert logits.shape == (1, NUM_CLASSES) and torch.isfinite(logits).all()


def test_i3d_rejects_short_clips_and_bad_layout():
    model = I3D().eval()
    with pytest.raises(ValueError, match="at least 9 frames"):
        model(torch.zeros(1, 3, 8, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        model(torch.zeros(1, 16, 32, 32, 3))


def test_i3d_features_mode_and_bn_eps(model):
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    a, b = model, I3D(bn_eps=1e-3).eval()
    b.load_state_dict(a.state_dict())
    assert {m.eps for m in b.modules() if isinstance(m, torch.nn.BatchNorm3d)} == {1e-3}
    with torch.no_grad():
        assert a.features(x).shape == (1, FEATURE_DIM)
        assert not torch.allclose(a(x), b(x))            # eps is not a no-op


def test_tf_same_padding():
    # TF: out = ceil(s / stride), total pad = max((out - 1) * stride + k - s, 0), smaller half first
    assert same_padding(224, 7, 2) == (2, 3)
    assert same_padding(9, 7, 2) == (3, 3)
    assert same_padding(16, 3, 1) == (1, 1)
    assert same_padding(7, 2, 2) == (0, 1)
    assert same_padding(8, 1, 1) == (0, 0)
    unit = Unit3D(3, 4, (7, 7, 7), (2, 2, 2))
    assert unit(torch.zeros(1, 3, 9, 15, 16)).shape == (1, 4, 5, 8, 8)


# -------------------------------------------------------------------------------------- detectors

def test_load_state_dict_detector_roundtrip(model, tmp_path):
    # Saved from DataParallel inside a checkpoint dict: both wrappers are undone on load.
    # (The plain i3d_pretrained_400.pt layout is loaded by the CLI test.)
    path = tmp_path / "i3d_dp.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    x = torch.rand(2, 3, 9, 16, 16) * 2 - 1
    with torch.no_grad():
        want = model(x)
    extractor = fvd.load_extractor(path, bn_eps=1e-5)
    assert isinstance(extractor, fvd.I3DExtractor) and extractor.dim == NUM_CLASSES
    assert torch.allclose(extractor(x), want, atol=1e-5)


def test_missing_or_foreign_detector_file(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        fvd.load_extractor(tmp_path / "nope.pt")
    message = str(info.value)
    assert "nope.pt" in message and "i3d_torchscript.pt" in message and "i3d_pretrained_400.pt" in message
    assert "\n" not in message
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="i3d_pretrained_400.pt layout"):
        fvd.load_extractor(tmp_path / "other.pt")


class _FakeTorchScriptDetector(torch.nn.Module):
    """Stands in for i3d_torchscript.pt: encodes the flags it was called with into its output."""

    def forward(self, x: torch.Tensor, rescale: bool, resize: bool, return_features: bool) -> torch.Tensor:
        flags = float(rescale) + 2.0 * float(resize) + 4.0 * float(return_features)
        return x.mean(dim=(1, 2, 3, 4)).unsqueeze(1).expand(-1, 400) + flags


def test_torchscript_detector_called_like_stylegan_v(tmp_path):
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(_FakeTorchScriptDetector()), str(path))
    extractor = fvd.load_extractor(path)
    assert isinstance(extractor, fvd.TorchScriptExtractor)
    x = torch.rand(3, 3, 16, 8, 8) * 2 - 1
    y = extractor(x)
    # rescale=False, resize=False (clips are already 224 px in [-1, 1]), return_features=True
    assert y.shape == (3, 400)
    assert torch.allclose(y, x.mean(dim=(1, 2, 3, 4)).unsqueeze(1) + 4.0)


# ---------------------------------------------------------------------------------- preprocessing

def test_preprocess_quantises_resizes_and_keeps_range():
    g = torch.Generator().manual_seed(0)
    video = torch.rand(2, 3, 4, 20, 30, generator=g) * 2 - 1
    square = video[..., :20, :20]
    quantised = fvd.preprocess_clips(square, size=20)                       # no resize: quantisation only
    levels = (quantised + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)               # uint8 levels
    assert (quantised - square).abs().max() <= 1 / 127.5 + 1e-6
    out = fvd.preprocess_clips(video, size=16)
    assert out.shape == (2, 3, 4, 16, 16) and out.min() >= -1 and out.max() <= 1
    constant = torch.full((1, 3, 2, 17, 33), 0.3)
    assert torch.allclose(fvd.preprocess_clips(constant, 224),
                          torch.full((1, 3, 2, 224, 224), round(1.3 * 127.5) / 127.5 - 1))


# ------------------------------------------------------------------------------------------ clips

def test_clip_start_rules():
    assert fvd.clip_start("a", 40, 16, "first", seed=0, run=3) == 0
    starts = [fvd.clip_start("a", 40, 16, "random", seed=0, run=r) for r in range(20)]
    assert all(0 <= s <= 24 for s in starts) and len(set(starts)) > 3
    assert starts == [fvd.clip_start("a", 40, 16, "random", seed=0, run=r) for r in range(20)]   # deterministic
    assert starts != [fvd.clip_start("a", 40, 16, "random", seed=1, run=r) for r in range(20)]
    assert fvd.clip_start("b", 16, 16, "random", seed=0, run=0) == 0
    with pytest.raises(ValueError, match="shorter than"):
        fvd.clip_start("c", 15, 16, "first", seed=0, run=0)


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    from cascadev.synthetic import write_clips

    folder = tmp_path_factory.mktemp("fvd_clips")
    paths = write_clips(folder, 3, frames=11, height=24, width=24)
    (folder / "broken.mp4").write_bytes(b"\x00" * 64)
    return paths, folder / "broken.mp4"


def test_extract_features_batching_order_and_failures(clip_files, model):
    paths, broken = clip_files
    extractor = fvd.I3DExtractor(model)
    clips = [fvd.Clip(str(paths[0]), 0), fvd.Clip(str(broken), 0), fvd.Clip(str(paths[1]), 1),
             fvd.Clip(str(paths[2]), 2)]
    feats, failed = fvd.extract_features(clips, extractor, frames=9, i3d_size=16, batch_size=3)
    assert failed == [1] and feats.shape == (3, NUM_CLASSES) and feats.dtype == np.float32
    one_by_one, _ = fvd.extract_features([clips[i] for i in (0, 2, 3)], extractor, frames=9, i3d_size=16, batch_size=1)
    np.testing.assert_allclose(feats, one_by_one, rtol=1e-4, atol=1e-4)
    assert np.abs(feats[0] - feats[1]).max() > 1e-3                          # different clips, different features
    with pytest.raises(ValueError, match="at least 9 frames"):
        fvd.extract_features(clips, extractor, frames=8)


def test_feature_cache_roundtrip_and_key(clip_files, tmp_path):
    paths, _ = clip_files
    clips = [fvd.Clip(str(p), 0) for p in paths]
    settings = {"frames": 9, "detector": {"kind": "i3d", "bn_eps": 1e-5}}
    key = fvd.cache_key(clips, settings)
    assert key == fvd.cache_key(clips, dict(settings))
    assert key != fvd.cache_key(clips, {**settings, "frames": 10})
    assert key != fvd.cache_key(clips[::-1], settings)
    assert key != fvd.cache_key([fvd.Clip(clips[0].path, 1), *clips[1:]], settings)
    assert fvd.load_cached_features(tmp_path, key) is None
    feats = np.random.default_rng(0).normal(size=(3, 400)).astype(np.float32)
    fvd.save_cached_features(tmp_path, key, feats, [2])
    loaded, failed = fvd.load_cached_features(tmp_path, key)
    assert np.array_equal(loaded, feats) and failed == [2]
    stat = os.stat(paths[0])
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))       # file changed -> new key
    assert fvd.cache_key(clips, settings) != key


# ---------------------------------------------------------------------------------------- protocols

def test_videogpt_protocol_scales_the_short_side_and_crops_the_centre():
    levels = torch.arange(40 * 60, dtype=torch.float32).reshape(1, 1, 1, 40, 60) % 256
    video = (levels.expand(1, 3, 2, 40, 60) / 127.5 - 1)                  # uint8 levels in [-1, 1]
    out = fvd.preprocess_clips(video, size=20, protocol="videogpt")
    # short side 40 -> 20 (factor 1/2): 40x60 -> 20x30, then the centre 20 columns (offset 5)
    half = torch.nn.functional.interpolate(levels[0, :, 0][None] / 255, size=(20, 30), mode="bilinear",
                                           align_corners=False)[0, 0]
    torch.testing.assert_close(out[0, 0, 0], half[:, 5:25] * 2 - 1)
    square = video[..., :40, :40]   # square clips: the stretch and the crop agree
    torch.testing.assert_close(fvd.preprocess_clips(square, 20, "videogpt"), fvd.preprocess_clips(square, 20),
                               atol=1e-5, rtol=0)


def test_tf_protocol_samples_without_half_pixel_offset():
    row = torch.tensor([0.0, 100.0, 200.0, 250.0])                          # 4 -> 8: sources 0, .5, 1, ..., 3.5
    video = (row.expand(1, 3, 1, 4, 4) / 127.5 - 1)
    out = (fvd.preprocess_clips(video, size=8, protocol="tf")[0, 0, 0] + 1) * 255 / 2
    torch.testing.assert_close(out[0], torch.tensor([0.0, 50, 100, 150, 200, 225, 250, 250]))   # edge held
    torch.testing.assert_close(out[:, 3], torch.full((8,), 150.0))
    same = torch.rand(1, 3, 2, 6, 6) * 2 - 1
    same = ((same + 1) * 127.5).round() / 127.5 - 1
    torch.testing.assert_close(fvd.preprocess_clips(same, 6, "tf"), same, atol=1e-6, rtol=0)    # no resize: identity


def test_stylegan_v_protocol_divides_by_n_and_needs_its_detector(tmp_path, model):
    x, y = np.random.default_rng(0).normal(size=(2, 30, 8))
    biased = fvd.frechet_distance(*fvd.gaussian_stats(x, ddof=0), *fvd.gaussian_stats(y, ddof=0))
    assert fvd.fvd_from_features(x, y, ddof=0) == pytest.approx(biased, rel=1e-9)
    assert fvd.fvd_from_features(x[:6], y[:6], ddof=0) == pytest.approx(     # the low-rank path (N <= D)
        fvd.frechet_distance(*fvd.gaussian_stats(x[:6], 0), *fvd.gaussian_stats(y[:6], 0)), rel=1e-6)
    assert fvd.fvd_from_features(x, y, ddof=0) != pytest.approx(fvd.fvd_from_features(x, y), rel=1e-3)
    video = torch.rand(1, 3, 2, 10, 14) * 2 - 1
    levels = fvd.preprocess_clips(video, protocol="stylegan-v")
    assert levels.shape == video.shape and levels.min() >= 0 and levels.max() <= 255       # 0..255, own size
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(_FakeTorchScriptDetector()), str(path))
    extractor = fvd.load_extractor(path, protocol="stylegan-v")
    assert torch.allclose(extractor(levels)[:, 0], levels.mean() + 1 + 2 + 4)     # rescale, resize, return_features
    torch.save(model.state_dict(), tmp_path / "i3d_pretrained_400.pt")
    with pytest.raises(ValueError, match="resizes inside StyleGAN-V's TorchScript detector"):
        fvd.load_extractor(tmp_path / "i3d_pretrained_400.pt", protocol="stylegan-v")
    with pytest.raises(ValueError, match="unknown FVD protocol"):
        fvd.preprocess_clips(video, protocol="fid")
