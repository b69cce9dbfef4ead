"""Attention through diffusers' dispatcher, and the grid partitions of the CascadeV DiT.

Kernels: ``dispatch_attention_fn`` with the backend a processor holds (None: diffusers' active one,
torch SDPA by default); ``model.set_attention_backend("flash" | "native" | "_native_math" | ...)``
sets it in every processor. ``fp32=True`` upcasts q, k, v as the release's ``fp32_attention`` did
(flash-attn has no fp32 kernel: use it with ``attn_fp32=False``).

Grid attention (CascadeV, Sec. 3.2): a window of T x h x w tokens, ordered frame, row, column, is
split into ``ts`` contiguous chunks of frames and ``xs x xs`` contiguous spatial blocks; attention
runs inside each part. ``None`` means full 3D attention.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import _AttentionBackendRegistry, dispatch_attention_fn
from einops import rearrange

# torch SDPA backends that take a boolean padding mask; flash-attn / sage kernels do not
MASK_BACKENDS = ("native", "_native_math", "_native_efficient", "_native_cudnn", "flex")


class DispatchProcessor:
    """Base of our attention processors: the attributes diffusers' ``set_attention_backend`` and context
    parallelism set, and the dispatch call. Subclasses' ``__call__(attn, ...)`` do the projections."""

    def __init__(self):
        self._attention_backend = None
        self._parallel_config = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
               fp32: bool = False) -> torch.Tensor:
        """Softmax attention. q: (B, N, heads, e); k, v: (B, L, heads, e); mask: (B, L) bool, True for keys to
        attend to. Returns (B, N, heads, e) in q's dtype (the dispatcher's layout)."""
        dtype = q.dtype
        if fp32:
            q, k, v = q.float(), k.float(), v.float()
        backend = self._attention_backend
        if mask is not None:
            mask = rearrange(mask, "b l -> b 1 1 l")
            active = backend or _AttentionBackendRegistry.get_active_backend()[0]
            if active not in MASK_BACKENDS:  # a padding mask needs SDPA (as before: flash-attn's dense kernel has none)
                backend = "native"
        out = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=backend, parallel_config=self._parallel_config)
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
