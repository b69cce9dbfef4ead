"""``cascadev demo``: the whole cascade on held-out procedural clips, against the Previewer baseline.

The built-in tiny cascade (``cascadev/assets/tiny_cascade``, trained on ``cascadev.synthetic`` clips by
the configs in ``configs/demo_*.yaml``) encodes each clip to 16-channel f32 semantic latents, then
decodes them two ways: the LDM-VAE (DiT sampling + Stage A decode; with the shipped setting, its band of
16 x 16 pixel blocks and below taken from the Previewer, StableSR's colour fix) and the no-LDM baseline (the
Previewer, x8, then bilinear x4). Clips use seeds the training never saw; the cascade without the colour fix
is scored too. Writes DIR/side_by_side.mp4 (input | cascade | baseline), DIR/frames.png (the same, first
clip, as rows) and DIR/results.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cascadev.cli.text2video import add_prompt_arguments, run_prompt
from cascadev.errors import UserError

def add_arguments(p: argparse.ArgumentParser) -> None:
    from cascadev.cli.arguments import DTYPE_NAMES, add_colour_fix_argument, add_scheduler_arguments

    p.add_argument("-o", "--output", default="demo_out", metavar="DIR", help="where videos and results go")
    p.add_argument("--clips", type=int, default=4, help="held-out clips to reconstruct")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=None,
                   help="square side in pixels, a multiple of 32 (default: the shipped setting, else 128)")
    p.add_argument("--steps", type=int, default=None, help="DiT sampling steps (default: the shipped setting)")
    add_scheduler_arguments(p, "default: the shipped one")
    p.add_argument("--kind", default=None, help="procedural clip kind (default: what the cascade was trained on)")
    add_colour_fix_argument(p, "the Previewer's decoding of the latents")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="fp32",
                   help="the models' precision (bf16 runs on a CPU too; fp32: the shipped numbers)")
    p.add_argument("--weights", default=None, help="another cascade folder (save_pretrained layout)")
    p.add_argument("--distilled", action="store_true",
                   help="also decode with the built-in distilled decoder (its saved 1-2 steps) beside the cascade at "
                        "its saved steps and the Previewer")
    p.add_argument("--fps-x4", action="store_true",
                   help="the built-in 4x frame-rate model instead (resize route): input every 4th frame, vs frame "
                        "repetition and blending; --frames counts the input frames")
    add_prompt_arguments(p)


def run(args: argparse.Namespace) -> dict:
    import torch

    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.fps_x4 and args.prompt is not None:
        raise UserError("--fps-x4 and --prompt are two demos: give one")
    if args.distilled and (args.fps_x4 or args.prompt is not None):
        raise UserError("--distilled compares decoders of the reconstruction demo: not with --fps-x4 or --prompt")
    from cascadev.synthetic import KINDS
    from cascadev.video_io import check_output_folder

    if args.kind is not None and args.kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, got {args.kind!r}")
    check_output_folder(args.output, "-o")      # every demo writes its files there at the end
    if args.prompt is not None:     # the text demo runs the built-in cascade on its own latents
        ignored = [f"--{name.replace('_', '-')}" for name in ("weights", "scheduler", "kind")
                   if getattr(args, name) is not None]
        if ignored:
            raise UserError(f"{', '.join(ignored)}: not used by --prompt (the built-in text-to-video model)")
    if args.fps_x4:
        from cascadev.cli.upscale import demo_fps_x4
        return demo_fps_x4(args)
    if args.prompt is not None:
        return run_prompt(args)   # text -> video with the built-in tiny Stage C

    with torch.no_grad():
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    import torch

    from cascadev.pipelines.cascade import CascadeVPipeline, check_pipeline_class, resolve_colour_fix
    from cascadev.pipelines.frames import fix_colour
    from cascadev.pipelines.cascade import TINY_CASCADE, TINY_DISTILLED, DecodeOptions
    from cascadev.pipelines.sampling import finishing_step, scheduler_name, set_steps
    from cascadev.pipelines.tiling import dit_work
    from vae.stage_a import DOWNSAMPLE as STAGE_A_DOWNSAMPLE
    from cascadev.pipelines.runtime import DTYPES
    from cascadev.synthetic import HELD_OUT_SEED0, make_clip
    from cascadev.video_io import write_png_strip, write_video
    from cascadev.weights import write_json
    from eval.metrics import high_frequency_energy, psnr, ssim

    if args.clips < 1 or args.frames < 1:
        raise UserError("--clips and --frames must be >= 1")
    weights = Path(args.weights) if args.weights else TINY_CASCADE
    if not (weights / "model_index.json").is_file():
        raise UserError(f"{weights}: no cascade here (expected a folder written by CascadeVPipeline.save_pretrained, "
                        "with model_index.json)")
    check_pipeline_class(weights, CascadeVPipeline)
    if args.size is not None and (args.size % 32 or args.size < 32):
        raise UserError(f"--size must be a positive multiple of 32, got {args.size}")
    if args.colour_fix is not None and args.colour_fix < 0:
        raise UserError(f"--colour-fix must be >= 0 (0: off), got {args.colour_fix}")

    start = time.perf_counter()
    pipe = CascadeVPipeline.from_pretrained(str(weights)).to("cpu").set_precision(DTYPES[args.dtype])
    pipe.set_progress_bar_config(disable=True)
    settings = pipe.config.demo or {}
    kind = args.kind or settings.get("kind", "mixed")
    size = args.size if args.size is not None else settings.get("size", 128)
    if size % 32 or size < 32:
        raise UserError(f"--size must be a positive multiple of 32, got {size}")
    fix = resolve_colour_fix(pipe, args.colour_fix)
    if fix and size % fix:
        raise UserError(f"--colour-fix must be 0 (off) or divide --size {size}, got {fix}")
    scheduler = pipe.resolve_scheduler(args.scheduler, args.force_scheduler)
    steps = args.steps if args.steps is not None else pipe.config.num_inference_steps
    decoders = {"cascade": (pipe, DecodeOptions(steps=steps, scheduler=scheduler, colour_fix=0))}
    if args.distilled:
        if not (TINY_DISTILLED / "model_index.json").is_file():
            raise UserError(f"{TINY_DISTILLED}: the built-in distilled decoder is missing from this install")
        student = CascadeVPipeline.from_pretrained(str(TINY_DISTILLED)).to("cpu").set_precision(DTYPES[args.dtype])
        student.set_progress_bar_config(disable=True)
        decoders["distilled"] = (student, DecodeOptions(colour_fix=0))   # its saved sampler
    seeds = [HELD_OUT_SEED0 + i for i in range(args.clips)]
    methods = [*decoders, "baseline"] + (["cascade_without_colour_fix"] if fix else [])
    scores = {method: {"psnr": [], "ssim": []} for method in methods}
    detail = dict.fromkeys([*methods, "input"], 0.0)     # energy above 1/16 cycle per pixel, all clips' frames
    panels = []
    for i, seed in enumerate(seeds):
        video = make_clip(seed, args.frames, size, size, kind)[None]   # (1, 3, T, H, W)
        latents = pipe.encode(video)
        outputs = {"baseline": pipe.preview(latents)}
        for method, (decoder, options) in decoders.items():
            decoded = decoder.decode(latents, options, seed=args.seed + i)
            outputs[method] = fix_colour(decoded, outputs["baseline"], fix) if fix else decoded
            if fix and method == "cascade":
                outputs["cascade_without_colour_fix"] = decoded
        for method in methods:
            scores[method]["psnr"].append(psnr(outputs[method], video))
            scores[method]["ssim"].append(ssim(outputs[method], video))
            detail[method] += high_frequency_energy(outputs[method]).sum().item()
        detail["input"] += high_frequency_energy(video).sum().item()
        panels.append(torch.cat([video, *(outputs[m] for m in decoders), outputs["baseline"]], dim=-1))
        print(f"clip {i + 1}/{args.clips} (seed {seed}): PSNR " + ", ".join(
            f"{m} {scores[m]['psnr'][-1].mean():.2f} dB" for m in (*decoders, "baseline")), flush=True)

    out_dir = Path(args.output)
    write_video(out_dir / "side_by_side.mp4", torch.cat(panels, dim=2), fps=8)
    rows = torch.cat(panels[0].split(size, dim=-1), dim=-2)     # input / cascade (/ distilled) / baseline, as rows
    write_png_strip(out_dir / "frames.png", rows, max_frames=args.frames)
    results = {method: {k: torch.cat(v).mean().item() for k, v in metrics.items()}
               for method, metrics in scores.items()}
    for method in methods:      # eval.metrics.sharpness over all clips' frames at once
        results[method]["sharpness"] = detail[method] / detail["input"]
    latent_size = (args.frames, size // STAGE_A_DOWNSAMPLE, size // STAGE_A_DOWNSAMPLE)
    for method, (decoder, options) in decoders.items():     # per clip; the baseline runs no DiT
        sampler = decoder.resolve_scheduler(options.scheduler)
        method_steps = options.steps or decoder.config.num_inference_steps
        set_steps(sampler, method_steps)
        forwards, _ = dit_work(decoder.dit.window, latent_size, options.tiling, method_steps, finishing_step(sampler))
        results[method].update(steps=method_steps, scheduler=scheduler_name(sampler), dit_forwards=forwards)
    results["baseline"].update(steps=0, dit_forwards=0)
    results.update({
        "clips": args.clips, "frames": args.frames, "size": [size, size], "seeds": seeds,
        "steps": steps, "scheduler": scheduler_name(scheduler), "colour_fix": fix,
        "kind": kind, "weights": str(weights),
        "conventions": "PSNR and SSIM per frame on [0, 1] (SSIM 11x11 Gaussian, sigma 1.5), mean over all frames; "
                       "sharpness: spectral energy above 1/16 cycle per pixel of all frames as a fraction of the "
                       "input's, on the float frames (eval.metrics.sharpness); dit_forwards: DiT windows per clip",
        "seconds": round(time.perf_counter() - start, 1),
    })
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", results)
    print(f"\n{args.clips} held-out clips, {args.frames} frames at {size}x{size}, "
          f"{steps} {scheduler_name(scheduler)} steps")
    print(f"{'method':<28}{'PSNR':>8}{'SSIM':>8}{'sharp':>8}{'steps':>7}{'DiT fwd':>9}")
    for method in methods:
        r = results[method]
        extra = f"{r['steps']:>7}{r['dit_forwards']:>9}" if "steps" in r else ""
        print(f"{method:<28}{r['psnr']:>8.2f}{r['ssim']:>8.3f}{r['sharpness']:>8.3f}{extra}")
    print(f"{results['seconds']:.0f} s -> {out_dir}/side_by_side.mp4, frames.png, results.json")
    return results
