"""Train a stage of the cascade with accelerate: the Stage B DiT ("dit"), the Stage A VAE ("vae"), the Stage B
semantic encoder with the Previewer ("semantic"), the Stage C text-to-video base model ("base"), or a 1-2 step
student of a Stage B DiT ("distill").

    accelerate launch [--config_file configs/accelerate/ddp.yaml] -m cascadev.training.train \\
        --config configs/dit_official_finetune.yaml [--set optim.lr=1e-5 data.videos=list.txt ...]
    python -m cascadev.training.train --config configs/dit_tiny.yaml --set data.videos=clips/ --max-steps 20

``main`` reads top to bottom: config -> inputs (data sources, weight files) -> Accelerator -> models -> run dir
-> prepare -> resume -> loop -> save. Nothing is written before the models are built, so a start that fails
(bad input, weights that do not load) leaves no run directory behind.
What differs between stages (models, loss, validation, export) is a task object from ``cascadev/training/tasks/``
(one module per stage, ``build_task``); this module is what they share: the loop, checkpoints, EMA, LR schedule,
logs and the CLI.

Run directory (``run.dir``): ``config.yaml`` (resolved), ``train.log``, ``logs/`` (TensorBoard),
``samples/`` (validation videos, or latents for base), ``checkpoints/step_XXXXXXXX/`` (accelerate state:
weights and buffers such as BatchNorm running statistics as safetensors, optimizer, RNG, grad scaler; plus
``ema.safetensors`` (EMA weights by parameter name), ``trainer.json`` with the step and the EMA's update
counter, ``config.yaml``; a dit or base checkpoint also has ``config.json``, so it loads with
``VideoDiT`` / ``TextDiT.from_legacy_folder``), and ``final/`` (``export_final``): dit and vae write
``model/`` and ``ema/`` (diffusers folders); semantic writes ``semantic_encoder/`` and ``previewer/``, base
``base_dit/``, ``base_scheduler/`` and ``text_encoder/`` (``load_text_to_video`` reads it with a cascade given
apart: ``cascadev generate --weights RUN/final
--cascade ...``),
with EMA weights when EMA is on and the trained ones in ``model/``; distill writes a cascade folder (the student's DiT
and sampler, ``CascadeVPipeline.from_pretrained``) with its trained DiT in ``model/``.
Checkpoints are written to a temporary folder and renamed; a restarted run continues from the newest.

Determinism: data order and augmentation depend only on (seed, position in the stream), and the noise
of micro-step m on rank r comes from a generator seeded with (seed, m, r), so a resumed run repeats an
uninterrupted one. Rank, world size and device come from the Accelerator only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import logging.handlers
import shutil
import sys
import time
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from cascadev.config import ConfigError, save_config, to_dict
from cascadev.errors import OneLineParser, run_guarded
from cascadev.training.args import add_train_arguments
from cascadev.training.config import TrainConfig, check_cache, check_weight_files, load_train_config
from cascadev.training.data import (IMAGE_EXTENSIONS, ImageDataset, LatentDataset, VideoDataset, image_step,
                                    image_steps_before, list_samples, make_loader, mix_seed, split_validation)
from cascadev.training.tasks import build_task, is_fsdp
from cascadev.video_io import check_output_folder
from cascadev.weights import CascadeModel, atomic_write, save_state_dict, write_json

log = logging.getLogger("cascadev.training.train")

CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer.json"
FINAL_TMP = ".final.tmp"            # the export's folder until it is complete
EMA_WEIGHTS = "ema.safetensors"


# -- final weights ----------------------------------------------------------------------------------

def export_final(task, final: Path, state_dict: dict, ema: dict | None) -> None:
    """Write the final weights. Stages dit and vae: ``final/model`` (trained weights) and ``final/ema`` (EMA
    parameters, the model's buffers). Stages semantic and base: ``final/`` itself is a folder their loaders
    take (semantic_encoder/ + previewer/; base_dit/ + text_encoder/) holding the EMA weights when EMA is on --
    what inference should use -- else the trained ones; with EMA, the trained weights also go to ``final/model/``."""
    ema_state = {**state_dict, **{k: v.cpu() for k, v in ema.items()}} if ema is not None else None
    if task.name == "distill":   # final/: the student's cascade folder (EMA weights when on); final/model/: its DiT
        task.export(ema_state if ema_state is not None else state_dict, final)
        if ema_state is not None:
            task.export_dit(state_dict, final / "model")
        return
    if task.name in ("dit", "vae"):
        task.export(state_dict, final / "model")
        if ema_state is not None:
            task.export(ema_state, final / "ema")
        return
    task.export(ema_state if ema_state is not None else state_dict, final)
    if ema_state is not None:
        task.export(state_dict, final / "model")
    if task.name == "base":   # the frozen text encoder, once (final/model/ shares it), and the objective's sampler
        from cascadev.pipelines.text_to_video import SCHEDULER_DIR, TEXT_ENCODER_DIR, scheduler_for
        task.text_encoder.save_pretrained(final / TEXT_ENCODER_DIR)
        scheduler_for(task.config.diffusion).save_pretrained(final / SCHEDULER_DIR)


# -- small helpers ----------------------------------------------------------------------------------

SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine"}     # optim.schedule -> diffusers' name


def lr_scheduler_at(optimizer, config: TrainConfig, step: int):
    """diffusers' LR schedule positioned at optimizer step ``step``: linear warmup ``k / warmup_steps`` at step k,
    then constant, or cosine to 0 at run.max_steps. A ``LambdaLR`` whose state is the step alone, so a resumed
    run builds it at its checkpoint's step (``last_epoch``) from the config, as an uninterrupted run reaches it."""
    for group in optimizer.param_groups:
        group["initial_lr"] = config.optim.lr                 # the base LR of a LambdaLR built past step 0
    return get_scheduler(SCHEDULES[config.optim.schedule], optimizer, num_warmup_steps=config.optim.warmup_steps,
                         num_training_steps=config.run.max_steps, last_epoch=step - 1)


def make_ema(model: torch.nn.Module, decay: float) -> tuple[EMAModel, list[str]]:
    """diffusers' EMAModel over the parameters that train, with float32 shadow weights whatever the model's dtype, and
    their names. Its warmup: update k (0-based) has decay ``min(decay, (1 + k) / (10 + k))``, except update 0, a plain
    copy (decay 0), so a short run's EMA does not still carry the random init (0.999 ** 3500 = 3%)."""
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ema = EMAModel([p for _, p in trained], decay=decay, foreach=True)
    ema.to(dtype=torch.float32)
    return ema, [n for n, _ in trained]


def ema_weights(ema: EMAModel, names: list[str]) -> dict[str, torch.Tensor]:
    """The EMA's shadow parameters by name (``names``: the trained parameters, in the order the EMA holds them)."""
    return dict(zip(names, ema.shadow_params, strict=True))


def load_ema_weights(ema: EMAModel, names: list[str], path: Path) -> None:
    """Shadow parameters from ``ema.safetensors`` (keyed by parameter name), as float32 on their current device."""
    from safetensors.torch import load_file
    saved = load_file(str(path))
    missing = [n for n in names if n not in saved]
    if missing:
        raise ValueError(f"{path} has no EMA weights for {len(missing)} trained parameter(s), e.g. {missing[0]}")
    ema.shadow_params = [saved[n].to(device=s.device, dtype=torch.float32) for n, s in zip(names, ema.shadow_params)]


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with trainer.json) under ``root``, oldest first."""
    found = []
    for path in root.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
        if suffix.isdigit() and (path / TRAINER_STATE).is_file():
            found.append((int(suffix), path))
    return sorted(found)


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
            if ema is not None:
                save_state_dict(ema, tmp / EMA_WEIGHTS)
            save_config(config, tmp / "config.yaml")
            if task.name in ("dit", "base", "distill") and isinstance(task.model, CascadeModel):  # VideoDiT / TextDiT
                task.model.save_config(tmp)                                   # folder (not a DiffusionAutoencoder)
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


LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")


def setup_logging(main_process: bool) -> None:
    """INFO on the main process (console, and ``train.log`` from ``open_run_dir``), warnings only elsewhere. Until
    the run dir is opened the main process holds its records in memory: a start that fails writes no train.log.
    Replaces the handlers of an earlier run in this process, so none of its records go to that run's train.log."""
    logger = logging.getLogger("cascadev")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.INFO if main_process else logging.WARNING)
    logger.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(LOG_FORMAT)
    logger.addHandler(console)
    if main_process:
        logger.addHandler(logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1))


def open_run_dir(accelerator, run_dir: Path, config: TrainConfig, superseded: list[Path], why: str) -> None:
    """The run's first writes, once its inputs are checked and its models built: the folder, ``train.log`` (with
    what was logged so far), leftovers of a killed run removed, superseded checkpoints set aside, ``config.yaml``."""
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        logger = logging.getLogger("cascadev")
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(LOG_FORMAT)
        for held in [h for h in logger.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
            held.setTarget(file)
            held.flush()
            logger.removeHandler(held)
            held.close()
        logger.addHandler(file)
        ckpt_root = run_dir / "checkpoints"
        for stale in [*ckpt_root.glob(f".tmp_{CHECKPOINT_PREFIX}*"), run_dir / FINAL_TMP]:   # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        set_aside(superseded, ckpt_root, why)
        atomic_write(run_dir / "config.yaml", lambda tmp: save_config(config, tmp))
    accelerator.wait_for_everyone()


def open_data(config: TrainConfig) -> tuple:
    """(training set, validation set, image set or None, warnings): the data sources checked -- lists readable,
    a cache matching the config -- before anything is built or written."""
    data, notes = config.data, []
    if data.latents:
        if config.stage not in ("dit", "base", "distill"):
            raise ConfigError("data.latents (a latent cache) only feeds stages dit, distill and base")
        check_cache(data.latents, config)
        train_set = LatentDataset(data.latents)
        val_samples = split_validation(data)[1] if data.videos or data.val_videos else []
    else:
        train_samples, val_samples = split_validation(data)
        train_set = VideoDataset(train_samples, data)
        if config.stage == "base" and not any(sample.caption for sample in train_samples):
            notes.append("stage base: no training video has a caption (give data.videos as a .csv/.jsonl/.json with "
                         "a 'caption' field); the model learns unconditional generation only")
    image_set = (ImageDataset(list_samples(data.images, IMAGE_EXTENSIONS, key="data.images"), data)
                 if data.images else None)
    val_set = VideoDataset(val_samples, data, train=False) if val_samples and config.run.val_every else []
    return train_set, val_set, image_set, notes


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
MODEL_SECTION = {"dit": "dit.", "base": "base.", "vae": "stage_a.", "semantic": "semantic.", "distill": "dit."}


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


def set_aside(paths: list[Path], root: Path, why: str) -> None:
    """Move checkpoints out of the way (into ``root/why-TIME/``): resuming never finds them, nothing is deleted."""
    if not paths:
        return
    folder = root / f"{why}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True)
    for path in paths:
        path.rename(folder / path.name)
    log.info("moved %d checkpoint(s) to %s", len(paths), folder)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m cascadev.training.train", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an internal error")
    return parser.parse_args(argv)


# -- the script -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> Path:
    """Train as the config says (``argv`` as on the command line); returns the run directory."""
    return run_training(parse_args(argv))


def run_training(args: argparse.Namespace) -> Path:
    """The training script, from parsed arguments (``cascadev train`` calls this)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    # an earlier run in this process (tests, notebooks) leaves its train.log attached: detach it until the
    # Accelerator says whether this process logs (a PartialState made here would miss accelerate's settings)
    setup_logging(main_process=False)
    # -- config
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"run.max_steps={args.max_steps}")
    if args.run_dir is not None:
        overrides.append(f"run.dir={args.run_dir}")
    config = load_train_config(args.config, overrides)
    run, data, optim = config.run, config.data, config.optim
    run_dir = Path(run.dir)
    ckpt_root = run_dir / "checkpoints"
    found = checkpoints(ckpt_root)
    fresh, resume_from = args.fresh, args.resume_from
    if resume_from is not None and resume_from not in dict(found):
        raise ConfigError(f"--resume-from {resume_from}: no complete checkpoint of that step in {ckpt_root} "
                          f"(have: {[s for s, _ in found] or 'none'})")
    superseded = [p for s, p in found if fresh or (resume_from is not None and s > resume_from)]
    found = [(s, p) for s, p in found if p not in superseded]
    changed = None
    if found:      # before anything is written or built: the checkpoint must be this model
        changed = check_resume(found[-1][1], config, args.allow_config_change)

    # -- inputs: data sources and weight files, before anything is built or written (a bad start leaves nothing)
    check_output_folder(run_dir, "run.dir")
    train_set, val_set, image_set, notes = open_data(config)
    check_weight_files(config)
    if isinstance(train_set, VideoDataset):
        train_set.check_loadable()                           # decodes clips: after the checks that only look

    # -- Accelerator: rank, world size, device, mixed precision, trackers
    # VAE: a trainable pattern may select parameters the forward never uses (diffusers' temporal mid-block skips
    # its attention with one layer per block), which plain DDP refuses
    ddp = DistributedDataParallelKwargs(find_unused_parameters=config.stage == "vae")
    accelerator = Accelerator(mixed_precision=run.mixed_precision, log_with="tensorboard" if run.tensorboard else None,
                              project_config=ProjectConfiguration(project_dir=str(run_dir),
                                                                  logging_dir=str(run_dir / "logs")),
                              kwargs_handlers=[ddp])
    if optim.ema_decay > 0 and is_fsdp(accelerator):
        raise ConfigError("EMA over FSDP shards is not supported: set optim.ema_decay=0 (or use DDP)")
    setup_logging(accelerator.is_main_process)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    log.info("stage %s on %d process(es), device %s, mixed precision %s, run dir %s",
             config.stage, world, device, run.mixed_precision, run_dir)
    if changed:
        log.warning("resuming with a changed config: %s", changed)
    set_seed(run.seed)                                       # the same initial weights on every rank

    # -- models (weights from the hub or files may still fail to load: the run dir is not written before they are)
    task = build_task(config).to(device)
    model = task.model
    log.info("%s: %.2fM parameters, %.2fM trained", type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6,
             sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6)
    ema, ema_names = make_ema(model, optim.ema_decay) if optim.ema_decay > 0 else (None, [])
    open_run_dir(accelerator, run_dir, config, superseded, "replaced" if fresh else f"after-{resume_from}")

    # -- data
    for note in notes:
        log.warning(note)
    log.info("data: %d training %s, %d validation clip(s)%s", len(train_set), train_set.kind + "s", len(val_set),
             f", {len(image_set)} images (p={data.image_prob})" if image_set else "")

    # -- prepare: DDP / FSDP wrapping, device placement, autocast, grad scaler (model first, as FSDP needs)
    prepared = {"model": accelerator.prepare(model)}
    params = [p for p in prepared["model"].parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                  weight_decay=optim.weight_decay)
    prepared["optimizer"] = accelerator.prepare(optimizer)
    if task.discriminator is not None:
        prepared["discriminator"] = accelerator.prepare(task.discriminator)
        d_opt = torch.optim.AdamW(prepared["discriminator"].parameters(), lr=config.vae.disc_lr, betas=(0.5, 0.9))
        prepared["d_optimizer"] = accelerator.prepare(d_opt)
    if run.tensorboard:
        accelerator.init_trackers("tb", config=flat_config(config))

    # -- resume from the newest complete checkpoint (or --resume-from's)
    step, state = 0, {"skipped": 0}
    if found:
        step, path = found[-1]
        accelerator.load_state(str(path))
        state = json.loads((path / TRAINER_STATE).read_text())
        if ema is not None and (path / EMA_WEIGHTS).is_file():
            load_ema_weights(ema, ema_names, path / EMA_WEIGHTS)
            ema.optimization_step = state.get("ema_step", step)   # older checkpoints: one update per step before
        log.info("resumed from %s (step %d)", path, step)

    lr_scheduler = lr_scheduler_at(optimizer, config, step)      # on the optimizer the prepared one wraps

    # data streams continue where the consumed micro-batches leave them
    micro_done = step * optim.grad_accum
    image_batches = image_steps_before(run.seed, micro_done, data.image_prob) if image_set else 0
    video_iter = make_loader(train_set, data.batch_size, run.seed, rank, world, micro_done - image_batches,
                             data.num_workers)
    image_iter = (make_loader(image_set, data.images_per_batch, run.seed + 1, rank, world, image_batches,
                              data.num_workers) if image_set else None)
    val_clips = [val_set[i] for i in range(len(val_set))]     # {"video": (3, T, H, W), "caption"}

    # -- loop
    progress = tqdm(total=run.max_steps, initial=step, disable=not accelerator.is_main_process, desc="train",
                    dynamic_ncols=True)
    sums: dict[str, float] = {}
    counted, tic, samples_seen, frames_seen = 0, time.perf_counter(), 0, 0
    while step < run.max_steps:
        for micro in range(optim.grad_accum):
            m = step * optim.grad_accum + micro
            as_images = image_step(run.seed, m, data.image_prob)
            batch = next(image_iter if as_images and image_iter is not None else video_iter)
            state["skipped"] += batch["skipped"]
            generator = torch.Generator(device).manual_seed(mix_seed(run.seed, m, rank, 2))
            sync = micro == optim.grad_accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(prepared["model"]):
                logs = task.micro_step(accelerator, prepared, batch, generator, as_images, step, optim.grad_accum)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v) / optim.grad_accum
            first = next(v for k, v in batch.items() if isinstance(v, torch.Tensor))
            samples_seen += first.shape[0] * world
            frames_seen += first.shape[0] * first.shape[2] * world
        lr = lr_scheduler.get_last_lr()[0]
        grad_norm = accelerator.clip_grad_norm_(params, optim.grad_clip if optim.grad_clip > 0 else float("inf"))
        for key in ("optimizer", "d_optimizer"):
            if key in prepared:
                prepared[key].step()
                prepared[key].zero_grad(set_to_none=True)
        lr_scheduler.step()                                   # every step, skipped (fp16 overflow) ones too
        if ema is not None and accelerator.optimizer_step_was_skipped:
            ema.optimization_step += 1                        # no update, but the warmup counts the step
        elif ema is not None:
            ema.step(p for p in accelerator.unwrap_model(prepared["model"]).parameters() if p.requires_grad)
        step += 1
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
        counted += 1
        progress.update(1)

        if step % run.log_every == 0 or step == run.max_steps:
            means = {k: v / counted for k, v in sums.items()}
            means = {k: accelerator.reduce(torch.tensor(v, device=device), "mean").item() for k, v in means.items()}
            skipped = int(accelerator.reduce(torch.tensor(state["skipped"], device=device), "sum").item())
            elapsed = time.perf_counter() - tic
            means.update({"lr": lr, "samples_per_s": samples_seen / elapsed, "frames_per_s": frames_seen / elapsed,
                          "data/skipped": skipped})
            accelerator.log({f"train/{k}" if "/" not in k else k: v for k, v in means.items()}, step=step)
            progress.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{lr:.2e}")
            log.info("step %d  %s", step, "  ".join(f"{k} {v:.4g}" for k, v in means.items()))
            sums, counted, tic, samples_seen, frames_seen = {}, 0, time.perf_counter(), 0, 0
        if val_clips and (step % run.val_every == 0 or step == run.max_steps):
            val_logs = task.validate(accelerator, prepared, val_clips, step, run_dir)
            accelerator.log(val_logs, step=step)
            log.info("step %d  validation  %s", step, "  ".join(f"{k} {v:.4g}" for k, v in val_logs.items()))
        if step % run.save_every == 0 or step == run.max_steps:
            if ema is not None:
                state["ema_step"] = ema.optimization_step
            ema_state = ema_weights(ema, ema_names) if ema is not None else None
            path = save_checkpoint(accelerator, ckpt_root, step, state, ema_state, task, config, run.keep_checkpoints)
            log.info("saved %s", path)
    progress.close()

    # -- save: final weights (and EMA) in our formats (``export_final``)
    state_dict = accelerator.get_state_dict(prepared["model"])
    if accelerator.is_main_process:       # written beside, then renamed: a killed export leaves no half final/
        final, tmp = run_dir / "final", run_dir / FINAL_TMP
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            export_final(task, tmp, state_dict, ema_weights(ema, ema_names) if ema is not None else None)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(f"could not write the final weights to {final}: {e.strerror or e}") from None
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        log.info("final weights in %s", final)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    del video_iter, image_iter
    return run_dir


if __name__ == "__main__":
    args = parse_args(None)
    run_guarded("cascadev.training.train", lambda: run_training(args), args.debug)
