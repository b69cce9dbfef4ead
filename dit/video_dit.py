"""The LDM-VAE decoder of CascadeV: a PixArt-XL/2 style video DiT without cross-attention.

It denoises Stage A latents (4 ch, f8) conditioned on the Stage B semantic latent upsampled to the
same grid (16 ch), concatenated on channels. Blocks are adaLN-single (PixArt-alpha, Sec. 2.3): one
``t_block`` output per video, plus a learned per-block ``scale_shift_table``. Attention runs on a
grid of parts per block (CascadeV, Sec. 3.2; see ``dit.attention``). A diffusers model: ``save_pretrained``
/ ``from_pretrained``, ``set_attention_backend``, ``enable_gradient_checkpointing``. Parameter names follow
the released ``s1024.effn-f32.pth`` except the timestep embedder and ``t_block``, which are diffusers'
``AdaLayerNormSingle`` (``adaln_single``; ``convert_released_state_dict`` renames them).
"""

from __future__ import annotations

import math
from functools import reduce
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers import ModelMixin  # noqa: F401  DiffusionPipeline.from_pretrained finds the load method by this name here
import torch.nn as nn
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.embeddings import get_1d_sincos_pos_embed_from_grid, get_2d_sincos_pos_embed_from_grid
from diffusers.models.normalization import AdaLayerNormSingle
from einops import rearrange, repeat
from timm.layers import Mlp

from cascadev.weights import CascadeModel, build_preset, load_state_dict_strict, torch_load
from dit.attention import DispatchProcessor, num_parts, partition, unpartition

Strides = tuple[int, int] | None

# Released schedule for 28 blocks (configs/s1024.effn-f32.py): spatial/temporal parts alternate,
# with full 3D attention in blocks 8-11 and 20-27.
OFFICIAL_ATTN_STRIDES: tuple[Strides, ...] = (
    *[(1, 4), (4, 1)] * 4, None, None, None, None,
    *[(1, 4), (4, 1)] * 4, *[None] * 8,
)
# released names -> ours: the timestep embedder and t_block are diffusers' AdaLayerNormSingle
RELEASED_PREFIXES = {
    "t_embedder.mlp.0.": "adaln_single.emb.timestep_embedder.linear_1.",
    "t_embedder.mlp.2.": "adaln_single.emb.timestep_embedder.linear_2.",
    "t_block.1.": "adaln_single.linear.",
}


class Window(NamedTuple):
    """A DiT's trained window and the multiples its attention partitions need: what tiling reads
    (``cascadev.pipelines.tiling.window_crops``)."""

    window_frames: int
    window_size: int
    frame_multiple: int
    spatial_multiple: int


def window_multiples(patch_size: int, attn_strides) -> tuple[int, int]:
    """(frame multiple, spatial multiple): T must be a multiple of the first (every temporal partition divides
    it), latent H and W of the second (patch size x spatial partitions)."""
    parts = [s for s in attn_strides if s is not None]
    return reduce(math.lcm, [s[0] for s in parts], 1), patch_size * reduce(math.lcm, [s[1] for s in parts], 1)


def check_window(T: int, H: int, W: int, multiples: tuple[int, int], as_images: bool = False) -> None:
    """Raise ValueError naming the sizes that would work if (T, H, W) latents cannot be processed."""
    frame_multiple, spatial_multiple = multiples
    def nearest(n, m):
        lo = max(m, n // m * m)
        return f"{lo} or {lo + m}" if lo != n else str(n)
    if T < 1 or (T % frame_multiple and not as_images):
        raise ValueError(f"{T} latent frames: the attention partitions need a multiple of {frame_multiple} "
                         f"(e.g. {nearest(T, frame_multiple)})")
    for name, n in (("height", H), ("width", W)):
        if n < 1 or n % spatial_multiple:
            raise ValueError(f"latent {name} {n} must be a multiple of {spatial_multiple} (patch size "
                             f"x spatial partitions), e.g. {nearest(n, spatial_multiple)}")


def check_dit_config(hidden_size: int, num_heads: int, patch_size: int, attn_strides, window_frames: int,
                     window_size: int) -> tuple[Strides, ...]:
    """Raise a one-line ValueError on an impossible DiT size; return ``attn_strides`` as tuples (config.json
    holds lists, so a round-tripped config equals the original)."""
    if hidden_size % num_heads:
        near = min((d for d in range(1, hidden_size + 1) if hidden_size % d == 0), key=lambda d: abs(d - num_heads))
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads} (e.g. num_heads={near})")
    if hidden_size % 12:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by 12 "
                         "(1/3 temporal and 2/3 spatial sin-cos position embedding)")
    if not attn_strides:
        raise ValueError("attn_strides needs at least one entry (use [null] for full attention)")
    for s in attn_strides:
        if s is not None and (not isinstance(s, (list, tuple)) or len(s) != 2 or min(s) < 1):
            raise ValueError(f"attn_strides entry {s} must be null or [frame_parts, spatial_parts] >= 1")
    strides = tuple(None if s is None else tuple(s) for s in attn_strides)
    check_window(window_frames, window_size, window_size, window_multiples(patch_size, strides))
    return strides


PRESETS: dict[str, dict] = {
    # PixArt-XL/2 as released in s1024.effn-f32.pth: VideoDiT's defaults
    "official": {},
    # A few narrow blocks with every kind of partition, for CPU tests
    "tiny": dict(hidden_size=96, depth=4, num_heads=4, window_frames=4, window_size=16,
                 attn_strides=((1, 2), (2, 1), None)),
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class PatchEmbed(nn.Module):
    """Ours, not diffusers' PatchEmbed (which adds a fixed 2D position table): per-frame patchify. (B, C, T, H, W)
    -> (B, T*H/p*W/p, D), tokens ordered frame, row, column."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[2]
        x = self.proj(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(x, "(b t) d h w -> b (t h w) d", t=T)


class SelfAttnProcessor(DispatchProcessor):
    """``SelfAttention``'s computation: fused qkv, optional q/k norms, dispatched attention, output projection."""

    def __call__(self, attn: "SelfAttention", x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(attn.qkv(x), "b n (three d) -> three b n d", three=3)
        q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = (rearrange(z, "b n (h e) -> b n h e", h=attn.num_heads) for z in (q, k, v))
        x = self.attend(q, k, v, fp32=attn.fp32)  # b n h e
        return attn.proj(rearrange(x, "b n h e -> b n (h e)"))


class SelfAttention(nn.Module, AttentionModuleMixin):
    """Multi-head self-attention over (B, N, D) tokens with a fused qkv projection (the release's names)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, fp32: bool):
        super().__init__()
        self.num_heads, self.fp32 = num_heads, fp32
        self.qkv = nn.Linear(dim, 3 * dim)
        # over the full width with LayerNorm's default eps, as PixArt-sigma's qk_norm
        self.q_norm = nn.LayerNorm(dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.processor = SelfAttnProcessor()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        return self.processor(self, x)


class DiTBlock(nn.Module):
    """PixArt block with adaLN-single: shift/scale/gate x2 = scale_shift_table + t_block(t)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, attn_fp32: bool):
        super().__init__()
        D = hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(D, num_heads, qk_norm, attn_fp32)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(D, int(D * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.scale_shift_table = nn.Parameter(torch.zeros(6, D))

    def forward(self, x: torch.Tensor, t6: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) tokens; t6: (B, 6*D) from ``t_block``."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + rearrange(t6, "b (six d) -> b six d", six=6)).chunk(6, dim=1)  # b 1 d each
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Ours (diffusers has no final layer with a 2-row table): adaLN with its own 2-row table and the timestep
    embedding (before t_block), then a linear to patches."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, hidden_size))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # b 1 d each
        return self.linear(modulate(self.norm_final(x), shift, scale))


def position_embedding(config, T: int, h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Sin-cos embedding of a (T, h, w) token grid -> (T*h*w, D), tokens ordered frame, row, column.
    Ours: diffusers' 3D embeddings put the spatial part first and have no ``pe_interpolation`` here.

    Temporal part first (D/3 dims, frame index), then the 2D spatial part (2D/3 dims, grid
    coordinates / pe_interpolation; its first half encodes the column, the second the row).
    Computed in float64 as the release did, then cast.
    """
    D_t = config.hidden_size // 3
    frames = torch.arange(T, dtype=torch.float64, device=device)
    temporal = get_1d_sincos_pos_embed_from_grid(D_t, frames, output_type="pt")  # T D_t
    rows = torch.arange(h, dtype=torch.float64, device=device) / config.pe_interpolation
    cols = torch.arange(w, dtype=torch.float64, device=device) / config.pe_interpolation
    grid = torch.stack(torch.meshgrid(cols, rows, indexing="xy"))  # 2 h w: [0] = column, [1] = row
    spatial = get_2d_sincos_pos_embed_from_grid(config.hidden_size - D_t, grid.reshape(2, -1),
                                                output_type="pt")  # (h w) D_s
    embed = torch.cat([repeat(temporal, "t d -> t n d", n=h * w), repeat(spatial, "n d -> t n d", t=T)], dim=-1)
    return rearrange(embed, "t n d -> (t n) d").to(dtype)


def convert_released_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release's (and this project's previous) DiT keys -> ours: ``t_embedder.mlp.{0,2}`` and ``t_block.1``
    -> ``adaln_single.*``; ``pos_embed`` (recomputed at run time) dropped; other keys (ours already) kept."""
    out = {}
    for key, value in state_dict.items():
        if key == "pos_embed":
            continue
        old = next((p for p in RELEASED_PREFIXES if key.startswith(p)), None)
        out[RELEASED_PREFIXES[old] + key.removeprefix(old) if old else key] = value
    return out


class DiTTrunk(CascadeModel):
    """What every video DiT here shares: the patch embedder, adaLN-single (timestep embedder and ``t_block``:
    diffusers' ``AdaLayerNormSingle``, the same numerics as the release), a stack of blocks run over their grid
    partitions, and the final layer. Subclasses add conditioning, ``forward`` and their ``__init__`` keywords
    (their config), check them with ``check_dit_config`` and pass the trunk's share here.

    Derived sizes are plain attributes, set once: ``in_channels`` (latent + condition), ``out_channels``
    (latent, x2 with ``learn_sigma``), ``frame_multiple`` and ``spatial_multiple`` (``window_multiples``).
    """

    _supports_gradient_checkpointing = True
    convert_state_dict = staticmethod(convert_released_state_dict)

    def __init__(self, in_channels: int, out_channels: int, hidden_size: int, patch_size: int,
                 attn_strides: tuple[Strides, ...], blocks: list[nn.Module]):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.frame_multiple, self.spatial_multiple = window_multiples(patch_size, attn_strides)
        D = hidden_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, D)
        # Timesteps(256, cos first) -> Linear-SiLU-Linear, then SiLU-Linear to 6D (PixArt-alpha, Sec. 2.3)
        self.adaln_single = AdaLayerNormSingle(D, use_additional_conditions=False)
        self.blocks = nn.ModuleList(blocks)
        self.final_layer = FinalLayer(D, patch_size, out_channels)
        self.gradient_checkpointing = False

    def initialize_weights(self) -> None:
        """PixArt initialisation: xavier linears, N(0, 0.02) timestep MLPs, zeroed output layer."""
        def basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.apply(basic_init)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # patch embedding as a linear layer
        nn.init.zeros_(self.x_embedder.proj.bias)
        embedder = self.adaln_single.emb.timestep_embedder
        for layer in (embedder.linear_1, embedder.linear_2, self.adaln_single.linear):
            nn.init.normal_(layer.weight, std=0.02)
        D = self.config.hidden_size
        for table in [b.scale_shift_table for b in self.blocks] + [self.final_layer.scale_shift_table]:
            nn.init.normal_(table, std=D ** -0.5)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def set_attn_fp32(self, fp32: bool) -> None:
        """Upcast q, k, v to fp32 in every attention (the release's numerics) or keep them in the weights' dtype,
        so half precision runs on the flash / cuDNN kernels. Updates the config (saved with the model)."""
        for module in self.modules():
            if isinstance(module, AttentionModuleMixin) and hasattr(module, "fp32"):
                module.fp32 = fp32
        self.register_to_config(attn_fp32=fp32)

    def timestep_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) float timesteps -> (B, D), in the parameters' dtype (the final layer's input, before ``t_block``)."""
        emb = self.adaln_single.emb
        return emb.timestep_embedder(emb.time_proj(t).to(emb.timestep_embedder.linear_1.weight.dtype))

    def modulation(self, t_emb: torch.Tensor) -> torch.Tensor:
        """(B, D) embedding -> (B, 6*D) adaLN-single modulation shared by all blocks (the release's ``t_block``)."""
        return self.adaln_single.linear(self.adaln_single.silu(t_emb))

    def block_strides(self, index: int) -> Strides:
        strides = self.config.attn_strides  # tuples: __init__ registered them normalised
        return strides[index % len(strides)]

    def check_window(self, T: int, H: int, W: int, as_images: bool = False) -> None:
        """Raise ValueError naming the sizes that would work if (T, H, W) latents cannot be processed."""
        check_window(T, H, W, (self.frame_multiple, self.spatial_multiple), as_images)

    @property
    def window(self) -> Window:
        """The trained window (config) and the multiples its partitions need (attributes), for tiling."""
        return Window(self.config.window_frames, self.config.window_size, self.frame_multiple, self.spatial_multiple)

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, as_images: bool) -> torch.Tensor:
        """Check x (B, C_in, T, H, W) and return t as (B, 1), or (B, T) per frame with ``as_images``."""
        C = self.in_channels
        if x.ndim != 5 or x.shape[1] != C:
            hint = " (is T before C? expected B C T H W)" if x.ndim == 5 and x.shape[2] == C else ""
            raise ValueError(f"{type(self).__name__} expects (B, {C}, T, H, W) latents, "
                             f"got {tuple(x.shape)}{hint}")
        B, _, T, H, W = x.shape
        self.check_window(T, H, W, as_images)
        t = t.to(device=x.device, dtype=torch.float32).reshape(B, -1)
        if t.shape[1] not in (1, T) or (t.shape[1] == T and not as_images):
            raise ValueError(f"timesteps must be (B,) per video{' or (B, T)' if as_images else ''}, "
                             f"got {tuple(t.shape)}")
        return t

    def embed(self, x: torch.Tensor, t: torch.Tensor, as_images: bool):
        """Patchify and add positions. Returns tokens, per-sequence timesteps and the token grid:
        (B, T*h*w, D), (B,), (T, h, w); with ``as_images`` (B*T, h*w, D), (B*T,), (1, h, w)."""
        B, _, T, H, W = x.shape
        h, w = H // self.config.patch_size, W // self.config.patch_size
        x = self.x_embedder(x)  # b (t h w) d
        x = x + position_embedding(self.config, T, h, w, x.device, x.dtype)
        if as_images:
            return rearrange(x, "b (t n) d -> (b t) n d", t=T), rearrange(t.expand(B, T), "b t -> (b t)"), (1, h, w)
        return x, t[:, 0], (T, h, w)

    def run_blocks(self, x: torch.Tensor, t6: torch.Tensor, grid: tuple[int, int, int], as_images: bool,
                   *block_args) -> torch.Tensor:
        """Every block on its attention parts. x: (B, T*h*w, D); t6: (B, 6*D); ``block_args`` pass through."""
        for i, block in enumerate(self.blocks):
            strides = self.block_strides(i)
            if as_images and strides is not None:
                strides = (1, strides[1])  # images: spatial partitions only
            parts = partition(x, grid, strides)  # (b parts) n d
            t_parts = repeat(t6, "b d -> (b n) d", n=num_parts(strides))
            if self.gradient_checkpointing and torch.is_grad_enabled():  # set by enable_gradient_checkpointing
                parts = self._gradient_checkpointing_func(block, parts, t_parts, *block_args)
            else:
                parts = block(parts, t_parts, *block_args)
            x = unpartition(parts, grid, strides)
        return x

    def head(self, x: torch.Tensor, t_emb: torch.Tensor, shape: tuple[int, ...], as_images: bool) -> torch.Tensor:
        """Final layer and unpatchify: tokens -> (B, C_out, T, H, W) for an input of ``shape``."""
        B, _, T, H, W = shape
        p = self.config.patch_size
        x = self.final_layer(x, t_emb)  # b (t h w) (p q c)
        if as_images:
            x = rearrange(x, "(b t) n d -> b (t n) d", t=T)
        return rearrange(x, "b (t h w) (p q c) -> b c t (h p) (w q)", t=T, h=H // p, w=W // p, p=p, q=p)


class VideoDiT(DiTTrunk):
    """Video DiT denoiser. ``model(x, t)``: x (B, C_in, T, H, W), t (B,) -> (B, C_out, T, H, W).

    The keywords of ``__init__`` are its config; the defaults are the released model (``PRESETS["official"]``),
    ``build_dit`` takes a preset: ``VideoDiT(**{**PRESETS["tiny"], "depth": 2})``.
    """

    _no_split_modules = ["DiTBlock"]        # FSDP's shard unit (accelerate's transformer wrap policy reads it)

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 4,       # noisy Stage A latent
        cond_channels: int = 16,        # semantic latent (or a resized Stage A latent on the resize route)
        learn_sigma: bool = True,       # output eps and the variance interpolation v (IDDPM, Eq. 15)
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        patch_size: int = 2,
        mlp_ratio: float = 4.0,
        window_frames: int = 8,         # latent frames of the trained window
        window_size: int = 128,         # latent pixels per side of the trained window (1024 px)
        pe_interpolation: float = 2.0,  # spatial grid coordinates are divided by this
        attn_strides: tuple[Strides, ...] = OFFICIAL_ATTN_STRIDES,  # cycled over blocks
        qk_norm: bool = False,
        attn_fp32: bool = True,         # upcast q, k, v (the release's fp32_attention)
    ):
        attn_strides = check_dit_config(hidden_size, num_heads, patch_size, attn_strides, window_frames, window_size)
        blocks = [DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, attn_fp32) for _ in range(depth)]
        super().__init__(latent_channels + cond_channels, latent_channels * (2 if learn_sigma else 1), hidden_size,
                         patch_size, attn_strides, blocks)
        self.register_to_config(attn_strides=attn_strides)
        self.initialize_weights()

    def forward(self, x: torch.Tensor, t: torch.Tensor, as_images: bool = False) -> torch.Tensor:
        """Predict (eps, v) for a window of latents.

        x: (B, C_in, T, H, W) noisy latent concatenated with the upsampled condition.
        t: (B,) float timesteps, one per video; with ``as_images`` (B, T) is accepted too.
        as_images: every frame attends only to itself, with spatial partitions only (the release's
            joint image training); frames keep their temporal position embedding.
        Returns (B, C_out, T, H, W).
        """
        t = self.check_inputs(x, t, as_images)
        tokens, t, grid = self.embed(x, t, as_images)
        # the compute dtype, read off the tokens: FSDP may shard adaln_single apart, its weights whole only inside it
        t6, t_emb = self.adaln_single(t, batch_size=t.shape[0], hidden_dtype=tokens.dtype)  # b 6d, b d
        tokens = self.run_blocks(tokens, t6, grid, as_images)
        return self.head(tokens, t_emb, x.shape, as_images)

    # -- weights ---------------------------------------------------------------------------------

    @classmethod
    def from_single_file(cls, path: str | Path, config: dict | None = None) -> "VideoDiT":
        """Load the release's ``s1024.effn-f32.pth`` ({'state_dict': PixArt-XL/2 keys}, converted by
        ``convert_released_state_dict``); eval mode. ``config=None`` means the ``official`` preset; pass
        ``__init__`` keywords (or a model's ``config``) for other sizes in that layout.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: download s1024.effn-f32.pth from the CascadeV release "
                                    "(huggingface.co/ByteDance/CascadeV)")
        blob = torch_load(path)
        state_dict = blob.get("state_dict", blob) if isinstance(blob, dict) else None
        if not isinstance(state_dict, dict):
            raise ValueError(f"{path} is not a CascadeV checkpoint (expected a dict with a 'state_dict' entry)")
        model = cls.from_config_dict(config or PRESETS["official"])
        load_state_dict_strict(model, convert_released_state_dict(state_dict), str(path))
        return model.eval()


def build_dit(preset: str = "official", **overrides) -> VideoDiT:
    """A preset name plus keyword overrides, e.g. ``build_dit("official", depth=2)``."""
    return build_preset(VideoDiT, PRESETS, preset, "DiT", **overrides)
