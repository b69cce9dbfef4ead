"""Per-frame PSNR / SSIM / LPIPS on (B, 3, T, H, W) videos in [-1, 1]."""

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from eval.metrics import PSNR_CAP_DB, LpipsUnavailable, alexnet_weights_path, load_lpips, psnr, ssim


def _video(seed, b=2, t=3, h=32, w=40):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


def _noisy(video, stds, seed=1):
    """Add noise of a different std to each frame: (B, 3, T, H, W), stds has T entries."""
    g = torch.Generator().manual_seed(seed)
    std = torch.tensor(stds).view(1, 1, -1, 1, 1)
    return (video + std * torch.randn(video.shape, generator=g)).clamp(-1, 1)


def test_constant_videos_known_values():
    black, white = -torch.ones(2, 3, 4, 16, 16), torch.ones(2, 3, 4, 16, 16)
    p, s = psnr(black, white), ssim(black, white)
    assert p.shape == s.shape == (2, 4)
    # [0, 1] range: MSE = 1 -> 10 log10(1 / 1) = 0 dB
    assert torch.equal(p, torch.zeros(2, 4))
    # constant frames: sigma terms vanish, SSIM = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) = C1 / (1 + C1)
    c1 = (0.01 * 1.0) ** 2
    assert torch.allclose(s, torch.full((2, 4), c1 / (1 + c1)), rtol=1e-4, atol=0)


def test_identical_videos_psnr_capped_and_ssim_one():
    v = _video(0)
    p = psnr(v, v)
    assert torch.isfinite(p).all()
    assert torch.equal(p, torch.full_like(p, PSNR_CAP_DB))
    assert torch.allclose(ssim(v, v), torch.ones(2, 3), atol=1e-5)


def test_psnr_is_per_frame_on_unit_range():
    target = _video(0)
    pred = _noisy(target, [0.0, 0.05, 0.2])
    p = psnr(pred, target)

    def frames(v):
        return rearrange((v.double() + 1) / 2, "b c t h w -> b t (c h w)")

    mse = ((frames(pred) - frames(target)) ** 2).mean(-1)
    expected = torch.where(mse == 0, torch.full_like(mse, PSNR_CAP_DB), 10 * torch.log10(1 / mse)).float()
    assert torch.allclose(p, expected, rtol=1e-5)
    assert (p[:, 0] == PSNR_CAP_DB).all() and (p[:, 1] > p[:, 2]).all()       # per frame, not per video
    # a video's value is the mean of its frames, not the PSNR of the pooled MSE
    pooled = 10 * math.log10(1 / float(mse[0, 1:].mean()))
    assert abs(float(p[0, 1:].mean()) - pooled) > 0.5


def _reference_ssim(a, b):
    """Wang et al. SSIM with 'valid' filtering: frames (N, 3, H, W) in [0, 1] -> (N,), in float64."""
    k, sigma = 11, 1.5
    x = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(3, 1, k, k)

    def blur(t):
        return F.conv2d(t, window, groups=3)

    a, b = a.double(), b.double()
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean(dim=(1, 2, 3))


def test_ssim_matches_reference_window_and_constants():
    target = _video(2, b=1, t=3, h=40, w=48)
    pred = _noisy(target, [0.05, 0.1, 0.3])
    s = ssim(pred, target)

    def to_frames(v):
        return rearrange((v + 1) / 2, "b c t h w -> (b t) c h w")

    ref = _reference_ssim(to_frames(pred), to_frames(target)).float().view(1, 3)
    assert torch.allclose(s, ref, atol=1e-5)
    assert s[0, 0] > s[0, 1] > s[0, 2]


def test_layout_is_checked():
    v = _video(0, t=4)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(v, v[:, :, :2])
    with pytest.raises(ValueError, match="channels last"):
        ssim(rearrange(v, "b c t h w -> b t h w c"), rearrange(v, "b c t h w -> b t h w c"))
    with pytest.raises(ValueError, match="smaller than"):
        ssim(v[..., :8, :8], v[..., :8, :8])
    # values: frames of [0, 255] would be clamped and score silently wrong; NaN would score NaN
    with pytest.raises(ValueError, match=r"psnr: pixel values span \[.*\]; videos are in \[-1, 1\]"):
        psnr((v + 1) * 127.5, (v + 1) * 127.5)
    with pytest.raises(ValueError, match="ssim: input contains NaN"):
        ssim(v, torch.full_like(v, float("nan")))
    with pytest.raises(ValueError, match="no frames"):
        psnr(v[:, :, :0], v[:, :, :0])


@pytest.fixture
def hub_dir(tmp_path):
    """An empty torch hub folder for the duration of a test."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


def test_lpips_missing_weights_is_a_clear_skip(hub_dir):
    with pytest.raises(LpipsUnavailable, match="alexnet-owt-7be5be79.pth") as info:
        load_lpips()
    assert str(hub_dir) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
def test_lpips_runs_per_frame_with_cached_backbone(hub_dir):
    import torchvision

    # Stand-in backbone weights in the cache (this checks the plumbing, not LPIPS values).
    path = alexnet_weights_path()
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    lpips = load_lpips(batch_size=4)
    target = _video(3, b=2, t=3, h=64, w=64)
    pred = _noisy(target, [0.0, 0.1, 0.4])
    d = lpips(pred, target)
    assert d.shape == (2, 3)
    assert torch.all(d[:, 0].abs() < 1e-6)
    assert torch.all(d[:, 1] > 0) and torch.all(d[:, 2] > d[:, 1])
    with pytest.raises(ValueError, match="smaller than the 31 px"):
        lpips(pred[..., :30, :30], target[..., :30, :30])


def test_ssim_equals_torchmetrics_on_the_valid_window_positions():
    from torchmetrics.functional.image import structural_similarity_index_measure
    target = _video(3, b=2, t=2, h=37, w=52)
    pred = _noisy(target, [0.05, 0.2])
    frames = lambda v: rearrange((v.double() + 1) / 2, "b c t h w -> (b t) c h w")  # noqa: E731
    _, full = structural_similarity_index_measure(frames(pred), frames(target), gaussian_kernel=True, sigma=1.5,
                                                  kernel_size=11, data_range=1.0, reduction="none",
                                                  return_full_image=True)
    expected = full[..., 5:-5, 5:-5].mean(dim=(1, 2, 3)).float().view(2, 2)
    torch.testing.assert_close(ssim(pred, target), expected, rtol=0, atol=1e-7)


def test_sharpness_measures_fine_detail_not_fidelity():
    from eval.metrics import SHARPNESS_CUTOFF, sharpness

    g = torch.Generator().manual_seed(0)
    target = torch.rand(1, 3, 2, 64, 64, generator=g) * 2 - 1
    blurred = torch.nn.functional.avg_pool3d(target, (1, 5, 5), stride=1, padding=(0, 2, 2), count_include_pad=False)
    assert sharpness(target, target) == pytest.approx(1.0)
    assert sharpness(blurred, target) < 0.2                                # a blurry prediction loses the band
    assert sharpness(target.flip(-1), target) == pytest.approx(1.0)        # detail, not fidelity
    # a sinusoid of period 8 px (1/8 cycle per pixel) is above the cutoff, one of period 32 below it
    x = torch.arange(64.0)
    fine, coarse = (torch.sin(2 * torch.pi * x / p).expand(1, 3, 2, 64, 64) * 0.5 for p in (8, 32))
    assert 1 / 32 < SHARPNESS_CUTOFF < 1 / 8
    assert sharpness(coarse, fine) == pytest.approx(0.0, abs=1e-12)
    assert sharpness(fine + coarse, fine) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no detail"):
        sharpness(fine, torch.full_like(fine, 0.3))
