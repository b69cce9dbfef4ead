"""The built-in tiny text-to-video cascade: ``cascadev demo --prompt`` and ``cascadev generate`` without ``--weights``.

``cascadev/assets/tiny_text2video`` holds a tiny Stage C (``text_encoder/``, ``base_dit/``: trained by
``scripts/build_demo_text.py`` from ``configs/demo_base.yaml`` on ``cascadev.captioned`` clips) and ``demo.json``
(its sampler settings); the decoder is the tiny cascade beside it (``assets/tiny_cascade``). A prompt goes
text encoder -> TextDiT (classifier-free guidance) -> semantic latents (B, 16, T, H/32, W/32) -> LDM-VAE DiT ->
Stage A -> mp4, with the Previewer's decoding of the same latents beside it. The model knows only the captions'
words (``cascadev.captioned.VOCABULARY``); other words are read, but mean nothing to it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cascadev.errors import UserError

ASSETS = Path(__file__).parents[1] / "assets"
BUILTIN = ASSETS / "tiny_text2video"
CASCADE = ASSETS / "tiny_cascade"


def add_prompt_arguments(p: argparse.ArgumentParser) -> None:
    """``cascadev demo``'s text-to-video options (the rest: -o, --frames, --size, --steps, --seed, --dtype)."""
    g = p.add_argument_group("text to video (the built-in tiny Stage C)")
    g.add_argument("--prompt", help='generate from text instead, e.g. "a fast yellow striped box with vertical stripes '
                                    'moving up over a dark background"')
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance; 1 disables it (default: shipped)")
    g.add_argument("--base-steps", type=int, default=None, help="Stage C sampling steps (default: shipped)")


def builtin_settings() -> dict:
    """The shipped sampler settings of the built-in Stage C (``demo.json``)."""
    return json.loads((BUILTIN / "demo.json").read_text())


def load_builtin(with_previewer: bool | None = True, cascade: str | Path | None = None):
    """The built-in ``TextToVideoPipeline`` in float32 on the CPU (``cascade`` replaces the tiny decoder;
    ``with_previewer`` as ``load_cascade``'s, None: when the decoder's saved colour fix needs it)."""
    import torch

    from cascadev.pipelines.cascade import load_cascade
    from cascadev.pipelines.sampling import load_scheduler
    from cascadev.pipelines.text_to_video import BASE_DIR, SCHEDULER_DIR, TEXT_ENCODER_DIR, TextToVideoPipeline
    from dit.text_dit import TextDiT
    from cascadev.pipelines.text_encoder import TextEncoder

    if not (BUILTIN / BASE_DIR).is_dir():
        raise FileNotFoundError(f"{BUILTIN}: the built-in text-to-video weights are missing "
                                "(python scripts/build_demo_text.py)")
    decoder = load_cascade(cascade or CASCADE, with_previewer=with_previewer)
    f32 = torch.float32                        # the weights are stored as fp16
    return TextToVideoPipeline.from_parts(TextEncoder.from_pretrained(BUILTIN / TEXT_ENCODER_DIR, torch_dtype=f32),
                                          TextDiT.from_pretrained(BUILTIN / BASE_DIR, torch_dtype=f32), decoder,
                                          load_scheduler(BUILTIN / SCHEDULER_DIR))


def note_unknown_words(prompt: str) -> None:
    """Say which words of ``prompt`` the built-in model never saw (they are read, but mean nothing to it)."""
    from cascadev.captioned import VOCABULARY, unknown_words

    unknown = unknown_words(prompt)
    if unknown:
        known = "; ".join(", ".join(words) for words in VOCABULARY.values())
        print(f"note: the built-in model never saw {', '.join(unknown)}: it knows its captions' words ({known})",
              flush=True)


def _stage(index: int, name: str, fn):
    """Run one stage under a numbered header (its own progress bar inside); return (result, seconds)."""
    print(f"[{index}/4] {name}", flush=True)
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    print(f"      {seconds:.1f} s", flush=True)
    return out, seconds


def run_prompt(args: argparse.Namespace) -> dict:
    """``cascadev demo --prompt``: DIR/text2video.mp4 (cascade | Previewer), DIR/text2video.png, DIR/text2video.json."""
    import torch

    from cascadev.pipelines.cascade import resolve_colour_fix
    from cascadev.pipelines.frames import check_colour_fix
    from cascadev.pipelines.runtime import DTYPES
    from cascadev.pipelines.text_to_video import check_request, seed_generators
    from cascadev.video_io import write_png_strip, write_video
    from cascadev.weights import write_json

    settings = builtin_settings()
    size = args.size if args.size is not None else settings["size"]
    steps = args.base_steps if args.base_steps is not None else settings["steps"]
    guidance = args.guidance if args.guidance is not None else settings["guidance"]
    try:
        check_request([args.prompt], args.frames, (size, size), steps, guidance, 1)
    except ValueError as e:
        raise UserError(str(e).replace("steps must", "--base-steps must").replace("guidance must", "--guidance must")
                        .replace("frames must", "--frames must").replace("width", "--size")) from None
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.colour_fix is not None and args.colour_fix < 0:
        raise UserError(f"--colour-fix must be >= 0 (0: off), got {args.colour_fix}")

    note_unknown_words(args.prompt)
    start = time.perf_counter()
    print("loading the built-in tiny text-to-video cascade ...", flush=True)
    pipe = load_builtin()
    pipe.cascade.set_precision(DTYPES[args.dtype])
    fix = resolve_colour_fix(pipe.cascade, args.colour_fix)
    check_colour_fix(size, size, fix)                            # before Stage C runs
    with torch.no_grad():
        latents, t_c = _stage(1, f"Stage C: prompt -> semantic latents ({steps} steps, guidance {guidance:g})",
                              lambda: pipe(args.prompt, num_frames=args.frames, height=size, width=size,
                                           num_inference_steps=steps, guidance_scale=guidance,
                                           generator=seed_generators(args.seed, 1), output_type="latent").latents)
        cascade = pipe.cascade
        decode_steps = args.steps or cascade.config.num_inference_steps
        video, t_b = _stage(2, f"Stage B + A: LDM-VAE DiT ({decode_steps} steps) -> Stage A decode",
                            lambda: cascade.decode(latents, steps=decode_steps, seed=args.seed, colour_fix=fix))
        preview, t_p = _stage(3, "Previewer: the same latents, no LDM-VAE (x8, then bilinear x4)",
                              lambda: cascade.preview(latents))
    out = Path(args.output)
    _, t_w = _stage(4, f"writing {out}/text2video.mp4", lambda: (
        write_video(out / "text2video.mp4", torch.cat([video, preview], dim=-1), fps=8),
        write_png_strip(out / "text2video.png", torch.cat([video, preview], dim=-2), max_frames=args.frames)))
    results = {"prompt": args.prompt, "frames": args.frames, "size": [size, size], "seed": args.seed,
               "base_steps": steps, "guidance": guidance, "decode_steps": decode_steps, "colour_fix": fix or 0,
               "seconds": {"stage_c": round(t_c, 1), "stage_b_a": round(t_b, 1), "previewer": round(t_p, 1),
                           "write": round(t_w, 1), "total": round(time.perf_counter() - start, 1)}}
    write_json(out / "text2video.json", results)
    print(f"{results['seconds']['total']:.0f} s -> {out}/text2video.mp4 (LDM-VAE | Previewer), text2video.png")
    return results
