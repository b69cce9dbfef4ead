"""``cascadev reconstruct`` and ``cascadev decode``: the LDM-VAE pipeline on files."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from cascadev.errors import UserError
from cascadev.pipelines.options import (add_pipeline_arguments, check_decode_args, decode_kwargs, load_pipeline,
                                        processes)


def add_reconstruct_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="video file (mp4, mkv, webm, gif, ...)")
    p.add_argument("-o", "--output", required=True, help="reconstructed video (.mp4)")
    p.add_argument("--size", help="long side in pixels (aspect kept) or WxH; rounded to multiples of 32")
    p.add_argument("--frames", type=int, help="number of frames to take (default: all)")
    p.add_argument("--start", type=int, default=0, help="first frame")
    p.add_argument("--stride", type=int, default=1, help="take every k-th frame")
    p.add_argument("--compare", help="also write input | reconstruction side by side here (.mp4)")
    p.add_argument("--latents-out", help="save the semantic latents (.safetensors) for `cascadev decode`")
    add_pipeline_arguments(p)


def add_decode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("latents", help="latents file: .safetensors or .pt, (C, T, h, w) or (B, C, T, h, w)")
    p.add_argument("-o", "--output", required=True, help="decoded video (.mp4); with B > 1, one file per video")
    p.add_argument("--latent-space", default="semantic", choices=["semantic", "sd-vae"],
                   help="semantic: our 16-ch f32 latents; sd-vae: 4-ch f8 latents of an SD/SVD-family VAE")
    p.add_argument("--vae", help="sd-vae route: the VAE that made the latents (diffusers folder or hub id; "
                                 "default: the SVD VAE)")
    p.add_argument("--vae-scale", type=float, default=0.18215, help="sd-vae route: that VAE's latent scale")
    p.add_argument("--scale", type=float, help="sd-vae route: upscale factor over the VAE's pixels")
    p.add_argument("--size", help="sd-vae route: output long side or WxH (default: 2048 long side)")
    p.add_argument("--fps", type=float, default=8.0)
    add_pipeline_arguments(p)


def _report(pipe) -> None:
    print("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in pipe.timings.items()))


def run_reconstruct(args: argparse.Namespace) -> None:
    from cascadev.pipelines.cascade import infer_size, resize_video, save_latents
    from cascadev.video_io import read_video, video_info, write_video
    from eval.metrics import psnr

    if args.frames is not None and args.frames < 1:
        raise UserError(f"--frames must be >= 1, got {args.frames}")
    info = video_info(args.input)
    video = read_video(args.input, num_frames=args.frames, start=args.start, stride=args.stride)
    H, W = video.shape[-2:]
    size = infer_size(H, W, args.size)
    if size != (H, W):
        print(f"resizing {W}x{H} -> {size[1]}x{size[0]} (aspect kept, multiples of 32)")
    video = resize_video(video, size)
    check_decode_args(args)
    pipe = load_pipeline(args)
    decode_kw = decode_kwargs(args, pipe)
    print(f"reconstructing {video.shape[2]} frames at {size[1]}x{size[0]}", flush=True)
    latents = pipe.encode(video, progress=True)
    if args.latents_out and processes().is_main_process:
        save_latents(args.latents_out, latents, source=str(args.input))
        print(f"latents {tuple(latents.shape)} -> {args.latents_out}")
    recon = pipe.decode(latents, **decode_kw).cpu()
    if not processes().is_main_process:
        return      # under accelerate launch the other processes only shared the DiT's windows; the main one writes
    fps = (info.fps or 8.0) / args.stride
    write_video(args.output, recon, fps=fps, crf=args.crf)
    if args.compare:
        import torch
        write_video(args.compare, torch.cat([video.clamp(-1, 1), recon], dim=-1), fps=fps, crf=args.crf)
    value = psnr(recon, video).mean().item()
    _report(pipe)
    print(f"PSNR {value:.2f} dB (per frame on [0, 1], mean) -> {args.output}")


def run_decode(args: argparse.Namespace) -> None:
    from cascadev.pipelines.cascade import SEMANTIC_CHANNELS, infer_size, load_latents, resize_video
    from cascadev.video_io import write_video

    pipe = None
    if args.latent_space == "semantic":
        if args.scale is not None or args.vae is not None:
            raise UserError("--scale and --vae are for --latent-space sd-vae")
        latents = load_latents(args.latents, SEMANTIC_CHANNELS)
        check_decode_args(args)
        pipe = load_pipeline(args)
        decode_kw = decode_kwargs(args, pipe)
        print(f"decoding latents {tuple(latents.shape)} -> {latents.shape[-1] * 32}x{latents.shape[-2] * 32}")
        videos = pipe.decode(latents, **decode_kw).cpu()
    else:
        from cascadev.pipelines.cascade import resolve_stage_a_config
        from vae.stage_a import SVD_VAE_REPO, StageAVAE
        check_decode_args(args)
        latents = load_latents(args.latents, 4)
        if args.vae_scale <= 0:
            raise UserError(f"--vae-scale must be positive, got {args.vae_scale}")
        config = dataclasses.replace(resolve_stage_a_config(args.vae or SVD_VAE_REPO, None), scale_factor=args.vae_scale)
        their_vae = StageAVAE.from_config(config)
        print(f"decoding {tuple(latents.shape)} sd-vae latents to pixels ...", flush=True)
        pixels = their_vae.decode(latents).clamp(-1, 1)
        del their_vae
        H, W = pixels.shape[-2:]
        if args.scale is not None and args.size is not None:
            raise UserError("give --scale or --size, not both")
        long_side = round(max(H, W) * args.scale) if args.scale else None
        size = infer_size(H, W, args.size if args.size else str(long_side or 2048))
        print(f"upscaling {W}x{H} -> {size[1]}x{size[0]} through the cascade")
        pipe = load_pipeline(args)
        videos = pipe.reconstruct(resize_video(pixels, size), **decode_kwargs(args, pipe)).cpu()
    if not processes().is_main_process:
        return      # as in run_reconstruct: the main process writes
    out = Path(args.output)
    for i, video in enumerate(videos):
        path = out if len(videos) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        write_video(path, video, fps=args.fps, crf=args.crf)
        print(f"-> {path}")
    _report(pipe)
