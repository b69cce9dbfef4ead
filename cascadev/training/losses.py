"""Losses of Stage A (VAE) training: L1, LPIPS, KL, and a hinge patch discriminator; and the diffusion loss of
the Stage C base model (``base_training_loss``).

Stage A: frames are scored as images: (N, 3, H, W) in [-1, 1], N = videos x frames. The discriminator is the
PatchGAN of pix2pix / taming-transformers (stride-2 4x4 convs, one logit per patch), trained with the
hinge loss (Lim & Ye 2017), as the latent-diffusion VAEs were.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from cascadev.pipelines.text_encoder import TextEmbedding
from cascadev.pipelines.text_to_video import config_of, to_model

log = logging.getLogger(__name__)


def kl_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, e^logvar) || N(0, 1)), mean over all but the batch dimension: (B, ...) -> (B,)."""
    return (0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar)).flatten(1).mean(dim=1)


def load_lpips_loss(device: torch.device) -> nn.Module | None:
    """A differentiable LPIPS (AlexNet, torchmetrics) when its backbone weights are on disk, else None (logged)."""
    from eval.metrics import alexnet_weights_path

    path = alexnet_weights_path()
    if not path.is_file():
        log.info("LPIPS loss off: AlexNet weights not found at %s (no download attempted); "
                 "put them there to train with LPIPS", path)
        return None
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    net = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=False).net   # frozen, eval mode
    log.info("LPIPS loss on (AlexNet weights from %s)", path)
    return net.to(device).requires_grad_(False).eval()


class PatchDiscriminator(nn.Module):
    """PatchGAN: (N, 3, H, W) -> (N, 1, H', W') logits, one per overlapping patch (receptive field 70 px for 3
    layers)."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers + 1):
            c_out = channels * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            # GroupNorm: no cross-rank batch stats
            blocks += [nn.Conv2d(c, c_out, 4, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(min(32, c_out // 4), c_out), nn.LeakyReLU(0.2)]
            c = c_out
        blocks.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.net(frames)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: E[relu(1 - D(x))] + E[relu(1 + D(G(z)))], halved."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge loss: -E[D(G(z))]."""
    return -logits_fake.mean()


# -- Stage C: the base model (stage stage_c) ---------------------------------------------------------

def drop_captions(text: TextEmbedding, null_text: TextEmbedding, drop: torch.Tensor) -> TextEmbedding:
    """Replace the rows where ``drop`` (B,) is True by ``null_text`` (1 row: the empty prompt's encoding)."""
    if null_text.context.shape[1:] != text.context.shape[1:]:
        raise ValueError(f"null text {tuple(null_text.context.shape)} does not match the captions "
                         f"{tuple(text.context.shape)}")
    return TextEmbedding(*(torch.where(drop.view(-1, *[1] * (z.ndim - 1)), n.to(z), z)
                           for z, n in zip(text, null_text)))


def base_training_loss(model: torch.nn.Module, diffusion, latents: torch.Tensor, text: TextEmbedding,
                       null_text: TextEmbedding, generator: torch.Generator, drop_prob: float,
                       as_images: bool = False) -> tuple[torch.Tensor, dict]:
    """Diffusion loss of the base model on one micro-batch.

    latents: (B, 16, T, h, w) semantic latents as the encoder makes them (unscaled; cached ones too).
    text: the captions' ``TextEmbedding`` (B rows); null_text: the empty prompt's (1 row), which
        replaces a ``drop_prob`` share of the captions so the model also learns eps(null) for CFG.
    diffusion: a ``cascadev.training.diffusion`` objective (per-video timesteps; eps + learned variance for iddpm).
    Returns (mean loss, {"loss", "mse", "vb"} detached means), as the Stage B task does.
    """
    x0 = to_model(latents, config_of(model))
    B = x0.shape[0]
    drop = torch.rand(B, generator=generator, device=generator.device) < drop_prob
    text = drop_captions(TextEmbedding(*(z.to(x0.device) for z in text)), null_text, drop.to(x0.device))
    t = diffusion.sample_t(B, generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    x_t = diffusion.noise(x0, t, eps)
    out = model(x_t, diffusion.model_time(t), *text, as_images=as_images)  # b c_out t h w
    losses = diffusion.losses(out, x0, x_t, t, eps)
    return losses["loss"].mean(), {k: v.detach().mean() for k, v in losses.items()}
