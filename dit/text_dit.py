"""Stage C, the base text-to-video model: a video DiT that generates Stage B semantic latents from text.

The same blocks and grid attention as the Stage B decoder (``dit.video_dit``): adaLN-single blocks
(PixArt-alpha, Sec. 2.3) over attention parts cycled by ``attn_strides`` (CascadeV, Sec. 3.2), with a
cross-attention to the text tokens after the self-attention (PixArt-alpha, Fig. 4: queries from the
video tokens, keys and values from the text). The pooled text embedding is added to the timestep
embedding, so it drives the adaLN modulation of every block and of the final layer (as SDXL and SD3
add their pooled CLIP vector). Text comes from ``cascadev.pipelines.text_encoder``: per-token hidden states
(B, L, caption_channels), a pooled vector (B, pooled_channels) and a mask (B, L) of real tokens.

Latents are the semantic encoder's output (B, 16, T, H/32, W/32) times ``latent_scale``; sampling
and training divide and multiply by it in ``cascadev.pipelines.text_to_video``, nowhere else.
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin  # noqa: F401  DiffusionPipeline.from_pretrained finds the load method by this name here
import torch.nn as nn
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import AttentionModuleMixin
from einops import rearrange, repeat
from timm.layers import Mlp

from cascadev.weights import build_preset
from dit.attention import DispatchProcessor
from dit.video_dit import DiTBlock, DiTTrunk, Strides, check_dit_config, modulate

# The release's schedule (dit.video_dit.OFFICIAL_ATTN_STRIDES) scaled to 32x32 latents at patch 1:
# 2x2 spatial parts keep the released part size (16x16 tokens); full 3D attention in blocks 8-11, 20-27.
BASE_ATTN_STRIDES: tuple[Strides, ...] = (
    *[(1, 2), (4, 1)] * 4, None, None, None, None,
    *[(1, 2), (4, 1)] * 4, *[None] * 8,
)


PRESETS: dict[str, dict] = {
    # ~1.08B parameters for 1024-px videos: 32x32 latents, 8-16 frames, open_clip ViT-bigG-14 text: TextDiT's defaults
    "base": {},
    # A few narrow blocks with every kind of partition and a 32-wide text tower, for CPU tests
    "tiny": dict(hidden_size=48, depth=3, num_heads=4, window_frames=4, window_size=8,
                 attn_strides=((1, 2), (2, 1), None), caption_channels=32, pooled_channels=32),
}


class CrossAttnProcessor(DispatchProcessor):
    """``CrossAttention``'s computation: the video's groups stacked into one query sequence per video."""

    def __call__(self, attn: "CrossAttention", x: torch.Tensor, context: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        B, n = context.shape[0], x.shape[1]
        q = attn.q_norm(attn.q_linear(rearrange(x, "(b g) n d -> b (g n) d", b=B)))
        k, v = rearrange(attn.kv_linear(context), "b l (two d) -> two b l d", two=2)
        k = attn.k_norm(k)
        q, k, v = (rearrange(z, "b n (h e) -> b n h e", h=attn.num_heads) for z in (q, k, v))
        out = self.attend(q, k, v, mask, attn.fp32)  # b (g n) h e
        out = attn.proj(rearrange(out, "b n h e -> b n (h e)"))
        return rearrange(out, "b (g n) d -> (b g) n d", n=n)


class CrossAttention(nn.Module, AttentionModuleMixin):
    """Video tokens attend to text tokens (PixArt's MultiHeadCrossAttention: q_linear, kv_linear, proj)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, fp32: bool):
        super().__init__()
        self.num_heads, self.fp32 = num_heads, fp32
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.q_norm = nn.LayerNorm(dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.processor = CrossAttnProcessor()

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B*G, n, D) tokens of B videos in G groups each (attention parts, frames), video-major;
        context: (B, L, D) text tokens; mask: (B, L) bool, True for real tokens. Returns (B*G, n, D).

        Every group of a video reads the same text, and cross-attention treats queries independently,
        so stacking a video's groups into one query sequence equals repeating the text per group,
        without copying the text or computing its keys and values G times. flash-attn takes no padding
        mask: a masked call runs torch SDPA (``dit.attention.MASK_BACKENDS``).
        """
        return self.processor(self, x, context, mask)


class TextDiTBlock(DiTBlock):
    """A ``DiTBlock`` (adaLN-single self-attention and MLP) with cross-attention to the text in between."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, attn_fp32: bool):
        super().__init__(hidden_size, num_heads, mlp_ratio, qk_norm, attn_fp32)
        self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm, attn_fp32)

    def forward(self, x: torch.Tensor, t6: torch.Tensor, context: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B*G, N, D) tokens; t6: (B*G, 6*D) from ``t_block``; context: (B, L, D); mask: (B, L) bool."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + rearrange(t6, "b (six d) -> b six d", six=6)).chunk(6, dim=1)  # b 1 d each
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(x, context, mask)  # PixArt: ungated, on the residual stream
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class TextDiT(DiTTrunk):
    """Text-to-video DiT. ``model(x, t, context, pooled, context_mask)`` -> (B, C_out, T, H, W).

    The keywords of ``__init__`` are its config, the ``VideoDiT`` ones (same blocks, partitions and size checks)
    plus the text widths and ``latent_scale``. Inputs are (B, latent_channels, T, H, W): no condition is
    concatenated on channels. The defaults are the ``base`` preset: ~1.08B parameters, 1024-px videos
    (32x32 latents, 8-16 frames), patch 1 as Stable Cascade's Stage C, whose 24x24 latents are not patchified
    either. ``build_text_dit`` takes a preset.
    """

    _no_split_modules = ["TextDiTBlock"]    # FSDP's shard unit (accelerate's transformer wrap policy reads it)

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 16,      # Stage B semantic latents
        cond_channels: int = 0,         # nothing concatenated: the condition is the text
        learn_sigma: bool = True,       # output eps and the variance interpolation v (IDDPM, Eq. 15)
        hidden_size: int = 1536,        # Stable Cascade 1B Stage C width
        depth: int = 28,
        num_heads: int = 24,            # head dim 64
        patch_size: int = 1,
        mlp_ratio: float = 4.0,
        window_frames: int = 16,        # latent frames of the trained clips
        window_size: int = 32,          # 1024 px
        pe_interpolation: float = 1.0,
        attn_strides: tuple[Strides, ...] = BASE_ATTN_STRIDES,
        qk_norm: bool = True,           # trained from scratch in bf16 (SD3, Sec. 5.3.2: QK-normalisation)
        attn_fp32: bool = False,
        caption_channels: int = 1280,   # text token width (open_clip ViT-bigG-14 text tower)
        pooled_channels: int = 1280,    # pooled, projected text embedding (ViT-bigG-14 embed_dim)
        latent_scale: float = 1.0,      # semantic latents are BatchNorm-normalised already (Stable Cascade Stage C
                                        # uses them as is)
    ):
        attn_strides = check_dit_config(hidden_size, num_heads, patch_size, attn_strides, window_frames, window_size)
        if cond_channels:
            raise ValueError(f"TextDiT concatenates no condition: cond_channels must be 0, got {cond_channels}")
        if caption_channels < 1 or pooled_channels < 1:
            raise ValueError("caption_channels and pooled_channels must be >= 1")
        if not latent_scale > 0:
            raise ValueError(f"latent_scale must be positive, got {latent_scale}")
        blocks = [TextDiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, attn_fp32) for _ in range(depth)]
        super().__init__(latent_channels, latent_channels * (2 if learn_sigma else 1), hidden_size, patch_size,
                         attn_strides, blocks)
        self.register_to_config(attn_strides=attn_strides)
        D = hidden_size
        self.pooled_embedder = nn.Sequential(nn.Linear(pooled_channels, D), nn.SiLU(), nn.Linear(D, D))
        self.y_embedder = Mlp(caption_channels, D, D, act_layer=lambda: nn.GELU(approximate="tanh"))  # PixArt
        self.y_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)  # Stable Cascade's clip_norm
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The trunk's PixArt initialisation, N(0, 0.02) text embedders, zeroed cross-attention outputs
        (so the untrained model predicts zero and starts as the unconditional trunk)."""
        super().initialize_weights()
        for layer in (self.pooled_embedder[0], self.pooled_embedder[2], self.y_embedder.fc1, self.y_embedder.fc2):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)

    def _check_text(self, B: int, context: torch.Tensor, pooled: torch.Tensor,
                    mask: torch.Tensor | None) -> torch.Tensor | None:
        c = self.config
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != c.caption_channels:
            raise ValueError(f"context must be (B={B}, L, {c.caption_channels}) text tokens, "
                             f"got {tuple(context.shape)}")
        if pooled.shape != (B, c.pooled_channels):
            raise ValueError(f"pooled must be (B={B}, {c.pooled_channels}), got {tuple(pooled.shape)}")
        if mask is None:
            return None
        if mask.shape != context.shape[:2]:
            raise ValueError(f"context_mask must be (B, L) = {tuple(context.shape[:2])}, got {tuple(mask.shape)}")
        mask = mask.to(device=context.device, dtype=torch.bool)
        if not mask.any(dim=1).all():
            raise ValueError("context_mask has a row without any token to attend to")
        return mask

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                context_mask: torch.Tensor | None = None, as_images: bool = False) -> torch.Tensor:
        """Predict eps (and the variance interpolation v with ``learn_sigma``) for noisy semantic latents.

        x: (B, C_latent, T, H, W) noisy latents (scaled by ``latent_scale``).
        t: (B,) float timesteps, one per video; with ``as_images`` (B, T) is accepted too.
        context: (B, L, caption_channels) text token states; pooled: (B, pooled_channels).
        context_mask: (B, L) bool, True for tokens to attend to; None attends to all L.
        as_images: every frame is its own image (spatial partitions only), reading its video's text.
        Returns (B, C_out, T, H, W).
        """
        t = self.check_inputs(x, t, as_images)
        B, T = x.shape[0], x.shape[2]
        mask = self._check_text(B, context, pooled, context_mask)
        tokens, t, grid = self.embed(x, t, as_images)
        y = self.y_norm(self.y_embedder(context.to(tokens.dtype)))  # b l d
        pooled = pooled.to(tokens.dtype)
        if as_images:
            pooled = repeat(pooled, "b d -> (b t) d", t=T)
        c_emb = self.timestep_embedding(t) + self.pooled_embedder(pooled)  # (b or (b t)) d
        tokens = self.run_blocks(tokens, self.modulation(c_emb), grid, as_images, y, mask)
        return self.head(tokens, c_emb, x.shape, as_images)


def build_text_dit(preset: str = "base", **overrides) -> TextDiT:
    """A preset name plus keyword overrides, e.g. ``build_text_dit("base", depth=2)``."""
    return build_preset(TextDiT, PRESETS, preset, "text DiT", **overrides)
