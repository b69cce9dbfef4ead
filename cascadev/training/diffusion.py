"""Training objectives of the Stage B decoder: IDDPM (the release) and rectified flow (an option).

Only the maths lives here, apart from any network: forward noising, the targets, the losses.
The training step reads

    t = diffusion.sample_t(B, generator)                     # one timestep per video
    x_t = diffusion.noise(x0, t, eps)
    out = model(torch.cat([x_t, cond], 1), diffusion.model_time(t))
    losses = diffusion.losses(out, x0, x_t, t, eps)          # {"loss", "mse", "vb"} per video

Symbols follow the papers: ``alpha_bar_t`` (DDPM, Ho et al. 2020), ``beta_tilde_t`` the posterior
variance (DDPM Eq. 7), the learned variance interpolation ``v`` (IDDPM, Nichol & Dhariwal 2021,
Eq. 15). Tensors are latents (B, C, T, H, W); reductions are over all but the batch dimension, so
every video gets its own loss. Sampling loops are not here: see ``cascadev.pipelines.sampling``, which runs
the matching diffusers schedulers (DDPM-family for ``iddpm``, FlowMatchEuler for ``rf``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDPMScheduler

Objective = Literal["iddpm", "rf"]


@dataclass(frozen=True)
class DiffusionConfig:
    """The training objective. Defaults are the release's (PixArt / IDDPM, 1000 linear betas)."""

    objective: Objective = "iddpm"  # iddpm: eps + learned-range sigma (MSE + VLB); rf: rectified flow
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    vlb_lambda: float = 0.001       # L_hybrid = L_simple + lambda * L_vlb (IDDPM Sec. 3.1, Eq. 16)
    # rf only: train on sigma' = s sigma / (1 + (s - 1) sigma), sigma ~ U(0, 1) (SD3, Esser et al. 2024,
    # Eq. 23). s > 1 spends more steps at high noise, where the decoder must infer latents from the
    # condition alone; the "flow" sampler takes the same value as its scheduler's ``shift``.
    sigma_shift: float = 1.0

    def __post_init__(self):
        if self.num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2, got {self.num_timesteps}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.vlb_lambda < 0:
            raise ValueError(f"vlb_lambda must be >= 0, got {self.vlb_lambda}")
        if self.sigma_shift <= 0:
            raise ValueError(f"sigma_shift must be > 0, got {self.sigma_shift}")
        if self.sigma_shift != 1.0 and self.objective != "rf":
            raise ValueError(f"sigma_shift applies to objective 'rf' only, got objective {self.objective!r}")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: (B, ...) -> (B,)."""
    return x.flatten(1).mean(dim=1)


# -- Gaussian helpers (closed forms, tested against torch.distributions and the normal CDF) --------

def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                                        bin_width: float = 2 / 255) -> torch.Tensor:
    """log P(x) of data in [-1, 1] on 256 bins under N(mean, e^(2 log_scale)); elementwise, in nats.

    The DDPM decoder L_0 (Ho et al. 2020, Eq. 13): the Gaussian mass of x's bin, with the first and
    last bins stretched to -inf and +inf. Uses the exact normal CDF in log space (IDDPM used a tanh
    approximation of it, within 1e-3).
    """
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + bin_width / 2)
    lower = inv_std * (x - mean - bin_width / 2)
    # Phi(u) - Phi(l) = Phi(-l) - Phi(-u): evaluate the bin in the left tail, where log_ndtr is exact
    right = lower > 0
    a, b = torch.where(right, -upper, lower), torch.where(right, -lower, upper)   # a < b, a <= 0
    log_cdf_b = torch.special.log_ndtr(b)
    log_mass = log_cdf_b + torch.log((-torch.expm1(torch.special.log_ndtr(a) - log_cdf_b)).clamp(min=1e-12))
    return torch.where(x < -0.999, torch.special.log_ndtr(upper),          # first bin: (-inf, -1 + w/2]
                       torch.where(x > 0.999, torch.special.log_ndtr(-lower), log_mass))  # last: [1 - w/2, inf)


def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] for per-video t (B,), broadcast to ``like`` (B, ...) in its dtype."""
    out = values.to(like.device)[t].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


class GaussianDiffusion:
    """IDDPM with eps prediction and learned-range variance, as the release trained (PixArt's IDDPM).

    The model outputs 2C channels: eps and v in [-1, 1] (IDDPM Eq. 15). Loss per video is
    MSE(eps) + lambda * T * L_t, where L_t is the VLB term at the sampled t in bits per dimension
    and the model mean is detached in it, so the VLB trains only the variance (IDDPM Sec. 3.1).
    With T = 1000 and lambda = 0.001 the VLB weight is 1, as in DiT and PixArt.
    """

    def __init__(self, config: DiffusionConfig = DiffusionConfig()):
        self.config = config
        T = config.num_timesteps
        scheduler = DDPMScheduler(num_train_timesteps=T, beta_start=config.beta_start, beta_end=config.beta_end,
                                  beta_schedule="linear")
        self.betas = beta = scheduler.betas.double()                                         # beta_t
        self.alpha_bar = alpha_bar = torch.cumprod(1.0 - beta, dim=0)                        # alpha_bar_t
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        # posterior q(x_{t-1} | x_t, x0) = N(c0 x0 + ct x_t, beta_tilde_t)  (DDPM Eqs. 6-7)
        self.beta_tilde = beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        # beta_tilde_0 = 0: clip its log to beta_tilde_1 (IDDPM, as in its code)
        self.log_beta_tilde = torch.log(torch.cat([self.beta_tilde[1:2], self.beta_tilde[1:]]))
        self.posterior_c0 = beta * alpha_bar_prev.sqrt() / (1.0 - alpha_bar)
        self.posterior_ct = (1.0 - alpha_bar_prev) * (1.0 - beta).sqrt() / (1.0 - alpha_bar)

    @property
    def num_timesteps(self) -> int:
        return self.config.num_timesteps

    def sample_t(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Uniform integer timesteps (B,), one per video."""
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator,
                             device=generator.device if generator is not None else device)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the network sees (the integer t itself)."""
        return t.float()

    def noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x0): x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps  (DDPM Eq. 4)."""
        alpha_bar_t = _at(self.alpha_bar, t, x0)
        return alpha_bar_t.sqrt() * x0 + (1.0 - alpha_bar_t).sqrt() * eps

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)  (DDPM Eq. 4 inverted)."""
        alpha_bar_t = _at(self.alpha_bar, t, x_t)
        return (x_t - (1.0 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()

    def predict_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's estimate of x0 from its eps (the first C output channels)."""
        return self.x0_from_eps(x_t, t, model_output[:, :x_t.shape[1]].to(x_t.dtype))

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log variance of q(x_{t-1} | x_t, x0)  (DDPM Eqs. 6-7)."""
        mean = _at(self.posterior_c0, t, x_t) * x0 + _at(self.posterior_ct, t, x_t) * x_t
        return mean, _at(self.log_beta_tilde, t, x_t).expand_as(x_t)

    def model_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sigma = exp(v log beta_t + (1 - v) log beta_tilde_t), with the network's v in [-1, 1] mapped to [0, 1]
        (IDDPM Eq. 15)."""
        frac = (v + 1.0) / 2.0
        return frac * _at(self.betas.log(), t, v) + (1.0 - frac) * _at(self.log_beta_tilde, t, v)

    def vlb(self, eps_pred: torch.Tensor, v: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
            t: torch.Tensor) -> torch.Tensor:
        """L_t in bits per dimension, per video (B,): KL(q || p) for t > 0, decoder NLL at t = 0  (DDPM Eq. 5)."""
        true_mean, true_log_var = self.posterior(x0, x_t, t)
        model_mean, _ = self.posterior(self.x0_from_eps(x_t, t, eps_pred), x_t, t)
        model_log_var = self.model_log_variance(v, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def losses(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
               eps: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"loss", "mse", "vb"}, each (B,). ``model_output`` is (B, 2C, ...) = (eps, v), or (B, C, ...) = eps only."""
        C = x0.shape[1]
        if model_output.shape[1] not in (C, 2 * C) or model_output.shape[2:] != x0.shape[2:]:
            raise ValueError(f"model output {tuple(model_output.shape)} does not fit latents {tuple(x0.shape)}: "
                             f"expected {C} (eps) or {2 * C} (eps, v) channels")
        out = model_output.float()
        eps_pred = out[:, :C]
        mse = mean_flat((eps.float() - eps_pred) ** 2)                 # L_simple (DDPM Eq. 14)
        if out.shape[1] == C:
            return {"loss": mse, "mse": mse, "vb": torch.zeros_like(mse)}
        # mean detached: the VLB only trains the variance (IDDPM Sec. 3.1, "stop-gradient")
        vb = self.vlb(eps_pred.detach(), out[:, C:], x0.float(), x_t.float(), t)
        vb = vb * (self.config.vlb_lambda * self.num_timesteps)      # lambda * L_vlb with L_vlb = T * E_t[L_t]
        return {"loss": mse + vb, "mse": mse, "vb": vb}


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift (Eq. 23), the same map as diffusers' FlowMatchEulerDiscreteScheduler(shift=...)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


class RectifiedFlow:
    """Rectified flow (Liu et al. 2022; SD3 convention): x_t = (1 - sigma) x0 + sigma eps, target v = eps - x0.

    sigma ~ U(0, 1) per video, then shifted by ``sigma_shift`` (``shift_sigma``); the network sees
    sigma * num_timesteps, as diffusers' FlowMatchEulerDiscreteScheduler does at inference. Only the first
    C output channels are used (a model with learned sigma keeps its variance channels, untrained).
    """

    def __init__(self, config: DiffusionConfig = DiffusionConfig(objective="rf")):
        self.config = config

    @property
    def num_timesteps(self) -> int:
        return self.config.num_timesteps

    def sample_t(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """sigma ~ U(0, 1) then shifted, shape (B,), one per video."""
        u = torch.rand(batch, generator=generator, device=generator.device if generator is not None else device)
        return shift_sigma(u, self.config.sigma_shift)

    def model_time(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * self.num_timesteps

    def noise(self, x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        return (1.0 - sigma) * x0 + sigma * eps

    def predict_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x0 = x_t - sigma v, the point a single Euler step from sigma to 0 lands on."""
        sigma = sigma.to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return x_t - sigma * model_output[:, :x_t.shape[1]].to(x_t.dtype)

    def losses(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor,
               eps: torch.Tensor) -> dict[str, torch.Tensor]:
        C = x0.shape[1]
        if model_output.shape[1] < C or model_output.shape[2:] != x0.shape[2:]:
            raise ValueError(f"model output {tuple(model_output.shape)} does not fit latents {tuple(x0.shape)}")
        mse = mean_flat((eps.float() - x0.float() - model_output[:, :C].float()) ** 2)   # d x_t / d sigma = eps - x0
        return {"loss": mse, "mse": mse, "vb": torch.zeros_like(mse)}


def build_diffusion(config: DiffusionConfig) -> GaussianDiffusion | RectifiedFlow:
    """The one factory for training objectives."""
    if config.objective == "iddpm":
        return GaussianDiffusion(config)
    elif config.objective == "rf":
        return RectifiedFlow(config)
    raise ValueError(f"unknown diffusion objective {config.objective!r}; choose 'iddpm' or 'rf'")
