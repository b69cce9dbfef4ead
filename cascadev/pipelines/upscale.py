"""The resize route at inference (CascadeV, Fig. 4b): 4x resolution or 4x frame rate, a diffusers ``DiffusionPipeline``.

A DiT trained on the resize route (``condition.route: resize``) reads, beside the noisy Stage A latent, a Stage A
latent of the same video at 1/``spatial_factor`` of the size and/or 1/``temporal_factor`` of the frames, brought
back to the full grid exactly as in training (``conditioning.upsample_condition``). At inference that small latent is
the user's: the Stage A encoding of a small or low-frame-rate video, or latents another model made in Stage A's
space. So the output has ``spatial_factor`` x the size and ``temporal_factor`` x the frames (and frame rate).

``encode``: low video (B, 3, T', H', W') -> scaled Stage A latents (B, 4, T', H'/8, W'/8).
``condition``: those -> (B, 4, T' kt, h' ks, w' ks) on the output's latent grid.
``upscale_latents``: DiT sampling of the output's Stage A latents (windows and tiles, ``sampling.sample``).
``upscale``: pixels or latents in, video (B, 3, T' kt, 8 h' ks, 8 w' ks) out; for frame rate alone, the given
frames can be kept as they are (``keep_input_frames``), as frame interpolation does; ``colour_fix=f`` keeps the
output's detail above the band of f x f pixel blocks over that band of the input brought to the output's grid as the
condition is (``colour_reference``): StableSR's colour fix, as ``CascadeVPipeline`` does with the Previewer.

The route's factors are part of the pipeline's config (``model_index.json``); a folder may leave out ``vae/`` and
name the Stage A it shares with a cascade in ``vae_source`` (the built-in tiny 4x frame-rate model does).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from cascadev.pipelines.cascade import (CascadeVPipelineOutput, check_pipeline_class, format_frames, initial_noise,
                                        load_saved_scheduler, load_vae)
from cascadev.pipelines.frames import fix_colour
from cascadev.pipelines.conditioning import temporal_upsample, upsample_condition
from cascadev.progress import bar_settings
from cascadev.pipelines.runtime import DecoderRuntimeMixin
from cascadev.pipelines.sampling import sample
from cascadev.pipelines.tiling import Tiling
from dit.video_dit import VideoDiT
from cascadev.checks import check_video
from vae.stage_a import DOWNSAMPLE, StageAVAE, stage_a_settings

PIPELINE_CLASS = "CascadeVUpscalePipeline"
TINY_FPS4X = Path(__file__).resolve().parents[1] / "assets" / "tiny_fps4x"


class CascadeVUpscalePipeline(DecoderRuntimeMixin, DiffusionPipeline):
    """Resize-route DiT + Stage A VAE + the sampler it was trained for. Videos (B, 3, T, H, W) in [-1, 1]; latents
    (B, 4, T, h, w), scaled by Stage A's ``scale_factor``.

    Registered settings: ``spatial_factor`` and ``temporal_factor`` (the route, as trained), ``stage_a`` (latent
    scale, chunks and tiles of Stage A), ``num_inference_steps``, ``vae_source`` (where Stage A lives when the folder
    has no ``vae/``: a path relative to the folder, or a hub id), ``colour_fix`` (the default block size of the colour
    fix, None: off) and ``demo`` (what ``cascadev demo --fps-x4`` uses).
    """

    model_cpu_offload_seq = "vae->dit"

    def __init__(self, dit: VideoDiT, vae: torch.nn.Module, scheduler: SchedulerMixin, spatial_factor: int = 4,
                 temporal_factor: int = 1, stage_a: dict | None = None, num_inference_steps: int = 8,
                 vae_source: str | None = None, colour_fix: int | None = None, demo: dict | None = None):
        super().__init__()
        stage_a_vae = StageAVAE.around(vae, stage_a)
        c = dit.config
        if c.cond_channels != c.latent_channels or c.latent_channels != vae.config.latent_channels:
            raise ValueError(f"not a resize-route DiT: its condition has {c.cond_channels} channels, its latent "
                             f"{c.latent_channels}, the Stage A VAE's {vae.config.latent_channels} (all must be equal)")
        if spatial_factor < 1 or temporal_factor < 1 or spatial_factor * temporal_factor == 1:
            raise ValueError(f"the route's factors must be >= 1 and not both 1, got spatial {spatial_factor}, "
                             f"temporal {temporal_factor}")
        self.register_modules(dit=dit, vae=vae, scheduler=scheduler)
        self.register_to_config(spatial_factor=spatial_factor, temporal_factor=temporal_factor,
                                stage_a=stage_a_settings(stage_a_vae.config), num_inference_steps=num_inference_steps,
                                vae_source=vae_source, colour_fix=colour_fix, demo=demo)
        for module in (dit, vae):
            module.eval().requires_grad_(False)
        self.stage_a = stage_a_vae
        self.timings: dict[str, float] = {}
        self.set_progress_bar_config(desc="denoising", **bar_settings())     # the DiT's steps

    @property
    def factors(self) -> tuple[int, int]:
        """(spatial_factor, temporal_factor) of the route."""
        return self.config.spatial_factor, self.config.temporal_factor

    def output_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T, H, W) of the output for an input of ``frames`` x ``height`` x ``width`` (pixels or latent cells
        alike)."""
        ks, kt = self.factors
        return frames * kt, height * ks, width * ks

    def check_input(self, frames: int, height: int | None = None, width: int | None = None,
                    colour_fix: int | None = None) -> None:
        """``check_route_input`` with this pipeline's settings."""
        check_route_input(self.config, frames, height, width, colour_fix)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Low video (B, 3, T', H', W') in [-1, 1] -> scaled Stage A latents (B, 4, T', H'/8, W'/8)."""
        check_video(video, 3, DOWNSAMPLE, f"{PIPELINE_CLASS}.encode", pixels=True)
        return self._timed("encode", lambda: self.stage_a.encode(video, device=self._execution_device))

    def condition(self, small: torch.Tensor) -> torch.Tensor:
        """Small latents (B, 4, T', h', w') -> the DiT's condition (B, 4, T' kt, h' ks, w' ks), as in training."""
        check_video(small, self.dit.config.cond_channels, 1, f"{PIPELINE_CLASS}.condition")
        return upsample_condition(small.float(), self.output_shape(*small.shape[2:]), self.config.temporal_factor)

    @torch.no_grad()
    def upscale_latents(self, small: torch.Tensor, steps: int | None = None, seed: int = 0,
                        scheduler: str | SchedulerMixin | None = None, tiling: str | Tiling = "blend",
                        window_batch: int = 1, generator: torch.Generator | None = None,
                        callback=None) -> torch.Tensor:
        """Small scaled latents (B, 4, T', h', w') -> the output's scaled latents (B, 4, T' kt, h' ks, w' ks).
        Noise drawn frames first from ``seed``, or with the steps' from ``generator`` (``cascade.initial_noise``);
        scheduler: the saved one unless named; ``callback(i, t, latents)`` after each step may return replacements."""
        self.check_input(small.shape[2])
        device = self._execution_device
        cond = self.condition(small.to(device))
        noise, generator = initial_noise((cond.shape[0], self.dit.config.latent_channels, *cond.shape[2:]), seed,
                                         generator, device)
        scheduler = self.resolve_scheduler(scheduler)
        steps = self.config.num_inference_steps if steps is None else steps
        with self.step_progress(steps, callback) as callback:
            return self._timed("dit", lambda: sample(self.dit, cond, noise.float(), scheduler, steps, tiling,
                                                     generator=generator, callback=callback, window_batch=window_batch))

    def colour_reference(self, low: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Output frames ``start:end`` of the low video (B, 3, T', H', W') brought to the output's grid as the condition
        is (linear in time, bilinear in space): the colour fix's reference (B, 3, end - start, H' ks, W' ks)."""
        kt = self.config.temporal_factor
        first = start // kt                       # the low frames these output frames lie between, and one more
        part = low[:, :, first:min(-(-end // kt) + 1, low.shape[2])].float()
        frames = temporal_upsample(part, kt, end - first * kt)[:, :, start - first * kt:]
        H, W = low.shape[-2:]
        return upsample_condition(frames, (frames.shape[2], H * self.config.spatial_factor,
                                           W * self.config.spatial_factor))

    @torch.no_grad()
    def upscale_pieces(self, video: torch.Tensor | None = None, latents: torch.Tensor | None = None,
                       keep_input_frames: bool | None = None, colour_fix: int | None = None,
                       **sample_kwargs) -> Iterator[torch.Tensor]:
        """``upscale`` in pieces (B, 3, t, H, W), in frame order, each yielded when Stage A has decoded it."""
        if (video is None) == (latents is None):
            raise ValueError("give either video= (B, 3, T, H, W) or latents= (B, 4, T, h, w)")
        keep = self.keeps_input_frames(video is not None) if keep_input_frames is None else keep_input_frames
        if keep and (video is None or self.config.spatial_factor != 1):
            raise ValueError("keep_input_frames needs a video input and a frame-rate-only route (spatial_factor 1)")
        fix = self.config.colour_fix if colour_fix is None else colour_fix
        if video is not None:
            self.check_input(*video.shape[2:], colour_fix=fix)
            latents = self.encode(video)
        else:
            self.check_input(latents.shape[2], *(n * DOWNSAMPLE for n in latents.shape[3:]), colour_fix=fix)
        z = self.upscale_latents(latents, **sample_kwargs)
        low = None
        if fix:       # the reference: the input's pixels (a latents input: Stage A's decoding of it)
            low = (video if video is not None
                   else self.stage_a.decode(latents, device=self._execution_device).clamp(-1, 1))
        pieces = self.stage_a.decode_pieces(z, self.progress_enabled(), self._execution_device)
        kt, start = self.config.temporal_factor, 0
        while (piece := self._timed("stage_a", lambda: next(pieces, None))) is not None:
            piece, end = piece.clamp_(-1, 1), start + piece.shape[2]
            if fix:
                piece = fix_colour(piece, self.colour_reference(low, start, end).to(piece), fix)
            if keep:   # output frame i * kt is input frame i
                first = -(-start // kt) * kt
                piece[:, :, first - start::kt] = video[:, :, first // kt:(end + kt - 1) // kt].to(piece)
            yield piece
            start = end

    def keeps_input_frames(self, from_video: bool) -> bool:
        """The default of ``keep_input_frames``: on for a video input to a frame-rate-only route."""
        return from_video and self.config.spatial_factor == 1

    @torch.no_grad()
    def upscale(self, video: torch.Tensor | None = None, latents: torch.Tensor | None = None,
                keep_input_frames: bool | None = None, colour_fix: int | None = None, **sample_kwargs) -> torch.Tensor:
        """A low video (B, 3, T', H', W') in [-1, 1] or its scaled Stage A latents (B, 4, T', h', w') -> video
        (B, 3, T' kt, H' ks, W' ks) in [-1, 1] (kt, ks: the route's factors; H' = 8 h' for latents).

        ``keep_input_frames`` (frame rate only; default on for a video): output frame i kt is input frame i as given,
        the DiT's frames go between. ``colour_fix``: block size of the colour fix (default: the saved one; 0: off).
        ``sample_kwargs``: ``steps``, ``seed``, ``scheduler``, ``tiling``, ``window_batch`` (``upscale_latents``).
        Progress bars: ``set_progress_bar_config``."""
        pieces = self.upscale_pieces(video, latents, keep_input_frames, colour_fix, **sample_kwargs)
        return torch.cat(list(pieces), dim=2)

    @torch.no_grad()
    def __call__(self, video: torch.Tensor | None = None, latents: torch.Tensor | None = None,
                 num_inference_steps: int | None = None, generator: torch.Generator | None = None,
                 tiling: str | Tiling = "blend", colour_fix: int | None = None, keep_input_frames: bool | None = None,
                 output_type: str = "pt", return_dict: bool = True, callback_on_step_end=None,
                 window_batch: int = 1):
        """Raise the resolution / frame rate of a low ``video`` (B, 3, T', H', W') in [-1, 1] or of its scaled Stage A
        ``latents`` (B, 4, T', h', w'), as ``upscale``.

        num_inference_steps: DiT steps (default: the saved ones). generator: the noise and ancestral steps (default:
        seed 0, as ``upscale``). output_type: "pt" (B, 3, T, H, W) in [-1, 1], "np" (B, T, H, W, 3) in [0, 1],
        "pil", or "latent" (the output's scaled Stage A latents). callback_on_step_end(pipe, i, t, {"latents": ...})
        after each DiT step; may return {"latents": ...} to replace them. Returns ``CascadeVPipelineOutput(frames)``,
        or ``(frames,)`` without ``return_dict``."""
        if output_type not in ("pt", "np", "pil", "latent"):
            raise ValueError(f"output_type must be 'pt', 'np', 'pil' or 'latent', got {output_type!r}")

        def on_step(i, t, z):
            if callback_on_step_end is None:
                return None
            return (callback_on_step_end(self, i, t, {"latents": z}) or {}).get("latents")
        sampling = dict(steps=num_inference_steps, generator=generator, tiling=tiling, window_batch=window_batch,
                        callback=on_step)
        if output_type == "latent":
            if latents is None:
                self.check_input(*video.shape[2:])
                latents = self.encode(video)
            frames = self.upscale_latents(latents, **sampling)
        else:
            frames = format_frames(self.upscale(video, latents, keep_input_frames, colour_fix, **sampling), output_type)
        self.maybe_free_model_hooks()
        return CascadeVPipelineOutput(frames=frames) if return_dict else (frames,)


def check_route_input(settings: dict, frames: int, height: int | None = None, width: int | None = None,
                      colour_fix: int | None = None) -> None:
    """Raise ValueError, before any compute, for an input a route (its saved ``settings``: ``spatial_factor``,
    ``temporal_factor``) cannot take: pixel sides (when given) not multiples of Stage A's 8, a single frame to raise
    the frame rate of, or output sides the colour fix's block size does not divide."""
    if frames < 1:
        raise ValueError("the input has no frames")
    if settings["temporal_factor"] > 1 and frames < 2:
        raise ValueError(f"{settings['temporal_factor']}x frame rate needs at least 2 input frames to go between, "
                         f"got {frames}")
    for name, n in (("height", height), ("width", width)):
        if n is not None and (n < DOWNSAMPLE or n % DOWNSAMPLE):
            raise ValueError(f"input {name} {n} is not a positive multiple of {DOWNSAMPLE} (Stage A's downsampling)")
        if n is not None and colour_fix and n * settings["spatial_factor"] % colour_fix:
            raise ValueError(f"output {name} {n * settings['spatial_factor']} is not a multiple of the colour fix's "
                             f"{colour_fix} px blocks (turn it off with colour_fix=0 / --colour-fix 0)")


def saved_settings(weights: str | Path) -> dict:
    """The settings (``model_index.json``) of a resize-route folder, read without loading weights; a folder of
    another kind is refused in one line."""
    folder = Path(weights)
    index = folder / "model_index.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: weights folder not found")
    if not index.is_file():
        raise ValueError(f"{folder}: not a resize-route model (no model_index.json; expected a folder written by "
                         f"{PIPELINE_CLASS}.save_pretrained)")
    check_pipeline_class(folder, CascadeVUpscalePipeline)
    defaults = {name: p.default for name, p in inspect.signature(CascadeVUpscalePipeline.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **json.loads(index.read_text())}


def load_upscale(weights: str | Path, vae: str | Path | None = None,
                 torch_dtype: torch.dtype | None = None) -> CascadeVUpscalePipeline:
    """A resize-route pipeline from its folder; Stage A from ``vae`` (a diffusers folder or hub id), else the folder's
    ``vae/``, else its saved ``vae_source``. A folder of another kind is refused in one line."""
    folder, saved = Path(weights), saved_settings(weights)
    source = vae
    if source is None and not (folder / "vae").is_dir():
        if not saved.get("vae_source"):
            raise FileNotFoundError(f"{folder}: no vae/ and no vae_source: give the Stage A VAE the DiT was trained on")
        source = saved["vae_source"]
        local = (folder / source).resolve()
        source = local if local.exists() else source
    parts = {} if source is None else {"vae": load_vae(source, torch_dtype)}
    if scheduler := load_saved_scheduler(folder):             # a damaged scheduler_config.json names itself
        parts["scheduler"] = scheduler
    pipe = CascadeVUpscalePipeline.from_pretrained(str(folder), torch_dtype=torch_dtype, **parts)
    if torch_dtype is None:      # weights stored in half precision (the small shipped model) run in fp32 by default
        pipe.set_precision(torch.float32)
    return pipe
