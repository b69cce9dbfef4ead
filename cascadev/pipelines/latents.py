"""Latents files: (B, C, T, h, w) tensors with their metadata, as the commands write them (safetensors or torch) and
as other projects save theirs. Every command that reads or writes latents, and training's samples, go through here."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cascadev.errors import first_line
from cascadev.pipelines.frames import SEMANTIC_CHANNELS
from cascadev.weights import atomic_write, torch_load

LATENTS_SUFFIXES = (".safetensors", ".pt", ".pth")
# no VAE's latents come near this (|z| of a few units scaled, tens raw): larger values are a damaged file, which would
# overflow in the DiT and fail after minutes instead of here
LATENTS_LIMIT = 1e4


def check_latents_output(path: str | Path, option: str = "--latents-out") -> Path:
    """A latents file name we can write (and read back), checked before any compute."""
    path = Path(path)
    if path.is_dir() or path.suffix not in LATENTS_SUFFIXES:
        raise ValueError(f"{option} {path}: give a file ending in {' or '.join(LATENTS_SUFFIXES)}")
    return path


def save_latents(path: str | Path, latents: torch.Tensor, **metadata: str) -> None:
    """Write (B, C, T, h, w) latents, atomically, in the format the suffix names: safetensors (key ``latents``, the
    metadata as the file's metadata) or torch (.pt / .pth: {"latents", "metadata"}). ``load_latents`` reads both."""
    path = check_latents_output(path, "save_latents:")
    tensor = latents.detach().float().contiguous().cpu()
    meta = {"layout": "B C T H W", **{k: str(v) for k, v in metadata.items()}}
    if path.suffix == ".safetensors":
        atomic_write(path, lambda tmp: save_file({"latents": tensor}, tmp, metadata=meta))
    else:
        atomic_write(path, lambda tmp: torch.save({"latents": tensor, "metadata": meta}, tmp))


def load_latents(path: str | Path, channels: int = SEMANTIC_CHANNELS) -> torch.Tensor:
    """Read latents saved by us or anyone: .safetensors (key ``latents`` or a single tensor) or .pt
    (a tensor or a dict with ``latents``); (C, T, h, w) or (B, C, T, h, w). Returns (B, C, T, h, w) float32."""
    return read_latents(path, channels)[0]


def read_latents(path: str | Path, channels: int | None = SEMANTIC_CHANNELS) -> tuple[torch.Tensor, dict[str, str]]:
    """``load_latents`` and, from the same read, the metadata ``save_latents`` stored (empty for others' files).
    ``channels=None``: any (the caller checks them)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: latents file not found")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                metadata = dict(f.metadata() or {})
                blob = {key: f.get_tensor(key) for key in f.keys()}
        elif path.suffix in (".pt", ".pth"):
            blob = torch_load(path)
            metadata = blob.get("metadata") or {} if isinstance(blob, dict) else {}
            if not isinstance(metadata, dict):
                raise ValueError(f"{path}: its 'metadata' entry is a {type(metadata).__name__}, expected a mapping "
                                 "of names to values")
            metadata = {str(k): str(v) for k, v in metadata.items()}
            if isinstance(blob, dict) and "latents" in blob:
                blob = blob["latents"]
        else:
            raise ValueError(f"{path}: latents must be a .safetensors or .pt file")
    except ValueError:
        raise
    except Exception as e:  # corrupt file: one line, not a pickle traceback
        raise ValueError(f"{path}: cannot read latents ({first_line(e)})") from None
    if isinstance(blob, dict):
        if "latents" in blob:
            blob = blob["latents"]
        elif len(blob) == 1:
            blob = next(iter(blob.values()))
        else:
            raise ValueError(f"{path}: expected one tensor or a 'latents' entry, found keys {sorted(blob)}")
    if not isinstance(blob, torch.Tensor):
        raise ValueError(f"{path}: expected a tensor, found {type(blob).__name__}")
    if blob.layout != torch.strided or not blob.is_floating_point():
        kind = "sparse" if blob.layout != torch.strided else str(blob.dtype).removeprefix("torch.")
        raise ValueError(f"{path}: expected dense floating-point latents, got a {kind} tensor")
    z = blob.float()
    if z.ndim == 4:
        z = z[None]
    if z.ndim != 5 or z.shape[1] != (channels or z.shape[1]):
        hint = ""
        if z.ndim == 5 and z.shape[2] == channels:
            hint = " (is T before C? expected B C T H W)"
        elif z.ndim == 5 and channels == SEMANTIC_CHANNELS:
            hint = (f" ({z.shape[1]}-channel latents of another model? decode them through its VAE: "
                    "decode --source-vae, or CascadeVPipeline.decode_from)")
        c = channels or "C"
        raise ValueError(f"{path}: expected latents ({c}, T, h, w) or (B, {c}, T, h, w), got {tuple(blob.shape)}{hint}")
    if z.numel() == 0:
        raise ValueError(f"{path}: latents {tuple(z.shape)} have a zero-sized dimension")
    if not torch.isfinite(z).all():
        raise ValueError(f"{path}: latents contain NaN or inf values")
    if z.abs().max() > LATENTS_LIMIT:
        raise ValueError(f"{path}: latents reach {z.abs().max().item():.3g}, far beyond any VAE's "
                         f"(|z| <= {LATENTS_LIMIT:g}): a damaged file?")
    return z, metadata


def metadata_fps(metadata: dict[str, str], path: str | Path, default: float = 8.0) -> float:
    """The frame rate a latents file's metadata holds (``save_latents(..., fps=...)``), else ``default``; one line
    naming the file for one that is not a positive number."""
    if "fps" not in metadata:
        return default
    try:
        fps = float(metadata["fps"])
    except ValueError:
        fps = float("nan")
    if not 0 < fps < float("inf"):
        raise ValueError(f"{path}: its metadata's fps {metadata['fps'][:40]!r} is not a positive frame rate "
                         "(give --fps)")
    return fps
