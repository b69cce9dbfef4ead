"""``cascadev eval``: PSNR / SSIM / LPIPS between paired videos and FVD between two sets.

Pairs are made by file name without extension (``real/a.mp4`` <-> ``fake/a.mkv``). Paired metrics
use the first ``--paired-frames`` frames of both videos (default: ``--frames``; 0 = all frames, which
must then agree in number); FVD uses one ``--frames``-frame clip per video and run, from every
readable video of each set (paired or not). Every file left out is reported with the reason, and
the report states the conventions behind each number.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cascadev.errors import UserError

PAIRED_METRICS = ("psnr", "ssim", "lpips")
METRICS = PAIRED_METRICS + ("fvd",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``eval`` options. No torch import here: ``cascadev --help`` stays fast (defaults resolve in ``run``)."""
    parser.add_argument("--real", required=True, metavar="DIR_OR_LIST",
                        help="folder of reference videos, or a text file with one video path per line")
    parser.add_argument("--fake", required=True, metavar="DIR_OR_LIST", help="folder (or list) of videos to evaluate")
    parser.add_argument("--metrics", default="psnr,ssim,lpips",
                        help=f"comma-separated subset of {','.join(METRICS)} (default: psnr,ssim,lpips)")
    parser.add_argument("--frames", type=int, default=None, help="FVD clip length (default: the standard 16)")
    parser.add_argument("--paired-frames", type=int, default=None, metavar="N",
                        help="frames compared per pair for psnr/ssim/lpips (default: --frames; 0 = all)")
    parser.add_argument("--size", type=int, nargs="+", metavar="N", default=None,
                        help="resize every video to H W (or N x N) before all metrics (antialiased bilinear)")
    parser.add_argument("--i3d", default=None, metavar="PATH",
                        help="FVD detector: i3d_pretrained_400.pt (state dict) or i3d_torchscript.pt "
                             "(StyleGAN-V); default: either file in the torch hub checkpoint folder")
    parser.add_argument("--i3d-bn-eps", type=float, default=None,
                        help="BatchNorm eps of the state-dict I3D (default: 1e-5 as VideoGPT/TATS; 1e-3 as TF-Hub)")
    parser.add_argument("--i3d-size", type=int, default=None,
                        help="I3D input side (default: 224; other values only for quick tests, "
                             "the FVD is then not comparable)")
    parser.add_argument("--fvd-protocol", default="cascadev", choices=("cascadev", "videogpt", "tf", "stylegan-v"),
                        help="how clips become I3D input, as one reference does it: cascadev (default: stretch to "
                             "224x224), videogpt (short side to 224, centre crop), tf (TF1 resize_bilinear), "
                             "stylegan-v (its TorchScript detector resizes; covariance over N)")
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


# ------------------------------------------------------------------------------------------ files

@dataclass(frozen=True)
class Video:
    name: str          # file name without extension: the pairing key
    path: str
    frames: int
    height: int
    width: int


@dataclass(frozen=True)
class Skip:
    set: str           # "real" or "fake"
    file: str
    reason: str


def _list_files(source: str, set_name: str) -> list[Path]:
    """Video files of a folder (sorted, not recursive), or the paths listed in a text file."""
    from cascadev.video_io import VIDEO_EXTENSIONS

    path = Path(source)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    if path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS:
        raise UserError(f"--{set_name} {source}: expected a folder or a text file listing videos, got a video")
    if path.is_file():
        files = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(line)
                files.append(p if p.is_absolute() else path.parent / p)
        return files
    raise UserError(f"--{set_name} {source}: no such folder or list file")


def scan(source: str, set_name: str, skips: list[Skip]) -> dict[str, Video]:
    """Readable videos of ``source`` by name; unreadable files and ambiguous names go to ``skips``."""
    from cascadev.video_io import VideoReadError, video_info

    videos: dict[str, Video] = {}
    duplicates: set[str] = set()
    for path in _list_files(source, set_name):
        try:
            info = video_info(path)
        except VideoReadError as e:
            skips.append(Skip(set_name, str(path), f"unreadable: {e}"))
            continue
        if info.frames < 1:
            skips.append(Skip(set_name, str(path), "unreadable: no frames"))
            continue
        if path.stem in videos or path.stem in duplicates:
            duplicates.add(path.stem)
            skips.append(Skip(set_name, str(path), f"ambiguous name: another {set_name} file is also named {path.stem!r}"))
            continue
        videos[path.stem] = Video(path.stem, str(path), info.frames, info.height, info.width)
    for name in duplicates:
        first = videos.pop(name, None)
        if first is not None:
            skips.append(Skip(set_name, first.path, f"ambiguous name: another {set_name} file is also named {name!r}"))
    return videos


def pair_up(real: dict[str, Video], fake: dict[str, Video], frames: int, resized: bool,
            skips: list[Skip]) -> list[tuple[Video, Video]]:
    """(real, fake) pairs by name, long enough for ``frames`` (0 = all, equal counts); others to ``skips``."""
    pairs = []
    for name, f in sorted(fake.items()):
        r = real.get(name)
        if r is None:
            skips.append(Skip("fake", f.path, f"unmatched name: no real video named {name!r} (left out of paired metrics)"))
            continue
        if frames and min(r.frames, f.frames) < frames:
            short = r if r.frames < frames else f
            which = "real" if short is r else "fake"
            skips.append(Skip(which, short.path, f"too short for paired metrics: {short.frames} < {frames} frames"))
            continue
        if not frames and r.frames != f.frames:
            skips.append(Skip("fake", f.path, f"frame counts differ (real {r.frames}, fake {f.frames}) "
                                              "and --paired-frames 0 compares all frames"))
            continue
        if not resized and (r.height, r.width) != (f.height, f.width):
            raise UserError(f"pair {name!r}: real frames are {r.height}x{r.width}, fake frames {f.height}x{f.width}; "
                            "pass --size H W to compare at one size")
        pairs.append((r, f))
    for name, r in sorted(real.items()):
        if name not in fake:
            skips.append(Skip("real", r.path, f"unmatched name: no fake video named {name!r} (left out of paired metrics)"))
    return pairs


# -------------------------------------------------------------------------------- paired metrics

def paired_metrics(pairs: list[tuple[Video, Video]], metrics: list[str], frames: int, size, device, lpips,
                   skips: list[Skip], show_progress: bool) -> list[dict]:
    """Per-video rows {name, real, fake, frames, psnr, ssim, lpips (means over frames), per_frame}."""
    import torch
    from tqdm.auto import tqdm

    from cascadev.video_io import VideoReadError, read_video
    from eval.metrics import psnr, ssim

    rows = []
    for r, f in tqdm(pairs, desc="paired metrics", disable=not show_progress, leave=False):
        n = frames or r.frames
        try:
            real = read_video(r.path, num_frames=n, size=size)
            fake = read_video(f.path, num_frames=n, size=size)
        except VideoReadError as e:
            skips.append(Skip("pair", r.name, f"unreadable: {e}"))
            continue
        if real.shape != fake.shape:
            skips.append(Skip("pair", r.name, f"decoded shapes differ: real {tuple(real.shape[2:])}, "
                                              f"fake {tuple(fake.shape[2:])} (T, H, W)"))
            continue
        real, fake = real.to(device), fake.to(device)
        row = {"name": r.name, "real": r.path, "fake": f.path, "frames": real.shape[2]}
        per_frame = {}
        with torch.no_grad():
            if "psnr" in metrics:
                per_frame["psnr"] = psnr(fake, real)[0].cpu()
            if "ssim" in metrics:
                per_frame["ssim"] = ssim(fake, real)[0].cpu()
            if "lpips" in metrics and lpips is not None:
                per_frame["lpips"] = lpips(fake, real)[0].cpu()
        for key, values in per_frame.items():
            row[key] = float(values.double().mean())
        row["per_frame"] = {k: [float(x) for x in v] for k, v in per_frame.items()}
        rows.append(row)
    return rows


def _summary(rows: list[dict], key: str) -> dict:
    """Set value = mean over all frames of all videos; also the spread of the per-video means."""
    frames = [x for row in rows for x in row["per_frame"][key]]
    videos = [row[key] for row in rows]
    std = math.sqrt(sum((v - sum(videos) / len(videos)) ** 2 for v in videos) / (len(videos) - 1)) if len(videos) > 1 else None
    return {"mean": sum(frames) / len(frames), "videos": len(videos), "frames": len(frames), "std_over_videos": std}


# -------------------------------------------------------------------------------------------- fvd

def run_fvd(real: dict[str, Video], fake: dict[str, Video], args, extractor, size, accelerator,
            skips: list[Skip], show_progress: bool) -> dict:
    """FVD over ``args.runs`` clip draws -> result dict (or {"skipped": reason})."""
    import numpy as np

    from eval import fvd

    frames = args.frames
    sets = {}
    for set_name, videos in (("real", real), ("fake", fake)):
        ok = []
        for v in videos.values():
            if v.frames < frames:
                skips.append(Skip(set_name, v.path, f"too short for fvd: {v.frames} < {frames} frames"))
            else:
                ok.append(v)
        sets[set_name] = ok
    if len(sets["real"]) < 2 or len(sets["fake"]) < 2:
        return {"skipped": f"fvd needs at least 2 videos of >= {frames} frames per set "
                           f"(real {len(sets['real'])}, fake {len(sets['fake'])})"}
    rule = args.clip or ("random" if args.runs > 1 else "first")
    protocol = fvd.PROTOCOLS[args.fvd_protocol]
    if protocol.detector_resizes and size is None:      # clips at their own size: one size for every clip
        sizes = {(v.height, v.width) for videos in sets.values() for v in videos}
        if len(sizes) > 1:
            raise UserError(f"--fvd-protocol {protocol.name} feeds clips at their own size, and these videos have "
                            f"{len(sizes)} sizes (e.g. {sorted(sizes)[:2]}): give --size H W")
        size = sizes.pop()
    settings = {"frames": frames, "i3d_size": args.i3d_size, "read_size": size, "detector": extractor.identity,
                "protocol": protocol.name}
    workers = args.workers if args.workers is not None else (4 if str(extractor.device).startswith("cuda") else 0)
    values, counts, failed_files = [], [], set()
    for run in range(args.runs):
        feats = {}
        for set_name, videos in sets.items():
            clips = [fvd.Clip(v.path, fvd.clip_start(v.name, v.frames, frames, rule, args.seed, run)) for v in videos]
            cached = None
            if set_name == "real" and args.cache_dir:
                key = fvd.cache_key(clips, settings)
                cached = fvd.load_cached_features(args.cache_dir, key)
            if cached is None:
                cached = fvd.extract_features(clips, extractor, frames, args.i3d_size, size, args.batch_size, workers,
                                              accelerator, progress=f"fvd {set_name} run {run + 1}/{args.runs}"
                                              if show_progress else None, protocol=protocol.name)
                if set_name == "real" and args.cache_dir and (accelerator is None or accelerator.is_main_process):
                    fvd.save_cached_features(args.cache_dir, key, *cached)
            feats[set_name], failed = cached
            for i in failed:
                if clips[i].path not in failed_files:
                    failed_files.add(clips[i].path)
                    skips.append(Skip(set_name, clips[i].path, f"unreadable: fvd clip at frame {clips[i].start} "
                                                               "could not be decoded"))
        if min(len(feats["real"]), len(feats["fake"])) < 2:
            return {"skipped": "fvd: fewer than 2 decodable clips in a set"}
        values.append(fvd.fvd_from_features(feats["real"], feats["fake"], ddof=protocol.ddof))
        counts.append((len(feats["real"]), len(feats["fake"])))
    n_real, n_fake = min(c[0] for c in counts), min(c[1] for c in counts)
    clip_text = (f"first {frames} frames of each video" if rule == "first" else
                 f"{frames} consecutive frames from a random start per video and run (seed {args.seed}; "
                 "same start for a real and a fake video of the same name)")
    result = {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
        "runs": values,
        "n_real": n_real,
        "n_fake": n_fake,
        "clip": clip_text,
        "detector": extractor.name,
        "protocol": protocol.name,
        "protocol_source": protocol.source,
        "input": (f"frames read at {size[0]}x{size[1]} (antialiased), then " if size else "") + protocol.input,
        "statistics": f"float64 mean and covariance over N - {protocol.ddof} of the features; Frechet distance exact "
                      "(symmetric eigendecomposition, or singular values of the centred features when N <= D)",
    }
    notes = []
    if args.i3d_size != fvd.I3D_SIZE:
        notes.append(f"I3D input {args.i3d_size} px instead of {fvd.I3D_SIZE}: not comparable with published FVD")
    if min(n_real, n_fake) <= extractor.dim:
        notes.append(f"N = {min(n_real, n_fake)} <= feature dim {extractor.dim}: covariance is rank-deficient, "
                     "FVD is biased upward; compare only at equal N")
    if notes:
        result["notes"] = notes
    return result


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
        elif name == "fvd":
            print(f"{name:<7} {_fmt(res['mean'], digits):>12} {_fmt(res['std'], digits):>10}  "
                  f"{len(res['runs'])} run(s), N = {res['n_real']} real / {res['n_fake']} fake", file=out)
        else:
            print(f"{name:<7} {_fmt(res['mean'], digits) + unit:>12} {_fmt(res['std_over_videos'], digits):>10}  "
                  f"{res['videos']} videos / {res['frames']} frames (std over videos)", file=out)
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

def _parse_metrics(text: str) -> list[str]:
    metrics = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise UserError(f"--metrics: unknown {', '.join(unknown) or '(empty)'}; choose from {','.join(METRICS)}")
    return list(dict.fromkeys(metrics))


def _accelerator():
    """An Accelerator only when launched on several processes (``accelerate launch``), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator()


def _check_args(args: argparse.Namespace, metrics: list[str]) -> tuple[tuple[int, int] | None, int]:
    """Every option checked, and the defaults that depend on others filled in, before anything loads or is read:
    returns (size or None, paired frames)."""
    from cascadev.video_io import check_output_file, check_output_folder
    from eval import fvd
    from eval.i3d import BN_EPS_VIDEOGPT

    args.frames = fvd.FVD_FRAMES if args.frames is None else args.frames
    args.i3d_size = fvd.I3D_SIZE if args.i3d_size is None else args.i3d_size
    args.i3d_bn_eps = BN_EPS_VIDEOGPT if args.i3d_bn_eps is None else args.i3d_bn_eps
    if args.size is not None and len(args.size) not in (1, 2):
        raise UserError(f"--size takes H W or N, got {len(args.size)} numbers")
    size = None if args.size is None else (tuple(args.size) * 2)[:2]
    if size is not None and min(size) < 1:
        raise UserError(f"--size must be positive, got {args.size}")
    paired_frames = args.frames if args.paired_frames is None else args.paired_frames
    if paired_frames < 0:
        raise UserError(f"--paired-frames must be >= 0, got {paired_frames}")
    for name, value, least in (("--frames", args.frames, 1), ("--batch-size", args.batch_size, 1),
                               ("--i3d-size", args.i3d_size, 1), ("--workers", args.workers, 0)):
        if value is not None and value < least:
            raise UserError(f"{name} must be >= {least}, got {value}")
    if "fvd" in metrics:
        if args.frames < fvd.MIN_FRAMES:
            raise UserError(f"--frames {args.frames}: I3D needs clips of at least {fvd.MIN_FRAMES} frames")
        if args.runs < 1:
            raise UserError(f"--runs must be >= 1, got {args.runs}")
        if args.runs > 1 and args.clip == "first":
            raise UserError("--runs > 1 needs --clip random (first-frame clips are the same in every run)")
        # a named detector that is not there is a typo to fix, not a reason to skip FVD (that is for no --i3d)
        if args.i3d and not Path(args.i3d).is_file():
            raise UserError(fvd.missing_detector_message(args.i3d))
        if args.cache_dir:
            check_output_folder(args.cache_dir, "--cache-dir")
    # written only after all the work: a bad path must fail now, not after the report is printed
    if args.json:
        check_output_file(args.json, "--json", "report.json")
    if args.csv:
        check_output_file(args.csv, "--csv", "per_video.csv")
    return size, paired_frames


def run(args: argparse.Namespace) -> dict:
    """Run the evaluation, print the report (main process), write --json/--csv; return the report."""
    from cascadev.pipelines.options import resolve_device
    from cascadev.weights import write_json
    from eval import fvd
    from eval.metrics import CONVENTIONS, LPIPS_MIN_SIDE, LpipsUnavailable, load_lpips

    metrics = _parse_metrics(args.metrics)
    size, paired_frames = _check_args(args, metrics)
    paired = [m for m in metrics if m in PAIRED_METRICS]
    accelerator = _accelerator()
    main = accelerator is None or accelerator.is_main_process
    device = accelerator.device if accelerator else resolve_device(args.device)

    # Load what can fail before reading any video: the detector is an error, LPIPS a skip.
    extractor = lpips = None
    results: dict[str, dict] = {}
    if "fvd" in metrics:
        try:
            extractor = fvd.load_extractor(args.i3d or fvd.default_detector_path(), device, args.i3d_bn_eps,
                                           protocol=args.fvd_protocol)
        except FileNotFoundError as e:      # alone it is an error; beside other metrics, FVD is skipped
            if len(metrics) == 1:
                raise
            results["fvd"] = {"skipped": f"FVD skipped: {e}"}
            print(f"warning: FVD skipped: {e}", file=sys.stderr)
    if "lpips" in metrics:
        try:
            lpips = load_lpips(device)
        except LpipsUnavailable as e:
            results["lpips"] = {"skipped": f"LPIPS skipped: {e}"}

    skips: list[Skip] = []
    real = scan(args.real, "real", skips)
    fake = scan(args.fake, "fake", skips)
    if not real:
        raise UserError(f"--real {args.real}: no readable videos")
    if not fake:
        raise UserError(f"--fake {args.fake}: no readable videos")

    rows = []
    pairs = []
    if paired:
        pairs = pair_up(real, fake, paired_frames, size is not None, skips)
        if not pairs:
            for s in skips:
                print(f"skipped {s.set} {s.file}: {s.reason}")
            raise UserError(f"no pairs: none of the {len(fake)} fake video(s) has a real video of the same name "
                            "and enough frames (skips listed above)")
        side = min(size) if size else min(min(r.height, r.width) for r, _ in pairs)
        if lpips is not None and side < LPIPS_MIN_SIDE:
            lpips = None
            results["lpips"] = {"skipped": f"LPIPS skipped: frames of {side} px are smaller than the "
                                           f"{LPIPS_MIN_SIDE} px AlexNet needs"}
        mine = pairs if accelerator is None else pairs[accelerator.process_index::accelerator.num_processes]
        rows = paired_metrics(mine, paired, paired_frames, size, device, lpips, skips, main)
        if accelerator is not None:
            from accelerate.utils import gather_object

            rows = sorted(gather_object(rows), key=lambda row: row["name"])
            skips = list(dict.fromkeys(gather_object(skips)))
        for m in paired:
            if m in results:
                continue
            results[m] = _summary(rows, m) if rows else {"skipped": "no pair could be read"}

    if extractor is not None:
        results["fvd"] = run_fvd(real, fake, args, extractor, size, accelerator, skips, main)
        if len(metrics) == 1 and "skipped" in results["fvd"]:
            raise UserError(results["fvd"]["skipped"])

    conventions = {m: CONVENTIONS[m] for m in paired}
    if "fvd" in metrics and "skipped" not in results["fvd"]:
        r = results["fvd"]
        conventions["fvd"] = (f"{r['detector']}; protocol {r['protocol']} ({r['protocol_source']}); clips: {r['clip']}; "
                              f"input: {r['input']}; N = {r['n_real']} real / "
                              f"{r['n_fake']} fake; {r['statistics']}; mean and std (N-1) over {len(r['runs'])} run(s)")
    report = {
        "real": str(args.real),
        "fake": str(args.fake),
        "settings": {"metrics": metrics, "frames": args.frames, "paired_frames": paired_frames,
                     "size": list(size) if size else None, "device": str(device), "runs": args.runs,
                     "seed": args.seed, "fvd_protocol": args.fvd_protocol},
        "conventions": conventions,
        "counts": {"real": len(real), "fake": len(fake), "pairs": len(rows)},
        "skipped": [s.__dict__ for s in skips],
        "results": {m: results[m] for m in metrics},
        "per_video": rows,
    }
    if main:
        print_report(report)
        if args.json:
            write_json(args.json, report, allow_nan=False)
        if args.csv:
            _write_csv(args.csv, rows, paired)
    return report
