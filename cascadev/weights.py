"""Our weight format (``config.json`` + ``model.safetensors``) and safe file writes.

Every model in this project saves and loads through these helpers, so the format and the
atomic-write rule live in one place. Loaders for the released formats live beside each model.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from cascadev.config import from_dict, to_dict

M = TypeVar("M", bound=torch.nn.Module)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)              # as any new file (mkstemp and safetensors make it 0600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Atomically write a safetensors file (tensors made contiguous, shared storage untied)."""
    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` that names every missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(f"{k} {tuple(state_dict[k].shape)} != {tuple(own[k].shape)}"
                    for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {', '.join(shapes)}")
    if problems:
        raise ValueError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True, assign=any(p.is_meta for p in model.parameters()))


def save_pretrained(state_dict: dict[str, torch.Tensor], config: Any, directory: str | Path) -> None:
    """Write ``config.json`` (the frozen dataclass) and ``model.safetensors`` (``state_dict``: a model's own, or
    other weights for it, e.g. EMA) into ``directory``."""
    directory = Path(directory)
    save_state_dict(state_dict, directory / WEIGHTS_NAME)
    text = json.dumps(to_dict(config), indent=2)
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


def load_pretrained_config(config_cls: type, directory: str | Path):
    """Read ``config.json`` of a directory written by ``save_pretrained``."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a directory written by save_pretrained")
    return from_dict(config_cls, json.loads(path.read_text()))


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` in our format for a module with ``self.config`` of ``config_class``."""

    config_class: type

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` + ``model.safetensors``."""
        save_pretrained(self.state_dict(), self.config, directory)

    @classmethod
    def from_pretrained(cls, path: str | Path):
        """Load a directory written by ``save_pretrained`` (or its ``model.safetensors``); eval mode."""
        path = Path(path)
        return load_pretrained(cls, cls.config_class, path.parent if path.is_file() else path)


def load_pretrained(build: Callable[[Any], M], config_cls: type, directory: str | Path) -> M:
    """Build a model with ``build(config)`` from ``directory``'s config.json and load its weights (eval mode)."""
    config = load_pretrained_config(config_cls, directory)
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: expected a directory written by save_pretrained")
    model = build(config)
    load_state_dict_strict(model, load_file(weights), str(weights))
    return model.eval()
