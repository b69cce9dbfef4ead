"""VideoMAE-v2 video transformer: the feature model of content-debiased FVD.

Ge et al., "On the Content Bias in Frechet Video Distance" (CVPR 2024) replace I3D's Kinetics logits with the features
of VideoMAE-v2 (Wang et al., CVPR 2023), a ViT-g/14 pretrained without labels and fine-tuned on Something-Something v2
(``vit_g_hybrid_pt_1200e_ssv2_ft.pth`` of the VideoMAEv2 model zoo). The layout matches that checkpoint:

- ``patch_embed.proj``: Conv3d over tubelets of 2 frames x 14 x 14 pixels -> 1408 channels; tokens ordered
  (frame pair, row, column).
- A fixed sine-cosine table of positions (not in the checkpoint): position p, channel j -> p / 10000^(2 (j // 2) / D),
  sine on even channels, cosine on odd ones, added after the patch embedding.
- 40 pre-norm blocks (``blocks.N``): LayerNorm (eps 1e-6), softmax attention with 16 heads whose qkv projection has
  biases for q and v only (``attn.q_bias``, ``attn.v_bias``; k has none), then an MLP of 6144 (exact GELU).
- Mean of the tokens, then ``fc_norm`` (LayerNorm, eps 1e-6): the 1408-d feature of a clip. The classifier ``head``
  (174 SSv2 classes) is in the checkpoint but unused.

Input: (B, 3, T, 224, 224) in [0, 1], T = 16 (another length: the table is resampled trilinearly in time, as the
cd-fvd package does). No ImageNet normalisation: cd-fvd feeds [0, 1] frames.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp

PRESETS = {
    # the ViT-g/14 of vit_g_hybrid_pt_1200e_ssv2_ft.pth (cd-fvd's model)
    "vit_g_14": dict(embed_dim=1408, depth=40, num_heads=16, mlp_hidden=6144, patch_size=14, tubelet_size=2,
                     img_size=224, num_frames=16, num_classes=174),
}
LN_EPS = 1e-6
HEAD_DIM = 88              # ViT-g: 1408 / 16 heads; a checkpoint does not record its heads, so its width says them
CHECKPOINT_NAME = "vit_g_hybrid_pt_1200e_ssv2_ft.pth"
CHECKPOINT_SOURCE = (f"{CHECKPOINT_NAME} from the VideoMAEv2 model zoo (github.com/OpenGVLab/VideoMAEv2, "
                     "docs/MODEL_ZOO.md), the checkpoint the cd-fvd package uses")


def sincos_table(positions: int, dim: int) -> torch.Tensor:
    """(positions, dim) float32: angle p / 10000^(2 (j // 2) / dim), sine at even j, cosine at odd j (float64 first)."""
    p = torch.arange(positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)
    angle = p / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    return torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle)).float()


class Attention(nn.Module):
    """Multi-head softmax attention, qkv bias on q and v only (BEiT / VideoMAE style)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)                                          # b n 3d
        q, k, v = rearrange(qkv, "b n (three h e) -> three b h n e", three=3, h=self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v)                                        # b h n e
        return self.proj(rearrange(x, "b h n e -> b n (h e)"))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_hidden, act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VideoMAEv2(nn.Module):
    """VideoMAE-v2 ViT encoder with mean pooling; ``forward`` (B, 3, T, S, S) in [0, 1] -> features (B, embed_dim)."""

    def __init__(self, embed_dim: int = 1408, depth: int = 40, num_heads: int = 16, mlp_hidden: int = 6144,
                 patch_size: int = 14, tubelet_size: int = 2, img_size: int = 224, num_frames: int = 16,
                 num_classes: int = 174):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"VideoMAEv2: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if img_size % patch_size or num_frames % tubelet_size:
            raise ValueError(f"VideoMAEv2: img_size {img_size} / patch {patch_size} and num_frames {num_frames} / "
                             f"tubelet {tubelet_size} must divide")
        self.patch_size, self.tubelet_size, self.img_size = patch_size, tubelet_size, img_size
        self.grid = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        self.embed_dim = embed_dim
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(3, embed_dim, (tubelet_size, patch_size, patch_size),
                                          stride=(tubelet_size, patch_size, patch_size))
        t, h, w = self.grid
        self.register_buffer("pos_embed", sincos_table(t * h * w, embed_dim), persistent=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_hidden) for _ in range(depth))
        self.fc_norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.head = nn.Linear(embed_dim, num_classes)           # the checkpoint's classifier; features stop before it

    def positions(self, frames: int) -> torch.Tensor:
        """The position table for ``frames`` input frames, (N, D); other lengths than the trained one resampled
        trilinearly in time (the grid size + 0.1 as scale, as cd-fvd does against round-off)."""
        t, h, w = self.grid
        t_new = frames // self.tubelet_size
        if t_new == t:
            return self.pos_embed
        table = rearrange(self.pos_embed, "(t h w) d -> 1 d t h w", t=t, h=h, w=w)
        table = F.interpolate(table, scale_factor=((t_new + 0.1) / t, 1, 1), mode="trilinear")
        return rearrange(table, "1 d t h w -> (t h w) d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, S, S) in [0, 1], S = img_size, T a multiple of the tubelet -> (B, D) pooled features."""
        if x.ndim != 5 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"VideoMAEv2: expected (B, 3, T, {self.img_size}, {self.img_size}), got {tuple(x.shape)}")
        if x.shape[2] % self.tubelet_size:
            raise ValueError(f"VideoMAEv2: {x.shape[2]} frames is not a multiple of the tubelet {self.tubelet_size}")
        tokens = rearrange(self.patch_embed.proj(x), "b d t h w -> b (t h w) d")            # b n d
        tokens = tokens + self.positions(x.shape[2]).to(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens)
        return self.fc_norm(tokens.mean(dim=1))                                             # b d


def missing_checkpoint_message(path: str | Path | None) -> str:
    head = f"VideoMAE-v2 checkpoint not found: {path}" if path else "no VideoMAE-v2 checkpoint given"
    return f"{head}; the cd-fvd protocol needs --videomae PATH ({CHECKPOINT_SOURCE}; nothing is downloaded)"


def _shapes_from_state(state: dict) -> dict:
    """The model's arguments read off a checkpoint's tensors (so smaller test models load as the real one does)."""
    proj = state["patch_embed.proj.weight"]                                # d 3 tubelet p p
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    return dict(embed_dim=proj.shape[0], depth=depth, mlp_hidden=state["blocks.0.mlp.fc1.weight"].shape[0],
                patch_size=proj.shape[-1], tubelet_size=proj.shape[2],
                num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0)


def load_videomae(path: str | Path | None, num_heads: int | None = None, img_size: int = 224,
                  num_frames: int = 16) -> VideoMAEv2:
    """A VideoMAE-v2 checkpoint (``{"model": state}``, ``{"module": state}`` or the state itself, as cd-fvd reads
    it) -> the model in eval mode. The sizes are read from the tensors; ``num_heads`` (not visible in them) defaults
    to embed_dim / 88, ViT-g's head width (its 16 heads for 1408). Problems are one-line ``FileNotFoundError`` /
    ``ValueError``s naming the file."""
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(missing_checkpoint_message(path))
    from cascadev.weights import torch_load

    try:
        state = torch_load(path)
    except Exception as e:     # a pickle with code, a truncated file, not a torch file at all
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"--videomae {path}: not a VideoMAE-v2 checkpoint ({reason})") from None
    for key in ("model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or "patch_embed.proj.weight" not in state or "blocks.0.mlp.fc1.weight" not in state:
        raise ValueError(f"--videomae {path}: not a VideoMAE-v2 checkpoint (no patch_embed.proj / blocks.0 weights)")
    state = {k: v for k, v in state.items() if k != "pos_embed"}     # fixed table, recomputed
    try:
        shapes = _shapes_from_state(state)
        heads = num_heads or shapes["embed_dim"] // HEAD_DIM
        if not heads or shapes["embed_dim"] % heads:
            raise ValueError(f"embed_dim {shapes['embed_dim']} is not a multiple of ViT-g's head width {HEAD_DIM}")
        model = VideoMAEv2(**shapes, num_heads=heads, img_size=img_size, num_frames=num_frames)
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise ValueError(f"--videomae {path}: unexpected VideoMAE-v2 layout ({e})") from None
    if shapes["num_classes"] == 0:
        model.head = nn.Identity()
    from cascadev.weights import load_state_dict_strict

    load_state_dict_strict(model, state, f"--videomae {path}", "the VideoMAE-v2 layout")
    return model.eval()
