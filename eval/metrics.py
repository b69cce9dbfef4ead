"""Paired per-frame metrics for videos: PSNR, SSIM, LPIPS (torchmetrics underneath).

Conventions (those of the video-VAE papers; ``CONVENTIONS`` says them in words for every report):

- Inputs are videos (B, 3, T, H, W) in [-1, 1], RGB; ``pred`` and ``target`` have the same shape.
- Every metric is computed per frame and returned per frame, (B, T). A video's value is the mean
  over its frames; a data set's value is the mean over all its frames.
- PSNR on [0, 1] (``data_range=1``), MSE over the 3 channels and all pixels of a frame, in float64.
  Identical frames have MSE 0 and infinite PSNR; per-frame values are capped at ``PSNR_CAP_DB``
  (100 dB, an MSE of 1e-10) so means stay finite and JSON stays valid.
- SSIM on [0, 1] (``data_range=1``), 11x11 Gaussian window, sigma 1.5, k1 0.01, k2 0.03, on each RGB
  channel, averaged over channels and over the valid window positions only (the SSIM map of
  torchmetrics with its 5-pixel reflect-padded border cropped), as Wang et al.'s reference code,
  skimage (``gaussian_weights=True``) and pytorch_msssim do. torchmetrics' own mean keeps that
  border, which moves SSIM by about 1e-3.
- LPIPS with AlexNet and the v0.1 linear heads, inputs in [-1, 1] (torchmetrics ``net_type="alex"``,
  ``normalize=False``). The AlexNet ImageNet weights are read only from the local torch hub cache;
  when absent, ``load_lpips`` raises ``LpipsUnavailable`` with the path to put them at: no download
  is tried and no number from random weights is ever reported.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

from cascadev.checks import check_video
from cascadev.errors import first_line

PSNR_CAP_DB = 100.0
SSIM_KERNEL_SIZE = 11
SSIM_SIGMA = 1.5
LPIPS_MIN_SIDE = 31        # smallest frame side AlexNet's five LPIPS stages accept

CONVENTIONS = {
    "psnr": f"per frame on [0, 1] (data_range=1), RGB MSE in float64, capped at {PSNR_CAP_DB:g} dB for "
            "identical frames; video = mean over its frames, set = mean over all frames",
    "ssim": f"per frame on [0, 1] (data_range=1) in float64, {SSIM_KERNEL_SIZE}x{SSIM_KERNEL_SIZE} Gaussian window, "
            f"sigma {SSIM_SIGMA}, mean over RGB channels and valid window positions (border cropped); "
            "video = mean over its frames, set = mean over all frames",
    "lpips": "per frame, AlexNet (LPIPS v0.1 linear heads, torchmetrics), inputs in [-1, 1]; "
             "video = mean over its frames, set = mean over all frames",
}
# the name each paired score carries in reports (its conventions in words: CONVENTIONS)
PAIRED_PROTOCOLS = {"psnr": "per-frame RGB, data range 1, mean over all frames",
                    "ssim": "per-frame RGB, Gaussian 11/1.5, valid window, mean over all frames",
                    "lpips": "per-frame AlexNet LPIPS v0.1, mean over all frames"}
# how the frames were read (cascadev.video_io.GEOMETRIES), in words for reports
GEOMETRY_TEXT = {"stored": "frames as stored in the files (no pixel-aspect stretch, no rotation), as the reference "
                           "tools (scikit-image, ffmpeg, VMAF, torchvision/decord loaders) score them",
                 "display": "frames as displayed (non-square pixels stretched to square, rotation applied): not "
                            "comparable with numbers from stored frames when a file has either"}


def _frames01(pred: torch.Tensor, target: torch.Tensor, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Check two (B, 3, T, H, W) videos in [-1, 1]; return both as frames (B*T, 3, H, W) in [0, 1]."""
    if pred.shape != target.shape:
        raise ValueError(f"{who}: pred and target differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.ndim != 5 or pred.shape[1] != 3:
        hint = " (channels last? expected (B, 3, T, H, W))" if pred.ndim == 5 and pred.shape[-1] == 3 else ""
        raise ValueError(f"{who}: expected (B, 3, T, H, W), got shape {tuple(pred.shape)}{hint}")
    for video in (pred, target):     # finite, in [-1, 1]: frames of [0, 255] would score silently wrong
        check_video(video, 3, 1, who, pixels=True)

    def to01(v):
        return rearrange((v.clamp(-1, 1) + 1) / 2, "b c t h w -> (b t) c h w")

    return to01(pred), to01(target)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) x2 in [-1, 1] -> PSNR per frame (B, T) in dB, on [0, 1], capped at PSNR_CAP_DB."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b = _frames01(pred.double(), target.double(), "psnr")
    values = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))   # (b t)
    values = values.clamp(max=PSNR_CAP_DB).float()
    return rearrange(values, "(b t) -> b t", b=pred.shape[0])


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) x2 in [-1, 1] -> SSIM per frame (B, T), on [0, 1], 11x11 Gaussian window, sigma 1.5.

    Mean over channels and valid window positions (see the module docstring); computed in float64, as the
    reference implementations (float32 is 2e-5 off them), returned as float32. The Gaussian window is applied as
    two 1-D passes: torchmetrics' 2-D float64 convolution is 15x slower on a CPU for the same map (1e-14 apart).
    """
    a, b = _frames01(pred.double(), target.double(), "ssim")
    if min(a.shape[-2:]) < SSIM_KERNEL_SIZE:
        raise ValueError(f"ssim: frames of {a.shape[-2]}x{a.shape[-1]} are smaller than the "
                         f"{SSIM_KERNEL_SIZE}x{SSIM_KERNEL_SIZE} window")
    r = torch.arange(SSIM_KERNEL_SIZE, dtype=torch.float64, device=a.device) - (SSIM_KERNEL_SIZE - 1) / 2
    g = torch.exp(-r ** 2 / (2 * SSIM_SIGMA ** 2))
    g = g / g.sum()

    def blur(x: torch.Tensor) -> torch.Tensor:       # valid positions only: the border is cropped, not padded
        c = x.shape[1]
        x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)

    c1, c2 = 0.01 ** 2, 0.03 ** 2                      # (k1 * data_range)^2, (k2 * data_range)^2
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    values = ssim_map.mean(dim=(1, 2, 3))                                                      # (b t)
    return rearrange(values.float(), "(b t) -> b t", b=pred.shape[0])


SHARPNESS_CUTOFF = 1 / 16     # cycles per pixel: periods shorter than the colour fix's 16 px blocks


def above_frequency(height: int, width: int, cutoff: float, device: torch.device | str | None = None) -> torch.Tensor:
    """(H, W) bool, in ``torch.fft.fft2``'s order: the frequencies whose radius exceeds ``cutoff`` cycles per pixel."""
    fy = torch.fft.fftfreq(height, dtype=torch.float64, device=device)
    fx = torch.fft.fftfreq(width, dtype=torch.float64, device=device)
    return (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() > cutoff


def high_frequency_energy(video: torch.Tensor, cutoff: float = SHARPNESS_CUTOFF) -> torch.Tensor:
    """Spectral energy of each frame above ``cutoff`` cycles per pixel (radial frequency), summed over the RGB
    channels: (B, 3, T, H, W) in [-1, 1] -> (B, T), float64."""
    frames = rearrange(video.double(), "b c t h w -> b t c h w")
    power = torch.fft.fft2(frames).abs() ** 2                                        # b t c h w
    return (power * above_frequency(*video.shape[-2:], cutoff, video.device)).sum(dim=(2, 3, 4))


def sharpness(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Fine detail of ``pred`` relative to ``target``, both (B, 3, T, H, W) in [-1, 1]: the spectral energy of all
    frames above 1/16 cycle per pixel (``high_frequency_energy``) as a fraction of the target's. 1.0: as much fine
    detail as the input; a blurry mean prediction scores near 0 however good its PSNR. Computed on the float frames
    (before any video encoding, whose quantiser removes fine detail first)."""
    pred, target = _frames01(pred, target, "sharpness")   # checked; the same frames, shifted: the ratio is unchanged
    pred, target = (rearrange(v, "(b t) c h w -> b c t h w", b=1) for v in (pred, target))
    reference = high_frequency_energy(target).sum()
    if reference == 0:
        raise ValueError("sharpness: the target has no detail above 1/16 cycle per pixel (flat frames)")
    return float(high_frequency_energy(pred).sum() / reference)


class LpipsUnavailable(RuntimeError):
    """LPIPS cannot run here (backbone weights missing); the message says what to put where."""


def alexnet_weights_path() -> Path:
    """Where torchvision (and so torchmetrics' LPIPS) looks for the ImageNet AlexNet weights."""
    from torchvision.models import AlexNet_Weights

    filename = AlexNet_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


class LPIPS:
    """Per-frame LPIPS (AlexNet) for videos; build with ``load_lpips`` (weights from local caches only)."""

    def __init__(self, device: torch.device | str = "cpu", batch_size: int = 16):
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        self.metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="none", normalize=False)
        self.metric = self.metric.to(device).eval()
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) x2 in [-1, 1] -> LPIPS per frame (B, T), frames in chunks of ``batch_size``."""
        a, b = _frames01(pred.float(), target.float(), "lpips")
        if min(a.shape[-2:]) < LPIPS_MIN_SIDE:
            raise ValueError(f"lpips: frames of {a.shape[-2]}x{a.shape[-1]} are smaller than the "
                             f"{LPIPS_MIN_SIDE} px AlexNet needs")
        scores = []
        for i in range(0, a.shape[0], self.batch_size):
            x = a[i:i + self.batch_size].to(self.device) * 2 - 1          # back to [-1, 1] after the checks
            y = b[i:i + self.batch_size].to(self.device) * 2 - 1
            self.metric.reset()
            self.metric.update(x, y)
            scores.append(self.metric.compute().reshape(-1).float().cpu())
        return rearrange(torch.cat(scores), "(b t) -> b t", b=pred.shape[0])


def load_lpips(device: torch.device | str = "cpu", batch_size: int = 16) -> LPIPS:
    """LPIPS (AlexNet) with weights from the local caches; ``LpipsUnavailable`` when they are missing."""
    from torchvision.models import AlexNet_Weights

    path = alexnet_weights_path()
    if not path.is_file():
        raise LpipsUnavailable(f"AlexNet weights not found at {path} (no download attempted); "
                               f"put {AlexNet_Weights.IMAGENET1K_V1.url} there to enable LPIPS")
    try:
        return LPIPS(device, batch_size)
    except (RuntimeError, OSError, KeyError, ValueError) as e:  # a truncated or foreign file in the cache
        raise LpipsUnavailable(f"cannot load LPIPS weights ({path}): {first_line(e, typed=False, limit=300)}") from None
