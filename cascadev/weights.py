"""Our models' base (diffusers ``ModelMixin`` + ``ConfigMixin`` over a frozen dataclass config), the
previous format (``config.json`` + ``model.safetensors``), and safe file writes.

Training checkpoints and exports use these helpers, so the formats and the atomic-write rule live in one
place. Loaders for the released formats live beside each model.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file, save_file

from cascadev.config import from_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"  # our previous format, and accelerate's checkpoints


@contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """A temporary file name beside ``path``, renamed onto it when the block ends without error and removed
    otherwise: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)              # as any new file (mkstemp and safetensors make it 0600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path`` (``atomic_path``)."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_json(path: str | Path, data, **dumps_kwargs) -> None:
    """``data`` as indented JSON, atomically (``atomic_write``; missing folders made)."""
    text = json.dumps(data, indent=2, **dumps_kwargs)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


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


# -- diffusers models configured by a frozen dataclass ----------------------------------------------

def fields_of(spec_class: type) -> Callable:
    """Give an ``__init__(self, **fields)`` the signature of ``spec_class``'s fields (names and defaults), so
    ``register_to_config`` records every field and the defaults live in one place: the dataclass."""
    def wrap(init):
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
                   for f in dataclasses.fields(spec_class)]
        init.__signature__ = inspect.Signature(params)
        return init
    return wrap


class DataclassModel(ModelMixin, ConfigMixin):
    """A diffusers model whose config is a frozen dataclass (``spec_class``).

    ``__init__`` takes the dataclass fields as keywords (``@register_to_config @fields_of(spec_class)``), so
    ``model.config`` is diffusers' FrozenDict and ``save_pretrained`` / ``from_pretrained`` are diffusers' own
    (``from_pretrained`` made strict here); ``model.spec`` is the dataclass again, with its derived properties.
    """

    config_name = CONFIG_NAME
    spec_class: type

    def __getattr__(self, name: str):
        # a submodule named like a config field (SemanticEncoder's ``backbone``) is the module: diffusers'
        # __getattr__ would return the field
        modules = self.__dict__.get("_modules", {})
        return modules[name] if name in modules else super().__getattr__(name)

    @property
    def spec(self):
        """The frozen dataclass rebuilt from ``self.config`` (JSON lists normalised by its ``__post_init__``)."""
        return spec_from(self.spec_class, self.config)

    @classmethod
    def from_spec(cls, spec):
        """A fresh model for ``spec`` (the dataclass, or a mapping such as another model's ``config``)."""
        return cls(**dataclasses.asdict(spec_from(cls.spec_class, spec)))

    @staticmethod
    def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Released / previous-format parameter names -> ours (identity unless a model renamed some)."""
        return state_dict

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``, strict: a missing, unexpected or mis-shaped weight is an error
        (diffusers only warns and leaves such parameters randomly initialised)."""
        return_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        problems = [f"{name.replace('_', ' ')}: {', '.join(sorted(map(str, keys)))}"
                    for name, keys in info.items() if keys]
        if problems:
            raise ValueError(f"{pretrained_model_name_or_path} does not fit {cls.__name__}: " + "; ".join(problems))
        return (model, info) if return_info else model

    @classmethod
    def from_folder(cls, folder: str | Path):
        """A model folder in either layout: diffusers' (``save_pretrained``) or the previous one / a training
        checkpoint (config.json + model.safetensors, ``from_legacy_folder``)."""
        folder = Path(folder)
        if (folder / SAFETENSORS_WEIGHTS_NAME).is_file():
            return cls.from_pretrained(folder)
        return cls.from_legacy_folder(folder)

    @classmethod
    def from_legacy_folder(cls, folder: str | Path):
        """Load this project's previous format: ``config.json`` (the dataclass fields; unknown keys such as the
        removed ``attn_backend`` are dropped) + ``model.safetensors`` (keys converted by ``convert_state_dict``),
        strictly; eval mode. A training checkpoint folder (config.json beside accelerate's model.safetensors)
        loads the same way."""
        folder = Path(folder)
        config, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        for path in (config, weights):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: expected a folder with {CONFIG_NAME} + "
                                        f"{WEIGHTS_NAME} (this project's previous format or a training checkpoint)")
        model = cls.from_spec(json.loads(config.read_text()))
        load_state_dict_strict(model, cls.convert_state_dict(load_file(weights)), str(weights))
        return model.eval()


def spec_from(spec_class: type, config: Any):
    """``spec_class`` from a dataclass or a mapping (a model's config, a JSON dict): keys that are not fields
    (diffusers' ``_class_name``, a removed field) are dropped, types are checked."""
    if isinstance(config, spec_class):
        return config
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    names = {f.name for f in dataclasses.fields(spec_class)}
    return from_dict(spec_class, {k: v for k, v in config.items() if k in names})


def save_model_weights(model: DataclassModel, state_dict: dict[str, torch.Tensor], directory: str | Path) -> None:
    """What ``model.save_pretrained(directory)`` writes, with other weights for it (e.g. EMA): its config.json
    and ``state_dict`` as diffusion_pytorch_model.safetensors, so ``from_pretrained`` reads the folder."""
    directory = Path(directory)
    save_state_dict(state_dict, directory / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})
    model.save_config(directory)


def is_hub_id(source: str) -> bool:
    """"owner/name" that is not a path here ("weights/" is a folder, even a missing one)."""
    owner, _, name = source.partition("/")
    return bool(owner) and bool(name) and "/" not in name and not Path(source).exists() and not source.startswith((".", "~"))
