"""``cascadev reconstruct`` and ``cascadev decode``: the LDM-VAE pipeline on files."""

from __future__ import annotations

import argparse
import contextlib
from typing import TYPE_CHECKING

from cascadev.errors import UserError
from cascadev.cli.arguments import add_pipeline_arguments

if TYPE_CHECKING:
    import torch


def add_reconstruct_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="video file (mp4, mkv, webm, gif, ...)")
    p.add_argument("-o", "--output", required=True, help="reconstructed video (.mp4)")
    p.add_argument("--size", help="long side in pixels (aspect kept) or WxH; rounded to multiples of 32")
    p.add_argument("--frames", type=int, help="number of frames to take (default: all)")
    p.add_argument("--start", type=int, default=0, help="first frame")
    p.add_argument("--stride", type=int, default=1, help="take every k-th frame")
    p.add_argument("--compare", help="also write input | reconstruction side by side here (.mp4)")
    p.add_argument("--latents-out", help="save the semantic latents (.safetensors or .pt) for `cascadev decode`")
    add_pipeline_arguments(p)


def add_decode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("latents", help="latents file: .safetensors or .pt, (C, T, h, w) or (B, C, T, h, w)")
    p.add_argument("-o", "--output", required=True, help="decoded video (.mp4); with B > 1, one file per video")
    p.add_argument("--latent-space", default="semantic", choices=["semantic", "sd-vae"],
                   help="semantic: our 16-ch f32 latents; sd-vae: 4-ch f8 latents of an SD/SVD-family VAE (a shortcut "
                        "for --source-vae with --vae and --vae-scale)")
    p.add_argument("--source-vae", metavar="FOLDER_OR_HUB_ID",
                   help="the latents are another model's: decode them with its diffusers VAE (any class its "
                        "config.json names: Wan, HunyuanVideo, CogVideoX, LTX-Video, Mochi, Cosmos, SD/SDXL/SD3/Flux, "
                        "TAESD, SVD), "
                        "then the cascade to --scale / --size")
    p.add_argument("--source-vae-subfolder", metavar="NAME",
                   help="the VAE's subfolder of a pipeline folder or hub repo (e.g. vae; a local folder's vae/ is "
                        "found without it)")
    p.add_argument("--raw-latents", action="store_true",
                   help="--source-vae: the file holds the VAE's raw latents (its encoder's output), not the normalised "
                        "ones its text-to-video model's denoiser makes (the default)")
    p.add_argument("--skip-latent-frames", type=int, default=0, metavar="N",
                   help="another model's latents: drop the first N latent frames before its VAE decodes them "
                        "(CogVideoX 1.5's pipeline pads 1 when the count is odd and drops it in its own decode)")
    p.add_argument("--vae", help="sd-vae route: the VAE that made the latents (diffusers folder or hub id; "
                                 "default: the SVD VAE)")
    p.add_argument("--vae-scale", type=float, help="sd-vae route: that VAE's latent scale (default: 0.18215)")
    p.add_argument("--scale", type=float, help="sd-vae / --source-vae: upscale factor over the VAE's pixels")
    p.add_argument("--size", help="sd-vae / --source-vae: output long side or WxH (default: 2048 long side)")
    p.add_argument("--fps", type=float, help="frame rate of the output (default: the source's, kept in the latents "
                                             "file by `reconstruct --latents-out`; else 8)")
    add_pipeline_arguments(p)


def _report(pipe) -> None:
    print("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in pipe.timings.items()))


class Frames:
    """The frames of a stream of pieces (B, C, t, H, W), handed out in pieces of any length."""

    def __init__(self, pieces):
        self.pieces, self.held = iter(pieces), None

    def take(self, n: int) -> torch.Tensor:
        import torch

        parts, have = [], 0
        while have < n:
            if self.held is None or self.held.shape[2] == 0:
                self.held = next(self.pieces)
            parts.append(self.held[:, :, :n - have])
            self.held = self.held[:, :, n - have:]
            have += parts[-1].shape[2]
        return torch.cat(parts, dim=2)


def shared_windows_only(pipe, latents: torch.Tensor, decode_kw: dict) -> bool:
    """Under ``accelerate launch``, a process other than the main one shares the DiT's windows and writes nothing:
    it runs the decode here and returns True; the main process returns False and writes."""
    from cascadev.pipelines.runtime import processes

    if processes().is_main_process:
        return False
    for _ in pipe.decode_pieces(latents, **decode_kw):
        pass
    return True


def run_reconstruct(args: argparse.Namespace) -> None:
    import torch

    from cascadev.pipelines.latents import check_latents_output, save_latents
    from cascadev.cli.options import check_decode_args, decode_kwargs, decoder_record, load_pipeline
    from cascadev.pipelines.frames import check_colour_fix, frames_per_piece, infer_size, resize_video
    from cascadev.video_io import VideoWriter, check_output_file, check_video_output, iter_video, video_info
    from eval.metrics import psnr

    if args.frames is not None and args.frames < 1:
        raise UserError(f"--frames must be >= 1, got {args.frames}")
    check_video_output(args.output)
    if args.compare:
        check_video_output(args.compare, "--compare")
    if args.latents_out:
        check_output_file(check_latents_output(args.latents_out), "--latents-out", "z.safetensors")
    info = video_info(args.input)
    H, W = next(iter_video(args.input, 1, 1, args.start, args.stride)).shape[-2:]   # bad input fails before loading
    size = infer_size(H, W, args.size)
    if size != (H, W):
        print(f"resizing {W}x{H} -> {size[1]}x{size[0]} (aspect kept, multiples of 32)")
    check_decode_args(args)
    pipe = load_pipeline(args)
    decode_kw = decode_kwargs(args, pipe)
    check_colour_fix(*size, decode_kw["colour_fix"])        # before the clip is encoded

    def source():      # the input clip, resized, in pieces
        return (resize_video(piece, size) for piece in
                iter_video(args.input, frames_per_piece((H, W), size), args.frames, args.start, args.stride))
    latents = torch.cat([pipe.encode(piece) for piece in source()], dim=2)
    print(f"reconstructing {latents.shape[2]} frames at {size[1]}x{size[0]}", flush=True)
    if shared_windows_only(pipe, latents, decode_kw):
        return
    fps = (info.fps or 8.0) / args.stride
    if args.latents_out:
        save_latents(args.latents_out, latents, source=str(args.input), fps=fps,     # and what decodes them
                     **decoder_record(args.weights, (args.dit, args.semantic_encoder, args.previewer, args.stage_a)))
        print(f"latents {tuple(latents.shape)} -> {args.latents_out}")
    inputs, scores = Frames(source()), []
    with VideoWriter(args.output, fps, args.crf) as out, \
            (VideoWriter(args.compare, fps, args.crf) if args.compare else contextlib.nullcontext()) as side:
        for recon in pipe.decode_pieces(latents, **decode_kw):     # written as each piece is final
            recon, video = recon.cpu(), inputs.take(recon.shape[2])
            out.write(recon)
            if side is not None:
                side.write(torch.cat([video.clamp(-1, 1), recon], dim=-1))
            # float64 by frame
            scores += [psnr(recon[:, :, i:i + 1], video[:, :, i:i + 1]) for i in range(recon.shape[2])]
    _report(pipe)
    print(f"PSNR {torch.cat(scores, dim=1).mean().item():.2f} dB (per frame on [0, 1], mean) -> {args.output}")


SD_VAE_SCALE = 0.18215          # --latent-space sd-vae: the SD / SVD VAEs' latent scale


def run_decode(args: argparse.Namespace) -> None:
    from cascadev.pipelines.latents import metadata_fps, read_latents
    from cascadev.pipelines.frames import SEMANTIC_CHANNELS
    from cascadev.cli.options import check_decode_args, decode_kwargs, load_pipeline, recorded_decoder
    from cascadev.video_io import VideoWriter, check_video_output, output_paths

    check_video_output(args.output)
    if args.fps is not None and args.fps <= 0:
        raise UserError(f"--fps must be positive, got {args.fps}")
    check_source_args(args)
    if args.latent_space == "semantic" and not args.source_vae:
        latents, metadata = read_latents(args.latents, SEMANTIC_CHANNELS)
        fps = args.fps or metadata_fps(metadata, args.latents)
        check_decode_args(args)
        if args.weights is None and (recorded := recorded_decoder(metadata, args.latents)):
            args.weights = recorded         # the cascade that made them (reconstruct / generate --latents-out)
            print(f"no --weights: the cascade that made these latents, {recorded}", flush=True)
        pipe = load_pipeline(args)
        decode_kw = decode_kwargs(args, pipe)
        print(f"decoding latents {tuple(latents.shape)} -> {latents.shape[-1] * 32}x{latents.shape[-2] * 32}")
    else:
        pipe, latents, decode_kw, metadata = decode_source(args)
        fps = args.fps or metadata_fps(metadata, args.latents)
    if shared_windows_only(pipe, latents, decode_kw):
        return
    paths = output_paths(args.output, len(latents))
    with contextlib.ExitStack() as files:      # every video written as each piece is final
        writers = [files.enter_context(VideoWriter(path, fps, args.crf)) for path in paths]
        for piece in pipe.decode_pieces(latents, **decode_kw):
            for writer, video in zip(writers, piece.cpu()):
                writer.write(video)
    print("\n".join(f"-> {path}" for path in paths))
    _report(pipe)


def check_source_args(args: argparse.Namespace) -> None:
    """The options of the two routes through another model's VAE (sd-vae, --source-vae), before anything loads."""
    sd_vae, source = args.latent_space == "sd-vae", args.source_vae is not None
    if sd_vae and source:
        raise UserError("--source-vae replaces --latent-space sd-vae: give one")
    if not sd_vae and (args.vae is not None or args.vae_scale is not None):
        raise UserError("--vae and --vae-scale are for --latent-space sd-vae (--source-vae reads the scale from "
                        "the VAE's config)")
    if not (sd_vae or source) and (args.scale is not None or args.size is not None or args.source_vae_subfolder
                                   or args.raw_latents or args.skip_latent_frames):
        raise UserError("--scale, --size, --source-vae-subfolder, --raw-latents and --skip-latent-frames are for "
                        "another model's latents (--latent-space sd-vae or --source-vae); semantic latents decode at "
                        "32x their size")
    if args.skip_latent_frames < 0:
        raise UserError(f"--skip-latent-frames must be >= 0, got {args.skip_latent_frames}")
    if args.scale is not None and args.size is not None:
        raise UserError("give --scale or --size, not both")
    if args.scale is not None and args.scale <= 0:
        raise UserError(f"--scale must be positive, got {args.scale}")
    if sd_vae and args.vae_scale is not None and args.vae_scale <= 0:
        raise UserError(f"--vae-scale must be positive, got {args.vae_scale}")


def decode_source(args: argparse.Namespace):
    """Another model's latents -> its VAE's pixels -> resized -> our semantic latents: (pipe, latents, decode
    arguments, the file's metadata). Everything is checked before the VAE's weights load."""
    import torch

    from cascadev.pipelines.latents import metadata_fps, read_latents
    from cascadev.weights import is_hub_id, offline_if_unreachable
    from cascadev.cli.options import check_decode_args, decode_kwargs, load_pipeline
    from cascadev.pipelines.runtime import DTYPES, resolve_device
    from cascadev.pipelines.source_vae import SourceVAE, encode_resized, target_size
    from vae.stage_a import SVD_VAE_REPO, vae_dtype

    check_decode_args(args)
    if args.source_vae:
        where = dict(source=args.source_vae, subfolder=args.source_vae_subfolder)
        latents, metadata = read_latents(args.latents, None)
    else:        # the sd-vae shortcut: 4-channel latents, the SVD VAE's subfolder on the hub, the given scale
        latents, metadata = read_latents(args.latents, 4)
        source = args.vae or SVD_VAE_REPO
        subfolder = args.source_vae_subfolder or ("vae" if is_hub_id(source) else None)
        where = dict(source=source, subfolder=subfolder, scaling_factor=args.vae_scale or SD_VAE_SCALE)
    if args.fps is None:
        metadata_fps(metadata, args.latents)           # a bad one fails before any weights load
    if args.skip_latent_frames >= latents.shape[2]:
        raise UserError(f"--skip-latent-frames {args.skip_latent_frames} leaves none of the {latents.shape[2]} latent "
                        "frames")
    latents = latents[:, :, args.skip_latent_frames:]
    if is_hub_id(str(where["source"])):     # as load_pipeline: asked once, so an unreachable hub is one line at once
        offline_if_unreachable()
    skeleton = SourceVAE.from_pretrained(**where, load_weights=False)     # its config only: checks before loading
    skeleton.check_latents(latents, args.latents)
    if skeleton.name == "AutoencoderKLCogVideoX" and latents.shape[2] % 2 == 0:
        print(f"note: {latents.shape[2]} latent frames (even): CogVideoX 1.5's pipeline pads one leading latent frame "
              "that its own decode drops; if these come from it, give --skip-latent-frames 1", flush=True)
    H, W = skeleton.pixel_size(*latents.shape[-2:])
    size = target_size(H, W, args.scale, args.size)
    device = resolve_device(args.device)
    # fp32 unless --dtype says otherwise (Wan's examples load its VAE in fp32); fp16 not for VAEs asking to be upcast
    dtype = vae_dtype(skeleton.model.config, DTYPES[args.dtype] if args.dtype else torch.float32)
    their_vae = SourceVAE.from_pretrained(**where, torch_dtype=dtype).to(device)
    print(f"decoding {tuple(latents.shape)} {their_vae.name} latents to {their_vae.frames_out(latents.shape[2])} "
          f"frames of {W}x{H} ...", flush=True)
    pixels = their_vae.decode(latents, normalised=not args.raw_latents)
    del their_vae
    print(f"upscaling {W}x{H} -> {size[1]}x{size[0]} through the cascade")
    pipe = load_pipeline(args)
    latents = encode_resized(pipe, pixels, size)
    return pipe, latents, decode_kwargs(args, pipe), metadata
