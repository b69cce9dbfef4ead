"""``cascadev generate``: text -> video with the Stage C base model and the LDM-VAE decoder."""

from __future__ import annotations

import argparse

from cascadev.errors import UserError


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    from cascadev.cli.arguments import add_colour_fix_argument, add_runtime_arguments, add_tiling_arguments

    p.add_argument("prompt", help="what the video shows")
    p.add_argument("-o", "--output", required=True,
                   help="video file (.mp4); with --num N > 1, OUT_0.mp4 ... OUT_{N-1}.mp4")
    p.add_argument("--frames", type=int, help="number of frames (default: the base model's trained clip length)")
    p.add_argument("--size", help="WxH in pixels, multiples of 32 (default: the base model's window, 32 x its "
                                  "window_size per side)")
    p.add_argument("--steps", type=int, help="base model denoising steps (default: 20 for the built-in model, else 25)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale; 1 disables it (default: 5 for the "
                                                   "built-in model, else 4)")
    p.add_argument("--negative", default="", help="negative prompt (default: empty)")
    p.add_argument("--seed", type=int, default=0, help="video k uses seed + k")
    p.add_argument("--num", type=int, default=1, help="videos to generate")
    p.add_argument("--scheduler", choices=["euler_a", "ddim", "dpmpp", "flow"],
                   help="base model sampler with its default settings (default: the model's own, saved in its "
                        "base_scheduler/ folder, e.g. flow Euler at the trained shift)")
    p.add_argument("--latents-out", help="also save the semantic latents (.safetensors or .pt) for `cascadev decode`")
    g = p.add_argument_group("weights and decoding")
    g.add_argument("--weights", help="folder written by TextToVideoPipeline.save_pretrained (model_index.json), or a "
                                     "base training run's final/ with --cascade (default: the built-in tiny model)")
    g.add_argument("--text-encoder", help="text encoder: our folder, or an open_clip preset (bigG, H)")
    g.add_argument("--cascade", help="LDM-VAE decoder weights, as for `cascadev decode --weights` (default: the "
                                     "decoder saved in WEIGHTS)")
    g.add_argument("--decode-steps", type=int, help="LDM-VAE decoder steps (default: the decoder's saved steps; 4 for "
                                                    "the built-in model's, 8 for the release's)")
    add_colour_fix_argument(g, "the Previewer's decoding of the latents")
    add_tiling_arguments(g)
    g.add_argument("--fps", type=float, default=8.0, help="frame rate written in the video file")
    g.add_argument("--crf", type=int, default=18, help="H.264 quality (lower is better)")
    add_runtime_arguments(p)


def parse_size(size: str) -> tuple[int, int]:
    """"WxH" -> (W, H)."""
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise UserError(f"--size must be WxH in pixels, e.g. 1024x576, got {size!r}") from None
    return w, h


def run_generate(args: argparse.Namespace) -> None:
    from cascadev.pipelines.frames import check_colour_fix
    from cascadev.cli.options import check_crf, check_runtime_args, prepare_pipeline, tiling_of
    from cascadev.pipelines.text_to_video import (DEFAULT_GUIDANCE, DEFAULT_STEPS, check_request, load_text_to_video,
                                                  seed_generators)
    from cascadev.pipelines.cascade import TINY_CASCADE, DecodeOptions, resolve_colour_fix
    from cascadev.pipelines.sampling import make_scheduler
    from cascadev.pipelines.latents import check_latents_output, save_latents
    from cascadev.video_io import check_output_file, check_video_output, output_paths, write_video
    from cascadev.cli.options import decoder_record

    if args.num < 1:
        raise UserError(f"--num must be >= 1, got {args.num}")
    request = {k: v for k, v in (("steps", args.steps), ("guidance", args.guidance), ("scheduler", args.scheduler))
               if v is not None}
    size = parse_size(args.size) if args.size else None
    # what can be checked before loading weights: one line, no waiting
    check_request([args.prompt], 1 if args.frames is None else args.frames, size or (32, 32),
                  request.get("steps", 1), request.get("guidance", 0.0), args.num)
    if args.decode_steps is not None and args.decode_steps < 1:
        raise UserError(f"--decode-steps must be >= 1, got {args.decode_steps}")
    if args.colour_fix is not None and args.colour_fix < 0:
        raise UserError(f"--colour-fix must be >= 0 (0: off), got {args.colour_fix}")
    if args.fps <= 0:
        raise UserError(f"--fps must be positive, got {args.fps}")
    check_video_output(args.output)
    check_crf(args.crf)
    check_runtime_args(args)
    if args.latents_out:
        check_output_file(check_latents_output(args.latents_out), "--latents-out", "z.safetensors")
    if args.weights is None and args.text_encoder is not None:
        raise UserError("--text-encoder replaces the text encoder of --weights; the built-in model has its own")

    # the decoder's Previewer: as its folder saves it (for its colour fix), or as --colour-fix asks
    with_previewer = None if args.colour_fix is None else args.colour_fix > 0
    print("loading weights ...", flush=True)
    if args.weights is None:     # the built-in tiny model (cascadev.cli.text2video): its settings unless given
        from cascadev.cli.text2video import builtin_settings, load_builtin, note_unknown_words
        pipe = load_builtin(with_previewer=with_previewer, cascade=args.cascade)
        shipped = builtin_settings()
        request = {**{k: shipped[k] for k in ("steps", "guidance")}, **request}
        size = size or (shipped["size"], shipped["size"])
        print(f"no --weights: the built-in tiny text-to-video model, {shipped['size']} px, trained on captions such as "
              f"'a fast red striped disc with vertical stripes moving left over a dark background'", flush=True)
        note_unknown_words(args.prompt)
    else:
        pipe = load_text_to_video(args.weights, text_encoder=args.text_encoder, cascade=args.cascade,
                                  with_previewer=with_previewer)
    if args.colour_fix and pipe.cascade.previewer is None:
        raise UserError("--colour-fix needs the decoder's Previewer, which its folder does not have (use 0)")
    prepare_pipeline(pipe, args)
    tiling = tiling_of(args, pipe.dit.config)                      # checked before any sampling
    W, H = size or pipe.default_size()
    check_colour_fix(H, W, resolve_colour_fix(pipe.cascade, args.colour_fix))      # before any sampling
    frames = args.frames or pipe.base.config.window_frames
    print(f"generating {args.num} video(s) of {frames} frames at {W}x{H}", flush=True)
    if "scheduler" in request:               # the base model's sampler, by name (make_scheduler)
        pipe.base_scheduler = make_scheduler(request["scheduler"])
    decode = DecodeOptions(seed=args.seed, tiling=tiling, window_batch=args.window_batch,
                           colour_fix=args.colour_fix)    # None: the decoder's saved setting (16 for the tiny cascade)
    out = pipe(args.prompt, num_frames=frames, height=H, width=W,
               num_inference_steps=request.get("steps", DEFAULT_STEPS),
               guidance_scale=request.get("guidance", DEFAULT_GUIDANCE), negative_prompt=args.negative,
               num_videos_per_prompt=args.num, generator=seed_generators(args.seed, args.num),
               decoder_num_inference_steps=args.decode_steps, decode_options=decode)
    latents, videos = out.latents, out.frames
    if args.latents_out:
        # the decoder that can decode them: --cascade, else the built-in model's (a --weights folder's own is not a
        # cascade folder decode can load)
        decoder = args.cascade or (TINY_CASCADE if args.weights is None else None)
        save_latents(args.latents_out, latents, prompt=args.prompt, negative=args.negative, seed=args.seed,
                     **decoder_record(decoder))
        print(f"latents {tuple(latents.shape)} -> {args.latents_out}")
    for path, video in zip(output_paths(args.output, len(videos)), videos):
        write_video(path, video, fps=args.fps, crf=args.crf)
        print(f"-> {path}")
    timings = {**pipe.timings, **{f"decode {k}": v for k, v in pipe.cascade.timings.items()}}
    print("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
