"""Helpers every stage's task shares: seeded initialisation, the frozen semantic encoder, weights from our
folders, and writing what a run exports."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn
from einops import rearrange

from cascadev.config import ConfigError
from cascadev.training.config import TrainConfig
from cascadev.training.data import mix_seed
from cascadev.weights import CONFIG_NAME, save_model_weights


@contextlib.contextmanager
def seeded(seed: int, part: int):
    """Initialise a model from (seed, part) without touching the global RNG: every process and every
    command (train, cache_latents) builds the same random-init weights, whatever else it builds."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(seed, part))
        yield


def load_semantic_encoder(weights: str, config, load_weights: bool, key: str) -> nn.Module:
    """A ``SemanticEncoder``: the released file ("hub", or a path to/holding ``effnet_encoder.safetensors``), our
    formats (a folder with ``config.json``, e.g. ``RUN/final/semantic_encoder`` of a "semantic" run: its own
    config wins over ``config`` but must give as many channels), or random ("random", or ``load_weights`` False)."""
    from cascadev.weights import init_keywords
    from vae.semantic_encoder import SemanticEncoder

    if not load_weights or weights == "random":
        return SemanticEncoder(**config)
    if weights == "hub":
        return SemanticEncoder.from_single_file(None, config)
    if (Path(weights) / CONFIG_NAME).is_file():
        encoder = SemanticEncoder.from_folder(weights)
        channels = config.get("latent_channels", init_keywords(SemanticEncoder)["latent_channels"].default)
        if encoder.config.latent_channels != channels:
            raise ConfigError(f"{key}={weights}: that encoder gives {encoder.config.latent_channels} channels, "
                              f"this config expects {channels}")
        return encoder
    return SemanticEncoder.from_single_file(weights, config)


def build_semantic_encoder(config: TrainConfig, load_weights: bool) -> nn.Module:
    """The frozen semantic encoder of the condition (stages dit and stage_c), in eval mode (running BatchNorm stats)."""
    from vae.semantic_encoder import PRESETS

    c = config.condition
    encoder = load_semantic_encoder(c.semantic_weights, PRESETS[c.semantic_preset], load_weights,
                                    "condition.semantic_weights")
    return encoder.eval().requires_grad_(False)


def init_weights(model: nn.Module, folder: str | Path, key: str, new_condition: bool = False) -> None:
    """Load the weights of a model folder (either layout ``from_folder`` takes) into ``model``, built from this
    run's config. ``new_condition``: ``dit.init_new_condition`` (a DiT trained with another condition)."""
    if not (Path(folder) / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{key}: {Path(folder) / CONFIG_NAME} not found (expected a folder written by "
                                "save_pretrained or a checkpoint of a run)")
    state = type(model).from_folder(folder).state_dict()
    if new_condition:   # DiT: the noisy-latent input channels of the patch embedding kept, the condition's zeroed
        key_w, n = "x_embedder.proj.weight", model.config.latent_channels
        fresh = torch.zeros_like(model.state_dict()[key_w])
        fresh[:, :n] = state[key_w][:, :n]
        state[key_w] = fresh
    model.load_state_dict(state, strict=True)


def encode_frames(encoder: nn.Module, video: torch.Tensor) -> torch.Tensor:
    """A semantic encoder on every frame, differentiably: (B, 3, T, H, W) -> (B, 16, T, H/32, W/32)."""
    latent = encoder(rearrange(video, "b c t h w -> (b t) c h w"))                    # (b t) 16 H/32 W/32
    return rearrange(latent, "(b t) c h w -> b c t h w", b=video.shape[0])


# where a run exports the semantic encoder and the Previewer it trained (stage semantic; stage dit, jointly)
PART_DIRS = {"encoder": "semantic_encoder", "previewer": "previewer"}


def save_module(state_dict: dict, module: nn.Module, folder: Path, prefix: str = "") -> None:
    """``save_pretrained`` of ``module`` with the entries of ``state_dict`` under ``prefix`` (prefix removed): the
    folder its ``from_pretrained`` reads."""
    save_model_weights(module, {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)},
                       folder)


def write_sample(run_dir: Path, step: int, videos: list[torch.Tensor]) -> None:
    """Videos (1, 3, T, H, W) side by side as ``samples/step_N.mp4``."""
    from cascadev.video_io import write_video
    write_video(run_dir / "samples" / f"step_{step:08d}.mp4", torch.cat([v.float() for v in videos], dim=-1))


@torch.no_grad()
def reconstruction_scores(accelerator, model: nn.Module, clips: list[dict], step: int, run_dir: Path,
                          reconstruct) -> dict:
    """PSNR and L1 of ``reconstruct(video) -> (target, output)`` (both (1, 3, T, H, W)) over held-out ``clips``, the
    model in eval mode; the first clip's target beside its output saved as ``samples/step_N.mp4``."""
    from eval.metrics import psnr

    model.eval()
    values, l1 = [], []
    for i, clip in enumerate(clips):
        target, output = reconstruct(clip["video"][None].to(accelerator.device))
        output = output.float().clamp(-1, 1)
        values.append(psnr(output.cpu(), target.cpu()).mean())
        l1.append((output - target).abs().mean().cpu())
        if i == 0 and accelerator.is_main_process:
            write_sample(run_dir, step, [target.cpu(), output.cpu()])
    model.train()
    if not values:
        return {}
    return {"val/psnr": torch.stack(values).mean().item(), "val/l1": torch.stack(l1).mean().item()}


def is_fsdp(accelerator) -> bool:
    """Whether the model is sharded (FSDP)."""
    return accelerator.distributed_type.name == "FSDP"


def draws_samples(accelerator) -> bool:
    """Whether this process runs validation's sampling: the main process; under FSDP every process, since each
    forward of a sharded model is collective (every shard unit gathers its weights from all ranks). The draw is
    seeded the same everywhere, and only the main process writes it."""
    return accelerator.is_main_process or is_fsdp(accelerator)


def export_trained_and_ema(task, final: Path, state_dict: dict, ema_state: dict | None) -> None:
    """Stages dit and vae: the trained weights in ``final/model``, the EMA ones (when on) in ``final/ema``."""
    task.export(state_dict, final / "model")
    if ema_state is not None:
        task.export(ema_state, final / "ema")


def export_for_inference(task, final: Path, state_dict: dict, ema_state: dict | None) -> None:
    """Stages semantic and base: ``final/`` itself is a folder their loaders take, holding the EMA weights when EMA
    is on -- what inference should use -- else the trained ones; with EMA, the trained ones also go to
    ``final/model``."""
    task.export(ema_state if ema_state is not None else state_dict, final)
    if ema_state is not None:
        task.export(state_dict, final / "model")
