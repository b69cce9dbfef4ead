"""Deterministic procedural video clips for tests and the demo (no data download needed).

``make_clip(seed, frames, height, width, kind)`` returns a (3, T, H, W) float clip in [-1, 1]. What it
draws, all from one seeded ``torch.Generator`` (same seed, same arguments -> bit-identical clip):

- ``"pan"``: a camera pan with a slow zoom over an endless procedural texture: coloured multi-octave
  value noise, sinusoidal gratings and a soft-edged checkerboard (fine detail, hard edges).
- ``"gradient"``: smooth colour gradients (linear plus radial) whose direction and colours drift.
- ``"shapes"``: 2-5 striped discs, boxes and rings with anti-aliased edges that move, bounce off the
  frame border and rotate, drawn over a gradient background (occlusion and independent motion).
- ``"mixed"`` (default): the pan texture tinted by a gradient, with the moving shapes on top.

Geometry is in "world units" of half the short frame side, so one seed makes the same scene at any
resolution; motion is per frame (about 1-5% of the short side), so longer clips move further.
Pure torch on CPU: a 16 x 256 x 256 clip takes a few tens of milliseconds.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

HELD_OUT_SEED0 = 100_000   # demo training clips use seeds below this (configs/demo_*.yaml); demos score from here

KINDS = ("mixed", "pan", "gradient", "shapes")
WORLD_EXTENT = 6.0     # procedural texture is defined on [-6, 6]^2 world units, mirrored beyond
SHAPE_TYPES = ("disc", "box", "ring")


def _uniform(g: torch.Generator, low: float, high: float, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape or (1,), generator=g)


def _color(g: torch.Generator, n: int = 1) -> torch.Tensor:
    """n saturated-ish random RGB colours in [-1, 1] -> (n, 3)."""
    hue = _uniform(g, 0.0, 2 * math.pi, n, 1)
    base = torch.cos(hue + torch.tensor([0.0, 2.094, 4.189]))      # evenly spaced hue phases
    return (0.75 * base + _uniform(g, -0.25, 0.25, n, 1)).clamp(-1, 1)


def _grid(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Pixel-centre coordinates in world units: y (H, 1), x (1, W); and pixels per world unit."""
    unit = min(height, width) / 2
    y = ((torch.arange(height) + 0.5 - height / 2) / unit).view(height, 1)
    x = ((torch.arange(width) + 0.5 - width / 2) / unit).view(1, width)
    return y, x, unit


def _texture(g: torch.Generator, y: torch.Tensor, x: torch.Tensor, unit: float) -> torch.Tensor:
    """Procedural colour texture sampled at world coordinates y, x (T, H, W) -> (3, T, H, W) in ~[-1, 1]."""
    t, h, w = y.shape
    pos = torch.stack([x, y], dim=-1) / WORLD_EXTENT                # t h w 2, grid_sample wants (x, y)
    pos = pos.reshape(1, t * h, w, 2)
    out = torch.zeros(3, t, h, w)
    # value-noise octaves, coarse to fine: colour blotches, then grey grain (luminance detail)
    for cells, amp, channels in ((8, 0.5, 3), (32, 0.25, 3), (128, 0.2, 1), (384, 0.1, 1)):
        noise = torch.randn(1, channels, cells, cells, generator=g)
        out += amp * F.grid_sample(noise, pos, mode="bicubic", padding_mode="reflection",
                                   align_corners=False).view(channels, t, h, w)
    for _ in range(2):                                              # coloured sinusoidal gratings
        angle, freq, phase = _uniform(g, 0, math.pi), _uniform(g, 10.0, 40.0), _uniform(g, 0, 2 * math.pi)
        wave = torch.sin(freq * (x * torch.cos(angle) + y * torch.sin(angle)) + phase)
        out += 0.3 * _color(g).view(3, 1, 1, 1) * wave
    cell = _uniform(g, 0.08, 0.25)                                  # checkerboard, edges ~1.5 px wide
    sharp = float(unit * cell / 3)
    checker = torch.tanh(sharp * torch.sin(math.pi * x / cell)) * torch.tanh(sharp * torch.sin(math.pi * y / cell))
    out += 0.5 * _color(g).view(3, 1, 1, 1) * checker
    return torch.tanh(out)


def _pan(g: torch.Generator, frames: int, height: int, width: int) -> torch.Tensor:
    """Camera pan + slow zoom over the procedural texture -> (3, T, H, W)."""
    y, x, unit = _grid(height, width)
    tau = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1)
    direction = _uniform(g, 0, 2 * math.pi)
    speed = _uniform(g, 0.02, 0.06)                                 # world units per frame
    wobble, wobble_freq = _uniform(g, 0.0, 0.15), _uniform(g, 0.1, 0.4)
    zoom_rate = _uniform(g, -0.01, 0.01)                            # log-scale change per frame
    cy = speed * tau * torch.sin(direction) + wobble * torch.sin(wobble_freq * tau)
    cx = speed * tau * torch.cos(direction) + wobble * torch.cos(wobble_freq * tau)
    zoom = torch.exp(zoom_rate * tau)
    origin = _uniform(g, -1.0, 1.0, 2)
    return _texture(g, (y / zoom + cy + origin[0]).expand(frames, height, width),
                    (x / zoom + cx + origin[1]).expand(frames, height, width), unit)


def _gradient(g: torch.Generator, frames: int, height: int, width: int) -> torch.Tensor:
    """Linear + radial colour gradients whose direction and colours drift -> (3, T, H, W)."""
    y, x, _ = _grid(height, width)
    tau = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1)
    c0, c1, c2 = _color(g, 3).view(3, 3, 1, 1, 1)
    angle = _uniform(g, 0, 2 * math.pi) + _uniform(g, -0.05, 0.05) * tau
    linear = 0.5 + 0.5 * torch.tanh(0.8 * (x * torch.cos(angle) + y * torch.sin(angle)))     # t h w
    centre = _uniform(g, -0.8, 0.8, 2) + _uniform(g, -0.02, 0.02, 2) * tau.view(frames, 1)   # t 2
    radius = torch.sqrt((y - centre[:, 0].view(-1, 1, 1)) ** 2 + (x - centre[:, 1].view(-1, 1, 1)) ** 2)
    radial = torch.exp(-radius ** 2 / _uniform(g, 0.3, 1.0))
    drift = 0.15 * torch.sin(_uniform(g, 0.05, 0.2) * tau + _uniform(g, 0, 6.3, 3, 1, 1, 1))  # 3 t 1 1
    return (0.8 * (c0 + (c1 - c0) * linear) + 0.6 * radial * (c2 - c0) + drift).clamp(-1, 1)


def _bounce(p: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Fold positions into [low, high] (a ball bouncing between two walls)."""
    span = high - low
    q = torch.remainder(p - low, 2 * span)
    return low + torch.where(q > span, 2 * span - q, q)


def _shapes(g: torch.Generator, frames: int, height: int, width: int, background: torch.Tensor) -> torch.Tensor:
    """Composite 2-5 moving, rotating, striped shapes over ``background`` (3, T, H, W)."""
    y, x, unit = _grid(height, width)
    tau = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1)
    half_h, half_w = height / 2 / unit, width / 2 / unit
    out = background.clone()
    for _ in range(int(torch.randint(2, 6, (1,), generator=g))):
        kind = SHAPE_TYPES[int(torch.randint(len(SHAPE_TYPES), (1,), generator=g))]
        size = _uniform(g, 0.15, 0.45)
        speed, direction = _uniform(g, 0.02, 0.08), _uniform(g, 0, 2 * math.pi)
        cy = _bounce(_uniform(g, -half_h, half_h) + speed * torch.sin(direction) * tau, -half_h + size, half_h - size)
        cx = _bounce(_uniform(g, -half_w, half_w) + speed * torch.cos(direction) * tau, -half_w + size, half_w - size)
        theta = _uniform(g, 0, 2 * math.pi) + _uniform(g, -0.1, 0.1) * tau
        aspect, freq = _uniform(g, 0.5, 1.0), _uniform(g, 25.0, 60.0)
        base, stripe_color = _color(g).view(3, 1, 1), _color(g).view(3, 1, 1)
        reach = float(size) * 1.5 * unit + 2                                 # bounding radius in pixels
        for t in range(frames):                  # draw inside each frame's bounding box only (fast)
            py, px = (float(cy[t]) * unit + height / 2), (float(cx[t]) * unit + width / 2)
            r0, r1 = max(int(py - reach), 0), min(int(py + reach) + 1, height)
            c0, c1 = max(int(px - reach), 0), min(int(px + reach) + 1, width)
            if r0 >= r1 or c0 >= c1:
                continue
            dx, dy = x[:, c0:c1] - cx[t], y[r0:r1] - cy[t]
            cos, sin = torch.cos(theta[t]), torch.sin(theta[t])
            u, v = dx * cos + dy * sin, dy * cos - dx * sin                  # shape-local coordinates
            if kind == "disc":
                sdf = torch.sqrt(u ** 2 + v ** 2) - size
            elif kind == "box":
                sdf = torch.maximum(u.abs() - size, v.abs() - size * aspect)
            elif kind == "ring":
                sdf = (torch.sqrt(u ** 2 + v ** 2) - 0.75 * size).abs() - 0.25 * size
            else:
                raise AssertionError(kind)
            alpha = (0.5 - sdf * unit).clamp(0, 1)                           # ~1 px anti-aliased edge
            stripes = torch.tanh(3.0 * torch.sin(freq * u))                  # texture that moves with it
            fill = (base * (0.7 + 0.3 * stripes) + 0.3 * stripe_color * stripes).clamp(-1, 1)
            region = out[:, t, r0:r1, c0:c1]
            region += alpha * (fill - region)
    return out


def make_clip(seed: int, frames: int, height: int, width: int, kind: str = "mixed") -> torch.Tensor:
    """A procedural clip (3, T, H, W) in [-1, 1]; ``kind`` in ``KINDS`` (see the module docstring).

    Deterministic: the same (seed, frames, height, width, kind) gives a bit-identical tensor.
    """
    if frames < 1 or height < 1 or width < 1:
        raise ValueError(f"make_clip: frames, height and width must be >= 1, got {frames}, {height}, {width}")
    g = torch.Generator().manual_seed(int(seed))
    if kind == "pan":
        clip = _pan(g, frames, height, width)
    elif kind == "gradient":
        clip = _gradient(g, frames, height, width)
    elif kind == "shapes":
        clip = _shapes(g, frames, height, width, _gradient(g, frames, height, width))
    elif kind == "mixed":
        background = _pan(g, frames, height, width)
        tint = _gradient(g, frames, height, width)
        clip = _shapes(g, frames, height, width, 0.65 * background + 0.35 * tint)
    else:
        raise ValueError(f"make_clip: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    return clip.clamp(-1.0, 1.0).contiguous()


def write_clips(folder: str | Path, n: int, frames: int, height: int, width: int, seed0: int = 0,
                fps: float = 8, kind: str = "mixed") -> list[Path]:
    """Write ``n`` clips ``folder/clip_{seed:05d}.mp4`` for seeds seed0 .. seed0+n-1; return their paths."""
    from cascadev.video_io import write_video

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(seed0, seed0 + n):
        path = folder / f"clip_{seed:05d}.mp4"
        write_video(path, make_clip(seed, frames, height, width, kind), fps=fps)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    """``python -m cascadev.synthetic DIR --n 64 --frames 16 --size 128``: write procedural clips."""
    import argparse

    parser = argparse.ArgumentParser(description="Write deterministic procedural clips (mp4) for training and tests.")
    parser.add_argument("folder")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=128, help="square side in pixels")
    parser.add_argument("--seed0", type=int, default=0,
                        help=f"first seed (the demos hold out seeds >= {HELD_OUT_SEED0})")
    parser.add_argument("--kind", default="mixed", choices=KINDS)
    args = parser.parse_args(argv)
    paths = write_clips(args.folder, args.n, args.frames, args.size, args.size, args.seed0, kind=args.kind)
    print(f"wrote {len(paths)} clips to {args.folder}")


if __name__ == "__main__":
    main()
