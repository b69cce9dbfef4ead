"""``cascadev info``: versions, device, and the precision and attention kernel a decode would run with."""

from __future__ import annotations

import argparse

# a DiT attention part as the release runs it: 16 heads of 72, 4096 tokens (1/4 of a 128 x 128 latent frame)
PROBE_HEADS, PROBE_HEAD_DIM, PROBE_TOKENS = 16, 72, 4096


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="as reconstruct/decode take it (default: bf16 "
                                                                     "on CUDA, fp32 on CPU)")
    p.add_argument("--attn-fp32", action="store_true", help="as reconstruct/decode take it")


def sdpa_kernel(device, dtype) -> str:
    """The kernel torch SDPA picks for the DiT's attention in ``dtype`` on ``device`` (asked of torch, not guessed)."""
    import torch

    q = torch.zeros(1, PROBE_HEADS, PROBE_TOKENS, PROBE_HEAD_DIM, device=device, dtype=dtype)
    try:
        choice = torch._fused_sdp_choice(q, q, q)
        return torch.nn.attention.SDPBackend(choice).name.lower()
    except (AttributeError, RuntimeError, ValueError):       # a torch without the private helper
        return "chosen by torch at run time"


def run(args: argparse.Namespace) -> None:
    import platform

    import torch

    import cascadev
    from cascadev.pipelines.runtime import resolve_device, resolve_dtype
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    device = resolve_device(args.device)
    print(f"cascadev     {cascadev.__version__}")
    print(f"python       {platform.python_version()}")
    print(f"torch        {torch.__version__}")
    for name in ("torchvision", "diffusers", "timm", "accelerate", "open_clip", "av", "einops"):
        try:
            module = __import__(name)
            print(f"{name:<12} {getattr(module, '__version__', '?')}")
        except ImportError:
            print(f"{name:<12} not installed")
    print(f"device       {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    dtype = resolve_dtype(args.dtype, device)
    # as set_precision does it: the DiT's q, k, v upcast in fp32 (and with --attn-fp32), else in the models' dtype
    attn_dtype = torch.float32 if dtype == torch.float32 or args.attn_fp32 else dtype
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    print(f"precision    models {names[dtype]}" + (", TF32 matmuls (--no-tf32: exact fp32)"
                                                   if device.type == "cuda" and dtype == torch.float32 else ""))
    backend = _AttentionBackendRegistry.get_active_backend()[0].value  # what a model without set_attention_backend uses
    kernel = sdpa_kernel(device, attn_dtype) if backend == "native" else backend
    print(f"attention    {names[attn_dtype]} q/k/v, {backend} dispatcher -> {kernel} "
          f"(DIFFUSERS_ATTN_BACKEND or model.set_attention_backend)")
