"""Inflated Inception-v1 (I3D, Kinetics-400): the video classifier whose logits FVD compares.

Carreira & Zisserman, "Quo Vadis, Action Recognition?" (CVPR 2017). The module names, the order of
the Inception branches and every tensor shape follow the PyTorch port whose weights are widely used
for FVD (``i3d_pretrained_400.pt``, as loaded by VideoGPT and TATS), so that file loads with
``load_state_dict(strict=True)``:

    Conv3d_1a_7x7 -> MaxPool3d_2a_3x3 -> Conv3d_2b_1x1 -> Conv3d_2c_3x3 -> MaxPool3d_3a_3x3
    -> Mixed_3b, 3c -> MaxPool3d_4a_3x3 -> Mixed_4b..4f -> MaxPool3d_5a_2x2 -> Mixed_5b, 5c
    -> AvgPool (2, 7, 7), stride 1 -> logits (1x1x1 conv, 1024 -> 400, with bias) -> mean over time

Each ``Unit3D`` is conv (no bias) + BatchNorm + ReLU with TensorFlow "SAME" padding computed from the
input size (total pad = max((ceil(s / stride) - 1) * stride + k - s, 0), the smaller half in front).
Max pools pad with zeros; every pool follows a ReLU, so this equals TF's -inf padding.

BatchNorm eps: 1e-3 is what the TF-Hub I3D (the original FVD model) uses; 1e-5 is what VideoGPT/TATS
use with ``i3d_pretrained_400.pt``. It is a constructor argument, the default follows VideoGPT.

Input: (B, 3, T, H, W) in [-1, 1], RGB, 224 x 224 for comparable numbers, T >= 9 (after the three
temporal stride-2 stages at least 2 steps must remain for the (2, 7, 7) average pool). Smaller
frames are accepted (the spatial pool kernel shrinks to fit) for quick tests only.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_CLASSES = 400          # Kinetics-400
FEATURE_DIM = 1024         # channels after Mixed_5c (the pooled "features" output)
BN_EPS_VIDEOGPT = 1e-5     # VideoGPT / TATS port of i3d_pretrained_400.pt
POOL_KERNEL = (2, 7, 7)    # final average pool (VALID, stride 1)
MIN_FRAMES = 9             # shortest clip the final (2, 7, 7) pool accepts

# Inception blocks: name -> (in_channels, (b0, b1a, b1b, b2a, b2b, b3b) output channels)
MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (front, back) along one axis of length ``size``."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    """Zero-pad (B, C, T, H, W) so a VALID conv/pool afterwards acts like TF "SAME"."""
    pads = [same_padding(s, k, st) for s, k, st in zip(x.shape[2:], kernel, stride)]   # t, h, w
    (tf, tb), (hf, hb), (wf, wb) = pads
    return F.pad(x, (wf, wb, hf, hb, tf, tb))


class Unit3D(nn.Module):
    """Conv3d (TF SAME) + optional BatchNorm3d + optional ReLU; keys ``conv3d.*`` and ``bn.*``."""

    def __init__(self, c_in: int, c_out: int, kernel=(1, 1, 1), stride=(1, 1, 1), bn_eps: float = BN_EPS_VIDEOGPT,
                 batch_norm: bool = True, relu: bool = True, bias: bool = False):
        super().__init__()
        self.kernel, self.stride, self.relu = tuple(kernel), tuple(stride), relu
        self.conv3d = nn.Conv3d(c_in, c_out, self.kernel, self.stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(c_out, eps=bn_eps) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MaxPool3dSame(nn.Module):
    """Max pool with TF SAME padding (zeros: the inputs are post-ReLU, so zeros act as -inf)."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionBlock(nn.Module):
    """Four branches concatenated on channels: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | maxpool 3x3 -> 1x1."""

    def __init__(self, c_in: int, widths: tuple[int, ...], bn_eps: float):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3b = widths
        k1, k3 = (1, 1, 1), (3, 3, 3)
        self.b0 = Unit3D(c_in, w0, k1, bn_eps=bn_eps)
        self.b1a = Unit3D(c_in, w1a, k1, bn_eps=bn_eps)
        self.b1b = Unit3D(w1a, w1b, k3, bn_eps=bn_eps)
        self.b2a = Unit3D(c_in, w2a, k1, bn_eps=bn_eps)
        self.b2b = Unit3D(w2a, w2b, k3, bn_eps=bn_eps)
        self.b3a = MaxPool3dSame(k3, (1, 1, 1))
        self.b3b = Unit3D(c_in, w3b, k1, bn_eps=bn_eps)
        self.out_channels = w0 + w1b + w2b + w3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class I3D(nn.Module):
    """I3D Kinetics-400 classifier; ``forward`` -> logits averaged over time (B, 400).

    ``features(x)`` gives the pooled Mixed_5c activations (B, 1024) instead. FVD in its common form
    (TF-Hub original, StyleGAN-V, VideoGPT/TATS) compares the 400-d logits, not these.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, bn_eps: float = BN_EPS_VIDEOGPT):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2), bn_eps=bn_eps)
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64, (1, 1, 1), bn_eps=bn_eps)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3), bn_eps=bn_eps)
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Mixed_3b = InceptionBlock(*MIXED["Mixed_3b"], bn_eps)
        self.Mixed_3c = InceptionBlock(*MIXED["Mixed_3c"], bn_eps)
        self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
        self.Mixed_4b = InceptionBlock(*MIXED["Mixed_4b"], bn_eps)
        self.Mixed_4c = InceptionBlock(*MIXED["Mixed_4c"], bn_eps)
        self.Mixed_4d = InceptionBlock(*MIXED["Mixed_4d"], bn_eps)
        self.Mixed_4e = InceptionBlock(*MIXED["Mixed_4e"], bn_eps)
        self.Mixed_4f = InceptionBlock(*MIXED["Mixed_4f"], bn_eps)
        self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        self.Mixed_5b = InceptionBlock(*MIXED["Mixed_5b"], bn_eps)
        self.Mixed_5c = InceptionBlock(*MIXED["Mixed_5c"], bn_eps)
        self.logits = Unit3D(FEATURE_DIM, num_classes, batch_norm=False, relu=False, bias=True)
        # Modules in forward order; the MaxPool entries have no parameters, so the state dict is
        # exactly Conv3d_*, Mixed_* and logits, as in i3d_pretrained_400.pt.
        self.trunk = [name for name in self._modules if name != "logits"]

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> average-pooled Mixed_5c map (B, 1024, t', h', w')."""
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"I3D: expected (B, 3, T, H, W), got shape {tuple(x.shape)}")
        if x.shape[2] < MIN_FRAMES:
            raise ValueError(f"I3D: needs at least {MIN_FRAMES} frames, got T={x.shape[2]}")
        for name in self.trunk:
            x = self._modules[name](x)                                  # b c t h w, t/8 h/32 w/32 at the end
        kernel = (POOL_KERNEL[0], min(POOL_KERNEL[1], x.shape[3]), min(POOL_KERNEL[2], x.shape[4]))
        return F.avg_pool3d(x, kernel, stride=1)                       # b 1024 t' h' w' (h'=w'=1 at 224 px)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> Kinetics-400 logits averaged over time (B, 400)."""
        logits = self.logits(self._pooled(x))                          # b 400 t' h' w'
        return logits.mean(dim=(2, 3, 4))                              # b 400

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> pooled Mixed_5c features averaged over time (B, 1024)."""
        return self._pooled(x).mean(dim=(2, 3, 4))
