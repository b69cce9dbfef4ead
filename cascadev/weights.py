"""Our models' base (diffusers ``ModelMixin`` + ``ConfigMixin``) and preset factory, the
previous format (``config.json`` + ``model.safetensors``), and safe file writes.

Training checkpoints and exports use these helpers, so the formats and the atomic-write rule live in one
place. Loaders for the released formats live beside each model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import math
import os
import re
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file, save_file

from cascadev.errors import first_line

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"  # our previous format, and accelerate's checkpoints


# -- safe file writes: a temporary file beside the target, renamed onto it -------------------------------

# A temp file is ".NAME.<machine>-<pid>.XXXXXXXX.tmp": the machine (a hash of the host name and, on Linux, the pid
# namespace, so two containers are two machines) and the process writing it. A killed run leaves it behind; the next
# write to that folder removes it when its writer is surely gone: on this machine, a pid that no longer runs (a live
# one, even a reused pid, keeps it); from another machine on a shared disk, whose pids cannot be asked, a file
# untouched for STALE_TEMP_AGE_S (writers touch theirs at every piece, and no piece of ours takes a day). Files
# without the writer's mark (older versions' ".NAME.XXXXXXXX.tmp", or another tool's) are never touched: they
# cannot be told apart.
STALE_TEMP_AGE_S = 24 * 3600
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<machine>[0-9a-f]{8})-(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp$")
_swept: set[Path] = set()          # folders this process cleaned (once each: cache-latents writes thousands of files)


@functools.cache
def _machine() -> str:
    """This machine's short id in temp names: the host name and the pid namespace (two containers differ)."""
    namespace = ""
    with contextlib.suppress(OSError):
        namespace = os.readlink("/proc/self/ns/pid")
    return hashlib.blake2s(f"{socket.gethostname()}|{namespace}".encode(), digest_size=4).hexdigest()


def temp_prefix(path: Path) -> str:
    """``mkstemp``'s prefix for a temp file of ``path`` written by this process (``remove_stale_temp_files``)."""
    return f".{path.name}.{_machine()}-{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                 # EPERM: another user's live process
        return True
    return True


def is_stale_temp_file(path: Path, now: float | None = None) -> bool:
    """Whether ``path`` is a temp file of ours whose writer is gone (the rule above ``STALE_TEMP_AGE_S``)."""
    match = _TEMP_NAME.match(path.name)
    if match is None or not path.is_file():
        return False
    if match["machine"] == _machine():
        return not _alive(int(match["pid"]))
    try:
        age = (now or time.time()) - path.stat().st_mtime
    except OSError:
        return False
    return age > STALE_TEMP_AGE_S


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temp files of killed writers in ``folder`` (``is_stale_temp_file``); returns them. Nothing else
    is touched, and a file another process removes meanwhile is skipped."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in Path(folder).iterdir():
            if entry.name.endswith(".tmp") and is_stale_temp_file(entry):
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed.append(entry)
    return removed


def _as_users_path(e: Exception, path: Path) -> OSError | None:
    """``e`` (an OS error, or PyAV's that carry a file name) as an ``OSError`` naming the user's ``path`` where it named
    our temp file for it (or the rename onto it), "[Errno 13] Permission denied: 'PATH'"; None where it did not."""
    def ours(name) -> bool:
        name = Path(os.fsdecode(name)) if isinstance(name, (str, bytes, os.PathLike)) else None
        return name is not None and name.name.startswith(f".{path.name}.") and name.name.endswith(".tmp")
    if not (ours(getattr(e, "filename", None)) or ours(getattr(e, "filename2", None))):
        return None
    errno, why = getattr(e, "errno", None), getattr(e, "strerror", None) or type(e).__name__
    return OSError(errno, why, str(path)) if errno is not None else OSError(f"{why}: {path}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """A temporary file name beside ``path``, renamed onto it when the block ends without error and removed
    otherwise: readers never see a half-written file. The first write to a folder removes the temp files killed
    runs left there (``remove_stale_temp_files``); an OS error names ``path``, not the temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent.resolve() not in _swept:
        _swept.add(path.parent.resolve())
        remove_stale_temp_files(path.parent)
    tmp = ""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
        os.close(fd)
        yield tmp
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)              # as any new file (mkstemp and safetensors make it 0600)
        os.replace(tmp, path)
    except Exception as e:
        if (named := _as_users_path(e, path)) is None:
            raise
        raise named from None
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path`` (``atomic_path``)."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_json(path: str | Path, data, **dumps_kwargs) -> None:
    """``data`` as indented JSON, atomically (``atomic_write``; missing folders made)."""
    text = json.dumps(data, indent=2, **dumps_kwargs)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_json_object(path: str | Path, what: str) -> dict:
    """The JSON object in the file ``path``; a file that is not one (bytes, another JSON type) is one line naming it
    as ``what`` it should be ("a model config")."""
    try:
        data = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not {what} ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not {what} (a JSON {type(data).__name__}, not an object)")
    return data


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Atomically write a safetensors file (tensors made contiguous, shared storage untied)."""
    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


KEYS_NAMED = 4     # keys of each kind an error names; a wrong file would list hundreds


def torch_load(path: str | Path):
    """``torch.load(path)`` onto the CPU with ``weights_only=True`` (no code in a pickle runs), without the notices
    torch prints about the file's own format (a pickle protocol it does not expect, sparse tensors it validates): the
    caller accepts or refuses what it reads in one line of its own."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning,
                                module=r"torch\.(serialization|_weights_only_unpickler)")
        return torch.load(path, map_location="cpu", weights_only=True)


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                           expected: str | None = None) -> None:
    """``load_state_dict(strict=True)`` that names the missing, unexpected or mis-shaped keys (the first few of each
    kind and how many more) in one line: "{source} does not fit {expected or the model's class}: ..."."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(f"{k} {tuple(state_dict[k].shape)} != {tuple(own[k].shape)}"
                    for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    problems = [f"{kind}: {', '.join(keys[:KEYS_NAMED])}" + (f" (+{len(keys) - KEYS_NAMED} more)"
                                                               if len(keys) > KEYS_NAMED else "")
                for kind, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("shape mismatch", shapes)) if keys]
    if problems:
        raise ValueError(f"{source} does not fit {expected or type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True, assign=any(p.is_meta for p in model.parameters()))


# -- our diffusers models: the config is the ``@register_to_config`` keywords of ``__init__`` --------------

def build_preset(cls: type, presets: dict[str, dict], preset: str, what: str, **overrides):
    """``cls(**presets[preset], **overrides)``: the one preset factory of every model (presets are plain dicts
    of ``__init__`` keywords, as DiT's ``DiT_XL_2``); an unknown name is a one-line ValueError."""
    if preset not in presets:
        raise ValueError(f"unknown {what} preset {preset!r}; choose from {sorted(presets)}")
    return cls(**{**presets[preset], **overrides})


def init_keywords(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword arguments of ``cls.__init__`` (the model's config fields), by name."""
    return {name: p for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"}


class CascadeModel(ModelMixin, ConfigMixin):
    """A diffusers model of this project: its config is its ``@register_to_config`` ``__init__`` keywords.

    ``save_pretrained`` / ``from_pretrained`` are diffusers' own (``from_pretrained`` made strict here);
    ``legacy_config_keys`` maps config keys a model renamed (old saved configs keep loading); the previous
    folder format (config.json + model.safetensors) loads with ``from_legacy_folder``.
    """

    config_name = CONFIG_NAME
    legacy_config_keys: dict[str, str] = {}   # old config key -> its new name

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # every config diffusers reads (from_config, from_pretrained) passes here: rename the old keys
        config_dict = {cls.legacy_config_keys.get(k, k): v for k, v in config_dict.items()}
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def from_config_dict(cls, config: dict):
        """A fresh model for a mapping of config keys (another model's ``config``, a JSON dict): keys that are
        not ``__init__`` keywords (diffusers' ``_class_name``, a removed field) are dropped, renamed ones mapped."""
        names = init_keywords(cls)
        config = {cls.legacy_config_keys.get(k, k): v for k, v in config.items()}
        return cls(**{k: v for k, v in config.items() if k in names})

    @staticmethod
    def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Released / previous-format parameter names -> ours (identity unless a model renamed some)."""
        return state_dict

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``, strict: a missing, unexpected or mis-shaped weight is an error
        (diffusers only warns and leaves such parameters randomly initialised)."""
        return_info = kwargs.pop("output_loading_info", False)
        where = Path(str(pretrained_model_name_or_path)) / (kwargs.get("subfolder") or "")
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        except OSError:
            raise
        except (TypeError, ValueError, ArithmeticError, RuntimeError, LookupError) as e:
            # a config.json of wrong types or impossible sizes, weights of other shapes: one line naming the folder
            raise ValueError(f"{where}: its config.json and weights do not make a {cls.__name__} "
                             f"({first_line(e)})") from None
        problems = [f"{name.replace('_', ' ')}: {', '.join(sorted(map(str, keys)))}"
                    for name, keys in info.items() if keys]
        if problems:
            raise ValueError(f"{pretrained_model_name_or_path} does not fit {cls.__name__}: " + "; ".join(problems))
        check_finite(model, where)
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
        """Load this project's previous format: ``config.json`` (the config keys; unknown keys such as the
        removed ``attn_backend`` are dropped) + ``model.safetensors`` (keys converted by ``convert_state_dict``),
        strictly; eval mode. A training checkpoint folder (config.json beside accelerate's model.safetensors)
        loads the same way."""
        folder = Path(folder)
        config, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        for path in (config, weights):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: expected a folder with {CONFIG_NAME} + "
                                        f"{WEIGHTS_NAME} (this project's previous format or a training checkpoint)")
        config_dict = read_json_object(config, "a model config")
        try:
            model = cls.from_config_dict(config_dict)
        except (TypeError, ValueError, ArithmeticError, RuntimeError, LookupError) as e:
            raise ValueError(f"{config}: does not make a {cls.__name__} ({first_line(e)})") from None
        try:
            state_dict = load_file(weights)
        except Exception as e:          # safetensors' own error type: a cut or overwritten file
            raise ValueError(f"{weights}: not a readable safetensors file ({first_line(e)})") from None
        load_state_dict_strict(model, cls.convert_state_dict(state_dict), str(weights))
        check_finite(model, folder)
        return model.eval()


# no trained weight comes near fp16's largest value (these models run in fp16 / bf16): beyond it, a damaged file
WEIGHT_LIMIT = torch.finfo(torch.float16).max


def check_finite(model: CascadeModel, where: str | Path) -> None:
    """Refuse a model whose config holds NaN or inf, or whose weights hold NaN, inf or values beyond
    ``WEIGHT_LIMIT`` (a damaged file), which would only show as a NaN output after a whole decode."""
    bad = [f"config {k}" for k, v in model.config.items() if isinstance(v, float) and not math.isfinite(v)]
    bad += [f"weight {n}" for n, p in model.named_parameters()
            if p.is_floating_point() and not p.is_meta and not (p.abs() <= WEIGHT_LIMIT).all()]   # NaN: False
    if bad:
        raise ValueError(f"{where}: {bad[0]} holds NaN, inf or values beyond {WEIGHT_LIMIT:g} (a damaged file?)"
                         + (f"; and {len(bad) - 1} more" if bad[1:] else ""))


def save_model_weights(model: CascadeModel, state_dict: dict[str, torch.Tensor], directory: str | Path) -> None:
    """What ``model.save_pretrained(directory)`` writes, with other weights for it (e.g. EMA): its config.json
    and ``state_dict`` as diffusion_pytorch_model.safetensors, so ``from_pretrained`` reads the folder."""
    directory = Path(directory)
    save_state_dict(state_dict, directory / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})
    model.save_config(directory)


def offline_if_unreachable(timeout_s: float = 5.0) -> bool:
    """Whether the Hugging Face hub is out of reach (no network, no DNS, a firewall; or ``HF_HUB_OFFLINE`` set), asked
    once, without retries; if so, huggingface_hub is put in offline mode for this process: loaders read its cache
    and fail at once where it lacks a file, instead of retrying each file for 30 s (on every process of a launch)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return True
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout_s)
    except Exception:        # whichever HTTP client's error: not reachable
        constants.HF_HUB_OFFLINE = True
        return True
    return False


def is_hub_id(source: str) -> bool:
    """"owner/name" that is not a path here ("weights/" is a folder, even a missing one)."""
    owner, _, name = source.partition("/")
    return (bool(owner) and bool(name) and "/" not in name and not Path(source).exists()
            and not source.startswith((".", "~")))
