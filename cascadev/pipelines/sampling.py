"""Sampling the LDM-VAE decoder over diffusers schedulers, the DiT run over the windows and tiles of a clip.

All tensors here are already-scaled latents in the layout (B, C, T, H, W). ``cond`` is the semantic
latent upsampled to the Stage A grid; the model sees ``cat([noisy latent, cond])`` at every step.
Where the windows go and how their outputs merge (``blend``, ``official``, ``shifted``): ``cascadev.pipelines.tiling``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from einops import rearrange

from cascadev.errors import first_line
from cascadev.pipelines.tiling import Crop, Tiling, crops_by_size, merge_windows, window_crops
from cascadev.weights import read_json_object

SCHEDULERS = {                   # short names, as the CLI takes them
    "euler_a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "dpmpp": DPMSolverMultistepScheduler,         # algorithm_type "dpmsolver++" by default
    "flow": FlowMatchEulerDiscreteScheduler,      # models trained with rectified flow: v = eps - x0
                                                  # (cascadev.training.diffusion)
}
NEGLIGIBLE_NOISE = 0.05   # noise-to-signal ratio below which a step only polishes what is there


def finishing_step(scheduler: SchedulerMixin) -> int:
    """The last step of a scheduler (after ``set_timesteps``) that starts from a noise-to-signal ratio of at least
    ``NEGLIGIBLE_NOISE``: the step whose prediction sets the sample's detail. Flow matching's 4 steps start at sigma
    1, 0.67, 0.33 and 0.001, so the third (index 2) finishes; the release's 8 Euler-ancestral steps end at t = 0 and
    the seventh (t = 142, ratio 0.45) finishes."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        sigma = scheduler.sigmas[:len(scheduler.timesteps)].double().cpu()
        ratio = sigma / (1 - sigma).clamp(min=1e-12)
    else:
        alpha = scheduler.alphas_cumprod.double()[scheduler.timesteps.round().long().cpu()]
        ratio = ((1 - alpha) / alpha).sqrt()
    above = (ratio >= NEGLIGIBLE_NOISE).nonzero()
    return int(above[-1]) if len(above) else len(ratio) - 1


def make_scheduler(name: str | SchedulerMixin = "euler_a", config: dict | None = None) -> SchedulerMixin:
    """A diffusers scheduler by short name, with its default config (as the release used them) or ``config``.

    One exception: DDIM's default ``clip_sample=True`` clamps the predicted x0 to [-1, 1], a rule for
    pixels that distorts latents, so it is off unless ``config`` turns it on (the release's DDIM path
    kept the clamp: pass ``{"clip_sample": True}`` to reproduce it).
    """
    if isinstance(name, SchedulerMixin):
        return name
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {tuple(SCHEDULERS)}")
    cls = SCHEDULERS[name]
    defaults = {"clip_sample": False} if name == "ddim" else {}
    return cls.from_config(cls().config, **{**defaults, **(config or {})})


def scheduler_for_objective(diffusion, eps_sampler: str = "euler_a") -> SchedulerMixin:
    """The sampler of a training objective (``cascadev.training.diffusion.DiffusionConfig``): flow Euler at the
    trained ``sigma_shift`` for rectified flow (the model predicts v = eps - x0), else ``eps_sampler`` (eps)."""
    if diffusion.objective == "rf":
        return make_scheduler("flow", {"shift": diffusion.sigma_shift})
    return make_scheduler(eps_sampler)


def load_scheduler(folder: str | Path) -> SchedulerMixin:
    """A scheduler saved by ``save_pretrained`` (``scheduler_config.json``), one of ``SCHEDULERS``' classes."""
    config_file = Path(folder) / "scheduler_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no scheduler_config.json "
                                "(a folder written by a scheduler's save_pretrained)")
    name = read_json_object(config_file, "a scheduler config").get("_class_name")
    cls = next((c for c in SCHEDULERS.values() if c.__name__ == name), None)
    if cls is None:
        raise ValueError(f"{config_file}: scheduler {name!r} is not one of "
                         f"{', '.join(c.__name__ for c in SCHEDULERS.values())}")
    return build_saved_scheduler(cls, folder)


def build_saved_scheduler(cls: type[SchedulerMixin], folder: str | Path) -> SchedulerMixin:
    """``cls.from_pretrained(folder)`` set to a few steps once, so that a damaged ``scheduler_config.json`` (no
    training timesteps, a word for a number) fails here in one line naming it, not inside diffusers or in the first
    denoising step."""
    try:
        scheduler = cls.from_pretrained(folder)
        copy.deepcopy(scheduler).set_timesteps(2)
    except OSError:
        raise
    except Exception as e:      # whatever the scheduler's own code raises on such a config
        raise ValueError(f"{Path(folder) / 'scheduler_config.json'}: does not make a working {cls.__name__} "
                         f"({first_line(e)})") from None
    return scheduler


def set_steps(scheduler: SchedulerMixin, steps: int, device: torch.device | str | None = None) -> None:
    """``scheduler.set_timesteps(steps)``, refusing a schedule that is not finite: diffusers' flow scheduler with a
    ``shift_terminal`` (a 2-step distilled student's) divides 0 by 0 at 1 step."""
    terminal = getattr(scheduler.config, "shift_terminal", None)
    message = f"{type(scheduler).__name__} gives no finite noise levels at {steps} step(s)"
    if terminal and steps < 2:
        raise ValueError(f"{message} (its shift_terminal {terminal} needs at least 2 steps)")
    scheduler.set_timesteps(steps, device=device)
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and not torch.isfinite(sigmas).all():
        raise ValueError(message)


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """The short name of a scheduler's class ("euler_a", "flow", ...), or its class name."""
    return next((name for name, cls in SCHEDULERS.items() if type(scheduler) is cls), type(scheduler).__name__)


def _pad_to(x: torch.Tensor, multiples: tuple[int, int, int]) -> torch.Tensor:
    """Pad (B, C, T, H, W) at the end of T, H, W by repetition up to the given multiples."""
    T, H, W = x.shape[2:]
    pads = [(-n) % m for n, m in zip((T, H, W), multiples)]
    if not any(pads):
        return x
    return F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]), mode="replicate")


def _run_window(model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eps of one window (B, C_in, T, H, W) -> (B, C_latent, T, H, W) in x's dtype; pads sizes the partitions
    need. The model runs in its own dtype (half precision stays inside the network)."""
    net = getattr(model, "module", model)   # as predict_noise
    T, H, W = x.shape[2:]
    weights = next(model.parameters(), None)
    padded = _pad_to(x, (net.frame_multiple, net.spatial_multiple, net.spatial_multiple))
    out = model(padded if weights is None else padded.to(weights.dtype), t)
    return out[:, : net.config.latent_channels, :T, :H, :W].to(x.dtype)


def _crops_eps(model, x: torch.Tensor, t: torch.Tensor, crops: list[Crop], window_batch: int) -> list[torch.Tensor]:
    """Eps of every crop of x (B, C_in, T, H, W), up to ``window_batch`` crops of one size stacked on the batch per
    forward. Returns one (B, C_latent, *crop size) per crop, in order."""
    out: list[torch.Tensor | None] = [None] * len(crops)
    for group in crops_by_size(crops):
        for i in range(0, len(group), window_batch):
            batch = group[i:i + window_batch]
            stacked = torch.cat([x[:, :, f, r, c] for f, r, c in (crops[j] for j in batch)])  # (k b) c t h w
            for j, eps in zip(batch, _run_window(model, stacked, t.repeat(len(batch))).chunk(len(batch))):
                out[j] = eps
    return out


def _distributed_eps(model, x: torch.Tensor, t: torch.Tensor, crops: list[Crop],
                     window_batch: int) -> list[torch.Tensor]:
    """``_crops_eps`` with the crops of each size split across the process group's ranks and the eps all-gathered."""
    from cascadev.pipelines.distributed import gather_eps, share, world

    rank, size = world()
    if size == 1:
        return _crops_eps(model, x, t, crops, window_batch)
    out: list[torch.Tensor | None] = [None] * len(crops)
    for group in crops_by_size(crops):      # gather_eps all-gathers one shape at a time
        mine = _crops_eps(model, x, t, [crops[j] for j in share(group, rank, size)], window_batch)
        for j, eps in zip(group, gather_eps(mine, len(group), size)):
            out[j] = eps
    return out


def predict_noise(model, x: torch.Tensor, t: torch.Tensor | float, tiling: str | Tiling = "blend",
                  window_batch: int = 1, distributed: bool = False, step: int = 0) -> torch.Tensor:
    """Eps for a whole clip. x: (B, C_in, T, H, W) = cat([noisy latent, cond]), any size; t: scalar or (B,).

    Returns (B, C_latent, T, H, W): the eps channels of the model output (the learned variance is
    not used by the schedulers); for a rectified-flow model, its velocity. ``window_batch`` windows and
    tiles go through the model per forward (same result as one by one, within rounding; faster on a GPU).
    ``distributed``: with an initialised process group of several ranks, each holding the same x, every rank runs
    its share of the windows/tiles and all-gathers the others' (``cascadev.pipelines.distributed``); all ranks
    return the same eps. A no-op without such a group; every rank must call it (a collective).
    ``step``: the denoising step's index, where ``shifted`` tiling places its grid (``window_crops``).
    """
    net = getattr(model, "module", model)   # a DDP-wrapped student: settings from inside, calls through the wrapper
    c = net.config
    tiling = Tiling.of(tiling)
    if x.ndim != 5 or x.shape[1] != net.in_channels:
        raise ValueError(f"predict_noise expects (B, {net.in_channels}, T, H, W) = noisy latent + condition, "
                         f"got {tuple(x.shape)}")
    if window_batch < 1:
        raise ValueError(f"window_batch must be >= 1, got {window_batch}")
    B, _, T, H, W = x.shape
    if tiling.mode == "official" and (T < c.window_frames or min(H, W) < c.window_size):
        raise ValueError(f"official tiling needs at least {c.window_frames} latent frames and {c.window_size}x"
                         f"{c.window_size} latents, got {T}x{H}x{W}; use tiling='blend' for smaller clips")
    t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(B)

    crops = window_crops(net.window, (T, H, W), tiling, step)
    if len(crops) == 1:
        return _run_window(model, x, t)
    eps = (_distributed_eps(model, x, t, crops, window_batch) if distributed
           else _crops_eps(model, x, t, crops, window_batch))
    return merge_windows(eps, crops, net.window, (T, H, W), tiling)


@torch.no_grad()
def sample(model, cond: torch.Tensor, noise: torch.Tensor, scheduler: str | SchedulerMixin = "euler_a",
           steps: int = 8, tiling: str | Tiling = "blend", generator: torch.Generator | None = None,
           scheduler_config: dict | None = None,
           callback: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
           window_batch: int = 1, distributed: bool = False) -> torch.Tensor:
    """Denoise ``noise`` (B, C_latent, T, H, W) given ``cond`` (B, C_cond, T, H, W); both already scaled.

    The release's loop (recon/refine_latent.py): scale the noise by ``init_noise_sigma``, then at each
    timestep predict eps on cat([scaled input, cond]) and take a scheduler step. The step runs on
    frames as a batch, (B*T, C, H, W), the release's layout, so a seeded ancestral sampler draws the
    same noise as the released code. ``callback(i, t, latents)`` runs after step i with the latents
    (B, C_latent, T, H, W) and may return replacements (a pipeline advances its progress bar there).
    ``window_batch``: windows/tiles per forward.
    ``distributed``: split each step's windows/tiles across the process group's ranks (``predict_noise``); every
    rank must pass the same noise, cond and generator seed, so that all step identically.
    Returns the denoised latents (B, C_latent, T, H, W).
    """
    c = model.config
    if noise.ndim != 5 or noise.shape[1] != c.latent_channels:
        raise ValueError(f"noise must be (B, {c.latent_channels}, T, H, W), got {tuple(noise.shape)}")
    if cond.shape[0] != noise.shape[0] or cond.shape[2:] != noise.shape[2:] or cond.shape[1] != c.cond_channels:
        raise ValueError(f"cond must be (B, {c.cond_channels}, T, H, W) matching noise {tuple(noise.shape)}, "
                         f"got {tuple(cond.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if distributed:
        from cascadev.pipelines.distributed import broadcast, world

        if world()[1] > 1:   # every rank steps from rank 0's inputs, so all stay identical
            cond, noise = broadcast(cond), broadcast(noise)
    scheduler = make_scheduler(scheduler, scheduler_config)
    set_steps(scheduler, steps, noise.device)
    predict = window_predictor(model, cond, scheduler, tiling, window_batch, distributed)
    return denoise_loop(predict, noise, scheduler, generator, callback)


def window_predictor(model, cond: torch.Tensor, scheduler: SchedulerMixin, tiling: str | Tiling = "blend",
                     window_batch: int = 1, distributed: bool = False
                     ) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """``predict(x, t, i)`` for ``denoise_loop``: the model's eps (B, C_latent, T, H, W) on cat([x, cond]) over the
    clip's windows and tiles at step i (``predict_noise``; ``shifted`` tiling blends the scheduler's finishing step,
    so call it after ``set_timesteps``). Differentiable: step distillation trains through it."""
    tiling = Tiling.of(tiling)
    finishing = finishing_step(scheduler)

    def predict(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        return predict_noise(model, torch.cat([x, cond.to(x)], dim=1), t, tiling.at_step(i, finishing), window_batch,
                             distributed, step=i)
    return predict


def denoise_loop(predict: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], noise: torch.Tensor,
                 scheduler: SchedulerMixin, generator: torch.Generator | None = None,
                 callback: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None
                 ) -> torch.Tensor:
    """The release's loop (recon/refine_latent.py) over a scheduler after ``set_timesteps``: noise (B, C, T, H, W)
    -> latents (B, C, T, H, W). ``predict(x, t, i)``: the model's eps (or velocity) for the scaled input x
    (B, C, T, H, W) at timestep t, step i. Steps run on frames as a batch, (B*T, C, H, W), the release's layout.
    Differentiable: ``sample`` runs it without gradients over windows and tiles, step distillation
    (``cascadev.training.distillation``) with gradients through a student's steps."""
    T = noise.shape[2]

    def to_frames(z: torch.Tensor) -> torch.Tensor:
        return rearrange(z, "b c t h w -> (b t) c h w")

    def from_frames(z: torch.Tensor) -> torch.Tensor:
        return rearrange(z, "(b t) c h w -> b c t h w", t=T)

    # flow matching starts from unit noise and has no input scaling
    latents = to_frames(noise * getattr(scheduler, "init_noise_sigma", 1.0))
    for i, t in enumerate(scheduler.timesteps):
        scaled = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        eps = predict(from_frames(scaled), t, i)
        latents = scheduler.step(to_frames(eps), t, latents, generator=generator, return_dict=False)[0]
        if callback is not None and (replaced := callback(i, t, from_frames(latents))) is not None:
            latents = to_frames(replaced)
    return from_frames(latents)
