"""``cascadev bench-recon``: the released reconstruction benchmark, with any weights.

The first ``--limit`` videos of a folder (sorted by name; the release used the first 200 Inter4K
videos) are cut to ``--frames`` frames from the start, resized on the short side and centre-cropped
to ``--size`` x ``--size`` (the release: 1024, 8 frames), then reconstructed by the cascade and by the
Previewer baseline (no LDM). PSNR / SSIM / LPIPS are computed in memory on the exact tensors, per
frame (conventions in ``eval.metrics``); FVD, when asked for and the clips are long enough for I3D,
runs ``cascadev eval`` over the written videos. Source frames are read as stored in the files (``--geometry
stored``, as the reference tools; ``display`` stretches non-square pixels and applies rotation first). Writes
RUN_DIR/{real,cascade,baseline}/NAME.mp4 (at the rate of the frames taken from the source), RUN_DIR/results.json,
and RUN_DIR/report_{cascade,baseline}.json in the format of ``cascadev eval --json``, and prints one table.
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
    p.add_argument("--geometry", default="stored", choices=("stored", "display"),
                   help="read the source frames as stored in the files (default, as the reference tools) or as "
                        "displayed (non-square pixels stretched, rotation applied)")
    p.add_argument("--i3d", help="I3D detector for FVD (i3d_pretrained_400.pt or i3d_torchscript.pt)")
    p.add_argument("--fvd-protocol", default="cascadev",
                   choices=("cascadev", "videogpt", "tf", "stylegan-v", "cd-fvd", "cd-fvd-i3d"),
                   help="FVD protocol, as cascadev eval's (cd-fvd: content-debiased FVD, VideoMAE-v2 from --videomae)")
    p.add_argument("--videomae", metavar="PATH", help="VideoMAE-v2 checkpoint for --fvd-protocol cd-fvd")
    p.add_argument("--fvd-resolution", type=int, default=None, metavar="R",
                   help="cd-fvd protocols: the loader's side (default 128, as cascadev eval)")
    add_pipeline_arguments(p)


RELEASE_FPS = 30.0       # the release's benchmark set: the first 200 Inter4K videos at 1024 x 1024 and 30 fps


def written_fps(file_fps: float, stride: int) -> float:
    """The rate of every ``stride``-th frame of a ``file_fps`` source (8 when the file does not say its rate)."""
    return file_fps / stride if file_fps > 0 else 8.0


def _score_video(pipe, path: Path, args, decode_kw: dict, fix: int, lpips) -> dict:
    """One video: {"skipped": {"file", "reason"}} when unusable, else its videos written under RUN_DIR and
    {"name", "frames", "scores": {method: {metric: per-frame scores on the CPU}}}."""
    from cascadev.pipelines.frames import fix_colour
    from cascadev.video_io import VideoReadError, read_video, video_info, write_video
    from eval.metrics import psnr, ssim

    try:
        file_fps = video_info(path, args.geometry).fps
        stride = frame_stride(file_fps, args.fps)
        video = read_video(path, num_frames=args.frames, stride=stride, geometry=args.geometry)
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
    fps = written_fps(file_fps, stride)
    write_video(run_dir / "real" / f"{path.stem}.mp4", video, fps=fps, crf=args.crf)  # one file a video: any process
    scores = {}
    for method, out in outputs.items():
        write_video(run_dir / method / f"{path.stem}.mp4", out, fps=fps, crf=args.crf)
        scores[method] = {"psnr": psnr(out, video), "ssim": ssim(out, video)}
        if lpips is not None:
            scores[method]["lpips"] = lpips(out, video).cpu()
    return {"name": path.stem, "frames": video.shape[2], "scores": scores}


def run(args: argparse.Namespace) -> dict | None:
    from cascadev.progress import progress_bar

    from accelerate.utils import gather_object

    from cascadev.pipelines.frames import check_colour_fix
    from cascadev.cli.options import check_decode_args, decode_kwargs, load_pipeline
    from cascadev.pipelines.runtime import processes
    from cascadev.video_io import VIDEO_EXTENSIONS, check_output_folder
    from cascadev.weights import write_json
    from eval.evaluation import build_report
    from eval.metric_names import parse_metrics
    from eval.metrics import LpipsUnavailable, load_lpips

    metrics = asked = parse_metrics(args.metrics)
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
        from eval.fvd import MIN_FRAMES, PROTOCOLS, default_detector_path, missing_detector_message
        from eval.videomae import missing_checkpoint_message

        videomae = PROTOCOLS[args.fvd_protocol].detector == "videomae"
        detector = args.videomae if videomae else args.i3d or default_detector_path()
        if args.i3d and not Path(args.i3d).is_file():      # as cascadev eval: a named file must be there
            raise UserError(missing_detector_message(args.i3d))
        if args.videomae and not Path(args.videomae).is_file():
            raise UserError(missing_checkpoint_message(args.videomae))
        if args.fvd_resolution is not None and args.fvd_resolution < 1:
            raise UserError(f"--fvd-resolution must be >= 1, got {args.fvd_resolution}")
        if videomae and min(args.frames, 16) % 2:
            notes["fvd"] = f"FVD skipped: VideoMAE-v2 takes an even number of frames ({args.frames} frames)"
        elif not videomae and min(args.frames, 16) < MIN_FRAMES:
            notes["fvd"] = f"FVD skipped: I3D needs >= {MIN_FRAMES} frames ({args.frames} frames)"
        elif detector is None or not Path(detector).is_file():
            missing = missing_checkpoint_message(None) if videomae else missing_detector_message(args.i3d)
            notes["fvd"] = f"FVD skipped: {missing}"
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
        mine = progress_bar(mine, desc="reconstructing", disable=not state.is_main_process)
        records = [_score_video(pipe, path, args, decode_kw, fix, lpips) for path in mine]
    records = gather_object(records)          # every process's per-video records, in file order
    skipped = [r["skipped"] for r in records if "skipped" in r]
    done = len(files) - len(skipped)
    if not done:
        raise UserError(f"none of the {len(files)} videos could be used: " + "; ".join(s["reason"] for s in skipped))
    if not state.is_main_process:
        return None                            # the main process writes results.json and runs FVD
    paired = [m for m in ("psnr", "ssim", "lpips") if m in metrics]
    rows = {m: [_row(record, m, run_dir, paired) for record in records if "scores" in record] for m in METHODS}
    results = {m: {} for m in METHODS}
    for method in METHODS:
        for metric in paired:
            frames = [x for row in rows[method] if metric in row["per_frame"] for x in row["per_frame"][metric]]
            if frames:
                results[method][metric] = sum(frames) / len(frames)     # mean over all frames
    fvd_results = {}
    if "fvd" in metrics:
        fvd_frames = min(args.frames, 16)
        if done < 2:
            notes["fvd"] = f"FVD skipped: it needs >= 2 videos ({done} reconstructed)"
            print(notes["fvd"])
        else:
            from cascadev.cli.eval import print_report
            from eval.evaluation import evaluate
            for method in METHODS:     # the written videos are square with square pixels: stored = displayed
                report = evaluate(run_dir / "real", run_dir / method, metrics=["fvd"], frames=fvd_frames, i3d=args.i3d,
                                  geometry="stored", fvd_protocol=args.fvd_protocol, videomae=args.videomae,
                                  fvd_resolution=args.fvd_resolution)
                print_report(report)
                fvd = fvd_results[method] = report["results"]["fvd"]
                results[method]["fvd"] = fvd.get("mean")
                if "skipped" in fvd:
                    notes[f"fvd_{method}"] = fvd["skipped"]

    settings = {"size": args.size, "frames": args.frames, "limit": args.limit,
                "steps": args.steps or pipe.config.num_inference_steps,
                "scheduler": args.scheduler or type(pipe.scheduler).__name__, "tiling": args.tiling,
                "colour_fix": fix, "seed": args.seed, "data": str(data), "fps": args.fps, "preprocess": args.preprocess,
                "geometry": args.geometry, "selection": "first videos by file name, first frames at about --fps"}
    run_dir.mkdir(parents=True, exist_ok=True)
    reports = {}
    for method in METHODS:    # the report of ``cascadev eval --json``, from the scores of the exact tensors
        skips = [{"set": "real", "file": s["file"], "reason": s["reason"]} for s in skipped]
        known = {m: {"skipped": notes[m]} for m in ("lpips", "fvd") if m in notes}     # asked for, skipped
        if method in fvd_results:
            known["fvd"] = fvd_results[method]
        reports[method] = build_report(run_dir / "real", run_dir / method, asked, rows[method], known,
                                       {**settings, "metrics": asked, "paired_frames": 0, "method": method},
                                       skips, done, done)
        write_json(run_dir / f"report_{method}.json", reports[method])
    protocols = {m: {"protocol": res["protocol"], "geometry": res["geometry"]}
                 for m, res in reports["cascade"]["results"].items() if "protocol" in res}
    report = {**results, "videos": done, "skipped": skipped, "notes": notes, "settings": settings,
              "protocols": protocols, "conventions": reports["cascade"]["conventions"]}
    write_json(run_dir / "results.json", report)
    print(f"\n{done} videos, {args.frames} frames at {args.size}x{args.size} ({len(skipped)} skipped; source frames "
          f"read in {args.geometry} geometry)")
    print(f"{'method':<10}" + "".join(f"{m.upper():>10}" for m in ("psnr", "ssim", "lpips", "fvd")))
    for method in METHODS:
        cells = [results[method].get(m) for m in ("psnr", "ssim", "lpips", "fvd")]
        print(f"{method:<10}" + "".join(f"{_cell(metric, v):>10}" for metric, v in zip(("psnr", "ssim", "lpips", "fvd"),
                                                                                      cells)))
    for metric, how in protocols.items():
        print(f"  {metric}: protocol {how['protocol']}; {how['geometry']} frames")
    print(f"-> {run_dir / 'results.json'}, {run_dir / 'report_cascade.json'}, {run_dir / 'report_baseline.json'}")
    return report


DIGITS = {"psnr": 2, "ssim": 4, "lpips": 4, "fvd": 2}     # as cascadev eval prints them


def _cell(metric: str, value: float | None) -> str:
    return "-" if value is None else f"{value:.{DIGITS[metric]}f}"


def _row(record: dict, method: str, run_dir: Path, metrics: list[str]) -> dict:
    """One video's scores of ``method`` in ``metrics`` as a row of ``cascadev eval``'s report (``per_video``)."""
    per_frame = {metric: [float(x) for x in values[0]] for metric, values in record["scores"][method].items()
                 if metric in metrics}
    return {"name": record["name"], "real": str(run_dir / "real" / f"{record['name']}.mp4"),
            "fake": str(run_dir / method / f"{record['name']}.mp4"), "frames": record["frames"],
            **{metric: sum(v) / len(v) for metric, v in per_frame.items()}, "per_frame": per_frame}
