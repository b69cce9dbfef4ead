"""Stage B semantic encoder: video frames -> 16-channel latents at 1/32 of the frame size.

As in Stable Cascade / Wuerstchen v3: torchvision ``efficientnet_v2_s().features`` (``backbone``) and a
``mapper`` = Conv2d(1280, 16, 1, bias=False) + BatchNorm2d(16, affine=False), whose running statistics
normalise the latent to roughly zero mean and unit variance. Parameter names match Stable Cascade's
``effnet_encoder.safetensors`` key for key (``backbone.<torchvision features key>``, ``mapper.0.weight``,
``mapper.1.running_mean`` ...), so the released file loads as is (``SemanticEncoder.from_single_file``). A diffusers
model: ``save_pretrained`` / ``from_pretrained``.

``encode`` returns the raw mapper output, which the Previewer consumes directly. CascadeV multiplies it
by the latent scale (0.13025, ``vae.stage_a.LATENT_SCALE``) after upsampling, before the DiT; that is
the pipeline's job, not this module's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ModelMixin  # noqa: F401  DiffusionPipeline.from_pretrained finds the load method by this name here
import torch.nn as nn
from diffusers.configuration_utils import register_to_config
from einops import rearrange

from cascadev.checks import check_video
from cascadev.errors import first_line
from cascadev.progress import progress_bar
from cascadev.weights import CascadeModel, build_preset, load_state_dict_strict

IMAGENET_MEAN = (0.485, 0.456, 0.406)   # torchvision EfficientNetV2 input normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
DOWNSAMPLE = 32                         # EfficientNetV2 features: total stride 32
EFFNET_FEATURES = 1280                  # channels out of efficientnet_v2_s().features
OFFICIAL_REPO = "stabilityai/stable-cascade"
OFFICIAL_FILE = "effnet_encoder.safetensors"


BACKBONES = ("efficientnet_v2_s", "tiny")   # released layout; strided convs for tests and the demo

PRESETS: dict[str, dict] = {
    "official": {},                     # SemanticEncoder's defaults: Stable Cascade's effnet_encoder.safetensors
    "tiny": dict(backbone_type="tiny"),
}


def _tiny_backbone(channels: tuple[int, ...]) -> nn.Sequential:
    """Stride-2 3x3 convs with SiLU: total stride 2**len(channels), a few hundred KB of weights."""
    layers, c_in = [], 3
    for c_out in channels:
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.SiLU()]
        c_in = c_out
    return nn.Sequential(*layers)


class SemanticEncoder(CascadeModel):
    """Frames in [-1, 1] -> semantic latents (16 ch, f32). Frozen in CascadeV: ``encode`` runs without grad.

    The keywords of ``__init__`` are its config; the defaults are the released encoder. ``backbone_type`` was
    called ``backbone`` in configs saved before, a name the submodule holds (the released keys ``backbone.*``):
    such configs load through ``legacy_config_keys``.
    """

    legacy_config_keys = {"backbone": "backbone_type"}

    @register_to_config
    def __init__(
        self,
        backbone_type: str = "efficientnet_v2_s",             # one of BACKBONES
        latent_channels: int = 16,
        tiny_channels: tuple[int, ...] = (8, 16, 32, 64, 128),  # "tiny" only: one stride-2 conv per entry
        frame_batch: int = 16,                                  # frames per backbone call in ``encode``
    ):
        super().__init__()
        if backbone_type not in BACKBONES:
            raise ValueError(f"unknown semantic encoder backbone {backbone_type!r}; expected one of {BACKBONES}")
        tiny_channels = tuple(tiny_channels)                     # a list from config.json
        if backbone_type == "tiny" and 2 ** len(tiny_channels) != DOWNSAMPLE:
            raise ValueError(f"tiny_channels needs {DOWNSAMPLE.bit_length() - 1} entries (one stride-2 conv each "
                             f"for a total stride of {DOWNSAMPLE}), got {len(tiny_channels)}")
        if frame_batch < 1 or latent_channels < 1:
            raise ValueError("frame_batch and latent_channels must be >= 1")
        self.register_to_config(tiny_channels=tiny_channels)
        if backbone_type == "efficientnet_v2_s":
            from torchvision.models import efficientnet_v2_s
            self.backbone = efficientnet_v2_s(weights=None).features   # weights come from from_single_file
            self.feature_channels = EFFNET_FEATURES
        else:
            self.backbone = _tiny_backbone(tiny_channels)
            self.feature_channels = tiny_channels[-1]
        self.mapper = nn.Sequential(
            nn.Conv2d(self.feature_channels, latent_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(latent_channels, affine=False),               # running stats normalise the latent
        )
        # not persistent: the released state dict has no such keys (from_pretrained builds them, see tests)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, latent_channels, H/32, W/32); differentiable, no checks."""
        x = (images * 0.5 + 0.5 - self.mean) / self.std                 # [-1,1] -> [0,1] -> ImageNet stats
        return self.mapper(self.backbone(x))

    @torch.no_grad()
    def encode(self, video: torch.Tensor, progress: bool = False, device: torch.device | None = None) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, 16, T, H/32, W/32), ``frame_batch`` frames per call.

        Runs in the module's dtype on ``device`` (default: the module's; a pipeline with offload hooks passes its
        execution device); returns float32 there. ``progress`` shows a bar.
        """
        check_video(video, 3, DOWNSAMPLE, "SemanticEncoder.encode", pixels=True)
        B = video.shape[0]
        param = next(self.parameters())
        frames = rearrange(video, "b c t h w -> (b t) c h w")
        out = [self(chunk.to(device=device or param.device, dtype=param.dtype)).float()
               for chunk in progress_bar(frames.split(self.config.frame_batch), desc="semantic encode",
                                         disable=not progress)]
        return rearrange(torch.cat(out), "(b t) c h w -> b c t h w", b=B)

    # -- weights -------------------------------------------------------------------------------

    @classmethod
    def from_single_file(cls, path: str | Path | None = None, config: dict | None = None) -> "SemanticEncoder":
        """Load Stable Cascade's ``effnet_encoder.safetensors`` (a file, a folder holding it, or None for
        the Hugging Face cache / hub); eval mode. ``config`` (``__init__`` keywords or a model's ``config``):
        None is the ``official`` preset."""
        file = resolve_official_file(path, OFFICIAL_FILE)
        model = cls.from_config_dict(config or PRESETS["official"])
        load_official_weights(model, file)
        return model.eval()


def build_semantic_encoder(preset: str = "official", **overrides) -> SemanticEncoder:
    """A preset name plus keyword overrides, e.g. ``build_semantic_encoder("tiny", frame_batch=4)``."""
    return build_preset(SemanticEncoder, PRESETS, preset, "semantic encoder", **overrides)


# -- released Stable Cascade files (shared with vae.previewer) ------------------------------------

def resolve_official_file(path: str | Path | None, filename: str, repo: str = OFFICIAL_REPO) -> Path:
    """Path of a released file: ``path`` itself, ``path/filename``, or (``path=None``) the hub download."""
    where = f"https://huggingface.co/{repo} (file {filename})"
    if path is None:
        from huggingface_hub import hf_hub_download
        try:
            return Path(hf_hub_download(repo, filename))
        except Exception as e:  # offline, gated, or missing: all mean "get the file yourself"
            raise FileNotFoundError(f"{filename} is not in the Hugging Face cache and could not be downloaded "
                                    f"({type(e).__name__}); download it from {where} into the weights folder, "
                                    "or pass the file itself") from None
    path = Path(path)
    if path.is_dir():
        path = path / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: download {filename} from {where}")
    return path


def load_official_weights(model: nn.Module, file: Path) -> None:
    """Strictly load a released safetensors state dict into ``model`` (names every bad key).

    BatchNorm ``num_batches_tracked`` counters may be absent from a released file; they do not affect
    inference, so missing ones keep the model's value. Everything else must match exactly.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state_dict = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a readable safetensors file ({first_line(e, typed=False, limit=300)})") \
            from None
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = value
    load_state_dict_strict(model, state_dict, str(file))
