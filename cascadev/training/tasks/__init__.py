"""What trains in each stage of the cascade: one task object per stage, picked by ``build_task``.

A task holds what differs between stages -- the models (the one that trains, the frozen encoders around it, a
discriminator), the loss, validation and the export of final weights -- so that the loop in ``cascadev.training.train``
is the same for all of them: ``DiTTask`` (stage "dit", Stage B), ``StageATask`` ("stage_a"), ``SemanticTask``
("semantic", Stage B's semantic encoder with the Previewer), ``StageCTask`` ("stage_c") and ``DistillTask``
("distill", a 1-2 step student of a trained Stage B DiT).

What the loop uses of a task:

- ``name``: the stage; ``model``: the module that trains (the loop prepares it, its optimizer and EMA);
  ``discriminator``: a second trained module with its own optimizer, or None.
- ``to(device)``: move what the task keeps outside ``model`` (frozen encoders, LPIPS); returns the task.
- ``micro_step(accelerator, prepared, batch, generator, as_images, step, accum)``: loss and backward of one
  micro-batch (``prepared`` holds the prepared "model" and "discriminator"); returns the values to log.
- ``validate(accelerator, prepared, clips, step, run_dir)``: metrics on held-out clips, and a sample under
  ``run_dir/samples``.
- ``save_model_config(directory)``: what a checkpoint holds beside accelerate's state (a DiT's ``config.json``).
- ``export_final(final, state_dict, ema_state)``: the run's ``final/`` folder -- which weights (trained, EMA) go
  where -- through ``export(state_dict, directory)``, the weights in our formats (for stage stage_c also the
  ``text_encoder`` and the sampler).

``DiTTask`` and ``StageCTask`` also ``encode`` videos into what ``cascadev.training.cache_latents`` stores, built with
``build_model=False`` (frozen encoders only). Every model is initialised under ``seeded(seed, part)``, so each
process and command builds the same random-init weights.

One module per stage (``dit_task``, ``stage_a_task``, ``semantic_task``, ``stage_c_task``, ``distill_task``) over
``common``'s helpers.
"""


from __future__ import annotations

from cascadev.config import ConfigError
from cascadev.training.config import TrainConfig
from cascadev.training.tasks.common import is_fsdp
from cascadev.training.tasks.dit_task import DiTTask, build_dit
from cascadev.training.tasks.distill_task import DistillTask
from cascadev.training.tasks.semantic_task import SemanticTask
from cascadev.training.tasks.stage_a_task import StageATask
from cascadev.training.tasks.stage_c_task import StageCTask, build_base_dit

__all__ = ["DiTTask", "DistillTask", "SemanticTask", "StageATask", "StageCTask", "build_base_dit", "build_dit",
           "build_task", "is_fsdp"]


def build_task(config: TrainConfig,
               load_weights: bool = True) -> DiTTask | StageATask | SemanticTask | StageCTask | DistillTask:
    """The one factory of what trains."""
    if config.stage == "dit":
        return DiTTask(config, load_weights)
    elif config.stage == "stage_a":
        return StageATask(config, load_weights)
    elif config.stage == "semantic":
        return SemanticTask(config, load_weights)
    elif config.stage == "stage_c":
        return StageCTask(config, load_weights)
    elif config.stage == "distill":
        return DistillTask(config, load_weights)
    raise ConfigError(f"unknown stage {config.stage!r}; expected 'dit', 'stage_a', 'semantic', 'stage_c' or 'distill'")
