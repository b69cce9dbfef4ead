"""``cascadev eval``: PSNR / SSIM / LPIPS between paired videos and FVD between two sets.

Pairs are made by file name without extension (``real/a.mp4`` <-> ``fake/a.mkv``); two video files are one pair.
Frames are scored as stored in the files (``--geometry stored``, as the reference tools); ``--geometry display``
scores them as players show them (pixel aspect stretched, rotation applied). Paired metrics
use the first ``--paired-frames`` frames of both videos (default: ``--frames``; 0 = all frames, which
must then agree in number); FVD uses one ``--frames``-frame clip per video and run, from every
readable video of each set (paired or not). Every file left out is reported with the reason, and
the report states the conventions behind each number.

The command line only: the work is ``eval.evaluation.evaluate``, typed, for use from Python.
"""

from __future__ import annotations

import argparse
import csv
import sys

from eval.metric_names import METRICS, PAIRED_METRICS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``eval`` options. No torch import here: ``cascadev --help`` stays fast (defaults resolve in ``run``)."""
    parser.add_argument("--real", required=True, metavar="DIR_OR_LIST",
                        help="folder of reference videos, a text file with one video path per line, one video "
                             "(then --fake is one video too: a single pair), or for FVD with the cd-fvd protocols a "
                             "statistics file (.pkl) of the cd-fvd package")
    parser.add_argument("--fake", required=True, metavar="DIR_OR_LIST",
                        help="folder (or list) of videos to evaluate, or one video")
    parser.add_argument("--metrics", default="psnr,ssim,lpips",
                        help=f"comma-separated subset of {','.join(METRICS)} (default: psnr,ssim,lpips)")
    parser.add_argument("--frames", type=int, default=None, help="FVD clip length (default: the standard 16)")
    parser.add_argument("--paired-frames", type=int, default=None, metavar="N",
                        help="frames compared per pair for psnr/ssim/lpips (default: --frames; 0 = all)")
    parser.add_argument("--size", type=int, nargs="+", metavar="N", default=None,
                        help="resize every video to H W (or N x N) before all metrics (antialiased bilinear)")
    parser.add_argument("--geometry", default="stored", choices=("stored", "display"),
                        help="score the frames as stored in the files (default; what scikit-image, ffmpeg and the "
                             "published FVD loaders read) or as displayed (non-square pixels stretched, rotation "
                             "applied)")
    parser.add_argument("--i3d", default=None, metavar="PATH",
                        help="FVD detector: i3d_pretrained_400.pt (state dict) or i3d_torchscript.pt "
                             "(StyleGAN-V); default: either file in the torch hub checkpoint folder")
    parser.add_argument("--i3d-bn-eps", type=float, default=None,
                        help="BatchNorm eps of the state-dict I3D (default: 1e-5 as VideoGPT/TATS; 1e-3 as TF-Hub)")
    parser.add_argument("--i3d-size", type=int, default=None,
                        help="I3D input side (default: 224; other values only for quick tests, "
                             "the FVD is then not comparable)")
    parser.add_argument("--fvd-protocol", default="cascadev",
                        choices=("cascadev", "videogpt", "tf", "stylegan-v", "cd-fvd", "cd-fvd-i3d"),
                        help="how clips become detector input, as one reference does it: cascadev (default: stretch "
                             "to 224x224), videogpt (short side to 224, centre crop), tf (TF1 resize_bilinear), "
                             "stylegan-v (its TorchScript detector resizes; covariance over N), cd-fvd "
                             "(content-debiased FVD: VideoMAE-v2 features, --videomae), cd-fvd-i3d (the cd-fvd "
                             "package's I3D variant)")
    parser.add_argument("--videomae", default=None, metavar="PATH",
                        help="VideoMAE-v2 checkpoint for --fvd-protocol cd-fvd (vit_g_hybrid_pt_1200e_ssv2_ft.pth; "
                             "nothing is downloaded)")
    parser.add_argument("--fvd-resolution", type=int, default=None, metavar="R",
                        help="cd-fvd protocols: clips are first made R x R (short side, centre crop, 8-bit) as the "
                             "cd-fvd loader does (default: from a --real statistics file's name, else 128)")
    parser.add_argument("--runs", type=int, default=1, help="FVD clip draws; mean and std are reported (default 1)")
    parser.add_argument("--clip", choices=("first", "random"), default=None,
                        help="FVD clip start: first frames, or random per video and run "
                             "(default: first for one run, random for several)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random clip starts (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="FVD clips per I3D batch (default 8)")
    parser.add_argument("--workers", type=int, default=None,
                        help="video-reading worker processes for FVD (default: 4 on GPU, 0 on CPU)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="cache the reference set's FVD features here (.npz keyed by files and settings)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the full report as JSON")
    parser.add_argument("--csv", default=None, metavar="PER_VIDEO", help="write per-video paired metrics as CSV")


# ---------------------------------------------------------------------------------------- report

def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_report(report: dict) -> None:
    out = sys.stdout
    for s in report["skipped"]:
        print(f"skipped {s['set']} {s['file']}: {s['reason']}", file=out)
    c = report["counts"]
    print(f"{c['pairs']} pair(s) from {c['real']} real and {c['fake']} fake readable video(s); "
          f"{len(report['skipped'])} skip(s)", file=out)
    print(f"{'metric':<7} {'value':>12} {'std':>10}  n", file=out)
    units = {"psnr": (" dB", 2), "ssim": ("", 4), "lpips": ("", 4), "fvd": ("", 2)}
    for name, res in report["results"].items():
        unit, digits = units[name]
        if "skipped" in res:
            print(f"{name:<7} {'skipped':>12} {'':>10}  {res['skipped']}", file=out)
            continue
        how = f"[protocol {res['protocol']}; {res['geometry']} frames]"
        if name == "fvd":
            print(f"{name:<7} {_fmt(res['mean'], digits):>12} {_fmt(res['std'], digits):>10}  "
                  f"{len(res['runs'])} run(s), N = {res['n_real']} real / {res['n_fake']} fake {how}", file=out)
        else:
            print(f"{name:<7} {_fmt(res['mean'], digits) + unit:>12} {_fmt(res['std_over_videos'], digits):>10}  "
                  f"{res['videos']} videos / {res['frames']} frames (std over videos) {how}", file=out)
    for name, text in report["conventions"].items():
        print(f"  {name}: {text}", file=out)
    for note in report["results"].get("fvd", {}).get("notes", []):
        print(f"  note: {note}", file=out)


def _write_csv(path: str, rows: list[dict], metrics: list[str]) -> None:
    """The per-video rows, atomically (a reader never sees half a table)."""
    from cascadev.weights import atomic_path

    keys = [m for m in PAIRED_METRICS if m in metrics]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "real", "fake", "frames", *keys])
        for row in rows:
            writer.writerow([row["name"], row["real"], row["fake"], row["frames"],
                             *[("" if row.get(k) is None else f"{row[k]:.6f}") for k in keys]])


# ------------------------------------------------------------------------------------------- run

def _options(args: argparse.Namespace) -> dict:
    """The namespace as ``evaluate``'s keyword arguments."""
    return {"metrics": args.metrics, "frames": args.frames, "paired_frames": args.paired_frames, "size": args.size,
            "i3d": args.i3d, "i3d_bn_eps": args.i3d_bn_eps, "i3d_size": args.i3d_size,
            "fvd_protocol": args.fvd_protocol, "runs": args.runs, "clip": args.clip, "seed": args.seed,
            "batch_size": args.batch_size, "workers": args.workers, "cache_dir": args.cache_dir,
            "geometry": args.geometry, "videomae": args.videomae, "fvd_resolution": args.fvd_resolution}


def run(args: argparse.Namespace) -> dict:
    """``eval.evaluation.evaluate`` on the options; print the report (main process), write --json/--csv; return it."""
    from cascadev.video_io import check_output_file
    from cascadev.weights import write_json
    from eval.evaluation import check_options, evaluate, is_main_process

    options = _options(args)
    check_options(**options, real=args.real)    # every option checked before anything loads or is read
    # written only after all the work: a bad path must fail now, not after the report is printed
    if args.json:
        check_output_file(args.json, "--json", "report.json")
    if args.csv:
        check_output_file(args.csv, "--csv", "per_video.csv")
    report = evaluate(args.real, args.fake, **options, device=args.device)
    if is_main_process():
        print_report(report)
        if args.json:
            write_json(args.json, report, allow_nan=False)
        if args.csv:
            _write_csv(args.csv, report["per_video"], [m for m in report["settings"]["metrics"] if m in PAIRED_METRICS])
    return report
