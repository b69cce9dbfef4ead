"""Issue 29 (1): ``cascadev eval`` scores the frames as stored in the files, as scikit-image and ffmpeg do.

An anamorphic clip (stored 48x32 with a 4:3 sample aspect ratio, shown 64x32) and a distorted copy: eval's PSNR and
SSIM equal scikit-image's ``peak_signal_noise_ratio`` / ``structural_similarity`` (``gaussian_weights=True``,
``sigma=1.5``, ``use_sample_covariance=False``) on the stored RGB frames to 1e-4. scikit-image is not a dependency:
the reference below is its published formula written out here (Wang et al. 2004 with a Gaussian window truncated at
3.5 sigma, reflected borders, the 5-pixel border cropped), and ``test_the_reference_formula_is_scikit_images`` checks
it against scikit-image itself where that is installed.
"""

import json
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from cascadev.synthetic import make_clip
from helpers import run_cli

SAR = Fraction(4, 3)
FRAMES, HEIGHT, WIDTH = 6, 32, 48


def write_anamorphic(path, frames: np.ndarray, sar: Fraction = SAR) -> None:
    """(T, H, W, 3) uint8 as H.264 whose stream says pixels are ``sar`` times as wide as high."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.sample_aspect_ratio = sar
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())


def stored_frames(path) -> np.ndarray:
    """The decoded RGB frames as the stream stores them, read with PyAV directly: (T, H, W, 3) float64 in [0, 1]."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float64) / 255


def reference_psnr(x: np.ndarray, y: np.ndarray) -> float:
    """PSNR of one frame (H, W, 3) in [0, 1]: data range 1, MSE over every pixel and channel."""
    return float(10 * np.log10(1.0 / np.mean((x - y) ** 2)))


def reference_ssim(x: np.ndarray, y: np.ndarray, sigma: float = 1.5) -> float:
    """SSIM of one frame (H, W, 3) in [0, 1] as scikit-image computes it with gaussian_weights=True,
    use_sample_covariance=False, data_range=1: per channel, local moments from a Gaussian filter (truncated at 3.5
    sigma, 'reflect' borders), population variances, the map's border of (window - 1) / 2 pixels cropped, mean over
    the rest, then mean over channels."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    pad = int(3.5 * sigma + 0.5)                                   # the window is 2 * pad + 1 = 11 wide
    scores = []
    for ch in range(x.shape[-1]):
        a, b = x[..., ch], y[..., ch]

        def blur(img):
            return gaussian_filter(img, sigma=sigma, truncate=3.5, mode="reflect")

        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
        cov = blur(a * b) - mu_a * mu_b
        s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
        scores.append(s[pad:-pad, pad:-pad].mean())
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def anamorphic_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("anamorphic")
    clean = make_clip(3, FRAMES, HEIGHT, WIDTH)
    noisy = (clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    for name, video in (("real", clean), ("fake", noisy)):
        (root / name).mkdir()
        levels = ((video + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()    # t h w c
        write_anamorphic(root / name / "clip.mp4", levels)
    return root


def _report(capsys, tmp_path, real, fake, *extra) -> dict:
    out = tmp_path / "report.json"
    code, _, err = run_cli(capsys, "eval", "--real", real, "--fake", fake, "--metrics", "psnr,ssim",
                           "--paired-frames", 0, "--json", out, *extra)
    assert code == 0, err
    return json.loads(out.read_text())


def test_eval_scores_stored_frames_as_scikit_image(anamorphic_pair, capsys, tmp_path):
    real_file, fake_file = anamorphic_pair / "real" / "clip.mp4", anamorphic_pair / "fake" / "clip.mp4"
    real, fake = stored_frames(real_file), stored_frames(fake_file)
    assert real.shape == (FRAMES, HEIGHT, WIDTH, 3)
    with av.open(str(real_file)) as c:                              # the file really is anamorphic
        assert c.streams.video[0].sample_aspect_ratio == SAR
    psnr = [reference_psnr(f, r) for f, r in zip(fake, real)]
    ssim = [reference_ssim(f, r) for f, r in zip(fake, real)]
    assert 15 < np.mean(psnr) < 40 and 0.2 < np.mean(ssim) < 0.99     # a real distortion, not identical frames

    report = _report(capsys, tmp_path, anamorphic_pair / "real", anamorphic_pair / "fake")
    assert report["settings"]["geometry"] == "stored"
    (row,) = report["per_video"]
    np.testing.assert_allclose(row["per_frame"]["psnr"], psnr, atol=1e-4, rtol=0)
    np.testing.assert_allclose(row["per_frame"]["ssim"], ssim, atol=1e-4, rtol=0)
    assert report["results"]["psnr"]["mean"] == pytest.approx(np.mean(psnr), abs=1e-4)
    assert report["results"]["ssim"]["mean"] == pytest.approx(np.mean(ssim), abs=1e-4)
    for metric in ("psnr", "ssim"):
        assert report["results"][metric]["geometry"] == "stored"
        assert "as stored in the files" in report["conventions"][metric]

    # the same two files as one pair, named on the command line (issue 32 item 7)
    single = _report(capsys, tmp_path, real_file, fake_file)
    assert single["results"]["psnr"]["mean"] == report["results"]["psnr"]["mean"]

    # display geometry: frames stretched to 64x32 before scoring, another (smoother) number, and said so
    shown = _report(capsys, tmp_path, real_file, fake_file, "--geometry", "display")
    assert shown["settings"]["geometry"] == "display" and shown["results"]["ssim"]["geometry"] == "display"
    assert shown["results"]["ssim"]["mean"] != pytest.approx(report["results"]["ssim"]["mean"], abs=1e-3)


def test_stored_sizes_that_differ_are_one_line_naming_size(anamorphic_pair, capsys, tmp_path):
    """Stored 48x32 against a 64x32 square-pixel file (what the anamorphic one shows): not silently stretched."""
    wide = tmp_path / "wide"
    wide.mkdir()
    levels = ((make_clip(3, FRAMES, HEIGHT, 64) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    write_anamorphic(wide / "clip.mp4", levels, Fraction(1, 1))
    code, _, err = run_cli(capsys, "eval", "--real", anamorphic_pair / "real", "--fake", wide, "--metrics", "psnr",
                           "--paired-frames", 0)
    assert code == 2 and err.count("\n") == 1
    assert "real frames are 32x48, fake frames 32x64 (stored geometry); pass --size H W" in err
    code, out, err = run_cli(capsys, "eval", "--real", anamorphic_pair / "real", "--fake", wide, "--metrics", "psnr",
                             "--paired-frames", 0, "--geometry", "display")
    assert code == 0, err                                              # shown, both are 64x32


def test_one_video_against_a_folder_is_one_line(anamorphic_pair, capsys):
    code, _, err = run_cli(capsys, "eval", "--real", anamorphic_pair / "real" / "clip.mp4",
                           "--fake", anamorphic_pair / "fake", "--metrics", "psnr")
    assert code == 2 and err.count("\n") == 1
    assert "--real is one video file and --fake is not: give two video files" in err


def test_the_reference_formula_is_scikit_images():
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image not installed (a test-only cross-check)")
    rng = np.random.default_rng(0)
    x = rng.random((20, 27, 3))
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    ssim = metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                         data_range=1.0, channel_axis=-1)
    assert reference_ssim(x, y) == pytest.approx(ssim, abs=1e-12)
    assert reference_psnr(x, y) == pytest.approx(metrics.peak_signal_noise_ratio(x, y, data_range=1.0), abs=1e-12)


def test_bench_recon_reads_the_stored_frames_by_default(anamorphic_pair, capsys, tmp_path, tiny_pipeline_dir):
    """The reference clip bench-recon writes (short side to 32, centre crop) is cut from the stored 48x32 frames;
    with --geometry display, from the 64x32 stretched ones, and the settings say which."""
    from cascadev.video_io import read_video
    from eval.bench_recon import square_crop

    source = anamorphic_pair / "real" / "clip.mp4"
    crops = {g: square_crop(read_video(source, num_frames=4, geometry=g), 32) for g in ("stored", "display")}
    assert (crops["stored"] - crops["display"]).abs().mean() > 0.1      # the two geometries crop different pixels
    for geometry in ("stored", "display"):
        run_dir = tmp_path / geometry
        code, _, err = run_cli(capsys, "bench-recon", anamorphic_pair / "real", "-o", run_dir, "--size", 32,
                               "--frames", 4, "--fps", 0, "--preprocess", "antialiased", "--weights",
                               tiny_pipeline_dir, "--steps", 1, "--metrics", "psnr", "--geometry", geometry)
        assert code == 0, err
        written = read_video(run_dir / "real" / "clip.mp4")
        errors = {g: (written - crop).abs().mean().item() for g, crop in crops.items()}
        assert errors[geometry] < 0.06 < errors[{"stored": "display", "display": "stored"}[geometry]], errors
        assert json.loads((run_dir / "results.json").read_text())["settings"]["geometry"] == geometry
