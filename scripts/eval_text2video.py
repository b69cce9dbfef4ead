"""Does the built-in tiny Stage C follow the text? Attribute accuracy of generated semantic latents for held-out
prompts.

    python scripts/eval_text2video.py --guidance 1,3,5         # the shipped weights; 5 min on 2 CPU cores
    python scripts/eval_text2video.py --weights runs/demo_base/final --guidance 1,2,3,5

The measuring instrument: nearest-class-mean classifiers on the semantic latents (B, 16, T, H/32, W/32) of real
``cascadev.captioned`` clips, encoded by the tiny cascade's semantic encoder (the space Stage C generates in).
They are fitted on ``--fit`` real clips of every attribute combination (the classifier is not the model under
test, so it may see the held-out pairs) on two features of the latents:
  appearance (colour, shape): per channel, the foreground-weighted mean, the background (per-frame median) mean,
      max, min and std over all cells, standardised; foreground weight = squared distance of a cell from its
      frame's background, normalised per frame;
  motion (direction): the slope over frames of the foreground-weighted centroid (x, y).
Prompts: captions of ``held_out_attributes`` (colour-shape pairs never in the training captions) and, for
comparison, captions the model was trained on. Each prompt is generated once per guidance scale (same noise);
the real clips of the held-out prompts (new seeds) give the classifier's own accuracy, the ceiling.
A classifier-free check (``paired_swap``): prompts that differ in one word only, generated from the same noise, and
real clips that differ in that word only (same seeds): the cosine between the generated and the real latent difference,
mean over word pairs (0: the word changes nothing in the right direction; real vs real of new seeds gives the ceiling).
A probe for rectified-flow models (``word_reliance``): how much the training loss on the seen prompts' real clips
rises when one attribute's word is swapped, at a few noise levels: 0 means the model ignores that word.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from cascadev.captioned import (EVAL_ATTRIBUTES, VOCABULARY, attributes, caption, held_out_attributes, render)

FIT_SEED0 = 700_000        # real clips the classifier is fitted on (every pair); training seeds are < 2400
PAIRED_SEED0 = 750_000     # real clips of the paired word-swap check


def features(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantic latents (B, C, T, h, w) -> appearance (B, 5C) and motion (B, 2) features (see the docstring)."""
    B, C, T, h, w = z.shape
    background = z.flatten(3).median(-1).values                                 # b c t
    distance = (z - background[..., None, None]).norm(dim=1)                    # b t h w
    weight = distance.pow(2) / distance.pow(2).sum((2, 3), keepdim=True).clamp_min(1e-12)
    foreground = (z * weight[:, None]).sum((3, 4)).mean(2)                      # b c
    appearance = torch.cat([foreground, background.mean(2), z.amax((2, 3, 4)), z.amin((2, 3, 4)), z.std((2, 3, 4))], 1)
    ys = torch.arange(h, dtype=z.dtype).view(1, 1, h, 1)
    xs = torch.arange(w, dtype=z.dtype).view(1, 1, 1, w)
    cy, cx = (weight * ys).sum((2, 3)), (weight * xs).sum((2, 3))               # b t
    tau = torch.arange(T, dtype=z.dtype) - (T - 1) / 2
    motion = torch.stack([(cx * tau).sum(1), (cy * tau).sum(1)], 1) / tau.pow(2).sum().clamp_min(1e-12)
    return appearance, motion


class NearestClassMean:
    """Standardise features by the fitting set's statistics; predict the class whose mean is nearest."""

    def __init__(self, x: torch.Tensor, labels: list[str]):
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-6
        self.classes = sorted(set(labels))
        x = (x - self.mu) / self.sd
        self.means = torch.stack([x[[y == c for y in labels]].mean(0) for c in self.classes])

    def __call__(self, x: torch.Tensor) -> list[str]:
        return [self.classes[i] for i in torch.cdist((x - self.mu) / self.sd, self.means).argmin(1).tolist()]


def encode_real(encoder, attrs: list, seeds: list[int], frames: int, size: int, batch: int = 16) -> torch.Tensor:
    """Real clips of ``attrs`` (rendered, never through a file) -> semantic latents (N, 16, T, h, w)."""
    out = []
    for i in range(0, len(attrs), batch):
        clips = torch.stack([render(a, s, frames, size, size) for a, s in zip(attrs[i:i + batch], seeds[i:i + batch])])
        out.append(encoder.encode(clips))
    return torch.cat(out)


def score(classifiers: dict, z: torch.Tensor, attrs: list) -> dict:
    """Accuracy per attribute and of all three at once."""
    appearance, motion = features(z)
    hits = {name: [p == getattr(a, name) for p, a in zip(clf(motion if name == "direction" else appearance), attrs)]
            for name, clf in classifiers.items()}
    acc = {name: sum(h) / len(h) for name, h in hits.items()}
    acc["all three"] = sum(all(col) for col in zip(*hits.values())) / len(attrs)
    return acc


def paired_swap(pipe, encoder, attrs: list, frames: int, size: int, steps: int, guidance: float) -> dict:
    """Per attribute: mean cosine between (generated word a - word b) and (real word a - word b), ``attrs`` with the
    attribute set to each word of its vocabulary, the rest unchanged; generated from the same noise, real from the
    same seeds (see the module docstring). ``real`` rows: the same with real clips of other seeds (the ceiling)."""
    seeds = [PAIRED_SEED0 + i for i in range(len(attrs))]
    out = {}
    for name in EVAL_ATTRIBUTES:
        variants = {w: [dataclasses.replace(a, **{name: w}) for a in attrs] for w in VOCABULARY[name]}
        real = {w: encode_real(encoder, v, seeds, frames, size) for w, v in variants.items()}
        other = {w: encode_real(encoder, v, [s + 1 for s in seeds], frames, size) for w, v in variants.items()}
        gen = {w: pipe([caption(a) for a in v], num_frames=frames, height=size, width=size, num_inference_steps=steps,
                       guidance_scale=guidance, output_type="latent").latents for w, v in variants.items()}
        def cosine(z):
            pairs = [(a, b) for i, a in enumerate(VOCABULARY[name]) for b in VOCABULARY[name][i + 1:]]
            return sum(torch.nn.functional.cosine_similarity((z[a] - z[b]).flatten(1), (real[a] - real[b]).flatten(1))
                       .mean() for a, b in pairs).item() / len(pairs)
        out[name] = {"generated": cosine(gen), "real": cosine(other)}
    return out


PROBE_SIGMAS = (0.5, 0.9, 0.97)    # rectified-flow noise levels; the path of the shape is decided near 1


def word_reliance(pipe, z: torch.Tensor, attrs: list, seed: int = 0) -> dict:
    """How much the model's training loss rises when one word of the caption is swapped for another of its kind.

    z: semantic latents (B, 16, T, h, w) of real clips captioned by ``attrs``. For each sigma of ``PROBE_SIGMAS``
    the rectified-flow training loss (``RectifiedFlow.losses``) of the true captions, then the relative rise with
    each attribute's word replaced by the next word of its vocabulary ("empty": no caption). 0: the word is ignored.
    """
    from cascadev.pipelines.text_to_video import to_model
    from cascadev.training.diffusion import RectifiedFlow

    base, encode, flow = pipe.base, pipe.text_encoder.encode, RectifiedFlow()
    x0 = to_model(z, base.config)
    g = torch.Generator().manual_seed(seed)
    def swapped(name):
        words = VOCABULARY[name]
        return [caption(dataclasses.replace(a, **{name: words[(words.index(getattr(a, name)) + 1) % len(words)]}))
                for a in attrs]
    captions = {"empty": [""] * len(attrs), **{name: swapped(name) for name in (*EVAL_ATTRIBUTES, "background")}}
    out = {}
    for sigma in PROBE_SIGMAS:
        eps, sigmas = torch.randn(x0.shape, generator=g), torch.full((len(attrs),), sigma)
        x_t = flow.noise(x0, sigmas, eps)
        def loss(texts):
            v = base(x_t, flow.model_time(sigmas), *encode(texts))
            return flow.losses(v, x0, x_t, sigmas, eps)["loss"].mean().item()
        true = loss([caption(a) for a in attrs])
        out[f"{sigma:g}"] = {name: loss(texts) / true - 1 for name, texts in captions.items()}
    return out


def markdown_table(title: str, columns: list[str], rows: dict[str, list[str]]) -> str:
    """A table with a header row (``title`` over the row names, then ``columns``) and one line per row of cells."""
    lines = [f"| {title} | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    return "\n".join([*lines, *(f"| {row} | " + " | ".join(cells) + " |" for row, cells in rows.items())])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="a base run's final/ (default: the built-in cascadev/assets/tiny_text2video)")
    parser.add_argument("--prompts", type=int, default=60, help="held-out prompts (cycling over the held-out pairs)")
    parser.add_argument("--seen", type=int, default=30, help="training captions, for comparison (0: none)")
    parser.add_argument("--fit", type=int, default=720, help="real clips the classifiers are fitted on")
    parser.add_argument("--guidance", default="1,shipped", help="comma-separated scales ('shipped': the demo's)")
    parser.add_argument("--steps", type=int, default=None, help="Stage C steps (default: the shipped)")
    parser.add_argument("--paired", type=int, default=12, help="prompts of the paired word-swap check (0: skip)")
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--out", default="runs/eval_text2video.json")
    args = parser.parse_args(argv)

    from cascadev.cli.text2video import CASCADE, builtin_settings, load_builtin
    from cascadev.pipelines.cascade import load_cascade
    from cascadev.pipelines.sampling import scheduler_name
    from cascadev.pipelines.text_to_video import load_text_to_video, seed_generators

    start = time.perf_counter()
    if args.weights:     # a run not exported yet: the settings the export will ship
        from build_demo_text import DEMO_SETTINGS as settings
    else:
        settings = builtin_settings()
    steps, frames, size = args.steps or settings["steps"], settings["frames"], settings["size"]
    scales = [settings["guidance"] if g == "shipped" else float(g) for g in args.guidance.split(",")]
    if args.weights:
        pipe = load_text_to_video(args.weights, cascade=CASCADE)
    else:
        pipe = load_builtin(with_previewer=False)
    pipe.set_progress_bar_config(disable=True)
    encoder = load_cascade(CASCADE).semantic_encoder.eval()
    torch.manual_seed(0)

    with torch.no_grad():
        fit_attrs = [attributes(FIT_SEED0 + i, include_held_out=True) for i in range(args.fit)]
        fit_z = encode_real(encoder, fit_attrs, [FIT_SEED0 + i for i in range(args.fit)], frames, size)
        appearance, motion = features(fit_z)
        classifiers = {name: NearestClassMean(motion if name == "direction" else appearance,
                                              [getattr(a, name) for a in fit_attrs]) for name in EVAL_ATTRIBUTES}
        sets = {"held-out": [held_out_attributes(i) for i in range(args.prompts)],
                "seen": [attributes(i) for i in range(args.seen)]}
        rows = {"real clips, held-out prompts": score(classifiers, encode_real(
            encoder, sets["held-out"], [500_000 + i for i in range(args.prompts)], frames, size), sets["held-out"])}
        for name, attrs in sets.items():
            if not attrs:
                continue
            for g in scales:
                z = torch.cat([pipe([caption(a) for a in attrs[i:i + args.batch]], num_frames=frames, height=size,
                                    width=size, num_inference_steps=steps, guidance_scale=g, output_type="latent",
                                    generator=seed_generators(i, min(args.batch, len(attrs) - i))).latents
                               for i in range(0, len(attrs), args.batch)])
                rows[f"generated, {name} prompts, guidance {g:g}"] = score(classifiers, z, attrs)
                print(f"{name} prompts, guidance {g:g}: {rows[f'generated, {name} prompts, guidance {g:g}']}",
                      flush=True)
        paired = (paired_swap(pipe, encoder, sets["seen"][:args.paired], frames, size, steps, settings["guidance"])
                  if args.paired and sets["seen"] else None)
        reliance = None
        if scheduler_name(pipe.base_scheduler) == "flow" and sets["seen"]:     # the probe's loss is rectified flow's
            seen = sets["seen"]
            reliance = word_reliance(pipe, encode_real(encoder, seen, list(range(len(seen))), frames, size), seen)
    chance = {name: 1 / len(VOCABULARY[name]) for name in EVAL_ATTRIBUTES}
    chance["all three"] = 1 / (len(VOCABULARY["colour"]) * len(VOCABULARY["shape"]) * len(VOCABULARY["direction"]))
    rows["chance"] = chance

    columns = [*EVAL_ATTRIBUTES, "all three"]
    print("\n" + markdown_table(f"clips ({args.prompts} held-out, {args.seen} seen prompts; {steps} steps)", columns,
                                {row: [f"{100 * acc[c]:.0f} %" for c in columns] for row, acc in rows.items()}))
    if paired:
        title = (f"one word swapped, same noise ({min(args.paired, args.seen)} seen prompts, "
                 f"guidance {settings['guidance']:g})")
        labels = {"generated": "generated", "real": "real clips of other seeds (the ceiling)"}
        print("\n" + markdown_table(title, list(paired),
                                    {labels[row]: [f"{v[row]:.2f}" for v in paired.values()] for row in labels}))
    if reliance:
        names = list(next(iter(reliance.values())))
        print("\n" + markdown_table(f"loss rise when one word is swapped ({len(sets['seen'])} training clips)", names,
                                    {f"sigma {sigma}": [f"{100 * rise[n]:+.1f} %" for n in names]
                                     for sigma, rise in reliance.items()}))
    result = {"rows": rows, "word_reliance": reliance, "paired_swap": paired, "steps": steps, "frames": frames,
              "size": size, "prompts": args.prompts, "seen": args.seen, "fit": args.fit,
              "weights": args.weights or "built-in", "seconds": round(time.perf_counter() - start, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{result['seconds']:.0f} s -> {args.out}")
    return result


if __name__ == "__main__":
    main()
