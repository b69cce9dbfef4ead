"""Frechet Video Distance: I3D features of fixed-length clips, Gaussian statistics, Frechet distance.

Unterthiner et al., "Towards Accurate Generative Models of Video: A New Metric & Challenges" (2018).
What this module does, so that numbers can be compared with the published ones:

- Clips: ``frames`` (16 by default) consecutive frames per video, each video read at its own size
  (or at the evaluation ``size``), quantised to uint8 levels, then prepared as one reference does
  (``PROTOCOLS``): ours by default (bilinear stretch to 224 x 224, half-pixel centres, no antialias,
  [-1, 1]); "videogpt" (short side to 224, centre crop); "tf" (TF1 resize_bilinear, corner-anchored
  sampling); "stylegan-v" (the TorchScript detector rescales and resizes; covariance over N). On square
  clips the stretch and the centre crop agree. One clip per video and run; the start is 0 ("first"), or
  drawn per video and run from a seeded generator ("random").
- Features: the 400 Kinetics logits averaged over time, the output the original TF-Hub FVD,
  StyleGAN-V (``return_features=True``) and VideoGPT/TATS all compare. Two detectors give them:
  ``I3D`` (eval/i3d.py) with ``i3d_pretrained_400.pt``, or StyleGAN-V's TorchScript port of the
  TF-Hub model, ``i3d_torchscript.pt``, called with ``rescale=False, resize=False`` because the
  clips are already 224 px in [-1, 1].
- Statistics in float64: mean and unbiased covariance (N - 1, as TF-GAN and VideoGPT; StyleGAN-V
  divides by N, its protocol does too).
- Distance: d^2 = |mu_r - mu_g|^2 + tr(S_r) + tr(S_g) - 2 tr((S_r S_g)^(1/2)) (Dowson & Landau, 1982),
  with tr((S_r S_g)^(1/2)) = sum of sqrt(eig(S_r^(1/2) S_g S_r^(1/2))), a symmetric PSD matrix, so
  only symmetric eigendecompositions are needed (no scipy.linalg.sqrtm, no ``disp``); with fewer
  clips than feature dimensions, the same trace from the singular values of the centred features.

Extraction is batched on the given device; under ``accelerate launch`` the clips are split across
processes and the features gathered with ``accelerator.gather_for_metrics``. Features of a fixed
clip list can be cached to ``.npz`` files keyed by the files (path, size, mtime) and every setting.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from cascadev.errors import first_line
from eval.i3d import BN_EPS_VIDEOGPT, FEATURE_DIM, I3D, MIN_FRAMES, NUM_CLASSES

FVD_FRAMES = 16            # clip length of the common FVD protocol ("FVD_16")
I3D_SIZE = 224             # I3D input side
CACHE_VERSION = 1          # bump when anything that changes cached features changes
DETECTOR_SOURCES = {
    "i3d_pretrained_400.pt": "the PyTorch I3D used by VideoGPT/TATS (Google Drive file id "
                             "1mQK8KD8G6UWRa5t87SRMm5PVXtlpneJT, see videogpt/download.py in wilson1yan/VideoGPT)",
    "i3d_torchscript.pt": "StyleGAN-V's TorchScript port of the TF-Hub model "
                          "(https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt)",
}


# --------------------------------------------------------------------------------------- distance

def gaussian_stats(features: np.ndarray, ddof: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and covariance (D, D) divided by N - ``ddof`` (1: unbiased), both float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"gaussian_stats: need (N >= 2, D) features, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False, ddof=ddof)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"frechet_distance: shapes do not match: mu {mu1.shape} {mu2.shape}, "
                         f"sigma {sigma1.shape} {sigma2.shape}")
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1                             # similar to sigma1 @ sigma2, symmetric PSD
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()           # tr((sigma1 sigma2)^(1/2))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def fvd_from_features(real: np.ndarray, fake: np.ndarray, ddof: int = 1) -> float:
    """FVD between two sets of (N, D) clip features (N >= 2 each), in float64; covariances divided by N - ``ddof``.

    With fewer clips than feature dimensions (N <= D, e.g. 256 clips of 400-d logits) the covariances
    are low-rank; writing S_r = A^T A, S_g = B^T B with A = (X_r - mu_r) / sqrt(N_r - 1) (N_r x D), the
    nonzero eigenvalues of S_r S_g are the squared singular values of A B^T, so
    tr((S_r S_g)^(1/2)) = sum of singular values of A B^T: exact, cheaper, and free of the round-off
    square roots of the many zero eigenvalues. Otherwise ``frechet_distance`` on the statistics.
    """
    x, y = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"fvd_from_features: need two (N >= 2, D) arrays of equal D, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("fvd_from_features: the features contain NaN or inf values")
    if min(len(x), len(y)) > x.shape[1]:
        return frechet_distance(*gaussian_stats(x, ddof), *gaussian_stats(y, ddof))
    mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
    a = (x - mu_x) / np.sqrt(len(x) - ddof)                               # n_r d, S_r = a^T a
    b = (y - mu_y) / np.sqrt(len(y) - ddof)                               # n_g d, S_g = b^T b
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()         # tr((S_r S_g)^(1/2))
    diff = mu_x - mu_y
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2 * trace_sqrt)


# ---------------------------------------------------------------------------------- preprocessing

@dataclass(frozen=True)
class Protocol:
    """How one reference turns clips into I3D input, and normalises the covariance (by N - ``ddof``)."""

    name: str
    input: str           # the input preparation, in words (reports and results JSON)
    source: str          # where it is defined
    ddof: int = 1
    detector_resizes: bool = False    # the TorchScript detector rescales and resizes itself (rescale=resize=True)
    detector: str = "i3d"             # the feature model: "i3d" (--i3d) or "videomae" (--videomae, eval/videomae.py)
    loader_resolution: bool = False   # clips first made RESOLUTION px square as cd-fvd's video-folder loader does


PROTOCOLS = {p.name: p for p in (
    Protocol("cascadev", "uint8 levels, bilinear stretch to 224 x 224 (half-pixel centres, no antialias), [-1, 1]",
             "this package's default"),
    Protocol("videogpt", "[0, 1], short side scaled to 224 (the other ceil'd; bilinear, half-pixel centres), centre "
                         "crop 224 x 224, [-1, 1]",
             "VideoGPT's data.preprocess times 2, as TATS's fvd.preprocess (wilson1yan/VideoGPT, songweige/TATS)"),
    Protocol("tf", "0..255, TF1 resize_bilinear to 224 x 224 with its defaults (output pixel i samples the input at "
                   "i * in / out: no half-pixel offset, corner-anchored), 2x/255 - 1",
             "google-research frechet_video_distance.py preprocess()"),
    Protocol("stylegan-v", "0..255 at the clip's own size, rescaled and resized inside the TorchScript detector "
                           "(rescale=True, resize=True); covariance divided by N",
             "StyleGAN-V src/metrics/frechet_video_distance.py and metric_utils.FeatureStats", ddof=0,
             detector_resizes=True),
    Protocol("cd-fvd", "[0, 1], short side scaled to RESOLUTION (the other ceil'd; bilinear, half-pixel centres, "
                       "antialiased), centre crop, truncated to uint8 (x255, then toward zero), then stretched to "
                       "224 x 224 (bilinear, no antialias), [0, 1]; VideoMAE-v2 ViT-g features (1408-d); covariance "
                       "divided by N",
             "the cd-fvd package (Ge et al., CVPR 2024, songweige/content-debiased-fvd): utils/data_utils.preprocess "
             "(video folders), VideoMAEv2/utils.preprocess_videomae, VisionTransformer.forward_features, FeatureStats",
             ddof=0, detector="videomae", loader_resolution=True),
    Protocol("cd-fvd-i3d", "[0, 1], short side scaled to RESOLUTION (the other ceil'd; bilinear, half-pixel centres, "
                           "antialiased), centre crop, truncated to uint8, then 0..255 stretched to 224 x 224 "
                           "(bilinear, no antialias), 2x/255 - 1; I3D 400-d logits; covariance divided by N",
             "the cd-fvd package with model='i3d': utils/data_utils.preprocess, i3d/utils.preprocess_i3d, FeatureStats",
             ddof=0, loader_resolution=True),
)}
DEFAULT_PROTOCOL = "cascadev"
CDFVD_RESOLUTION = 128     # cd-fvd's `resolution`: its quick start's (reference statistics exist for 128 and 256)


def preprocess_clips(video: torch.Tensor, size: int = I3D_SIZE, protocol: str = DEFAULT_PROTOCOL,
                     resolution: int = CDFVD_RESOLUTION) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> the detector input of ``protocol`` (``PROTOCOLS``): (B, 3, T, size, size) in
    [-1, 1], for "cd-fvd" in [0, 1] (made ``resolution`` px square first, as that package's loader), or for
    "stylegan-v" (B, 3, T, H, W) in 0..255 (its detector resizes)."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"preprocess_clips: expected (B, 3, T, H, W), got shape {tuple(video.shape)}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown FVD protocol {protocol!r}; choose from {sorted(PROTOCOLS)}")
    b = video.shape[0]
    levels = ((video.float().clamp(-1, 1) + 1) * 127.5).round()          # the uint8 levels of the decoded frames
    if protocol == "stylegan-v":
        return levels
    frames = rearrange(levels, "b c t h w -> (b t) c h w")
    if PROTOCOLS[protocol].loader_resolution:        # cd-fvd: its loader's clip, stored as uint8 again
        frames = _short_side_centre_crop(frames / 255, resolution, antialias=True)
        frames = (frames * 255).to(torch.uint8).float()                 # truncation, as the package's .byte()
        if protocol == "cd-fvd":                                         # VideoMAE: [0, 1], then resized
            frames = F.interpolate(frames / 255, size=(size, size), mode="bilinear", align_corners=False)
        else:                                                            # I3D: resized in 0..255, then [-1, 1]
            frames = 2 * F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False) / 255 - 1
    elif protocol == "videogpt":
        frames = _short_side_centre_crop(frames / 255, size) * 2 - 1
    elif protocol == "tf":
        frames = 2 * _tf1_resize_bilinear(frames, size) / 255 - 1
    else:
        if tuple(frames.shape[-2:]) != (size, size):
            frames = F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        frames = frames / 127.5 - 1.0
    return rearrange(frames, "(b t) c h w -> b c t h w", b=b).contiguous()


def _short_side_centre_crop(frames: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size): short side to ``size``, the other side ceil'd, bilinear (half-pixel
    centres; antialiased as cd-fvd's loader, not as VideoGPT's preprocess), then the centre crop (offsets floored)."""
    h, w = frames.shape[-2:]
    scale = size / min(h, w)
    target = (size, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), size)
    frames = F.interpolate(frames, size=target, mode="bilinear", align_corners=False, antialias=antialias)
    top, left = (frames.shape[-2] - size) // 2, (frames.shape[-1] - size) // 2
    return frames[..., top:top + size, left:left + size]


def _tf1_resize_bilinear(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size) as TF1's ``tf.image.resize_bilinear`` with its defaults: output index i
    samples the input at i * in / out (float32 scale), the neighbour index clamped at the edge, interpolated along
    x then y."""
    def taps(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(size, dtype=torch.float32) * torch.tensor(n_in / size, dtype=torch.float32)
        lower = src.floor()
        return lower.long(), (lower.long() + 1).clamp(max=n_in - 1), (src - lower).to(frames.dtype)
    y0, y1, dy = taps(frames.shape[-2])
    x0, x1, dx = taps(frames.shape[-1])
    rows_top, rows_bottom = frames[..., y0, :], frames[..., y1, :]
    top = rows_top[..., x0] + (rows_top[..., x1] - rows_top[..., x0]) * dx
    bottom = rows_bottom[..., x0] + (rows_bottom[..., x1] - rows_bottom[..., x0]) * dx
    return top + (bottom - top) * dy[:, None]


# -------------------------------------------------------------------------------------- detectors

class FeatureExtractor:
    """Callable: clips (B, 3, T, S, S) in [-1, 1] -> features (B, dim), float32 on CPU."""

    name: str = ""
    dim: int = 0
    identity: dict = {}          # what goes into cache keys

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class I3DExtractor(FeatureExtractor):
    """Our ``I3D`` module; ``output`` "logits" (400-d, the FVD convention) or "features" (pooled 1024-d)."""

    def __init__(self, model: I3D, device: torch.device | str = "cpu", output: str = "logits",
                 identity: dict | None = None):
        if output not in ("logits", "features"):
            raise ValueError(f"I3DExtractor: output must be 'logits' or 'features', got {output!r}")
        self.model = model.to(device).eval()
        self.device, self.output = torch.device(device), output
        self.dim = NUM_CLASSES if output == "logits" else FEATURE_DIM
        bn_eps = model.Conv3d_1a_7x7.bn.eps
        self.name = (f"I3D ({'400-d logits' if output == 'logits' else '1024-d pooled features'}, "
                     f"BatchNorm eps {bn_eps:g})")
        self.identity = {"kind": "i3d", "output": output, "bn_eps": bn_eps, **(identity or {})}

    @torch.no_grad()
    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        x = clips.to(self.device, torch.float32)
        y = self.model(x) if self.output == "logits" else self.model.features(x)
        return y.float().cpu()


class TorchScriptExtractor(FeatureExtractor):
    """StyleGAN-V's ``i3d_torchscript.pt``: ``detector(x, rescale=False, resize=False, return_features=True)``.

    ``rescale=True`` would expect [0, 255] input and ``resize=True`` would resize inside; our clips are
    already 224 px in [-1, 1] (what both flags produce), so both are off. Output: 400-d logits.
    """

    def __init__(self, module: torch.jit.ScriptModule, device: torch.device | str = "cpu", identity: dict | None = None,
                 resizes: bool = False):
        self.module = module.to(device).eval()
        self.device = torch.device(device)
        self.dim = NUM_CLASSES
        self.resizes = resizes       # StyleGAN-V's own call: clips in 0..255 at their size, rescale=resize=True
        self.name = "I3D TorchScript (StyleGAN-V port of TF-Hub i3d-kinetics-400, 400-d logits)"
        self.identity = {"kind": "torchscript", "resizes": resizes, **(identity or {})}

    @torch.no_grad()
    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        y = self.module(clips.to(self.device, torch.float32), rescale=self.resizes, resize=self.resizes,
                        return_features=True)
        return y.float().cpu()


class VideoMAEExtractor(FeatureExtractor):
    """VideoMAE-v2 (``eval.videomae``) pooled features of clips (B, 3, T, 224, 224) in [0, 1] (content-debiased FVD)."""

    def __init__(self, model, device: torch.device | str = "cpu", identity: dict | None = None):
        self.model = model.to(device).eval()
        self.device, self.dim = torch.device(device), model.embed_dim
        self.name = f"VideoMAE-v2 ({len(model.blocks)} blocks, {model.embed_dim}-d pooled features, cd-fvd)"
        self.identity = {"kind": "videomae", **(identity or {})}

    @torch.no_grad()
    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        return self.model(clips.to(self.device, torch.float32)).float().cpu()


def missing_detector_message(path: str | Path | None) -> str:
    """One line: which file is missing and where the two supported detector files come from."""
    where = "; ".join(f"{name}: {src}" for name, src in DETECTOR_SOURCES.items())
    searched = Path(torch.hub.get_dir()) / "checkpoints"
    head = f"I3D weights not found: {path}" if path else f"no I3D weights given (--i3d PATH) and none in {searched}"
    return f"{head}. Get {where}"


def default_detector_path() -> Path | None:
    """The first detector file present in the torch hub checkpoint folder, else None."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    for name in DETECTOR_SOURCES:
        if (folder / name).is_file():
            return folder / name
    return None


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``constants.pkl`` (torch.save archives have none)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())
    except (zipfile.BadZipFile, OSError):         # a damaged archive: torch.load names the problem
        return False


def _file_identity(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def load_extractor(path: str | Path | None, device: torch.device | str = "cpu", bn_eps: float = BN_EPS_VIDEOGPT,
                   output: str = "logits", protocol: str = DEFAULT_PROTOCOL) -> FeatureExtractor:
    """Detector from a file: a TorchScript archive (StyleGAN-V) or an I3D state dict (``i3d_pretrained_400.pt``).

    A missing file is a one-line ``FileNotFoundError`` naming it and where to get the detectors; a protocol whose
    detector resizes (stylegan-v) needs the TorchScript file. For the "cd-fvd" protocol ``path`` is the VideoMAE-v2
    checkpoint (``eval.videomae.load_videomae``).
    """
    if PROTOCOLS[protocol].detector == "videomae":
        from eval.videomae import load_videomae

        model = load_videomae(path)
        return VideoMAEExtractor(model, device, _file_identity(Path(path)))
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(missing_detector_message(path))
    path = Path(path)
    identity = _file_identity(path)
    if _is_torchscript(path):
        if output != "logits":
            raise ValueError(f"{path}: the TorchScript detector only gives the 400-d logits")
        if protocol == "cd-fvd-i3d":
            raise ValueError(f"{path}: the cd-fvd-i3d protocol uses the PyTorch I3D state dict (i3d_pretrained_400.pt: "
                             f"{DETECTOR_SOURCES['i3d_pretrained_400.pt']}), not the TorchScript port")
        try:
            with warnings.catch_warnings():     # StyleGAN-V's detector is TorchScript, whatever torch now prefers
                warnings.filterwarnings("ignore", message="`torch.jit.load` is deprecated", category=FutureWarning)
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:       # a damaged archive: torch raises RuntimeError with miniz's words
            raise ValueError(f"{path}: not a readable TorchScript file ({first_line(e)})") from None
        schema = getattr(getattr(module, "forward", None), "schema", None)
        arguments = [a.name for a in schema.arguments[1:]] if schema is not None else []      # self aside
        if arguments[1:4] != ["rescale", "resize", "return_features"]:
            raise ValueError(f"{path}: a TorchScript module that is not StyleGAN-V's I3D detector (its forward takes "
                             f"({', '.join(arguments)}), not (x, rescale, resize, return_features))")
        return TorchScriptExtractor(module, device, identity, resizes=PROTOCOLS[protocol].detector_resizes)
    if PROTOCOLS[protocol].detector_resizes:
        raise ValueError(f"{path}: the {protocol} protocol resizes inside StyleGAN-V's TorchScript detector; "
                         f"give --i3d i3d_torchscript.pt ({DETECTOR_SOURCES['i3d_torchscript.pt']})")
    from cascadev.weights import torch_load

    try:
        state = torch_load(path)
    except Exception as e:  # a pickle with code, a truncated file, not a torch file at all
        raise ValueError(f"{path}: not an I3D state dict or TorchScript file ({first_line(e)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        what = type(state).__name__ if not isinstance(state, dict) else "a dict of other entries than named tensors"
        raise ValueError(f"{path}: expected a state dict, got {what}")
    state = {k.removeprefix("module."): v for k, v in state.items()}    # saved from DataParallel
    model = I3D(bn_eps=bn_eps)
    from cascadev.weights import load_state_dict_strict

    load_state_dict_strict(model, state, str(path), "the i3d_pretrained_400.pt layout")
    if not all(t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point()):
        raise ValueError(f"{path}: the I3D weights hold NaN or inf values (a damaged file?)")
    return I3DExtractor(model, device, output, identity)


# ------------------------------------------------------------------------------------------ clips

@dataclass(frozen=True)
class Clip:
    path: str
    start: int


def clip_start(name: str, num_frames: int, frames: int, rule: str, seed: int, run: int) -> int:
    """First frame of the clip of video ``name`` (``num_frames`` long) in run ``run``.

    "first": 0. "random": uniform in [0, num_frames - frames], from a generator seeded with
    (seed, run, crc32(name)), so a real and a fake video of the same name get the same start and the
    draw does not depend on the order or number of the other files.
    """
    if num_frames < frames:
        raise ValueError(f"{name}: {num_frames} frames, shorter than the {frames}-frame clip")
    if rule == "first":
        return 0
    if rule != "random":
        raise ValueError(f"clip rule must be 'first' or 'random', got {rule!r}")
    rng = np.random.default_rng([seed, run, zlib.crc32(name.encode())])
    return int(rng.integers(0, num_frames - frames + 1))


class ClipDataset(torch.utils.data.Dataset):
    """Items (index, clip (3, F, S, S) in [-1, 1], ok) for the extraction loader; unreadable -> ok False."""

    def __init__(self, clips: Sequence[Clip], frames: int, i3d_size: int = I3D_SIZE,
                 read_size: tuple[int, int] | None = None, protocol: str = DEFAULT_PROTOCOL, geometry: str = "stored",
                 resolution: int = CDFVD_RESOLUTION):
        self.clips, self.frames, self.i3d_size, self.read_size = list(clips), frames, i3d_size, read_size
        self.protocol, self.geometry, self.resolution = protocol, geometry, resolution

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int):
        from cascadev.video_io import VideoReadError, read_video

        clip = self.clips[i]
        try:
            video = read_video(clip.path, num_frames=self.frames, start=clip.start, size=self.read_size,
                               geometry=self.geometry)
        except VideoReadError:
            video = None
        if video is None or video.shape[2] != self.frames:
            side = self.read_size if PROTOCOLS[self.protocol].detector_resizes else (self.i3d_size, self.i3d_size)
            return i, torch.zeros(3, self.frames, *side), False
        return i, preprocess_clips(video, self.i3d_size, self.protocol, self.resolution)[0], True


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """Full float32 convolutions on Ampere+ GPUs while extracting (TF32 would shift the logits)."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


def extract_features(clips: Sequence[Clip], extractor: FeatureExtractor, frames: int = FVD_FRAMES,
                     i3d_size: int = I3D_SIZE, read_size: tuple[int, int] | None = None, batch_size: int = 8,
                     workers: int = 0, accelerator=None, progress: str | None = None,
                     protocol: str = DEFAULT_PROTOCOL, geometry: str = "stored",
                     resolution: int = CDFVD_RESOLUTION) -> tuple[np.ndarray, list[int]]:
    """Features of ``clips`` -> (features (N_ok, D) float32 in clip order, indices of the clips that failed).

    With an ``accelerate.Accelerator``, each process reads and embeds its share of the clips and the
    features are gathered (``gather_for_metrics`` drops the padding of the last batch); every
    process returns the full result. ``geometry``: how frames are read (``cascadev.video_io.GEOMETRIES``).
    """
    if frames < MIN_FRAMES and PROTOCOLS[protocol].detector == "i3d":
        raise ValueError(f"FVD clips need at least {MIN_FRAMES} frames for I3D, got {frames}")
    if PROTOCOLS[protocol].detector_resizes and read_size is None:
        raise ValueError(f"the {protocol} protocol feeds clips at their own size: give the size they share (read_size)")
    dataset = ClipDataset(clips, frames, i3d_size, read_size, protocol, geometry, resolution)
    loader = torch.utils.data.DataLoader(dataset,
                                         batch_size=batch_size, shuffle=False, num_workers=workers)
    main = True
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader, device_placement=False)
        main = accelerator.is_main_process
    from tqdm.auto import tqdm

    indices, feats, oks = [], [], []
    with _no_tf32():
        for index, batch, ok in tqdm(loader, desc=progress, disable=progress is None or not main, leave=False):
            y = extractor(batch)                                                        # b d
            if accelerator is not None:
                device = accelerator.device
                index, y, ok = accelerator.gather_for_metrics((index.to(device), y.to(device), ok.to(device)))
            indices.append(index.cpu())
            feats.append(y.cpu())
            oks.append(ok.cpu())
    if not feats:
        return np.zeros((0, extractor.dim), np.float32), []
    index, y, ok = torch.cat(indices), torch.cat(feats), torch.cat(oks)
    order = torch.argsort(index)
    index, y, ok = index[order], y[order], ok[order]
    failed = index[~ok].tolist()
    return y[ok].numpy().astype(np.float32), failed


# ------------------------------------------------------------------------------------------ cache

def cache_key(clips: Sequence[Clip], settings: dict) -> str:
    """Hash of the clip list (with each file's size and mtime) and every extraction setting."""
    files = []
    for c in clips:
        stat = os.stat(c.path)
        files.append([str(Path(c.path).resolve()), c.start, stat.st_size, stat.st_mtime_ns])
    blob = json.dumps({"version": CACHE_VERSION, "clips": files, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def load_cached_features(cache_dir: str | Path, key: str) -> tuple[np.ndarray, list[int]] | None:
    """Features saved by ``save_cached_features`` under ``key``, or None."""
    path = Path(cache_dir) / f"fvd_{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            if str(data["key"]) != key:
                return None
            return data["features"], data["failed"].astype(int).tolist()
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):   # a partial or foreign file: recompute
        return None


def save_cached_features(cache_dir: str | Path, key: str, features: np.ndarray, failed: list[int]) -> Path:
    """Write features to ``cache_dir/fvd_<key>.npz`` (temp file + rename)."""
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"fvd_{key}.npz"
    tmp = folder / f".fvd_{key}.{os.getpid()}.npz"
    np.savez(tmp, key=np.array(key), features=features, failed=np.array(failed, dtype=np.int64))
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------- reference statistics

@dataclass(frozen=True)
class ReferenceStats:
    """Mean and covariance (over N) of a reference set's features, from a cd-fvd statistics file."""

    path: str
    mean: np.ndarray            # (D,) float64
    cov: np.ndarray             # (D, D) float64, divided by N
    count: int                  # N
    model: str | None           # from the file name: "videomae" or "i3d"
    resolution: int | None
    frames: int | None


# cd-fvd's published files: {model}_{data set}_{n real}_res{R}_len{T}_skip{k}_seed{s}.pkl
STATS_NAME = re.compile(r"^(?P<model>videomae|i3d)_(?P<data>.+)_(?P<n>full|\d+)_res(?P<res>\d+)_len(?P<len>\d+)"
                        r"_skip(?P<skip>\d+)_seed(?P<seed>\d+)\.pkl$")


def is_stats_file(path: str | Path) -> bool:
    """``path`` is a reference statistics file (a ``.pkl``), not videos."""
    return Path(path).suffix.lower() == ".pkl"


class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a statistics file cannot run code."""

    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it holds {module}.{name}, not only arrays")


def load_reference_stats(path: str | Path, option: str = "--real") -> ReferenceStats:
    """A statistics file of the cd-fvd package (a pickled ``FeatureStats.__dict__``: ``num_items``, ``raw_mean`` = sum
    of the features, ``raw_cov`` = sum of their outer products) -> mean and covariance over N, as its
    ``get_mean_cov``. Model, resolution and clip length are read from the published file name when it has that form.
    Anything else is a one-line ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{option} {path}: no such statistics file")
    try:
        with open(path, "rb") as f:
            state = _ArraysOnly(f).load()
    except Exception as e:     # truncated, not a pickle, or a pickle of other objects
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{option} {path}: not a cd-fvd statistics file ({reason})") from None
    try:
        count = int(state["num_items"])
        raw_mean = np.asarray(state["raw_mean"], dtype=np.float64)
        raw_cov = np.asarray(state["raw_cov"], dtype=np.float64)
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"{option} {path}: not a cd-fvd statistics file (no {e} of FeatureStats)") from None
    if count < 2 or raw_mean.ndim != 1 or raw_cov.shape != raw_mean.shape * 2:
        raise ValueError(f"{option} {path}: statistics of {count} item(s) with mean {raw_mean.shape} and covariance "
                         f"{raw_cov.shape}: need N >= 2, (D,) and (D, D)")
    if not (np.isfinite(raw_mean).all() and np.isfinite(raw_cov).all()):
        raise ValueError(f"{option} {path}: the statistics contain NaN or inf values")
    mean = raw_mean / count
    cov = raw_cov / count - np.outer(mean, mean)
    name = STATS_NAME.match(path.name)
    return ReferenceStats(str(path), mean, cov, count, name["model"] if name else None,
                          int(name["res"]) if name else None, int(name["len"]) if name else None)


def save_reference_stats(path: str | Path, features: np.ndarray) -> Path:
    """Features (N, D) as a statistics file of cd-fvd's format (what ``FeatureStats.save`` writes, mean and
    covariance sums only), so a reference set is embedded once and read back with ``--real``."""
    from cascadev.weights import atomic_path

    x = np.asarray(features, dtype=np.float32)
    x64 = x.astype(np.float64)
    state = {"capture_all": False, "capture_mean_cov": True, "max_items": None, "num_items": len(x),
             "num_features": x.shape[1], "all_features": [], "raw_mean": x64.sum(axis=0), "raw_cov": x64.T @ x64}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(state, f)
    return Path(path)
