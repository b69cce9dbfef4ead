"""Another model's VAE as the source of the cascade: its latents -> its pixels -> our semantic latents -> 2K.

``SourceVAE.from_pretrained(folder or hub id, subfolder)`` loads the diffusers autoencoder that the folder's
``config.json`` names (``_class_name``), any of ``SOURCE_VAE_CLASSES``, and knows its latent layout: channels,
t x s x s compression, and for video VAEs the causal first frame (T latent frames decode to 1 + t(T - 1) frames).

Normalisation: a text-to-video model's denoiser makes *normalised* latents; its diffusers pipeline maps them to the
VAE's *raw* latents just before ``vae.decode``. ``to_raw`` applies that map, formula for formula (``_affine``), and
``from_raw`` inverts it. Each is an affine map raw = z * a + b:

| class | a | b | diffusers pipeline |
|---|---|---|---|
| AutoencoderKL | std / scaling (latents_std set), else 1 / scaling | mean, else shift_factor (0) | stable_diffusion_xl, stable_diffusion_3, flux |
| AutoencoderTiny, AutoencoderKLTemporalDecoder | 1 / scaling | 0 | stable_diffusion, stable_video_diffusion |
| AutoencoderKLHunyuanVideo, AutoencoderKLCogVideoX | 1 / scaling | 0 | hunyuan_video, cogvideo |
| AutoencoderKLWan | latents_std (per channel) | latents_mean | wan (also Wan 2.2's 48-channel VAE) |
| AutoencoderKLLTXVideo | latents_std / scaling (the model's buffers) | latents_mean (buffer) | ltx (``_denormalize_latents``) |
| AutoencoderKLMochi | latents_std / scaling (set), else 1 / scaling | latents_mean, else 0 | mochi |
| AutoencoderKLCosmos | latents_std[c, t] / sigma_data (set), else 1 / sigma_data | latents_mean[c, t], else 0 | cosmos (text2world) |

Decoding is bounded: one video of the batch at a time; video VAEs with their own tiling switched on
(``enable_tiling``: diffusers tiles only frames larger than the VAE's tile, e.g. Wan 256 px) and their own frame
batching; image VAEs through ``StageAVAE`` (chunks of frames and our blended tiles, as Stage A decodes).
"""  # noqa: E501 (the table's rows)

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn as nn
from einops import rearrange

from cascadev.errors import first_line
from cascadev.pipelines.frames import frames_per_piece, infer_size, resize_video
from cascadev.weights import is_hub_id
from vae.stage_a import KIND_OF_CLASS, StageAConfig, StageAVAE

IMAGE_VAES = ("AutoencoderKL", "AutoencoderTiny", "AutoencoderKLTemporalDecoder")      # frame by frame, f8
VIDEO_VAES = ("AutoencoderKLWan", "AutoencoderKLHunyuanVideo", "AutoencoderKLCogVideoX", "AutoencoderKLLTXVideo",
              "AutoencoderKLMochi", "AutoencoderKLCosmos")                               # 3D, causal in time
SOURCE_VAE_CLASSES = IMAGE_VAES + VIDEO_VAES
COSMOS_SIGMA_DATA = 0.5         # Cosmos 1.0's EDMEulerScheduler (its default): the pipeline divides by it, not scaling
LTX_DECODE_TIMESTEP = 0.0       # LTXPipeline's default decode_timestep (and noise scale) for timestep-conditioned VAEs
DEFAULT_LONG_SIDE = 2048        # the cascade's output when neither scale nor size is given


def find_config(source: str | Path, subfolder: str | None = None) -> tuple[Path, str | None]:
    """The VAE's ``config.json`` and the subfolder it is in: a local folder (``folder/subfolder``; without a
    subfolder, ``folder`` or else ``folder/vae``), or a hub id (the file fetched, or the cached copy offline)."""
    source = str(source)
    if not is_hub_id(source):
        root = Path(source).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"source VAE folder {root} not found")
        tried = ([root / subfolder / "config.json"] if subfolder
                 else [root / "config.json", root / "vae" / "config.json"])
        for path in tried:
            if path.is_file():
                return path, subfolder or (None if path.parent == root else "vae")
        raise FileNotFoundError(f"no config.json in {' or '.join(str(p.parent) for p in tried)}: give the folder of a "
                                f"diffusers VAE (written by save_pretrained), or --source-vae-subfolder")
    from huggingface_hub import hf_hub_download
    try:
        return Path(hf_hub_download(source, "config.json", subfolder=subfolder)), subfolder
    except Exception as e:        # offline, no such repo or file: one line, with what to do
        where = f"{source}/{subfolder + '/' if subfolder else ''}config.json"
        raise FileNotFoundError(f"cannot fetch {where} from the hub ({type(e).__name__}): download it once online "
                                f"(hf download {source} --include '{subfolder + '/' if subfolder else ''}*'), "
                                f"or give a local folder") from None


def vae_class(config_file: Path) -> type:
    """The diffusers class that ``config_file`` names, if a ``SOURCE_VAE_CLASSES`` one."""
    name = json.loads(Path(config_file).read_text()).get("_class_name")
    if name not in SOURCE_VAE_CLASSES:
        raise ValueError(f"{config_file}: _class_name {name!r} is not a VAE cascadev can decode "
                         f"(one of {', '.join(SOURCE_VAE_CLASSES)})")
    import diffusers
    if not hasattr(diffusers, name):
        raise ValueError(f"{config_file}: {name} is not in the installed diffusers {diffusers.__version__}")
    return getattr(diffusers, name)


@contextlib.contextmanager
def _quiet_diffusers():
    """AutoencoderTiny saves block_out_channels, then warns that the key is unexpected when it loads."""
    from diffusers.utils import logging as diffusers_logging
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


class SourceVAE:
    """A diffusers autoencoder whose latents (B, C, T, h, w) the cascade decodes: their layout, their normalisation
    (``to_raw`` / ``from_raw``, as the model's own pipeline does it), their decoding to pixels (B, 3, T', H, W).

    ``scaling_factor`` replaces the config's (``--latent-space sd-vae --vae-scale``); ``sigma_data``: Cosmos's."""

    def __init__(self, model: nn.Module, where: str = "", scaling_factor: float | None = None,
                 sigma_data: float = COSMOS_SIGMA_DATA):
        self.model, self.where, self.sigma_data = model.eval().requires_grad_(False), where, sigma_data
        self.name = type(model).__name__
        if self.name not in SOURCE_VAE_CLASSES:
            raise ValueError(f"source VAE {self.name} is not supported (one of {', '.join(SOURCE_VAE_CLASSES)})")
        self.scaling_factor = model.config.get("scaling_factor", 1.0) if scaling_factor is None else scaling_factor
        if self.scaling_factor <= 0:
            raise ValueError(f"the source VAE's scaling factor must be positive, got {self.scaling_factor}")
        if self.name in VIDEO_VAES and hasattr(model, "enable_tiling"):
            model.enable_tiling()      # diffusers tiles only frames larger than the VAE's tile

    @classmethod
    def from_pretrained(cls, source: str | Path, subfolder: str | None = None, torch_dtype: torch.dtype | None = None,
                        scaling_factor: float | None = None, load_weights: bool = True) -> "SourceVAE":
        """The VAE in a folder or hub id (``find_config``). ``load_weights=False``: its architecture on the meta
        device, for checks before anything heavy loads."""
        config_file, subfolder = find_config(source, subfolder)
        cls_ = vae_class(config_file)
        where = f"{source}" + (f" (subfolder {subfolder})" if subfolder else "")
        with _quiet_diffusers():
            if not load_weights:
                with torch.device("meta"):
                    return cls(cls_.from_config(cls_.load_config(str(Path(config_file).parent))), where,
                               scaling_factor)
            local = {"local_files_only": True} if not is_hub_id(str(source)) else {}
            root = Path(source).expanduser() if local else source
            try:
                model = cls_.from_pretrained(str(root), subfolder=subfolder, torch_dtype=torch_dtype, **local)
            except (OSError, ValueError) as e:
                raise FileNotFoundError(f"cannot load the source VAE {cls_.__name__} from {where}: "
                                        f"{first_line(e, typed=False, limit=200)}") from None
        return cls(model, where, scaling_factor)

    # -- layout --------------------------------------------------------------------------------------

    @property
    def channels(self) -> int:
        cfg = self.model.config
        return cfg.z_dim if self.name == "AutoencoderKLWan" else cfg.latent_channels

    @property
    def compression(self) -> tuple[int, int]:
        """(t, s): frames and pixels per latent cell, as each family's diffusers pipeline reads them."""
        m, cfg = self.model, self.model.config
        if self.name == "AutoencoderKLWan":
            return cfg.scale_factor_temporal, cfg.scale_factor_spatial
        if self.name in ("AutoencoderKLHunyuanVideo", "AutoencoderKLLTXVideo", "AutoencoderKLMochi"):
            return m.temporal_compression_ratio, m.spatial_compression_ratio
        if self.name == "AutoencoderKLCosmos":
            return cfg.temporal_compression_ratio, cfg.spatial_compression_ratio
        spatial = 2 ** (len(cfg.block_out_channels) - 1)
        return (cfg.temporal_compression_ratio if self.name == "AutoencoderKLCogVideoX" else 1), spatial

    def frames_out(self, latent_frames: int) -> int:
        """Pixel frames that ``latent_frames`` decode to: 1 + t(T - 1) for causal video VAEs, T for image VAEs.
        CogVideoX decodes in batches of 2 latent frames and keeps a first frame only in an odd batch (its first, for
        odd T): an even T gives tT. CogVideoX 1.5's pipeline makes an even T by padding one leading latent frame,
        which its own decode drops before the VAE: drop it too (``latents[:, :, 1:]``, ``--skip-latent-frames 1``)."""
        t = self.compression[0]
        if t == 1 or (self.name == "AutoencoderKLCogVideoX" and latent_frames % 2 == 0):
            return t * latent_frames
        return 1 + t * (latent_frames - 1)

    def pixel_size(self, h: int, w: int) -> tuple[int, int]:
        s = self.compression[1]
        return h * s, w * s

    def check_latents(self, latents: torch.Tensor, what: str = "latents") -> None:
        """(B, C, T, h, w) finite latents that this VAE decodes; one line naming what is wrong."""
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"{what}: expected (B, C, T, h, w) latents, got {shape}")
        if latents.shape[1] != self.channels:
            hint = (" (is T before C? CogVideoX's pipeline returns (B, T, C, h, w): permute(0, 2, 1, 3, 4))"
                    if latents.shape[2] == self.channels else "")
            raise ValueError(f"{what}: the latents have {latents.shape[1]} channels but the source VAE {self.name} "
                             f"({self.where}) takes {self.channels}; shape {tuple(latents.shape)} (B, C, T, h, w)"
                             f"{hint}")
        if latents.numel() == 0:
            raise ValueError(f"{what}: latents {tuple(latents.shape)} have a zero-sized dimension")
        if not torch.isfinite(latents).all():
            raise ValueError(f"{what}: latents contain NaN or inf values")
        stats = self._cosmos_stats_frames()
        if stats and latents.shape[2] > stats:
            raise ValueError(f"{what}: {latents.shape[2]} latent frames, but {self.name}'s latents_mean/std cover "
                             f"{stats} ({self.frames_out(stats)} pixel frames); decode at most {stats} at a time")

    def _cosmos_stats_frames(self) -> int | None:
        cfg = self.model.config
        if self.name != "AutoencoderKLCosmos" or cfg.latents_mean is None:
            return None
        return len(cfg.latents_mean) // cfg.latent_channels

    # -- normalisation -------------------------------------------------------------------------------

    def _affine(self, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) with raw = z * a + b, each (1, C, T or 1, 1, 1) float64 on the CPU (module docstring's table)."""
        cfg, C = self.model.config, self.channels

        def per_channel(values) -> torch.Tensor:
            return torch.as_tensor(values, dtype=torch.float64).reshape(1, C, 1, 1, 1)
        ones, zeros = torch.ones(1, C, 1, 1, 1, dtype=torch.float64), torch.zeros(1, C, 1, 1, 1, dtype=torch.float64)
        sf = self.scaling_factor
        if self.name == "AutoencoderKLWan":                 # pipeline_wan: latents / (1 / std) + mean
            return per_channel(cfg.latents_std), per_channel(cfg.latents_mean)
        if self.name == "AutoencoderKLLTXVideo":            # pipeline_ltx: latents * std / scaling + mean (buffers)
            return (per_channel(self.model.latents_std.detach().cpu()) / sf,
                    per_channel(self.model.latents_mean.detach().cpu()))
        if self.name == "AutoencoderKLCosmos":              # pipeline_cosmos_text2world: per channel and frame
            if cfg.latents_mean is None:
                return ones / self.sigma_data, zeros

            def stats(values):
                return torch.as_tensor(values, dtype=torch.float64).reshape(1, C, -1, 1, 1)[:, :, :frames]
            return stats(cfg.latents_std) / self.sigma_data, stats(cfg.latents_mean)
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if self.name in ("AutoencoderKL", "AutoencoderKLMochi") and mean is not None and std is not None:
            return per_channel(std) / sf, per_channel(mean)  # pipeline_stable_diffusion_xl, pipeline_mochi
        shift = cfg.get("shift_factor") if self.name == "AutoencoderKL" else None
        return ones / sf, zeros + (shift or 0.0)            # SD, SD3 / Flux (shift), SVD, Hunyuan, CogVideoX

    def to_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (what the model's denoiser makes) -> the VAE's raw latents, (B, C, T, h, w)."""
        a, b = self._affine(latents.shape[2])
        return (latents.double() * a.to(latents.device) + b.to(latents.device)).to(latents.dtype)

    def from_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's raw latents -> normalised ones, (B, C, T, h, w): ``to_raw``'s inverse."""
        a, b = self._affine(latents.shape[2])
        return ((latents.double() - b.to(latents.device)) / a.to(latents.device)).to(latents.dtype)

    # -- encode and decode ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: torch.device | str) -> "SourceVAE":
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, video: torch.Tensor, normalised: bool = True) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> latents (B, C, 1 + (T - 1)/t or T, H/s, W/s) float32 (the posterior mode),
        normalised as the model's denoiser makes them (or raw). Causal video VAEs take T = 1 + tk frames."""
        t, s = self.compression
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"{self.name}.encode: expected (B, 3, T, H, W) video, got {tuple(video.shape)}")
        B, _, T, H, W = video.shape
        if t > 1 and (T - 1) % t:
            low = 1 + (T - 1) // t * t
            raise ValueError(f"{self.name} encodes 1 + {t}k frames (causal first frame): {T} frames do not fit; "
                             f"take {low} or {low + t}")
        if H % s or W % s:
            raise ValueError(f"{self.name} encodes frames whose sides are multiples of {s}, got {W}x{H}")
        x = video.to(self.device, self.dtype)
        if self.name in IMAGE_VAES:
            x = rearrange(x, "b c t h w -> (b t) c h w")
        out = self.model.encode(x)
        z = out.latents if self.name == "AutoencoderTiny" else out.latent_dist.mode()
        if self.name in IMAGE_VAES:
            z = rearrange(z, "(b t) c h w -> b c t h w", b=B)
        z = z.float()
        return self.from_raw(z) if normalised else z

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, normalised: bool = True) -> torch.Tensor:
        """(B, C, T, h, w) latents, normalised (default) or raw -> video (B, 3, frames_out(T), h s, w s) float32 in
        [-1, 1] on the CPU, one video of the batch at a time, on the VAE's device."""
        self.check_latents(latents)
        device = self.device
        videos = []
        for z in latents.split(1):
            z = z.to(device, torch.float32)
            z = self.to_raw(z) if normalised else z
            videos.append(self._decode_raw(z.to(self.dtype), device).float().clamp_(-1, 1).cpu())
        return torch.cat(videos)

    def _decode_raw(self, z: torch.Tensor, device: torch.device) -> torch.Tensor:
        """One video's raw latents (1, C, T, h, w) -> (1, 3, T', H, W)."""
        if self.name in IMAGE_VAES and self.compression[1] == 8:      # chunks and tiles as our Stage A
            # Stage A's default chunks (8 frames) and tiles (1024 px); the latents are raw already (scale 1)
            stage_a = StageAVAE(StageAConfig(kind=KIND_OF_CLASS[self.name], pretrained=None, subfolder=None,
                                             latent_channels=self.channels, scale_factor=1.0), self.model)
            return stage_a.decode(z, device=device)
        if self.name in IMAGE_VAES:
            frames = rearrange(z, "b c t h w -> (b t) c h w")
            out = torch.cat([self.model.decode(f).sample for f in frames.split(8)])
            return rearrange(out, "(b t) c h w -> b c t h w", b=z.shape[0])
        if self.name == "AutoencoderKLLTXVideo" and self.model.config.timestep_conditioning:
            temb = torch.full((z.shape[0],), LTX_DECODE_TIMESTEP, device=device, dtype=z.dtype)
            return self.model.decode(z, temb).sample
        return self.model.decode(z).sample


def target_size(height: int, width: int, scale: float | None = None, size: str | None = None) -> tuple[int, int]:
    """The cascade's output (H, W) for the source's ``height`` x ``width`` pixels: ``scale`` times them, or ``size``
    (long side "N" or "WxH"), else a 2048 px long side; aspect kept, multiples of 32."""
    if scale is not None and size is not None:
        raise ValueError("give --scale or --size, not both")
    if scale is not None and scale <= 0:
        raise ValueError(f"--scale must be positive, got {scale}")
    long_side = round(max(height, width) * scale) if scale else DEFAULT_LONG_SIDE
    return infer_size(height, width, size or str(long_side))


def encode_resized(pipe, video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 3, T, H, W) -> semantic latents (B, 16, T, size / 32) of the video resized to ``size``, a few frames at a
    time (``frames_per_piece``): the full-size frames never sit in memory whole."""
    frames = frames_per_piece(tuple(video.shape[-2:]), size)
    return torch.cat([pipe.encode(resize_video(piece, size)) for piece in video.split(frames, dim=2)], dim=2)
