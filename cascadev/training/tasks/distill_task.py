"""Stage "distill": a student of a trained Stage B DiT that samples in 1 or 2 steps.

The teacher is any decoder DiT of ours with its sampler and steps: a cascade folder (its ``dit/``, saved scheduler
and ``num_inference_steps``; e.g. the built-in tiny cascade at 4 flow steps), a DiT folder, or the released
``s1024.effn-f32.pth`` (``official:PATH``; 8 steps of DDIM, the deterministic counterpart of its Euler-ancestral
sampler). The student starts from the teacher's weights and learns, from the same noise and condition, to land
in ``distill.student_steps`` steps of its own sampler where the teacher lands in its steps -- trajectory
distillation (Luhman & Luhman 2021; Salimans & Ho 2022 for the v-parameterised student of an eps teacher) --
plus a loss on the high-frequency amplitude spectrum of the decoded frames that keeps the student from trading
detail for PSNR. The maths is in ``cascadev.training.distillation``.

Inputs are the DiT's (``DiTTask.inputs``: pixels or a latent cache of stage dit); the clean latent is not used.
The export is a cascade folder (``CascadeVPipeline.save_pretrained``) whose scheduler and ``num_inference_steps``
are the student's: ``cascadev decode --weights RUN/final`` samples as the student was trained.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn as nn

from cascadev.config import ConfigError
from cascadev.training.config import TrainConfig
from cascadev.training.data import mix_seed
from cascadev.training.distillation import (detail_loss, distill_losses, ode_scheduler, sample_unrolled)
from cascadev.training.tasks.common import init_weights, save_module, seeded, write_sample
from cascadev.training.tasks.dit_task import DiTTask

RELEASE_STEPS = 8        # the release's recon steps, the teacher's default outside a cascade folder


def is_cascade_folder(path: str) -> bool:
    return (Path(path) / "model_index.json").is_file()


def as_tuples(value):
    """Lists (as JSON holds them) as tuples, nested, so two configs compare by value."""
    return tuple(as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def load_teacher(config: TrainConfig, load_weights: bool) -> nn.Module:
    """The teacher DiT, frozen in eval mode; its architecture must be the ``dit`` section's (the student's)."""
    from cascadev.pipelines.cascade import load_dit
    from dit.video_dit import VideoDiT

    spec, teacher = config.dit.model_config(), config.distill.teacher       # VideoDiT keywords
    if not load_weights:
        model = VideoDiT(**spec)
    elif teacher.startswith("official:"):
        model = VideoDiT.from_single_file(teacher.removeprefix("official:"), spec)
    else:
        model = load_dit(Path(teacher) / "dit" if is_cascade_folder(teacher) else teacher)
        # compared as tuples: config.json holds the attention strides as lists
        diff = [f"{k}: {model.config.get(k)!r}" for k, v in spec.items()
                if as_tuples(model.config.get(k)) != as_tuples(v)]
        if diff:
            raise ConfigError(f"distill.teacher {teacher}: its DiT differs from the dit section "
                              f"({'; '.join(diff[:4])}): set dit.overrides to the teacher's config.json")
    return model.eval().requires_grad_(False)


def teacher_sampler(config: TrainConfig):
    """(scheduler, steps) of the teacher: ``distill.teacher_scheduler`` / ``teacher_steps``, else a cascade folder's
    saved ones, else the objective's ODE sampler (``ode_scheduler``) at the release's 8 steps."""
    from cascadev.pipelines.sampling import load_scheduler, scheduler_name

    d = config.distill
    saved = is_cascade_folder(d.teacher)
    name = d.teacher_scheduler
    if name is None and saved:
        scheduler = load_scheduler(Path(d.teacher) / "scheduler")
        if scheduler_name(scheduler) == "euler_a":          # stochastic: its deterministic counterpart instead
            scheduler = ode_scheduler(config.diffusion)
    else:
        scheduler = ode_scheduler(config.diffusion, name)
    steps = d.teacher_steps
    if steps is None:
        steps = (json.loads((Path(d.teacher) / "model_index.json").read_text()).get("num_inference_steps")
                 if saved else None) or RELEASE_STEPS
    return scheduler, steps


class DistillTask(DiTTask):
    """Stage "distill": ``model`` is the student DiT; the teacher, Stage A and the semantic encoder are frozen."""

    name = "distill"

    def __init__(self, config: TrainConfig, load_weights: bool = True):
        if config.condition.route != "semantic":
            raise ConfigError("stage distill decodes semantic latents: condition.route must be 'semantic'")
        super().__init__(config, load_weights, build_model=False)      # Stage A, semantic encoder, objective
        with seeded(config.run.seed, 0):
            self.teacher = load_teacher(config, load_weights)
        self.model = copy.deepcopy(self.teacher)          # the student starts as the teacher, or an earlier student
        if config.dit.init_from and load_weights:
            init_weights(self.model, config.dit.init_from, "dit.init_from (a student to train on: RUN/final/dit)")
        self.model.train().requires_grad_(True)
        if config.dit.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.teacher_scheduler, self.teacher_steps = teacher_sampler(config)
        try:
            self.student_scheduler = ode_scheduler(config.diffusion, student=True,
                                                   last_sigma=config.distill.student_last_sigma)
        except ValueError as e:
            raise ConfigError(f"distill.student_last_sigma: {e}") from None

    def to(self, device: torch.device) -> "DistillTask":
        super().to(device)
        self.teacher.to(device)
        return self

    def tiling(self):
        """How both samplers combine the windows of a crop larger than the DiT's: the exported decoder's rule
        (``blend`` at the release's spacing, ``distill.tile_detail``), so the teacher's target is what the teacher
        decodes with it and the student learns what it will run."""
        from cascadev.pipelines.tiling import Tiling

        return Tiling("blend", detail=self.config.distill.tile_detail)

    def samples(self, model: nn.Module, cond: torch.Tensor, noise: torch.Tensor, generator: torch.Generator,
                accelerator) -> tuple[torch.Tensor, torch.Tensor]:
        """(student's k-step sample with gradients, teacher's sample) from the same noise, both (B, C, T, h, w)."""
        with torch.no_grad(), accelerator.autocast():
            target = sample_unrolled(self.teacher, cond, noise, self.teacher_scheduler, self.teacher_steps,
                                     self.tiling(), generator)
        with accelerator.autocast():
            student = sample_unrolled(model, cond, noise, self.student_scheduler, self.config.distill.student_steps,
                                      self.tiling())
        return student.float(), target.float()

    def micro_step(self, accelerator, prepared: dict, batch: dict, generator: torch.Generator, as_images: bool,
                   step: int, accum: int) -> dict:
        """Loss and backward of one micro-batch: the student's sample against the teacher's from the same noise,
        plus ``distill.detail_weight`` times the detail loss on ``detail_frames`` decoded frames."""
        d = self.config.distill
        seed = int(torch.randint(2 ** 62, (1,), generator=generator, device=generator.device))
        x0, cond = self.inputs(batch, torch.Generator(generator.device).manual_seed(seed))
        noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
        student, target = self.samples(prepared["model"], cond, noise, generator, accelerator)
        losses = distill_losses(student, target)
        if d.detail_weight > 0:
            crop = self.detail_crop(x0.shape, generator)
            with torch.no_grad():
                reference = self.stage_a.decode_window(target[crop])
            losses["detail"] = detail_loss(self.stage_a.decode_window(student[crop]), reference, d.detail_cutoff)
            losses["loss"] = losses["loss"] + d.detail_weight * losses["detail"]
        accelerator.backward(losses["loss"].mean() / accum)
        return {k: v.detach().mean() for k, v in losses.items()}

    def detail_crop(self, shape: tuple, generator: torch.Generator) -> tuple:
        """Index of what the detail loss decodes in latents (B, C, T, h, w): ``detail_frames`` random frames and a
        random ``detail_size`` square (the decoder is convolutional: a crop costs its share of the window)."""
        d, (T, h, w) = self.config.distill, shape[2:]
        frames = torch.randperm(T, generator=generator, device=generator.device)[:d.detail_frames].tolist()
        size_y, size_x = (min(d.detail_size, h), min(d.detail_size, w)) if d.detail_size else (h, w)
        top = int(torch.randint(h - size_y + 1, (1,), generator=generator, device=generator.device))
        left = int(torch.randint(w - size_x + 1, (1,), generator=generator, device=generator.device))
        return (slice(None), slice(None), frames, slice(top, top + size_y), slice(left, left + size_x))

    @torch.no_grad()
    def validate(self, accelerator, prepared: dict, clips: list[dict], step: int, run_dir: Path) -> dict:
        """On held-out clips, from fixed noise: the student's distance to the teacher (latent MSE) and both
        decodings' PSNR against the input; the first clip's input | teacher | student saved as
        ``samples/step_N.mp4``."""
        from eval.metrics import psnr

        model = prepared["model"]
        model.eval()
        scores: dict[str, list[float]] = {"val/mse_to_teacher": [], "val/psnr_student": [], "val/psnr_teacher": []}
        for i, clip in enumerate(clips):
            g = torch.Generator(accelerator.device).manual_seed(mix_seed(self.config.run.seed, i, 3))
            video = clip["video"][None].to(accelerator.device)
            x0, cond = self.inputs({"video": video}, g)
            noise = torch.randn(x0.shape, generator=g, device=g.device).to(x0.device)
            student, target = self.samples(accelerator.unwrap_model(model), cond, noise, g, accelerator)
            scores["val/mse_to_teacher"].append(distill_losses(student, target)["mse"].mean().item())
            decoded = [self.stage_a.decode(z).clamp(-1, 1).cpu() for z in (target, student)]
            scores["val/psnr_teacher"].append(psnr(decoded[0], clip["video"][None]).mean().item())
            scores["val/psnr_student"].append(psnr(decoded[1], clip["video"][None]).mean().item())
            if i == 0 and accelerator.is_main_process:
                write_sample(run_dir, step, [clip["video"][None], *decoded])
        model.train()
        return {k: sum(v) / len(v) for k, v in scores.items() if v}

    def export_final(self, final: Path, state_dict: dict, ema_state: dict | None) -> None:
        """``final/``: the student's cascade folder (EMA weights when on); with EMA, ``final/model/``: its
        trained DiT."""
        self.export(ema_state if ema_state is not None else state_dict, final)
        if ema_state is not None:
            self.export_dit(state_dict, final / "model")

    def export(self, state_dict: dict, directory: Path) -> None:
        """A cascade folder (``CascadeVPipeline.save_pretrained``) with the student DiT and its sampler: the teacher
        cascade's other parts and settings when the teacher is one, else this run's Stage A and semantic encoder."""
        from cascadev.pipelines.cascade import CascadeVPipeline
        from vae.stage_a import stage_a_settings

        student = copy.deepcopy(self.model).cpu()
        student.load_state_dict({k: v.cpu() for k, v in state_dict.items()})
        settings = {"scheduler": self.student_scheduler, "num_inference_steps": self.config.distill.student_steps,
                    "tile_detail": self.config.distill.tile_detail}
        if is_cascade_folder(self.config.distill.teacher):
            teacher = CascadeVPipeline.from_pretrained(self.config.distill.teacher, dit=student)
            pipe = CascadeVPipeline(**{**teacher.components, **settings},
                                    **{k: teacher.config[k] for k in ("stage_a", "colour_fix", "demo")})
        else:
            pipe = CascadeVPipeline(dit=student, semantic_encoder=copy.deepcopy(self.semantic).cpu(),
                                    vae=copy.deepcopy(self.stage_a.model).cpu(), previewer=None,
                                    stage_a=stage_a_settings(self.stage_a.config), **settings)
        pipe.save_pretrained(directory)

    def export_dit(self, state_dict: dict, directory: Path) -> None:
        """The student DiT alone (``VideoDiT.from_pretrained``), as stage dit exports its trained weights."""
        save_module(state_dict, self.model, directory)
