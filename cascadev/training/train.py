"""Train a stage of the cascade with accelerate: the Stage B DiT ("dit"), the Stage A VAE ("stage_a"), the Stage B
semantic encoder with the Previewer ("semantic"), the Stage C text-to-video base model ("stage_c"), or a 1-2 step
student of a Stage B DiT ("distill").

    accelerate launch [--config_file configs/accelerate/ddp.yaml] -m cascadev.training.train \\
        --config configs/dit_official_finetune.yaml [--set optim.lr=1e-5 data.videos=list.txt ...]
    python -m cascadev.training.train --config configs/dit_tiny.yaml --set data.videos=clips/ --max-steps 20

From Python: ``train(config, overrides=..., max_steps=...)`` (``cascadev.training.train``), which reads top to
bottom in phases: ``prepare_run`` (config, the checkpoint to resume, inputs: data sources, weight files) ->
``build`` (Accelerator, models, run dir, prepare, optimizers) -> ``resume`` -> ``loop`` -> ``export``. ``main`` is
the command line over it. Nothing is written before the models are built, so a start that
fails (bad input, weights that do not load) leaves no run directory behind.
What differs between stages (models, loss, validation, export) is a task object from ``cascadev/training/tasks/``
(one module per stage, ``build_task``); this module is what they share: the loop, EMA, LR schedule, logs and the
CLI; writing, finding and checking checkpoints is ``cascadev.training.checkpoints``.

Run directory (``run.dir``): ``config.yaml`` (resolved), ``train.log``, ``logs/`` (TensorBoard),
``samples/`` (validation videos, or latents for base), ``checkpoints/step_XXXXXXXX/`` (accelerate state:
weights and buffers such as BatchNorm running statistics as safetensors, optimizer, RNG, grad scaler; plus
``ema.safetensors`` (EMA weights by parameter name), ``trainer.json`` with the step and the EMA's update
counter, ``config.yaml``; a dit or stage_c checkpoint also has ``config.json``, so it loads with
``VideoDiT`` / ``TextDiT.from_legacy_folder``), and ``final/`` (``export_final``): dit and stage_a write
``model/`` and ``ema/`` (diffusers folders); semantic writes ``semantic_encoder/`` and ``previewer/``, stage_c
``base_dit/``, ``base_scheduler/`` and ``text_encoder/`` (``load_text_to_video`` reads it with a cascade given
apart: ``cascadev generate --weights RUN/final
--cascade ...``),
with EMA weights when EMA is on and the trained ones in ``model/``; distill writes a cascade folder (the student's DiT
and sampler, ``CascadeVPipeline.from_pretrained``) with its trained DiT in ``model/``.
Checkpoints are written to a temporary folder and renamed; a restarted run continues from the newest.
Under FSDP (``configs/accelerate/fsdp.yaml``, FSDP2) accelerate's part of a checkpoint is sharded
(``pytorch_model_fsdp_0/``, ``optimizer_0/``: torch.distributed.checkpoint) and the EMA is sharded like the
parameters, gathered whole into ``ema.safetensors`` and ``final/``; docs/distributed-training.md.

Determinism: data order and augmentation depend only on (seed, position in the stream), and the noise
of micro-step m on rank r comes from a generator seeded with (seed, m, r), so a resumed run repeats an
uninterrupted one. Rank, world size and device come from the Accelerator only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from cascadev.config import ConfigError, apply_overrides, from_dict, save_config, to_dict
from cascadev.errors import run_guarded
from cascadev.progress import BarAwareHandler
from cascadev.training.checkpoints import (CHECKPOINT_PREFIX, EMA_WEIGHTS, TRAINER_STATE, check_resume, check_sharding,
                                           checkpoint_problem, checkpoints, ema_weights, flat_config, load_ema_weights,
                                           save_checkpoint, set_aside)
from cascadev.training.config import (TrainConfig, check_cache, check_weight_files, config_parser, load_train_config,
                                      upgrade_overrides)
from cascadev.training.data import (IMAGE_EXTENSIONS, ImageDataset, LatentDataset, VideoDataset, image_step,
                                    image_steps_before, list_samples, make_loader, mix_seed, split_validation)
from cascadev.training.tasks import build_task, is_fsdp
from cascadev.video_io import check_output_folder
from cascadev.weights import atomic_write

log = logging.getLogger("cascadev.training.train")

FINAL_TMP = ".final.tmp"            # the export's folder until it is complete
CACHE_TENSORS = {"dit": ("latent", "cond"), "distill": ("latent", "cond"), "stage_c": ("semantic",)}  # per cache file


# -- final weights ----------------------------------------------------------------------------------

def export_final(task, final: Path, state_dict: dict, ema: dict | None) -> None:
    """Write the final weights: ``task.export_final`` decides what goes where -- stages dit and stage_a: ``final/model``
    (trained weights) and ``final/ema`` (EMA parameters, the model's buffers); semantic, stage_c and distill: ``final/``
    itself is a folder their loaders take, holding the EMA weights when EMA is on -- what inference should use --
    else the trained ones; with EMA, the trained weights also go to ``final/model/``."""
    ema_state = {**state_dict, **{k: v.cpu() for k, v in ema.items()}} if ema is not None else None
    task.export_final(final, state_dict, ema_state)


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
    copy (decay 0), so a short run's EMA does not still carry the random init (0.999 ** 3500 = 3%).
    Built over a model FSDP2 has sharded, its shadow weights are DTensors sharded as the parameters are: each rank
    keeps and updates 1/world of the EMA, its own shard (no communication)."""
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ema = EMAModel([p for _, p in trained], decay=decay, foreach=True)
    ema.to(dtype=torch.float32)
    return ema, [n for n, _ in trained]


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
    console = BarAwareHandler(sys.stderr)       # records never glued onto the progress bar's line
    console.setFormatter(LOG_FORMAT)
    logger.addHandler(console)
    if main_process:
        logger.addHandler(logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1))


def open_run_dir(accelerator, run_dir: Path, config: TrainConfig, superseded: list[Path], why: str,
                 damaged: Sequence[Path] = ()) -> None:
    """The run's first writes, once its inputs are checked and its models built: the folder, ``train.log`` (with
    what was logged so far), leftovers of a killed run removed, superseded and damaged checkpoints set aside,
    ``config.yaml``."""
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
        set_aside(list(damaged), ckpt_root, "damaged")
        atomic_write(run_dir / "config.yaml", lambda tmp: save_config(config, tmp))
    accelerator.wait_for_everyone()


def open_data(config: TrainConfig) -> tuple:
    """(training set, validation set, image set or None, warnings): the data sources checked -- lists readable,
    a cache matching the config -- before anything is built or written."""
    data, notes = config.data, []
    if data.latents:
        if config.stage not in ("dit", "stage_c", "distill"):
            raise ConfigError("data.latents (a latent cache) only feeds stages dit, distill and stage_c")
        check_cache(data.latents, config)
        train_set = LatentDataset(data.latents, CACHE_TENSORS[config.stage])
        val_samples = split_validation(data)[1] if data.videos or data.val_videos else []
    else:
        train_samples, val_samples = split_validation(data)
        train_set = VideoDataset(train_samples, data)
        if config.stage == "stage_c" and not any(sample.caption for sample in train_samples):
            notes.append("stage stage_c: no training video has a caption (give data.videos as a .csv/.jsonl/.json with "
                         "a 'caption' field); the model learns unconditional generation only")
    image_set = (ImageDataset(list_samples(data.images, IMAGE_EXTENSIONS, key="data.images"), data)
                 if data.images else None)
    val_set = VideoDataset(val_samples, data, train=False) if val_samples and config.run.val_every else []
    return train_set, val_set, image_set, notes


# -- the run, in phases: prepare_run -> build -> resume -> loop -> export ---------------------------------------

@dataclass
class RunPlan:
    """What ``prepare_run`` settles before anything is built or written: the resolved config, the checkpoint to
    resume from (None: step 0), the checkpoints to set aside and the folder name they go under, the config changes
    allowed on resuming (listed for the log), and the data sources, checked."""
    config: TrainConfig
    run_dir: Path
    checkpoint: tuple[int, Path] | None
    superseded: list[Path]
    set_aside_as: str
    changed: str | None
    train_set: VideoDataset | LatentDataset
    val_set: VideoDataset | list
    image_set: ImageDataset | None
    notes: list[str]
    damaged: list[Path] = field(default_factory=list)     # newer checkpoints than the one resumed, set aside


@dataclass
class Session:
    """What ``build`` makes: the Accelerator, the task, the prepared modules and optimizers ("model", "optimizer";
    with a discriminator also "discriminator", "d_optimizer"), the trained parameters, the model's optimizer as
    built (the LR schedule's), and the EMA with its parameter names (None and [] when off)."""
    accelerator: Any
    task: Any
    prepared: dict
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    ema: EMAModel | None
    ema_names: list[str]


def resolve_config(config: TrainConfig | str | Path, overrides: Sequence[str] = (), max_steps: int | None = None,
                   run_dir: str | Path | None = None) -> TrainConfig:
    """The run's config: a YAML file or a ``TrainConfig``, with ``overrides`` (``"optim.lr=1e-4"``, type-checked)
    and then ``max_steps`` / ``run_dir`` (the same as ``run.max_steps=N`` / ``run.dir=DIR``)."""
    overrides = list(overrides)
    if max_steps is not None:
        overrides.append(f"run.max_steps={max_steps}")
    if run_dir is not None:
        overrides.append(f"run.dir={run_dir}")
    if not isinstance(config, TrainConfig):
        return load_train_config(config, overrides)
    if not overrides:
        return config
    return from_dict(TrainConfig, apply_overrides(to_dict(config), upgrade_overrides(overrides)))


def prepare_run(config: TrainConfig, resume_from: int | None = None, fresh: bool = False,
                allow_config_change: bool = False) -> RunPlan:
    """Which checkpoint the run continues from (the newest complete one, ``resume_from``'s, or none with ``fresh``),
    checked to be this model; then the inputs: data sources and weight files. Builds and writes nothing, so a bad
    start leaves nothing behind."""
    if fresh and resume_from is not None:
        raise ConfigError(f"fresh and resume_from={resume_from} exclude each other: start over, or go back")
    run_dir = Path(config.run.dir)
    ckpt_root = run_dir / "checkpoints"
    found = checkpoints(ckpt_root)
    if resume_from is not None and resume_from not in dict(found):
        raise ConfigError(f"--resume-from {resume_from}: no complete checkpoint of that step in {ckpt_root} "
                          f"(have: {[s for s, _ in found] or 'none'})")
    superseded = [p for s, p in found if fresh or (resume_from is not None and s > resume_from)]
    found = [(s, p) for s, p in found if p not in superseded]
    # a damaged newest checkpoint (a bad disk, a partial copy): go on from the newest intact one, saying so, and set
    # the damaged ones aside (kept, never deleted); --resume-from names one: it must be intact
    damaged, problems = [], []
    while found and (problem := checkpoint_problem(found[-1][1])):
        if resume_from is not None:
            raise ConfigError(f"--resume-from {resume_from}: {problem}; resume from another step, or start over with "
                              "--fresh")
        damaged.append(found.pop()[1])
        problems.append(problem)
    if damaged and not found:
        raise ConfigError(f"no intact checkpoint to resume in {ckpt_root}: {problems[0]}; start over with --fresh")
    changed = check_resume(found[-1][1], config, allow_config_change) if found else None

    check_output_folder(run_dir, "run.dir")
    data = config.data
    train_set, val_set, image_set, notes = open_data(config)
    check_weight_files(config)
    val_key = "data.val_videos" if config.data.val_videos else f"data.videos (validation: the last {data.val_count})"
    for dataset, key, source in ((train_set, "data.latents" if data.latents else "data.videos", data.latents or
                                  data.videos), (val_set, val_key, data.val_videos or data.videos)):
        if isinstance(dataset, (VideoDataset, LatentDataset)):    # decodes clips: after the checks that only look
            try:
                dataset.check_loadable()
            except ValueError as e:
                raise ValueError(f"{key} {source}: {e}") from None
    notes += [f"{problem}: resuming from {found[-1][1].name} instead (the damaged checkpoint is moved to "
              f"{ckpt_root}/damaged-*)" for problem in problems]
    return RunPlan(config, run_dir, found[-1] if found else None, superseded,
                   "replaced" if fresh else f"after-{resume_from}", changed, train_set, val_set, image_set, notes,
                   damaged)


def make_accelerator(plan: RunPlan):
    """The Accelerator (rank, world size, device, mixed precision, trackers), and logging as its rank says."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    config, run_dir = plan.config, plan.run_dir
    # VAE: a trainable pattern may select parameters the forward never uses (diffusers' temporal mid-block skips
    # its attention with one layer per block), which plain DDP refuses
    ddp = DistributedDataParallelKwargs(find_unused_parameters=config.stage == "stage_a")
    accelerator = Accelerator(mixed_precision=config.run.mixed_precision,
                              log_with="tensorboard" if config.run.tensorboard else None,
                              project_config=ProjectConfiguration(project_dir=str(run_dir),
                                                                  logging_dir=str(run_dir / "logs")),
                              kwargs_handlers=[ddp])
    if config.optim.ema_decay > 0 and is_fsdp(accelerator) and not accelerator.is_fsdp2:
        raise ConfigError("EMA under FSDP needs FSDP2 (fsdp_version: 2 in the accelerate config, as "
                          "configs/accelerate/fsdp.yaml), or set optim.ema_decay=0")
    setup_logging(accelerator.is_main_process)
    log.info("stage %s on %d process(es), device %s, mixed precision %s, run dir %s",
             config.stage, accelerator.num_processes, accelerator.device, config.run.mixed_precision, run_dir)
    if plan.changed:
        log.warning("resuming with a changed config: %s", plan.changed)
    return accelerator


def build(plan: RunPlan) -> Session:
    """Accelerator, task (models), the run dir's first writes, then DDP / FSDP wrapping, device placement, autocast
    and grad scaler of the model with its optimizer (together, as FSDP2 needs), its EMA (over what FSDP made of the
    parameters) and the discriminator with its optimizer. Weights from the hub or files may still fail to load: the
    run dir is not written before they are."""
    from accelerate.utils import set_seed

    config, optim = plan.config, plan.config.optim
    accelerator = make_accelerator(plan)
    set_seed(config.run.seed)                                # the same initial weights on every rank
    task = build_task(config).to(accelerator.device)
    model = task.model
    log.info("%s: %.2fM parameters, %.2fM trained", type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6,
             sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6)
    open_run_dir(accelerator, plan.run_dir, config, plan.superseded, plan.set_aside_as, plan.damaged)

    for note in plan.notes:
        log.warning(note)
    train_set, image_set = plan.train_set, plan.image_set
    log.info("data: %d training %s, %d validation clip(s)%s", len(train_set), train_set.kind + "s", len(plan.val_set),
             f", {len(image_set)} images (p={config.data.image_prob})" if image_set else "")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=optim.lr, betas=optim.betas,
                                  eps=optim.eps, weight_decay=optim.weight_decay)
    # together: FSDP2 points the optimizer at the shards it makes of the parameters
    prepared = dict(zip(("model", "optimizer"), accelerator.prepare(model, optimizer)))
    params = [p for p in prepared["model"].parameters() if p.requires_grad]
    # after prepare: under FSDP2 the parameters are the shards, and so is the EMA (the same weights under DDP)
    trained = accelerator.unwrap_model(prepared["model"])
    ema, ema_names = make_ema(trained, optim.ema_decay) if optim.ema_decay > 0 else (None, [])
    if task.discriminator is not None:
        prepared["discriminator"] = accelerator.prepare(task.discriminator)
        d_opt = torch.optim.AdamW(prepared["discriminator"].parameters(), lr=config.stage_a_training.disc_lr,
                                  betas=(0.5, 0.9))
        prepared["d_optimizer"] = accelerator.prepare(d_opt)
    if config.run.tensorboard:
        accelerator.init_trackers("tb", config=flat_config(config))
    return Session(accelerator, task, prepared, params, optimizer, ema, ema_names)


def resume(plan: RunPlan, session: Session) -> tuple[int, dict]:
    """(step, trainer state) of the plan's checkpoint, loaded into the session (accelerate state, EMA); (0, fresh
    state) without one."""
    if plan.checkpoint is None:
        return 0, {"skipped": 0}
    step, path = plan.checkpoint
    check_sharding(path, is_fsdp(session.accelerator))
    session.accelerator.load_state(str(path))
    state = json.loads((path / TRAINER_STATE).read_text())
    ema = session.ema
    if ema is not None and (path / EMA_WEIGHTS).is_file():
        load_ema_weights(ema, session.ema_names, path / EMA_WEIGHTS)
        ema.optimization_step = state.get("ema_step", step)   # older checkpoints: one update per step before
    log.info("resumed from %s (step %d)", path, step)
    return step, state


def data_streams(plan: RunPlan, accelerator, step: int) -> tuple:
    """(video batches, image batches or None), continuing where the micro-batches of ``step`` steps leave them."""
    config, data = plan.config, plan.config.data
    rank, world, seed = accelerator.process_index, accelerator.num_processes, config.run.seed
    micro_done = step * config.optim.grad_accum
    image_batches = image_steps_before(seed, micro_done, data.image_prob) if plan.image_set else 0
    video_iter = make_loader(plan.train_set, data.batch_size, seed, rank, world, micro_done - image_batches,
                             data.num_workers)
    image_iter = (make_loader(plan.image_set, data.images_per_batch, seed + 1, rank, world, image_batches,
                              data.num_workers) if plan.image_set else None)
    return video_iter, image_iter


@dataclass
class Meter:
    """What the loop adds up between two log lines: logged values (means over micro-batches), steps, samples and
    frames seen (all ranks), since ``tic``."""
    sums: dict[str, float] = field(default_factory=dict)
    counted: int = 0
    samples: int = 0
    frames: int = 0
    tic: float = field(default_factory=time.perf_counter)


def accumulate(plan: RunPlan, session: Session, streams: tuple, step: int, state: dict, meter: Meter) -> None:
    """Loss and backward of step ``step``'s micro-batches (gradients synchronised on the last); the noise of
    micro-step m on rank r from a generator seeded with (seed, m, r)."""
    accelerator, run, optim = session.accelerator, plan.config.run, plan.config.optim
    video_iter, image_iter = streams
    for micro in range(optim.grad_accum):
        m = step * optim.grad_accum + micro
        as_images = image_step(run.seed, m, plan.config.data.image_prob)
        batch = next(image_iter if as_images and image_iter is not None else video_iter)
        state["skipped"] += batch["skipped"]
        generator = torch.Generator(accelerator.device).manual_seed(mix_seed(run.seed, m, accelerator.process_index, 2))
        sync = micro == optim.grad_accum - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(session.prepared["model"]):
            logs = session.task.micro_step(accelerator, session.prepared, batch, generator, as_images, step,
                                           optim.grad_accum)
        for k, v in logs.items():
            meter.sums[k] = meter.sums.get(k, 0.0) + float(v) / optim.grad_accum
        first = next(v for k, v in batch.items() if isinstance(v, torch.Tensor))
        meter.samples += first.shape[0] * accelerator.num_processes
        meter.frames += first.shape[0] * first.shape[2] * accelerator.num_processes


def optimizer_step(session: Session, lr_scheduler, grad_clip: float) -> float:
    """Clip, step and zero the optimizers, step the LR schedule and the EMA; returns the gradient norm."""
    accelerator, prepared, ema = session.accelerator, session.prepared, session.ema
    grad_norm = accelerator.clip_grad_norm_(session.params, grad_clip if grad_clip > 0 else float("inf"))
    for key in ("optimizer", "d_optimizer"):
        if key in prepared:
            prepared[key].step()
            prepared[key].zero_grad(set_to_none=True)
    lr_scheduler.step()                                       # every step, skipped (fp16 overflow) ones too
    if ema is not None and accelerator.optimizer_step_was_skipped:
        ema.optimization_step += 1                            # no update, but the warmup counts the step
    elif ema is not None:
        ema.step(p for p in accelerator.unwrap_model(prepared["model"]).parameters() if p.requires_grad)
    return float(grad_norm)


def log_means(session: Session, meter: Meter, state: dict, lr: float, step: int, progress) -> None:
    """The means since the last log line, over ranks, to the trackers, the progress bar and the log."""
    accelerator, device = session.accelerator, session.accelerator.device
    means = {k: v / meter.counted for k, v in meter.sums.items()}
    means = {k: accelerator.reduce(torch.tensor(v, device=device), "mean").item() for k, v in means.items()}
    skipped = int(accelerator.reduce(torch.tensor(state["skipped"], device=device), "sum").item())
    elapsed = time.perf_counter() - meter.tic
    means.update({"lr": lr, "samples_per_s": meter.samples / elapsed, "frames_per_s": meter.frames / elapsed,
                  "data/skipped": skipped})
    accelerator.log({f"train/{k}" if "/" not in k else k: v for k, v in means.items()}, step=step)
    progress.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)   # drawn at the next step
    log.info("step %d  %s", step, "  ".join(f"{k} {v:.4g}" for k, v in means.items()))


def loop(plan: RunPlan, session: Session, step: int, state: dict) -> None:
    """Train from ``step`` to run.max_steps: log, validate and save a checkpoint as often as the config says, and
    at the last step."""
    from cascadev.progress import progress_bar

    config, run = plan.config, plan.config.run
    accelerator, task, ema = session.accelerator, session.task, session.ema
    lr_scheduler = lr_scheduler_at(session.optimizer, config, step)  # on the optimizer the prepared one wraps
    streams = data_streams(plan, accelerator, step)
    val_clips = [plan.val_set[i] for i in range(len(plan.val_set))]   # {"video": (3, T, H, W), "caption"}
    progress = progress_bar(total=run.max_steps, initial=step, disable=not accelerator.is_main_process, desc="train",
                            dynamic_ncols=True, leave=True)
    meter = Meter()
    while step < run.max_steps:
        accumulate(plan, session, streams, step, state, meter)
        lr = lr_scheduler.get_last_lr()[0]
        grad_norm = optimizer_step(session, lr_scheduler, config.optim.grad_clip)
        step += 1
        meter.sums["grad_norm"] = meter.sums.get("grad_norm", 0.0) + grad_norm
        meter.counted += 1
        progress.update(1)

        if step % run.log_every == 0 or step == run.max_steps:
            log_means(session, meter, state, lr, step, progress)
            meter = Meter()
        if val_clips and (step % run.val_every == 0 or step == run.max_steps):
            val_logs = task.validate(accelerator, session.prepared, val_clips, step, plan.run_dir)
            accelerator.log(val_logs, step=step)
            log.info("step %d  validation  %s", step, "  ".join(f"{k} {v:.4g}" for k, v in val_logs.items()))
        if step % run.save_every == 0 or step == run.max_steps:
            if ema is not None:
                state["ema_step"] = ema.optimization_step
            ema_state = (ema_weights(ema, session.ema_names, keep=accelerator.is_main_process) if ema is not None
                         else None)
            path = save_checkpoint(accelerator, plan.run_dir / "checkpoints", step, state, ema_state, task, config,
                                   run.keep_checkpoints)
            log.info("saved %s", path)
    progress.close()


def export(plan: RunPlan, session: Session) -> Path:
    """The final weights (and EMA) in our formats (``export_final``) in ``run_dir/final``, written beside and
    renamed (a killed export leaves no half final/); ends the run. Returns the run directory."""
    accelerator, ema = session.accelerator, session.ema
    state_dict = accelerator.get_state_dict(session.prepared["model"])       # under FSDP: gathered, main process
    ema_state = ema_weights(ema, session.ema_names, keep=accelerator.is_main_process) if ema is not None else None
    if accelerator.is_main_process:
        final, tmp = plan.run_dir / "final", plan.run_dir / FINAL_TMP
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            export_final(session.task, tmp, state_dict, ema_state)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(f"could not write the final weights to {final}: {e.strerror or e}") from None
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        log.info("final weights in %s", final)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return plan.run_dir


def train(config: TrainConfig | str | Path, *, overrides: Sequence[str] = (), resume_from: int | None = None,
          fresh: bool = False, allow_config_change: bool = False, max_steps: int | None = None,
          run_dir: str | Path | None = None) -> Path:
    """Train a stage as ``config`` (a YAML file or a ``TrainConfig``) says; returns the run directory, whose
    ``final/`` holds the export.

    ``overrides``: ``"key=value"`` strings as ``--set`` takes them; ``max_steps`` / ``run_dir``: ``run.max_steps`` /
    ``run.dir``. A run dir with checkpoints continues from the newest, unless ``resume_from`` names an older step
    (later ones are moved aside) or ``fresh`` starts at step 0 (all moved aside); a config that changed since the
    checkpoint resumes only with ``allow_config_change`` (and never into another model). Under ``accelerate launch``
    every process calls this."""
    # an earlier run in this process (tests, notebooks) leaves its train.log attached: detach it until the
    # Accelerator says whether this process logs (a PartialState made here would miss accelerate's settings)
    setup_logging(main_process=False)
    plan = prepare_run(resolve_config(config, overrides, max_steps, run_dir), resume_from, fresh, allow_config_change)
    session = build(plan)
    step, state = resume(plan, session)
    loop(plan, session, step, state)
    return export(plan, session)


# -- the command line -------------------------------------------------------------------------------

def command_parser(prog: str = "python -m cascadev.training.train"):
    """The options of the training command (``main``)."""
    parser = config_parser(prog, __doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=None, help="same as --set run.max_steps=N")
    parser.add_argument("--run-dir", default=None, help="same as --set run.dir=DIR")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--fresh", action="store_true",
                        help="start at step 0 in a run dir that has checkpoints (they are moved aside, not deleted)")
    resume.add_argument("--resume-from", type=int, default=None, metavar="STEP",
                        help="resume from this checkpoint instead of the newest (later ones are moved aside)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume although the config differs from the checkpoint's (the model must not change)")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m cascadev.training.train") -> Path:
    """The command line over ``train`` (what ``accelerate launch -m cascadev.training.train`` runs; ``cascadev train``
    hands its arguments here): parse ``argv`` (default: ``sys.argv``), train, return the run directory."""
    args = command_parser(prog).parse_args(argv)
    return train(args.config, overrides=args.overrides, resume_from=args.resume_from, fresh=args.fresh,
                 allow_config_change=args.allow_config_change, max_steps=args.max_steps, run_dir=args.run_dir)


if __name__ == "__main__":
    run_guarded("cascadev.training.train", main, "--debug" in sys.argv[1:])
