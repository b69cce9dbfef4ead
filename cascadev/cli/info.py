"""``cascadev info``: versions, device and the attention backend in use."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> None:
    import platform

    import torch

    import cascadev
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"cascadev     {cascadev.__version__}")
    print(f"python       {platform.python_version()}")
    print(f"torch        {torch.__version__}")
    for name in ("torchvision", "diffusers", "timm", "accelerate", "open_clip", "av", "einops"):
        try:
            module = __import__(name)
            print(f"{name:<12} {getattr(module, '__version__', '?')}")
        except ImportError:
            print(f"{name:<12} not installed")
    print(f"device       {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    backend = _AttentionBackendRegistry.get_active_backend()[0].value  # what a model without set_attention_backend uses
    print(f"attention    {backend} (diffusers dispatcher; DIFFUSERS_ATTN_BACKEND or model.set_attention_backend)")
