"""Captioned procedural clips: one striped shape moving over a gradient, described in words from its own parameters.

The text-to-video data of the built-in tiny Stage C. Every clip is drawn from a seed's ``Attributes``, each a word:

    shape       disc, box, ring                           (``cascadev.synthetic.SHAPE_TYPES``)
    colour      red, yellow, green, cyan, blue, purple
    stripes     horizontal, vertical
    direction   left, right, up, down
    speed       slow, fast
    background  dark, grey, light

``caption(attrs)`` puts them in one fixed template, "a fast red striped ring with vertical stripes moving left
over a dark background", so the words are the parameters and nothing else. ``HELD_OUT`` colour-shape pairs
never occur in training seeds (``attributes`` draws again until the pair is allowed); ``held_out_attributes``
gives clips of those pairs, for measuring whether generation composes words it saw only apart.

``render(attrs, seed, frames, height, width)`` -> (3, T, H, W) in [-1, 1]: the shape starts so that its path
of ``frames`` frames is centred in the frame (no bounce: the direction holds for the whole clip), with a
seeded jitter of position, size and background gradient. Deterministic: same arguments, same tensor.

    python -m cascadev.captioned DIR --n 600 --frames 8 --size 256   # DIR/clip_*.mp4 + DIR/captions.jsonl
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cascadev.synthetic import SHAPE_TYPES, _grid, _uniform

COLOURS = {"red": (0.9, -0.8, -0.8), "yellow": (0.9, 0.8, -0.8), "green": (-0.8, 0.8, -0.8),
           "cyan": (-0.8, 0.8, 0.9), "blue": (-0.8, -0.6, 0.9), "purple": (0.5, -0.8, 0.9)}   # RGB in [-1, 1]
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}                # (x, y), y downwards
SPEEDS = {"slow": 0.08, "fast": 0.14}                    # world units (half the short side) per frame
JITTER = (0.1, 0.05)                                     # position jitter across and along the path
BACKGROUNDS = {"dark": -0.7, "grey": 0.0, "light": 0.65}  # mean brightness of the gradient
STRIPES = ("horizontal", "vertical")
HELD_OUT = (("red", "ring"), ("green", "disc"), ("blue", "box"))   # colour-shape pairs kept out of training
EVAL_SEED0 = 500_000     # seeds of held-out clips (``held_out_attributes``); training seeds are small
EVAL_ATTRIBUTES = ("colour", "shape", "direction")          # what the text-following check scores


@dataclass(frozen=True)
class Attributes:
    """A clip's parameters, one word each (see the module docstring for the vocabulary)."""

    shape: str
    colour: str
    stripes: str
    direction: str
    speed: str
    background: str

    def __post_init__(self):
        for name, allowed in VOCABULARY.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")


VOCABULARY: dict[str, tuple[str, ...]] = {
    "shape": SHAPE_TYPES, "colour": tuple(COLOURS), "stripes": STRIPES, "direction": tuple(DIRECTIONS),
    "speed": tuple(SPEEDS), "background": tuple(BACKGROUNDS)}


def caption(a: Attributes) -> str:
    """The one template: "a {speed} {colour} striped {shape} with {stripes} stripes moving {direction} over a
    {background} background"."""
    return (f"a {a.speed} {a.colour} striped {a.shape} with {a.stripes} stripes moving {a.direction} "
            f"over a {a.background} background")


def parse_caption(text: str) -> Attributes:
    """The inverse of ``caption`` (ValueError for any other sentence)."""
    words = text.split()
    fixed = {0: "a", 3: "striped", 5: "with", 7: "stripes", 8: "moving", 10: "over", 11: "a", 13: "background"}
    if len(words) != 14 or any(words[i] != w for i, w in fixed.items()):
        raise ValueError(f"not a caption of this template: {text!r}")
    return Attributes(shape=words[4], colour=words[2], stripes=words[6], direction=words[9], speed=words[1],
                      background=words[12])


def unknown_words(text: str) -> list[str]:
    """The words of ``text`` no caption uses, once each in order: words a model trained on these captions never saw."""
    template = caption(Attributes(**{name: words[0] for name, words in VOCABULARY.items()})).split()
    known = set(template) | {word for words in VOCABULARY.values() for word in words}
    return list(dict.fromkeys(w for w in re.findall(r"[a-z]+", text.lower()) if w not in known))


def is_held_out(a: Attributes) -> bool:
    return (a.colour, a.shape) in HELD_OUT


def _draw(g: torch.Generator) -> Attributes:
    pick = {name: words[int(torch.randint(len(words), (1,), generator=g))] for name, words in VOCABULARY.items()}
    return Attributes(**pick)


def attributes(seed: int, include_held_out: bool = False) -> Attributes:
    """A clip's attributes, uniform over the vocabulary; for training clips (``include_held_out`` False) redrawn
    while the colour-shape pair is held out. The text-following check's classifier sees every pair."""
    g = torch.Generator().manual_seed(int(seed))
    while is_held_out(a := _draw(g)) and not include_held_out:
        pass
    return a


def held_out_attributes(index: int) -> Attributes:
    """An evaluation clip's attributes: a held-out colour-shape pair (cycled over ``HELD_OUT``), the rest uniform."""
    g = torch.Generator().manual_seed(EVAL_SEED0 + int(index))
    colour, shape = HELD_OUT[index % len(HELD_OUT)]
    return Attributes(**{**asdict(_draw(g)), "colour": colour, "shape": shape})


def render(a: Attributes, seed: int, frames: int, height: int, width: int) -> torch.Tensor:
    """The clip of ``a`` (3, T, H, W) in [-1, 1]; ``seed`` jitters position, size, stripe frequency and background."""
    if frames < 1 or height < 1 or width < 1:
        raise ValueError(f"render: frames, height and width must be >= 1, got {frames}, {height}, {width}")
    g = torch.Generator().manual_seed(int(seed) + 7_919)
    y, x, unit = _grid(height, width)
    tau = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1)

    # background: a soft linear gradient around the named brightness, faintly tinted
    angle = float(_uniform(g, 0, 2 * math.pi))
    ramp = torch.tanh(0.8 * (x * math.cos(angle) + y * math.sin(angle)))                       # h w
    tint = _uniform(g, -0.12, 0.12, 3).view(3, 1, 1, 1)
    out = (BACKGROUNDS[a.background] + 0.2 * ramp + tint).expand(3, frames, height, width).clone()

    # the shape: its path of `frames` frames centred, jittered a little across and along the motion. The jitter is
    # what a caption cannot say: at +-0.35 across it outweighed the direction word 2-4x and the shape word 70x in the
    # semantic latents, and the model learnt neither (docs/text-to-video.md, "Does it follow the text?")
    size = float(_uniform(g, 0.35, 0.45))
    dx, dy = DIRECTIONS[a.direction]
    travel = SPEEDS[a.speed] * (frames - 1)
    across, along = _uniform(g, -JITTER[0], JITTER[0]), _uniform(g, -JITTER[1], JITTER[1])
    s = (along - travel / 2 + SPEEDS[a.speed] * tau.view(frames)).view(frames, 1, 1)         # t 1 1
    cx, cy = s * dx + across * dy, s * dy + across * dx
    u, v = x - cx, y - cy                                                                       # t h w
    if a.shape == "disc":
        sdf = torch.sqrt(u ** 2 + v ** 2) - size
    elif a.shape == "box":
        sdf = torch.maximum(u.abs(), v.abs()) - 0.85 * size
    elif a.shape == "ring":
        sdf = (torch.sqrt(u ** 2 + v ** 2) - 0.75 * size).abs() - 0.25 * size
    else:
        raise AssertionError(a.shape)
    alpha = (0.5 - sdf * unit).clamp(0, 1)                                                      # ~1 px edge
    freq = float(_uniform(g, 25.0, 35.0))
    stripes = torch.tanh(3.0 * torch.sin(freq * (v if a.stripes == "horizontal" else u)))    # move with the shape
    base = torch.tensor(COLOURS[a.colour]).view(3, 1, 1, 1)
    fill = base * (0.8 + 0.2 * stripes) - 0.25 * (1 - stripes) / 2
    out += alpha * (fill - out)
    return out.clamp(-1.0, 1.0).contiguous()


def write_dataset(folder: str | Path, n: int, frames: int, size: int, seed0: int = 0, fps: float = 8,
                  held_out: bool = False) -> Path:
    """Write ``n`` clips ``folder/clip_{seed:06d}.mp4`` and ``folder/captions.jsonl`` (``path``, ``caption`` and the
    attributes, one row per clip); the training split (``held_out`` False) never holds a ``HELD_OUT`` pair."""
    from cascadev.video_io import write_video

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        seed = seed0 + i
        a = held_out_attributes(i) if held_out else attributes(seed)
        name = f"clip_{seed:06d}.mp4"
        if not (folder / name).is_file():
            write_video(folder / name, render(a, seed, frames, size, size), fps=fps)
        rows.append({"path": name, "caption": caption(a), **asdict(a)})
    listing = folder / "captions.jsonl"
    listing.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return listing


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write captioned procedural clips (mp4 + captions.jsonl).")
    parser.add_argument("folder")
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="square side in pixels")
    parser.add_argument("--seed0", type=int, default=0)
    parser.add_argument("--held-out", action="store_true", help="clips of the held-out colour-shape pairs only")
    args = parser.parse_args(argv)
    listing = write_dataset(args.folder, args.n, args.frames, args.size, args.seed0, held_out=args.held_out)
    print(f"wrote {args.n} clips and {listing}")


if __name__ == "__main__":
    main()
