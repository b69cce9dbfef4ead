"""``cascadev bench-recon``: the released reconstruction benchmark, with any weights.

The first ``--limit`` videos of a folder (sorted by name; the release used the first 200 Inter4K
videos) are cut to ``--frames`` frames from the start, resized on the short side and centre-cropped
to ``--size`` x ``--size`` (the release: 1024, 8 frames), then reconstructed by the cascade and by the
Previewer baseline (no LDM). PSNR / SSIM / LPIPS are computed in memory on the exact tensors, per
frame (conventions in ``eval.metrics``); FVD, when asked for and the clips are long enough for I3D,
runs ``cascadev eval`` over the written videos. Writes RUN_DIR/{real,cascade,baseline}/NAME.mp4 and
RUN_DIR/results.json, and prints one table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cascadev.errors import UserError
from eval.bench_recon import frame_stride, release_frames, square_crop

METHODS = ("cascade", "baseline")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from cascadev.cli.arguments import add_pipeline_arguments

    p.add_argument("data", help="folder of videos (the first --limit by name are used)")
    p.add_argument("-o", "--output", required=True, metavar="RUN_DIR", help="where videos and results.json go")
    p.add_argument("--size", type=int, default=1024, help="square side in pixels (release: 1024)")
    p.add_argument("--frames", type=int, default=8, help="frames per video, from the first (release: 8)")
    p.add_argument("--fps", type=float, default=RELEASE_FPS,
                   help="take the frames at about this rate: every round(file fps / FPS)-th (release: its set was "
                        "Inter4K at 30 fps, so every 2nd frame of the 60 fps originals); 0: every frame")
    p.add_argument("--preprocess", default="release", choices=["release", "antialiased"],
                   help="how frames become SIZE x SIZE: as the release's loader (3 x 3 box blur, bilinear resize, "
                        "8-bit; the default) or our antialiased bilinear resize without blur")
    p.add_argument("--limit", type=int, default=200, help="number of videos (release: 200)")
    p.add_argument("--metrics", default="psnr,ssim,lpips,fvd", help="subset of psnr,ssim,lpips,fvd (any case)")
    p.add_argument("--i3d", help="I3D detector for FVD (i3d_pretrained_400.pt or i3d_torchscript.pt)")
    add_pipeline_arguments(p)


RELEASE_FPS = 30.0       # the release's benchmark set: the first 200 Inter4K videos at 1024 x 1024 and 30 fps


def _score_video(pipe, path: Path, args, decode_kw: dict, fix: int, lpips) -> dict:
    """One video: {"skipped": {"file", "reason"}} when unusable, else its videos written under RUN_DIR and
    {"scores": {method: {metric: per-frame scores on the CPU}}}."""
    from cascadev.pipelines.frames import fix_colour
    from cascadev.video_io import VideoReadError, read_video, video_info, write_video
    from eval.metrics import psnr, ssim

    try:
        stride = frame_stride(video_info(path).fps, args.fps)
        video = read_video(path, num_frames=args.frames, stride=stride)
    except VideoReadError as e:
        return {"skipped": {"file": path.name, "reason": str(e)}}
    if video.shape[2] < args.frames:
        return {"skipped": {"file": path.name, "reason": f"only {video.shape[2]} frames at every {stride}, "
                                                         f"need {args.frames}"}}
    video = (release_frames(video, args.size) if args.preprocess == "release"
             else square_crop(video, args.size).clamp(-1, 1))
    latents = pipe.encode(video)
    if decode_kw.get("generator") is not None:      # --noise device: every video from the seed, as one run each
        decode_kw["generator"].manual_seed(args.seed)
    cascade, baseline = pipe.decode(latents, **decode_kw).cpu(), pipe.preview(latents).cpu()
    outputs = {"cascade": fix_colour(cascade, baseline, fix) if fix else cascade, "baseline": baseline}
    run_dir = Path(args.output)
    write_video(run_dir / "real" / f"{path.stem}.mp4", video, fps=8, crf=args.crf)   # one file a video: any process
    scores = {}
    for method, out in outputs.items():
        write_video(run_dir / method / f"{path.stem}.mp4", out, fps=8, crf=args.crf)
        scores[method] = {"psnr": psnr(out, video), "ssim": ssim(out, video)}
        if lpips is not None:
            scores[method]["lpips"] = lpips(out, video).cpu()
    return {"scores": scores}


def run(args: argparse.Namespace) -> dict | None:
    import torch
    from tqdm.auto import tqdm

    from accelerate.utils import gather_object

    from cascadev.pipelines.frames import check_colour_fix
    from cascadev.cli.options import check_decode_args, decode_kwargs, load_pipeline
    from cascadev.pipelines.runtime import processes
    from cascadev.video_io import VIDEO_EXTENSIONS, check_output_folder
    from cascadev.weights import write_json
    from eval.metric_names import parse_metrics
    from eval.metrics import CONVENTIONS, LpipsUnavailable, load_lpips

    metrics = parse_metrics(args.metrics)
    if args.size % 32 or args.size < 32:
        raise UserError(f"--size must be a positive multiple of 32, got {args.size}")
    if args.frames < 1 or args.limit < 1:
        raise UserError("--frames and --limit must be >= 1")
    if args.fps < 0:
        raise UserError(f"--fps must be >= 0 (0: every frame), got {args.fps}")
    data = Path(args.data)
    if not data.is_dir():
        raise UserError(f"{data}: not a folder of videos")
    files = sorted(p for p in data.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS)[: args.limit]
    if not files:
        raise UserError(f"{data}: no video files ({', '.join(VIDEO_EXTENSIONS)})")
    check_output_folder(args.output, "-o")     # the videos and results.json go there only after the models load

    check_decode_args(args)
    notes = {}
    if "fvd" in metrics:           # known before any video is reconstructed: the other metrics still run
        from eval.fvd import MIN_FRAMES, default_detector_path, missing_detector_message
        detector = args.i3d or default_detector_path()
        if args.i3d and not Path(args.i3d).is_file():      # as cascadev eval: a named file must be there
            raise UserError(missing_detector_message(args.i3d))
        if min(args.frames, 16) < MIN_FRAMES:
            notes["fvd"] = f"FVD skipped: I3D needs >= {MIN_FRAMES} frames ({args.frames} frames)"
        elif detector is None or not Path(detector).is_file():
            notes["fvd"] = f"FVD skipped: {missing_detector_message(args.i3d)}"
        if "fvd" in notes:
            print(notes["fvd"])
            metrics = [m for m in metrics if m != "fvd"]
    pipe = load_pipeline(args, with_previewer=True)
    pipe.set_progress_bar_config(disable=True)         # one bar over the videos instead
    decode_kw = decode_kwargs(args, pipe)
    fix = decode_kw.pop("colour_fix")      # applied here, to the baseline already decoded for the table
    decode_kw["colour_fix"] = 0
    check_colour_fix(args.size, args.size, fix)
    decode_kw["distributed"] = False       # several processes: each decodes its own videos whole
    lpips = None
    if "lpips" in metrics:
        try:
            lpips = load_lpips(pipe._execution_device)
        except LpipsUnavailable as e:
            notes["lpips"] = f"LPIPS skipped: {e}"
            print(notes["lpips"])
    run_dir = Path(args.output)
    state = processes()
    with state.split_between_processes(files) as mine:     # contiguous blocks: gathered back in file order
        records = [_score_video(pipe, path, args, decode_kw, fix, lpips) for path in tqdm(mine, desc="reconstructing")]
    records = gather_object(records)          # every process's per-video records, in file order
    skipped = [r["skipped"] for r in records if "skipped" in r]
    done = len(files) - len(skipped)
    if not done:
        raise UserError(f"none of the {len(files)} videos could be used: " + "; ".join(s["reason"] for s in skipped))
    if not state.is_main_process:
        return None                            # the main process writes results.json and runs FVD
    scores = {m: {k: [] for k in ("psnr", "ssim", "lpips")} for m in METHODS}
    for record in records:
        for method, per_frame in record.get("scores", {}).items():
            for metric, value in per_frame.items():
                scores[method][metric].append(value)

    results = {m: {} for m in METHODS}
    for method in METHODS:
        for metric in ("psnr", "ssim", "lpips"):
            if metric in metrics and scores[method][metric]:
                results[method][metric] = torch.cat(scores[method][metric]).mean().item()  # mean over all frames
    if "fvd" in metrics:
        fvd_frames = min(args.frames, 16)
        if done < 2:
            notes["fvd"] = f"FVD skipped: it needs >= 2 videos ({done} reconstructed)"
            print(notes["fvd"])
        else:
            from cascadev.cli.eval import print_report
            from eval.evaluation import evaluate
            for method in METHODS:
                report = evaluate(run_dir / "real", run_dir / method, metrics=["fvd"], frames=fvd_frames, i3d=args.i3d)
                print_report(report)
                fvd = report["results"]["fvd"]
                results[method]["fvd"] = fvd.get("mean")
                if "skipped" in fvd:
                    notes[f"fvd_{method}"] = fvd["skipped"]

    report = {**results, "videos": done, "skipped": skipped, "notes": notes,
              "settings": {"size": args.size, "frames": args.frames, "limit": args.limit,
                           "steps": args.steps or pipe.config.num_inference_steps,
                           "scheduler": args.scheduler or type(pipe.scheduler).__name__, "tiling": args.tiling,
                           "colour_fix": fix, "seed": args.seed,
                           "data": str(data), "fps": args.fps, "preprocess": args.preprocess,
                           "selection": "first videos by file name, first frames at about --fps"},
              "conventions": {m: CONVENTIONS[m] for m in ("psnr", "ssim", "lpips")}}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "results.json", report)
    print(f"\n{done} videos, {args.frames} frames at {args.size}x{args.size} ({len(skipped)} skipped)")
    print(f"{'method':<10}" + "".join(f"{m.upper():>10}" for m in ("psnr", "ssim", "lpips", "fvd")))
    for method in METHODS:
        cells = [results[method].get(m) for m in ("psnr", "ssim", "lpips", "fvd")]
        print(f"{method:<10}" + "".join(f"{'-' if v is None else f'{v:.4g}':>10}" for v in cells))
    print(f"-> {run_dir / 'results.json'}")
    return report
