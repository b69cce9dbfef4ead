"""The frozen text encoder of Stage C: an open_clip CLIP text tower and its tokenizer.

As Stable Cascade's Stage C (CLIP ViT-bigG-14, laion2b_s39b_b160k): the per-token states are a
transformer block's output before ``ln_final`` (``hidden_layer=-1``, the last block, is Hugging Face's
``hidden_states[-1]`` that Stable Cascade reads; -2 is SDXL's penultimate layer), and the pooled
embedding is the projected end-of-text token (CLIP's text features, unnormalised). Prompts are padded
to the tokenizer's context length (77); the mask marks start-of-text through end-of-text.

Only the text tower is built and loaded (the released checkpoints also hold the image tower, which
Stage C does not need): from an open_clip pretrained tag (Hugging Face hub or cache), a local
checkpoint file, or our ``save_pretrained`` folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from cascadev.errors import first_line

CHECKPOINT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # as open_clip's hub repos ship them
NON_TEXT_KEYS = ("visual.", "logit_scale", "logit_bias")                          # the rest of a CLIP checkpoint
MIN_OPEN_CLIP = "2.32"  # TextTransformer.forward_intermediates (2.31 and earlier lack it)


class TextEmbedding(NamedTuple):
    """Encoded prompts: context (B, L, width) token states, pooled (B, embed_dim), mask (B, L) bool (True = real
    token)."""

    context: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor


def text_tower_config(model_name: str, hidden_layer: int = -1, text_overrides: dict | None = None,
                      embed_dim: int | None = None):
    """(embed_dim, open_clip CLIPTextCfg, quick_gelu) of a tower: open_clip's shipped config plus overrides.
    Raises a one-line ValueError on an unknown name or override, or a ``hidden_layer`` out of range."""
    import open_clip

    base = open_clip.get_model_config(model_name)
    if base is None:
        raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
    fields = {**base["text_cfg"], **(text_overrides or {})}
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(open_clip.CLIPTextCfg)})
    if unknown:
        raise ValueError(f"text_overrides: unknown open_clip text config field(s) {', '.join(unknown)}")
    cfg = open_clip.CLIPTextCfg(**fields)
    if cfg.hf_model_name or cfg.pool_type != "argmax" or cfg.embed_cls:
        raise ValueError(f"{model_name}: only CLIP text towers (BPE tokenizer, end-of-text pooling) are supported")
    if not -cfg.layers <= hidden_layer < cfg.layers:
        raise ValueError(f"hidden_layer {hidden_layer} is out of range for {cfg.layers} layers")
    return embed_dim or base["embed_dim"], cfg, bool(base.get("quick_gelu", False))


PRESETS: dict[str, dict] = {
    # Stable Cascade's text encoder: TextEncoder's defaults
    "bigG": {},
    # The smaller LAION CLIP (SD 2.x's), 1024 wide
    "H": dict(model_name="ViT-H-14", pretrained="laion2b_s32b_b79k"),
    # A random 2-layer, 32-wide tower with the real tokenizer, for CPU tests
    "tiny": dict(model_name="ViT-B-32", pretrained=None, embed_dim=32,
                 text_overrides={"width": 32, "heads": 2, "layers": 2}),
}


def _state_dict_of_file(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: safetensors or a torch file (a state dict, or {'state_dict': ...})."""
    from cascadev.weights import torch_load

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        blob = torch_load(path)
    except Exception as e:  # a corrupt or foreign file: one line, not a pickle traceback
        raise ValueError(f"{path}: cannot read the checkpoint "
                         f"({first_line(e)})") from None
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        blob = blob["state_dict"]
    if not isinstance(blob, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(blob).__name__}")
    return {k.removeprefix("module."): v for k, v in blob.items()}


def text_tower_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text tower's entries of an open_clip checkpoint: ``text.*`` (CustomTextCLIP) or the
    top-level text keys of a CLIP (everything but ``visual.*`` and the logit scale/bias)."""
    if any(k.startswith("text.") for k in state_dict):
        return {k.removeprefix("text."): v for k, v in state_dict.items() if k.startswith("text.")}
    return {k: v for k, v in state_dict.items() if not k.startswith(NON_TEXT_KEYS)}


def resolve_checkpoint(model_name: str, pretrained: str) -> Path:
    """The checkpoint file ``pretrained`` names: a local file or folder, or an open_clip tag of ``model_name`` (hub)."""
    import open_clip

    source = str(pretrained)
    path = Path(source).expanduser()
    if path.exists() or "/" in source or path.suffix in (".bin", ".pt", ".pth", ".safetensors"):
        if path.is_dir():
            found = [path / n for n in CHECKPOINT_NAMES if (path / n).is_file()]
            if not found:
                raise FileNotFoundError(f"{path}: no {' or '.join(CHECKPOINT_NAMES)} in this folder")
            path = found[0]
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: pass an open_clip checkpoint of {model_name} "
                                    f"(e.g. {CHECKPOINT_NAMES[1]}) or an open_clip pretrained tag")
        return path
    cfg = open_clip.get_pretrained_cfg(model_name, source)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(f"{source!r} is not an open_clip pretrained tag of {model_name}; choose from {tags} "
                         "or pass a checkpoint path")
    where = f"https://huggingface.co/{cfg['hf_hub'].rstrip('/')}" if cfg.get("hf_hub") else cfg.get("url", "?")
    try:
        file = open_clip.download_pretrained(cfg)
    except Exception as e:  # offline, gated or missing: all mean "get the file yourself"
        raise FileNotFoundError(f"text encoder weights {model_name} ({source}) are not in the cache and could not be "
                                f"downloaded ({type(e).__name__}); download {CHECKPOINT_NAMES[1]} from {where} "
                                "and pass its path") from None
    if not file:
        raise FileNotFoundError(f"open_clip has no download for {model_name} ({source}); pass a checkpoint path")
    return Path(file)


class TextEncoder(ModelMixin, ConfigMixin):
    """Frozen open_clip text tower + tokenizer: ``encode(prompts)`` -> ``TextEmbedding``.

    A diffusers model: ``TextEncoder(**keywords)`` (its config) builds the tower with random weights,
    ``build_text_encoder`` also loads ``pretrained``; ``save_pretrained`` / ``from_pretrained`` are diffusers' own
    (the saved config has ``pretrained`` cleared: the weights are in the folder)."""

    @register_to_config
    def __init__(self, model_name: str = "ViT-bigG-14", pretrained: str | None = "laion2b_s39b_b160k",
                 hidden_layer: int = -1, text_overrides: dict | None = None, embed_dim: int | None = None):
        super().__init__()
        import open_clip
        from open_clip.model import _build_text_tower  # the builder open_clip's own CLIP uses for its text half

        embed_dim, text_cfg, quick_gelu = text_tower_config(model_name, hidden_layer, text_overrides, embed_dim)
        self.tower = _build_text_tower(embed_dim, text_cfg, quick_gelu)
        if not hasattr(self.tower, "forward_intermediates"):
            raise ImportError(f"cascadev.pipelines.text_encoder needs open_clip_torch >= {MIN_OPEN_CLIP} "
                              "(pip install -U open_clip_torch)")
        self.tokenizer = open_clip.get_tokenizer(model_name, context_length=self.tower.context_length)
        self.requires_grad_(False).eval()

    @property
    def width(self) -> int:
        """Token state width: a ``TextDiT``'s ``caption_channels``."""
        return self.tower.width

    @property
    def embed_dim(self) -> int:
        """Pooled width: a ``TextDiT``'s ``pooled_channels``."""
        return self.tower.output_dim

    @property
    def context_length(self) -> int:
        return self.tower.context_length

    @property
    def device(self) -> torch.device:
        return self.tower.token_embedding.weight.device

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> token ids (B, L) long, padded or truncated to the context length, and mask (B, L) bool.

        The mask runs from start-of-text through end-of-text, the token with the largest id (which
        CLIP's own pooling looks up by argmax): padding is 0, which is also a real token ("!").
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("tokenize expects a list of strings")
        tokens = self.tokenizer(list(prompts))  # b l
        eot = tokens.argmax(dim=1, keepdim=True)
        mask = torch.arange(tokens.shape[1])[None] <= eot
        return tokens, mask

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) -> (token states (B, L, width) of ``hidden_layer``, pooled (B, embed_dim))."""
        layer = self.config.hidden_layer % len(self.tower.transformer.resblocks)
        out = self.tower.forward_intermediates(tokens, indices=[layer], output_fmt="NLC")
        return out["text_intermediates"][0], out["text_features"]

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> TextEmbedding:
        """Prompts -> ``TextEmbedding`` (context (B, L, width), pooled (B, embed_dim), mask (B, L)) on this device."""
        tokens, mask = self.tokenize([prompts] if isinstance(prompts, str) else prompts)
        context, pooled = self(tokens.to(self.device))
        return TextEmbedding(context.float(), pooled.float(), mask.to(self.device))

    # -- weights -------------------------------------------------------------------------------

    def load_checkpoint(self, path: str | Path) -> None:
        """Strictly load the text tower of an open_clip checkpoint (names every bad key)."""
        from cascadev.weights import load_state_dict_strict
        path = Path(path)
        load_state_dict_strict(self.tower, text_tower_state_dict(_state_dict_of_file(path)), str(path))

    @classmethod
    def build(cls, config: dict, load_weights: bool = True) -> "TextEncoder":
        """Build the tower for ``config`` (``__init__`` keywords) and load its ``pretrained`` (unless None or
        ``load_weights`` is False)."""
        from cascadev.weights import init_keywords
        full = {**{k: p.default for k, p in init_keywords(cls).items()}, **config}
        load = load_weights and full["pretrained"] is not None
        file = resolve_checkpoint(full["model_name"], full["pretrained"]) if load else None  # fail before building
        model = cls(**config)
        if file is not None:
            model.load_checkpoint(file)
        return model.eval()

    def save_pretrained(self, directory: str | Path, **kwargs) -> None:
        """diffusers' ``save_pretrained``, with ``pretrained`` cleared in the saved config: the weights are here."""
        pretrained = self.config.pretrained
        self.register_to_config(pretrained=None)
        try:
            super().save_pretrained(directory, **kwargs)
        finally:
            self.register_to_config(pretrained=pretrained)

    @classmethod
    def from_legacy_folder(cls, folder: str | Path) -> "TextEncoder":
        """A folder saved by cascadev < 0.2 (``config.json`` of the ``__init__`` keywords + ``model.safetensors``)."""
        import json

        from safetensors.torch import load_file

        from cascadev.weights import init_keywords, load_state_dict_strict
        folder = Path(folder)
        config = {**json.loads((folder / "config.json").read_text()), "pretrained": None}
        model = cls(**{k: v for k, v in config.items() if k in init_keywords(cls)})
        load_state_dict_strict(model, load_file(str(folder / "model.safetensors")), str(folder))
        return model.eval()


def build_text_encoder(preset: str = "bigG", load_weights: bool = True, **overrides) -> TextEncoder:
    """A preset plus keyword overrides, e.g. ``build_text_encoder("H", pretrained="/ckpt.bin")``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown text encoder preset {preset!r}; choose from {sorted(PRESETS)}")
    return TextEncoder.build({**PRESETS[preset], **overrides}, load_weights)
