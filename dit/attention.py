"""Attention kernels and the grid partitions of the CascadeV DiT.

Kernels: flash-attn when installed, on CUDA, in fp16/bf16; torch SDPA otherwise; an explicit
"math" path (fp32 softmax) kept as the reference. ``fp32=True`` upcasts q, k, v as the release's
``fp32_attention`` did (then flash-attn, which has no fp32 kernel, is not used).

Grid attention (CascadeV, Sec. 3.2): a window of T x h x w tokens, ordered frame, row, column, is
split into ``ts`` contiguous chunks of frames and ``xs x xs`` contiguous spatial blocks; attention
runs inside each part. ``None`` means full 3D attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

try:  # optional extra `flash`
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None

BACKENDS = ("auto", "flash", "sdpa", "math")


def attention_backend(device: torch.device, dtype: torch.dtype, requested: str = "auto", fp32: bool = False) -> str:
    """The kernel that will run for tensors on ``device`` in ``dtype``: "flash", "sdpa" or "math"."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose from {BACKENDS}")
    flash_ok = (flash_attn_func is not None and device.type == "cuda" and not fp32
                and dtype in (torch.float16, torch.bfloat16))
    if requested == "flash" and not flash_ok:
        raise ValueError("attention backend 'flash' needs flash-attn installed (pip install cascadev[flash]), "
                         "a CUDA device, fp16/bf16 tensors and attn_fp32=False")
    if requested == "auto":
        return "flash" if flash_ok else "sdpa"
    return requested


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto", fp32: bool = False) -> torch.Tensor:
    """Softmax attention. q, k, v: (B, heads, N, head_dim) -> (B, heads, N, head_dim) in q's dtype."""
    dtype = q.dtype
    if fp32:
        q, k, v = q.float(), k.float(), v.float()
    kernel = attention_backend(q.device, q.dtype, backend, fp32)
    if kernel == "flash":
        out = flash_attn_func(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    elif kernel == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        weights = torch.einsum("bhnd,bhmd->bhnm", q.float(), k.float()) * q.shape[-1] ** -0.5
        out = torch.einsum("bhnm,bhmd->bhnd", weights.softmax(dim=-1), v.float())
    return out.to(dtype)


def partition(x: torch.Tensor, grid: tuple[int, int, int], strides: tuple[int, int] | None) -> torch.Tensor:
    """Split a window into its attention parts. x: (B, T*h*w, D) -> (B*ts*xs*xs, T/ts * h/xs * w/xs, D)."""
    if strides is None:
        return x
    (T, h, w), (ts, xs) = grid, strides
    return rearrange(x, "b (ts gt xs gh xs2 gw) d -> (b ts xs xs2) (gt gh gw) d",
                     ts=ts, xs=xs, xs2=xs, gt=T // ts, gh=h // xs, gw=w // xs)


def unpartition(x: torch.Tensor, grid: tuple[int, int, int], strides: tuple[int, int] | None) -> torch.Tensor:
    """Inverse of ``partition``: (B*ts*xs*xs, T/ts * h/xs * w/xs, D) -> (B, T*h*w, D)."""
    if strides is None:
        return x
    (T, h, w), (ts, xs) = grid, strides
    return rearrange(x, "(b ts xs xs2) (gt gh gw) d -> b (ts gt xs gh xs2 gw) d",
                     ts=ts, xs=xs, xs2=xs, gt=T // ts, gh=h // xs, gw=w // xs)


def num_parts(strides: tuple[int, int] | None) -> int:
    """How many attention parts a window is split into."""
    return 1 if strides is None else strides[0] * strides[1] ** 2
