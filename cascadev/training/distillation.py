"""The maths of step distillation for the Stage B decoder, apart from any network.

Trajectory distillation (Luhman & Luhman 2021, "Knowledge Distillation in Iterative Generative Models for Improved
Sampling Speed"): a deterministic sampler makes the teacher's sample a function x_T = S_teacher(z, c) of the initial
noise z and the condition c; the student, started from the teacher's weights, is trained so that its own k-step
sampler (k = 1 or 2) from the same z lands on it:

    L = || S_student^k(z, c) - S_teacher^K(z, c) ||^2  +  w * L_detail(decoded frames)

The student's k steps are the very diffusers scheduler calls the pipelines make (``sample_unrolled`` mirrors
``cascadev.pipelines.sampling.sample``, windows and tiles included, with gradients through every step), so what
was trained is exactly what ``pipe.decode(..., steps=k)`` runs with the saved scheduler and tile detail. Crops
larger than the DiT's window train the student where its windows overlap: one step cannot reconcile the fine detail
two windows guess differently; a second step can, as a sampler's later steps do, since it starts from the blended
latents (measured: docs/fast-decoding.md). The student's sampler per objective:

- rectified flow: flow Euler at the trained shift; one step is x0 = z - v(z, sigma=1). diffusers starts the last
  step before 0 at sigma 0.001 whatever the count, so a second step needs ``last_sigma`` (its ``shift_terminal``).
- IDDPM (eps): DDIM with "trailing" timesteps (the first step at t = T - 1) and v-prediction: a 1-step eps student
  would divide its error by sqrt(alpha_bar_T) (~0.006 with the release's betas); v is well conditioned at every t
  (progressive distillation, Salimans & Ho 2022, Sec. 4). The teacher's default sampler is then DDIM (eta 0): the
  deterministic counterpart of the release's Euler-ancestral steps, whose injected noise no student could predict
  from z (it would learn their mean: a blur).

``detail_loss``: the distance between the amplitude spectra above a cutoff frequency of two decoded videos. It
ignores phase, so a blurred guess (the MSE's answer where the student is unsure) cannot lower it: only producing
the teacher's amount of fine detail does -- a cheap, non-adversarial stand-in for the GAN term of one-step video
restorers (SeedVR2, Wang et al. 2025). Tensors are (B, C, T, H, W).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from cascadev.pipelines.sampling import denoise_loop, make_scheduler, set_steps, window_predictor
from cascadev.pipelines.tiling import Tiling
from cascadev.training.diffusion import DiffusionConfig, mean_flat


def ode_scheduler(diffusion: DiffusionConfig, name: str | None = None, student: bool = False,
                  last_sigma: float | None = None) -> SchedulerMixin:
    """The deterministic sampler of an objective: flow Euler at the trained shift (rf), else DDIM with trailing
    timesteps on the training betas, predicting eps (a teacher) or v (``student``). ``name``: another of
    ``SCHEDULERS`` instead (e.g. the release's "euler_a" for a teacher; stochastic). ``last_sigma`` (rf): the noise
    level of the last step before 0 (diffusers' ``shift_terminal``; its default spacing ends at sigma 0.001, so a
    second flow step would change almost nothing)."""
    if diffusion.objective == "rf":
        if (name or "flow") != "flow":
            return make_scheduler(name)
        return make_scheduler("flow", {"shift": diffusion.sigma_shift}
                              | ({"shift_terminal": last_sigma} if last_sigma is not None else {}))
    if last_sigma is not None:
        raise ValueError("last_sigma sets a flow scheduler's last noise level; the iddpm student's DDIM steps are "
                         "evenly spaced already")
    betas = {"num_train_timesteps": diffusion.num_timesteps, "beta_start": diffusion.beta_start,
             "beta_end": diffusion.beta_end}
    if name not in (None, "ddim"):
        return make_scheduler(name, betas)
    return make_scheduler("ddim", {**betas, "timestep_spacing": "trailing",
                                   "prediction_type": "v_prediction" if student else "epsilon"})


def sample_unrolled(model: nn.Module, cond: torch.Tensor, noise: torch.Tensor, scheduler: SchedulerMixin,
                    steps: int, tiling: str | Tiling = "blend", generator: torch.Generator | None = None
                    ) -> torch.Tensor:
    """``sampling.sample`` with gradients: noise (B, C, T, h, w) given cond (B, C_cond, T, h, w) -> latents
    (B, C, T, h, w). The pipeline's own loop and windows (``denoise_loop``, ``window_predictor``), so the result
    equals the pipeline's for the same noise and tiling; gradients flow through every step of a deterministic
    scheduler and every window. Latents larger than the DiT's window are sampled over its overlapping windows and
    combined by ``tiling``'s rule: a student trained so learns to agree with its neighbours where they overlap."""
    set_steps(scheduler, steps, noise.device)
    return denoise_loop(window_predictor(model, cond, scheduler, tiling), noise, scheduler, generator)


def high_frequency_amplitude(video: torch.Tensor, cutoff: float) -> torch.Tensor:
    """|FFT| per frame and channel (orthonormal), zero at radial frequencies <= ``cutoff`` cycles per pixel:
    (B, C, T, H, W) -> (B, C, T, H, W) float32."""
    from eval.metrics import above_frequency

    amplitude = torch.fft.fft2(video.float(), norm="ortho").abs()                        # b c t h w
    return amplitude * above_frequency(*video.shape[-2:], cutoff, video.device)


def detail_loss(pred: torch.Tensor, target: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Per-video (B,) L1 distance of the amplitude spectra above ``cutoff`` of ``pred`` and ``target``
    (B, C, T, H, W), relative to the target's mean amplitude there: phase-free, so blur is penalised, not rewarded."""
    a_pred, a_target = high_frequency_amplitude(pred, cutoff), high_frequency_amplitude(target, cutoff)
    return mean_flat((a_pred - a_target).abs()) / mean_flat(a_target).clamp(min=1e-8)


def distill_losses(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"loss", "mse"} per video (B,): the student's k-step sample against the teacher's from the same noise."""
    mse = mean_flat((student.float() - teacher.float()) ** 2)
    return {"loss": mse, "mse": mse}
