"""``cascadev upscale``: the resize route (4x resolution or 4x frame rate) on a video or a latents file."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from cascadev.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from cascadev.cli.arguments import (add_colour_fix_argument, add_runtime_arguments, add_scheduler_arguments,
                                        add_tiling_arguments)

    p.add_argument("input", help="low video (mp4, mkv, ...) or its Stage A latents (.safetensors or .pt, (4, T, h, w) "
                                 "or (B, 4, T, h, w), scaled as Stage A encodes them)")
    p.add_argument("-o", "--output", required=True, help="output video (.mp4); with B > 1 latents, one file per video")
    p.add_argument("--weights", help="a resize-route model folder (CascadeVUpscalePipeline.save_pretrained; "
                                     "default: the built-in tiny 4x frame-rate model, cascadev/assets/tiny_fps4x)")
    p.add_argument("--stage-a", help="Stage A VAE (diffusers folder or hub id; default: the folder's own or the one it "
                                     "names)")
    p.add_argument("--frames", type=int, help="input frames to take (default: all)")
    p.add_argument("--start", type=int, default=0, help="first input frame")
    p.add_argument("--fps", type=float, help="input frame rate (default: the file's, or the latents file's 'fps', "
                                             "else 8); the output's is this times the route's temporal factor")
    p.add_argument("--latent-scale", type=float, help="latents input: the scale they carry (default: the model's "
                                                      "Stage A scale_factor)")
    p.add_argument("--regenerate-input-frames", action="store_true",
                   help="frame rate: let the DiT redo the given frames too (default: they are output as given)")
    add_colour_fix_argument(p, "the input brought to the output's grid")
    p.add_argument("--compare", help="also write the input (repeated, resized) | output side by side here (.mp4)")
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, help="denoising steps (default: the folder's saved setting)")
    add_scheduler_arguments(g, "default: the folder's saved one")
    add_tiling_arguments(g)
    g.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    g.add_argument("--crf", type=int, default=18, help="H.264 quality (lower is better)")
    add_runtime_arguments(p)


def _check_args(args) -> None:
    from cascadev.cli.options import check_crf, check_runtime_args
    from cascadev.video_io import check_video_output

    check_video_output(args.output)
    if args.compare:
        check_video_output(args.compare, "--compare")
    if args.colour_fix is not None and args.colour_fix < 0:
        raise UserError(f"--colour-fix must be >= 0 (0: off), got {args.colour_fix}")
    for name in ("frames", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.start < 0:
        raise UserError(f"--start must be >= 0, got {args.start}")
    for name in ("fps", "latent_scale"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    check_crf(args.crf)
    check_runtime_args(args)


def _read_input(args):
    """(video or None, latents or None, input fps): the input, checked, before the weights load."""
    import torch

    from cascadev.pipelines.latents import LATENTS_SUFFIXES, metadata_fps, read_latents
    from cascadev.video_io import read_video, video_info

    if Path(args.input).suffix in LATENTS_SUFFIXES:
        latents, metadata = read_latents(args.input, 4)
        latents = latents[:, :, args.start:args.start + args.frames if args.frames else None]
        if latents.shape[2] == 0:
            raise UserError(f"--start {args.start} is past the last of the latents' frames")
        return None, latents, args.fps or metadata_fps(metadata, args.input)
    if args.latent_scale is not None:
        raise UserError("--latent-scale is for a latents input")
    info = video_info(args.input)
    video = read_video(args.input, args.frames, args.start)
    return video.to(torch.float32), None, args.fps or info.fps or 8.0


def run(args: argparse.Namespace) -> None:
    import torch

    from cascadev.cli.options import prepare_pipeline, tiling_of
    from cascadev.pipelines.upscale import TINY_FPS4X, check_route_input, load_upscale, saved_settings
    from cascadev.video_io import VideoWriter, output_paths
    from vae.stage_a import DOWNSAMPLE

    _check_args(args)
    if args.weights is None:       # no resize-route model is released: the built-in one, as generate's built-in
        args.weights = TINY_FPS4X
        print(f"no --weights: the built-in tiny 4x frame-rate model ({TINY_FPS4X}), trained on procedural clips",
              flush=True)
    settings = saved_settings(args.weights)
    if args.regenerate_input_frames and settings["spatial_factor"] != 1:
        raise UserError("--regenerate-input-frames is for a frame-rate-only model (spatial_factor 1)")
    video, latents, fps = _read_input(args)
    fix = settings.get("colour_fix") if args.colour_fix is None else args.colour_fix
    T, H, W = video.shape[2:] if video is not None else (latents.shape[2], *(DOWNSAMPLE * n for n in latents.shape[3:]))
    try:     # bad sizes and frame counts: one line, before the weights load
        check_route_input(settings, T, H, W, colour_fix=fix)
    except ValueError as e:
        raise UserError(f"{args.input}: {e}") from None
    print("loading weights ...", flush=True)
    pipe = load_upscale(args.weights, vae=args.stage_a)
    ks, kt = pipe.factors
    if latents is not None and args.latent_scale is not None:
        latents = latents * (pipe.stage_a.config.scale_factor / args.latent_scale)
    prepare_pipeline(pipe, args)
    T2, H2, W2 = pipe.output_shape(T, H, W)
    print(f"{'x'.join(map(str, (W, H)))} at {fps:g} fps, {T} frames -> {W2}x{H2} at {fps * kt:g} fps, {T2} frames "
          f"(spatial x{ks}, temporal x{kt})", flush=True)
    sample_kw = dict(steps=args.steps, seed=args.seed,
                     scheduler=pipe.resolve_scheduler(args.scheduler, args.force_scheduler),
                     tiling=tiling_of(args, pipe.dit.config), window_batch=args.window_batch)
    keep = None if video is None else (not args.regenerate_input_frames and ks == 1)
    paths = output_paths(args.output, (video if video is not None else latents).shape[0])
    with contextlib.ExitStack() as files:
        writers = [files.enter_context(VideoWriter(path, fps * kt, args.crf)) for path in paths]
        side = files.enter_context(VideoWriter(args.compare, fps * kt, args.crf)) if args.compare else None
        start = 0
        for piece in pipe.upscale_pieces(video, latents, keep_input_frames=keep, colour_fix=fix, **sample_kw):
            piece = piece.cpu()
            for writer, clip in zip(writers, piece):
                writer.write(clip)
            if side is not None:
                side.write(torch.cat([_nearest(video, latents, pipe, start, piece), piece[:1]], dim=-1))
            start += piece.shape[2]
    print("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in pipe.timings.items()))
    print("\n".join(f"-> {path}" for path in paths))


def _nearest(video, latents, pipe, start: int, piece):
    """The input of the first video, frames repeated and pixels resized (nearest) to the output's, for ``--compare``."""
    import torch.nn.functional as F
    from einops import rearrange

    ks, kt = pipe.factors
    idx = [i // kt for i in range(start, start + piece.shape[2])]
    if video is None:
        low = pipe.stage_a.decode(latents[:1, :, idx[0]:idx[-1] + 1].to(pipe._execution_device)).cpu().clamp(-1, 1)
        low = low[:, :, [i - idx[0] for i in idx]]
    else:
        low = video[:1, :, idx]
    T = low.shape[2]
    up = F.interpolate(rearrange(low, "b c t h w -> (b t) c h w"), scale_factor=ks, mode="nearest")
    return rearrange(up, "(b t) c h w -> b c t h w", t=T)


# -- cascadev demo --fps-x4 ----------------------------------------------------------------------------

DEMO_FPS = 6.0          # the low-rate input's frame rate in the side-by-side video (the output's: x temporal factor)


def demo_fps_x4(args: argparse.Namespace) -> dict:
    """``cascadev demo --fps-x4``: the built-in tiny 4x frame-rate model (``cascadev/assets/tiny_fps4x``) on held-out
    procedural clips at 1/4 of their frame rate, against frame repetition and linear frame blending.

    Each clip has ``4 (n - 1) + 4`` frames, ``n`` = ``--frames`` (the input frames); the input is every 4th one. Scores
    (PSNR, SSIM per frame, mean) are over the frames strictly between input frames, the ones a method must make; the
    3 frames after the last input (extrapolation, held by both baselines) are scored apart. Writes
    DIR/side_by_side.mp4 (truth | ours | blend | repeat), DIR/frames.png (the same for the first clip, as rows) and
    DIR/results.json."""
    import time

    import torch

    from cascadev.pipelines.frames import fix_colour
    from cascadev.pipelines.conditioning import temporal_upsample
    from cascadev.pipelines.runtime import DTYPES
    from cascadev.pipelines.upscale import TINY_FPS4X, load_upscale
    from cascadev.synthetic import HELD_OUT_SEED0, make_clip
    from cascadev.video_io import write_png_strip, write_video
    from cascadev.weights import write_json
    from eval.metrics import psnr, sharpness, ssim

    weights = Path(args.weights) if args.weights else TINY_FPS4X
    if args.clips < 1 or args.frames < 2:
        raise UserError("--fps-x4 needs --clips >= 1 and --frames >= 2 (input frames at the low rate)")
    if args.size is not None and (args.size % 8 or args.size < 16):
        raise UserError(f"--size must be a multiple of 8 and >= 16 with --fps-x4, got {args.size}")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    start = time.perf_counter()
    with torch.no_grad():
        pipe = load_upscale(weights).to("cpu").set_precision(DTYPES[args.dtype])
        pipe.set_progress_bar_config(disable=True)
        ks, kt = pipe.factors
        if ks != 1:
            raise UserError(f"{weights}: a {ks}x resolution model; --fps-x4 shows a frame-rate model "
                            "(spatial_factor 1)")
        settings = pipe.config.demo or {}
        kind = args.kind or settings.get("kind", "shapes")
        size = args.size or settings.get("size", 128)
        steps = args.steps or pipe.config.num_inference_steps
        scheduler = pipe.resolve_scheduler(args.scheduler, args.force_scheduler)
        frames = kt * args.frames                                      # the last input frame + kt - 1 after it
        between = [i for i in range(kt * (args.frames - 1)) if i % kt]   # strictly between input frames
        tail = list(range(kt * (args.frames - 1) + 1, frames))
        fix = pipe.config.colour_fix if args.colour_fix is None else args.colour_fix
        methods = ("ours", "blend", "repeat") + (("ours_without_colour_fix",) if fix else ())
        scores = {m: {k: [] for k in ("psnr", "ssim", "sharpness", "psnr_tail", "ssim_tail")} for m in methods}
        seeds = [HELD_OUT_SEED0 + i for i in range(args.clips)]
        panels = []
        for i, seed in enumerate(seeds):
            truth = make_clip(seed, frames, size, size, kind)[None]      # (1, 3, T, H, W)
            low = truth[:, :, ::kt]
            raw = pipe.upscale(video=low, steps=steps, seed=args.seed + i, scheduler=scheduler, colour_fix=0)
            outputs = {"ours": raw, "blend": temporal_upsample(low, kt, frames),
                       "repeat": low.repeat_interleave(kt, dim=2)}
            if fix:      # the same sample with the colour fix, as pipe.upscale(video=low) gives it
                fixed = fix_colour(raw.clone(), pipe.colour_reference(low, 0, frames), fix)
                fixed[:, :, ::kt] = low
                outputs.update(ours=fixed, ours_without_colour_fix=raw)
            for m, out in outputs.items():
                for suffix, idx in (("", between), ("_tail", tail)):
                    scores[m]["psnr" + suffix].append(psnr(out[:, :, idx], truth[:, :, idx]))
                    scores[m]["ssim" + suffix].append(ssim(out[:, :, idx], truth[:, :, idx]))
                scores[m]["sharpness"].append(torch.tensor([sharpness(out[:, :, between], truth[:, :, between])]))
            # truth | ours | blend | repeat
            panels.append(torch.cat([truth, *(outputs[m] for m in methods[:3])], dim=-1))
            print(f"clip {i + 1}/{args.clips} (seed {seed}): PSNR between input frames: " + ", ".join(
                f"{m} {scores[m]['psnr'][-1].mean():.2f} dB" for m in methods), flush=True)
    out_dir = Path(args.output)
    write_video(out_dir / "side_by_side.mp4", torch.cat(panels, dim=2), fps=DEMO_FPS * kt)
    rows = torch.cat(panels[0].split(size, dim=-1), dim=-2)                 # truth / ours / blend / repeat
    write_png_strip(out_dir / "frames.png", rows[:, :, :min(frames, 2 * kt)], max_frames=2 * kt)
    results = {m: {k: torch.cat(v).mean().item() for k, v in metric.items()} for m, metric in scores.items()}
    results.update({
        "clips": args.clips, "input_frames": args.frames, "output_frames": frames, "size": [size, size], "kind": kind,
        "seeds": seeds, "steps": steps, "colour_fix": fix, "weights": str(weights), "temporal_factor": kt,
        "conventions": "PSNR and SSIM per frame on [0, 1] (SSIM 11x11 Gaussian, sigma 1.5), mean over the frames "
                       "strictly between input frames; *_tail: the frames after the last input frame; sharpness: "
                       "spectral energy above 1/16 cycle per pixel of the frames between input frames as a fraction "
                       "of the "
                       "truth's, per clip on the float frames, mean over clips",
        "seconds": round(time.perf_counter() - start, 1)})
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", results)
    print(f"\n{args.clips} held-out clips, {args.frames} -> {frames} frames at {size}x{size}, {steps} steps; "
          f"frames between input frames (after the last one):")
    print(f"{'method':<24}{'PSNR':>8}{'SSIM':>8}{'sharp':>8}{'PSNR':>10}{'SSIM':>8}")
    for m in methods:
        r = results[m]
        print(f"{m:<24}{r['psnr']:>8.2f}{r['ssim']:>8.3f}{r['sharpness']:>8.3f}  ({r['psnr_tail']:>6.2f}"
              f"{r['ssim_tail']:>8.3f})")
    print(f"{results['seconds']:.0f} s -> {out_dir}/side_by_side.mp4, frames.png, results.json")
    return results
