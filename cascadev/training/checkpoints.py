"""A training run's checkpoints: written atomically (``save_checkpoint``), found and checked before a run resumes
(``checkpoints``, ``checkpoint_problem``, ``check_resume``, ``check_sharding``), set aside rather than deleted, and
the EMA's part of them (``ema.safetensors``, whole weights by parameter name, whatever the sharding).

A checkpoint is ``checkpoints/step_XXXXXXXX/``: accelerate's state (weights, optimizer, RNG, grad scaler; sharded
under FSDP), ``ema.safetensors``, ``trainer.json`` (the step and the EMA's update counter), ``config.yaml`` and, for
the DiT stages, the model's ``config.json``. ``cascadev.training.train`` runs the loop that writes them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

from cascadev.config import ConfigError, save_config, to_dict
from cascadev.errors import first_line
from cascadev.training.config import TrainConfig, load_train_config
from cascadev.weights import save_state_dict, write_json

log = logging.getLogger("cascadev.training.checkpoints")

CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer.json"
EMA_WEIGHTS = "ema.safetensors"


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with trainer.json) under ``root``, oldest first."""
    found = []
    for path in root.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
        if suffix.isdigit() and (path / TRAINER_STATE).is_file():
            found.append((int(suffix), path))
    return sorted(found)


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed, naming the file (cut short, overwritten, not what it
    should be: a bad disk, a partial copy), or None. Every file is read once: safetensors whole (and their values
    finite), accelerate's torch archives against their CRCs, the JSON and the config."""
    import zipfile

    from safetensors.torch import load_file

    for file in sorted(f for f in path.iterdir() if f.is_file()):
        try:
            if file.suffix == ".safetensors":
                if not all(t.isfinite().all() for t in load_file(str(file)).values() if t.is_floating_point()):
                    return f"{file} holds NaN or inf values"
            elif file.suffix in (".bin", ".pt", ".pth", ".pkl"):          # torch.save archives (zip)
                with zipfile.ZipFile(file) as archive:
                    if (bad := archive.testzip()) is not None:
                        return f"{file} is damaged (its part {bad} does not match its checksum)"
            elif file.suffix == ".json" and not isinstance(json.loads(file.read_text()), dict):
                return f"{file} is not a JSON object"
            elif file.name == "config.yaml":
                load_train_config(file)
        except Exception as e:      # whatever a damaged file makes its reader raise
            return f"{file} is damaged ({first_line(e)})"
    return None


def save_checkpoint(accelerator, root: Path, step: int, state: dict, ema: dict | None, task, config: TrainConfig,
                    keep: int) -> Path:
    """accelerate state + EMA + trainer state + config into a temp folder, renamed to ``step_N`` when complete."""
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = root / f".tmp_{CHECKPOINT_PREFIX}{step:08d}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))                     # every rank: weights, optimizer, RNG, scaler
        # save_state ends without a barrier: every rank's RNG file must be in tmp before the main process renames it
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            umask = os.umask(0o022)
            os.umask(umask)
            for file in tmp.iterdir():       # accelerate's safetensors files are 0600, beside 0644 ones
                file.chmod(0o666 & ~umask)
            if ema is not None:
                save_state_dict(ema, tmp / EMA_WEIGHTS)
            save_config(config, tmp / "config.yaml")
            task.save_model_config(tmp)                   # dit, base, distill: config.json (VideoDiT / TextDiT)
            write_json(tmp / TRAINER_STATE, {**state, "step": step})
    except OSError as e:       # a full disk, no permission: one line, and no half checkpoint left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"could not write checkpoint {final}: {e.strerror or e}") from None
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep:
            for _, old in checkpoints(root)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def flat_config(config: TrainConfig) -> dict:
    """The config as flat scalar hparams for TensorBoard."""
    out = {}
    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = value if isinstance(value, (int, float, str, bool)) else str(value)
    walk("", to_dict(config))
    return out


# what may change between a run and its resumption without a word: how long, how often, where, how many workers
FREE_ON_RESUME = ("run.max_steps", "run.dir", "run.log_every", "run.save_every", "run.keep_checkpoints",
                  "run.val_every", "run.tensorboard", "data.num_workers")
# the trained model's section
MODEL_SECTION = {"dit": "dit.", "stage_c": "base.", "stage_a": "stage_a.", "semantic": "semantic.", "distill": "dit."}


def config_changes(saved: TrainConfig, new: TrainConfig) -> dict[str, tuple]:
    """Config keys whose value differs between a checkpoint's config and this run's: {key: (saved, new)}."""
    old, cur = flat_config(saved), flat_config(new)
    return {k: (old.get(k), cur.get(k)) for k in sorted(set(old) | set(cur))
            if old.get(k) != cur.get(k) and k not in FREE_ON_RESUME}


def check_resume(checkpoint: Path, config: TrainConfig, allow_change: bool) -> str | None:
    """Refuse to resume ``checkpoint`` into another model; any other config change only with ``allow_change``.
    Returns the changes allowed, listed, for the run to log (None: none)."""
    if not (checkpoint / "config.yaml").is_file():
        return None
    changes = config_changes(load_train_config(checkpoint / "config.yaml"), config)
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:6])
    model = [k for k in changes if k == "stage" or k.startswith(MODEL_SECTION.get(config.stage, "-"))]
    if model:
        raise ConfigError(f"{checkpoint} was trained as another model ({listed}): use another run.dir, or --fresh "
                          "to start over here")
    if changes and not allow_change:
        raise ConfigError(f"the config changed since {checkpoint} ({listed}): resume anyway with "
                          "--allow-config-change, or start over with --fresh")
    return listed if changes else None


def check_sharding(checkpoint: Path, fsdp: bool) -> None:
    """Refuse to resume a DDP checkpoint under FSDP or an FSDP one (sharded model and optimizer) under DDP: accelerate
    would fail deep inside torch. The EMA (ema.safetensors, whole) would resume either way."""
    sharded = any(checkpoint.glob("pytorch_model_fsdp*"))      # accelerate's name for an FSDP model's state
    if sharded and not fsdp:
        raise ConfigError(f"{checkpoint} was written under FSDP (sharded), this run is not: launch it with an FSDP "
                          "accelerate config (configs/accelerate/fsdp.yaml), or start over with --fresh")
    if fsdp and not sharded:
        raise ConfigError(f"{checkpoint} was written without FSDP (whole weights), this run is under FSDP: launch it "
                          "as it was written (configs/accelerate/ddp.yaml), or start over with --fresh")


def set_aside(paths: list[Path], root: Path, why: str) -> None:
    """Move checkpoints out of the way (into ``root/why-TIME/``): resuming never finds them, nothing is deleted."""
    if not paths:
        return
    folder = root / f"{why}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True)
    for path in paths:
        path.rename(folder / path.name)
    log.info("moved %d checkpoint(s) to %s", len(paths), folder)


# -- the EMA's part: whole weights by parameter name ------------------------------------------------

def ema_weights(ema: EMAModel, names: list[str], keep: bool = True) -> dict[str, torch.Tensor]:
    """The EMA's shadow parameters by name (``names``: the trained parameters, in the order the EMA holds them), whole
    and on the CPU. Sharded ones (FSDP2) are gathered one at a time: every rank must call this; those with ``keep``
    False get {} and never hold more than one whole parameter."""
    from torch.distributed.tensor import DTensor

    whole = {}
    for name, shadow in zip(names, ema.shadow_params, strict=True):
        tensor = shadow.full_tensor() if isinstance(shadow, DTensor) else shadow        # all-gather of its shards
        if keep:
            whole[name] = tensor.cpu()
    return whole


def load_ema_weights(ema: EMAModel, names: list[str], path: Path) -> None:
    """Shadow parameters from ``ema.safetensors`` (keyed by parameter name, whole), as float32 on their current
    device; sharded ones (FSDP2) keep this rank's shard: the file is the same whatever the number of processes."""
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor, distribute_tensor

    saved = load_file(str(path))
    missing = [n for n in names if n not in saved]
    if missing:
        raise ValueError(f"{path} has no EMA weights for {len(missing)} trained parameter(s), e.g. {missing[0]}")
    shadows = []
    for name, shadow in zip(names, ema.shadow_params):
        if isinstance(shadow, DTensor):
            mesh = shadow.device_mesh
            whole = saved[name].to(device=mesh.device_type, dtype=torch.float32)
            shadows.append(distribute_tensor(whole, mesh, shadow.placements, src_data_rank=None))  # local slice
        else:
            shadows.append(saved[name].to(device=shadow.device, dtype=torch.float32))
    ema.shadow_params = shadows
