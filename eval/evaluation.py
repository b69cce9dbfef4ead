"""Evaluation as a library: PSNR / SSIM / LPIPS between paired videos and FVD between two sets.

``evaluate(real, fake, metrics=("psnr", "fvd"), ...)`` takes typed arguments and returns the report (a dict, what
``cascadev eval --json`` writes); ``cascadev.cli.eval`` is the command line over it. Pairs are made by file name without
extension (``real/a.mp4`` <-> ``fake/a.mkv``); two single video files are one pair whatever their names.
Frames are scored as stored in the files (``geometry="stored"``, the default, as the reference tools read them:
no pixel-aspect stretch, no rotation); ``geometry="display"`` scores them as players show them.
Paired metrics use the first ``paired_frames`` frames of both videos
(default: ``frames``; 0 = all frames, which must then agree in number); FVD uses one ``frames``-frame clip per video
and run, from every readable video of each set (paired or not). Every file left out is reported with the reason,
and the report states the conventions behind each number.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cascadev.errors import UserError
from eval.metric_names import PAIRED_METRICS, parse_metrics

DEFAULT_METRICS = PAIRED_METRICS


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
        return [path]                   # one video: a single pair with the other side's one video
    if path.is_file():
        files = []
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise UserError(f"--{set_name} {source}: not a list of videos (binary data, not text)") from None
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(line)
                files.append(p if p.is_absolute() else path.parent / p)
        return files
    raise UserError(f"--{set_name} {source}: no such folder or list file")


def is_single_video(source: str | Path) -> bool:
    """``source`` names one video file (not a folder or a list of videos)."""
    from cascadev.video_io import VIDEO_EXTENSIONS

    return Path(source).is_file() and Path(source).suffix.lower() in VIDEO_EXTENSIONS


def scan(source: str, set_name: str, skips: list[Skip], geometry: str = "stored") -> dict[str, Video]:
    """Readable videos of ``source`` by name, their sizes in ``geometry``; unreadable files and ambiguous names go
    to ``skips``."""
    from cascadev.video_io import VideoReadError, video_info

    videos: dict[str, Video] = {}
    duplicates: set[str] = set()
    for path in _list_files(source, set_name):
        try:
            info = video_info(path, geometry)
        except VideoReadError as e:
            skips.append(Skip(set_name, str(path), f"unreadable: {e}"))
            continue
        if info.frames < 1:
            skips.append(Skip(set_name, str(path), "unreadable: no frames"))
            continue
        if path.stem in videos or path.stem in duplicates:
            duplicates.add(path.stem)
            skips.append(Skip(set_name, str(path),
                              f"ambiguous name: another {set_name} file is also named {path.stem!r}"))
            continue
        videos[path.stem] = Video(path.stem, str(path), info.frames, info.height, info.width)
    for name in duplicates:
        first = videos.pop(name, None)
        if first is not None:
            skips.append(Skip(set_name, first.path, f"ambiguous name: another {set_name} file is also named {name!r}"))
    return videos


def pair_up(real: dict[str, Video], fake: dict[str, Video], frames: int, resized: bool,
            skips: list[Skip], geometry: str = "stored") -> list[tuple[Video, Video]]:
    """(real, fake) pairs by name, long enough for ``frames`` (0 = all, equal counts); others to ``skips``."""
    pairs = []
    for name, f in sorted(fake.items()):
        r = real.get(name)
        if r is None:
            skips.append(Skip("fake", f.path,
                              f"unmatched name: no real video named {name!r} (left out of paired metrics)"))
            continue
        if frames and min(r.frames, f.frames) < frames:
            short = r if r.frames < frames else f
            which = "real" if short is r else "fake"
            skips.append(Skip(which, short.path, f"too short for paired metrics: {short.frames} < {frames} frames "
                                                 f"(--paired-frames {frames}; 0 compares all frames)"))
            continue
        if not frames and r.frames != f.frames:
            skips.append(Skip("fake", f.path, f"frame counts differ (real {r.frames}, fake {f.frames}) "
                                              "and --paired-frames 0 compares all frames"))
            continue
        if not resized and (r.height, r.width) != (f.height, f.width):
            raise UserError(f"pair {name!r}: real frames are {r.height}x{r.width}, fake frames {f.height}x{f.width} "
                            f"({geometry} geometry); pass --size H W to compare at one size")
        pairs.append((r, f))
    for name, r in sorted(real.items()):
        if name not in fake:
            skips.append(Skip("real", r.path,
                              f"unmatched name: no fake video named {name!r} (left out of paired metrics)"))
    return pairs


# -------------------------------------------------------------------------------- paired metrics

def paired_metrics(pairs: list[tuple[Video, Video]], metrics: list[str], frames: int, size, device, lpips,
                   skips: list[Skip], show_progress: bool, geometry: str = "stored") -> list[dict]:
    """Per-video rows {name, real, fake, frames, psnr, ssim, lpips (means over frames), per_frame}."""
    import torch
    from tqdm.auto import tqdm

    from cascadev.video_io import VideoReadError, read_video
    from eval.metrics import psnr, ssim

    rows = []
    for r, f in tqdm(pairs, desc="paired metrics", disable=not show_progress, leave=False):
        n = frames or r.frames
        try:
            real = read_video(r.path, num_frames=n, size=size, geometry=geometry)
            fake = read_video(f.path, num_frames=n, size=size, geometry=geometry)
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
    std = (math.sqrt(sum((v - sum(videos) / len(videos)) ** 2 for v in videos) / (len(videos) - 1))
           if len(videos) > 1 else None)
    return {"mean": sum(frames) / len(frames), "videos": len(videos), "frames": len(frames), "std_over_videos": std}


# -------------------------------------------------------------------------------------------- fvd

def fvd_of_sets(real: dict[str, Video], fake: dict[str, Video], extractor, *, frames: int, i3d_size: int,
                size: tuple[int, int] | None = None, protocol: str = "cascadev", runs: int = 1, clip: str | None = None,
                seed: int = 0, batch_size: int = 8, workers: int | None = None, cache_dir: str | Path | None = None,
                accelerator=None, skips: list[Skip] | None = None, show_progress: bool = False,
                geometry: str = "stored", resolution: int | None = None, reference=None) -> dict:
    """FVD between two scanned sets over ``runs`` clip draws -> result dict (or {"skipped": reason}).

    ``extractor``: from ``eval.fvd.load_extractor``. ``clip``: "first" or "random" clip starts (default: first for
    one run, random for several). ``cache_dir``: the real set's features cached there. ``resolution``: the cd-fvd
    protocols' loader side. ``reference``: ``eval.fvd.ReferenceStats`` standing for the real set (``real`` is then
    empty). Files left out go to ``skips``."""
    import numpy as np

    from eval import fvd

    skips = [] if skips is None else skips
    sets = {}
    for set_name, videos in (("real", real), ("fake", fake)):
        ok = []
        for v in videos.values():
            if v.frames < frames:
                skips.append(Skip(set_name, v.path, f"too short for fvd: {v.frames} < {frames} frames"))
            else:
                ok.append(v)
        sets[set_name] = ok
    n_reference = reference.count if reference is not None else len(sets["real"])
    if n_reference < 2 or len(sets["fake"]) < 2:
        return {"skipped": f"fvd needs at least 2 videos of >= {frames} frames per set "
                           f"(real {n_reference}, fake {len(sets['fake'])})"}
    rule = clip or ("random" if runs > 1 else "first")
    protocol = fvd.PROTOCOLS[protocol]
    resolution = resolution or fvd.CDFVD_RESOLUTION
    if protocol.detector_resizes and size is None:      # clips at their own size: one size for every clip
        sizes = {(v.height, v.width) for videos in sets.values() for v in videos}
        if len(sizes) > 1:
            raise UserError(f"--fvd-protocol {protocol.name} feeds clips at their own size, and these videos have "
                            f"{len(sizes)} sizes (e.g. {sorted(sizes)[:2]}): give --size H W")
        size = sizes.pop()
    settings = {"frames": frames, "i3d_size": i3d_size, "read_size": size, "detector": extractor.identity,
                "protocol": protocol.name, "geometry": geometry,
                **({"resolution": resolution} if protocol.loader_resolution else {})}
    if reference is not None:
        sets["real"] = []                                          # no real videos: a statistics file
    workers = workers if workers is not None else (4 if str(extractor.device).startswith("cuda") else 0)
    values, counts, failed_files = [], [], set()
    for run in range(runs):
        feats = {}
        for set_name, videos in sets.items():
            if set_name == "real" and reference is not None:      # the statistics file stands for the real set
                continue
            clips = [fvd.Clip(v.path, fvd.clip_start(v.name, v.frames, frames, rule, seed, run)) for v in videos]
            cached = None
            if set_name == "real" and cache_dir:
                key = fvd.cache_key(clips, settings)
                cached = fvd.load_cached_features(cache_dir, key)
            if cached is None:
                cached = fvd.extract_features(clips, extractor, frames, i3d_size, size, batch_size, workers,
                                              accelerator, progress=f"fvd {set_name} run {run + 1}/{runs}"
                                              if show_progress else None, protocol=protocol.name,
                                              geometry=geometry, resolution=resolution)
                if set_name == "real" and cache_dir and (accelerator is None or accelerator.is_main_process):
                    fvd.save_cached_features(cache_dir, key, *cached)
            feats[set_name], failed = cached
            for i in failed:
                if clips[i].path not in failed_files:
                    failed_files.add(clips[i].path)
                    skips.append(Skip(set_name, clips[i].path, f"unreadable: fvd clip at frame {clips[i].start} "
                                                               "could not be decoded"))
        if reference is not None:
            if len(feats["fake"]) < 2:
                return {"skipped": "fvd: fewer than 2 decodable clips in the fake set"}
            if feats["fake"].shape[1] != len(reference.mean):
                raise UserError(f"--real {reference.path}: statistics of {len(reference.mean)}-d features, and "
                                f"{extractor.name} gives {feats['fake'].shape[1]}-d ones")
            values.append(fvd.frechet_distance(reference.mean, reference.cov,
                                               *fvd.gaussian_stats(feats["fake"], ddof=protocol.ddof)))
            counts.append((reference.count, len(feats["fake"])))
            continue
        if min(len(feats["real"]), len(feats["fake"])) < 2:
            return {"skipped": "fvd: fewer than 2 decodable clips in a set"}
        values.append(fvd.fvd_from_features(feats["real"], feats["fake"], ddof=protocol.ddof))
        counts.append((len(feats["real"]), len(feats["fake"])))
    n_real, n_fake = min(c[0] for c in counts), min(c[1] for c in counts)
    clip_text = (f"first {frames} frames of each video" if rule == "first" else
                 f"{frames} consecutive frames from a random start per video and run (seed {seed}; "
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
        "geometry": geometry,
        "input": f"{geometry} frames, " + (f"read at {size[0]}x{size[1]} (antialiased), then " if size else "")
                 + protocol.input.replace("RESOLUTION", str(resolution)),
        "statistics": f"float64 mean and covariance over N - {protocol.ddof} of the features; Frechet distance exact "
                      "(symmetric eigendecomposition, or singular values of the centred features when N <= D)",
    }
    if reference is not None:
        result["reference"] = (f"statistics file {reference.path} (mean and covariance over its N = {reference.count} "
                               "clips)")
    notes = []
    if i3d_size != fvd.I3D_SIZE:
        notes.append(f"I3D input {i3d_size} px instead of {fvd.I3D_SIZE}: not comparable with published FVD")
    if min(n_real, n_fake) <= extractor.dim:
        notes.append(f"N = {min(n_real, n_fake)} <= feature dim {extractor.dim}: covariance is rank-deficient, "
                     "FVD is biased upward; compare only at equal N")
    if notes:
        result["notes"] = notes
    return result


# ------------------------------------------------------------------------------------------ options

@dataclass(frozen=True)
class EvalOptions:
    """Every option of an evaluation, checked, with the defaults that depend on others filled in."""
    metrics: tuple[str, ...]
    frames: int                          # FVD clip length
    paired_frames: int                   # frames compared per pair (0 = all)
    size: tuple[int, int] | None         # (H, W) every video is resized to, or None
    i3d: str | None
    i3d_bn_eps: float
    i3d_size: int
    fvd_protocol: str
    runs: int
    clip: str | None
    seed: int
    batch_size: int
    workers: int | None
    cache_dir: str | None
    geometry: str                        # "stored" (default) or "display" frames (cascadev.video_io.GEOMETRIES)
    videomae: str | None                 # VideoMAE-v2 checkpoint (fvd protocol cd-fvd)
    fvd_resolution: int                  # the cd-fvd protocols' loader side
    reference: object = None             # eval.fvd.ReferenceStats when --real is a statistics file


def check_options(*, metrics: str | Iterable[str] = DEFAULT_METRICS, frames: int | None = None,
                  paired_frames: int | None = None, size: int | Sequence[int] | None = None,
                  i3d: str | Path | None = None, i3d_bn_eps: float | None = None, i3d_size: int | None = None,
                  fvd_protocol: str = "cascadev", runs: int = 1, clip: str | None = None, seed: int = 0,
                  batch_size: int = 8, workers: int | None = None, cache_dir: str | Path | None = None,
                  geometry: str = "stored", videomae: str | Path | None = None, fvd_resolution: int | None = None,
                  real: str | Path | None = None) -> EvalOptions:
    """The options of ``evaluate`` checked before anything loads or is read (one-line ``UserError``s). ``real``: when
    a statistics file (``.pkl``), it is read here, and its file name's clip length and resolution are the defaults of
    ``frames`` and ``fvd_resolution`` (others given are an error)."""
    from cascadev.video_io import GEOMETRIES, check_output_folder
    from eval import fvd
    from eval.i3d import BN_EPS_VIDEOGPT

    metrics = parse_metrics(metrics)
    if fvd_protocol not in fvd.PROTOCOLS:
        raise UserError(f"--fvd-protocol: unknown {fvd_protocol}; choose from {','.join(fvd.PROTOCOLS)}")
    reference = None
    if real is not None and fvd.is_stats_file(real):
        reference = _check_reference(real, metrics, fvd_protocol, frames, fvd_resolution)
        frames = frames or reference.frames
        fvd_resolution = fvd_resolution or reference.resolution
    frames = fvd.FVD_FRAMES if frames is None else frames
    fvd_resolution = fvd.CDFVD_RESOLUTION if fvd_resolution is None else fvd_resolution
    i3d_size = fvd.I3D_SIZE if i3d_size is None else i3d_size
    i3d_bn_eps = BN_EPS_VIDEOGPT if i3d_bn_eps is None else i3d_bn_eps
    sizes = None if size is None else [size] if isinstance(size, int) else list(size)
    if sizes is not None and len(sizes) not in (1, 2):
        raise UserError(f"--size takes H W or N, got {len(sizes)} numbers")
    hw = None if sizes is None else (tuple(sizes) * 2)[:2]
    if hw is not None and min(hw) < 1:
        raise UserError(f"--size must be positive, got {sizes}")
    paired_frames = frames if paired_frames is None else paired_frames
    if paired_frames < 0:
        raise UserError(f"--paired-frames must be >= 0, got {paired_frames}")
    for name, value, least in (("--frames", frames, 1), ("--batch-size", batch_size, 1), ("--fvd-resolution",
                                                                                            fvd_resolution, 1),
                               ("--i3d-size", i3d_size, 1), ("--workers", workers, 0)):
        if value is not None and value < least:
            raise UserError(f"{name} must be >= {least}, got {value}")
    if geometry not in GEOMETRIES:
        raise UserError(f"--geometry: unknown {geometry}; choose from {','.join(GEOMETRIES)}")
    if clip not in (None, "first", "random"):
        raise UserError(f"--clip: unknown {clip}; choose from first,random")
    if "fvd" in metrics:
        if frames < fvd.MIN_FRAMES and fvd.PROTOCOLS[fvd_protocol].detector == "i3d":
            raise UserError(f"--frames {frames}: I3D needs clips of at least {fvd.MIN_FRAMES} frames")
        if runs < 1:
            raise UserError(f"--runs must be >= 1, got {runs}")
        if runs > 1 and clip == "first":
            raise UserError("--runs > 1 needs --clip random (first-frame clips are the same in every run)")
        # a named detector that is not there is a typo to fix, not a reason to skip FVD (that is for no --i3d)
        if i3d and not Path(i3d).is_file():
            raise UserError(fvd.missing_detector_message(i3d))
        if fvd.PROTOCOLS[fvd_protocol].detector == "videomae":
            from eval.videomae import missing_checkpoint_message

            if not videomae or not Path(videomae).is_file():      # never downloaded: the user's file or an error
                raise UserError(missing_checkpoint_message(videomae))
            if frames % 2 or i3d_size != fvd.I3D_SIZE:
                raise UserError(f"--fvd-protocol cd-fvd: VideoMAE-v2 takes an even number of frames (--frames, got "
                                f"{frames}) at {fvd.I3D_SIZE} px (--i3d-size, got {i3d_size})")
        if cache_dir:
            check_output_folder(cache_dir, "--cache-dir")
    return EvalOptions(tuple(metrics), frames, paired_frames, hw, None if i3d is None else str(i3d), i3d_bn_eps,
                       i3d_size, fvd_protocol, runs, clip, seed, batch_size, workers,
                       None if cache_dir is None else str(cache_dir), geometry,
                       None if videomae is None else str(videomae), fvd_resolution, reference)


def _check_reference(real, metrics: list[str], protocol: str, frames: int | None, resolution: int | None):
    """``--real`` given as a cd-fvd statistics file: read it and check it fits the other options."""
    from eval import fvd

    if metrics != ["fvd"]:
        raise UserError(f"--real {real} holds feature statistics, not videos: only --metrics fvd can use it")
    if not fvd.PROTOCOLS[protocol].loader_resolution:
        raise UserError(f"--real {real}: statistics of the cd-fvd package need --fvd-protocol cd-fvd (VideoMAE-v2) "
                        "or cd-fvd-i3d")
    try:
        reference = fvd.load_reference_stats(real)
    except ValueError as e:
        raise UserError(str(e)) from None
    model = "videomae" if fvd.PROTOCOLS[protocol].detector == "videomae" else "i3d"
    for what, option, mine, theirs in (("model", "--fvd-protocol", model, reference.model),
                                       ("clip length", "--frames", frames, reference.frames),
                                       ("resolution", "--fvd-resolution", resolution, reference.resolution)):
        if mine is not None and theirs is not None and mine != theirs:
            raise UserError(f"--real {real}: its name says {what} {theirs}, and {option} gives {mine}")
    return reference


def _accelerator():
    """An Accelerator only when launched on several processes (``accelerate launch``), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator()


def is_main_process() -> bool:
    """True but in the other processes of a multi-process launch (where only the main one reports)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    from accelerate import PartialState

    return PartialState().is_main_process


# ------------------------------------------------------------------------------------------ evaluate

def evaluate(real: str | Path, fake: str | Path, *, metrics: str | Iterable[str] = DEFAULT_METRICS,
             frames: int | None = None, paired_frames: int | None = None, size: int | Sequence[int] | None = None,
             i3d: str | Path | None = None, i3d_bn_eps: float | None = None, i3d_size: int | None = None,
             fvd_protocol: str = "cascadev", runs: int = 1, clip: str | None = None, seed: int = 0,
             batch_size: int = 8, workers: int | None = None, cache_dir: str | Path | None = None,
             geometry: str = "stored", videomae: str | Path | None = None, fvd_resolution: int | None = None,
             device: str | None = None, progress: bool = True) -> dict:
    """Score the videos of ``fake`` against those of ``real`` (folders, or text files listing one video per line).

    metrics: names of ``eval.metric_names.METRICS`` (case-insensitive; a comma-separated string or a list).
    frames: the FVD clip length (default 16); paired_frames: frames compared per pair (default ``frames``, 0 = all).
    size: resize every video to (H, W) or N x N first. geometry: "stored" (default) scores the frames as stored in the
    files, as the reference tools do; "display" as players show them (pixel aspect stretched, rotation applied).
    i3d, i3d_bn_eps, i3d_size, fvd_protocol: the FVD detector
    and how clips reach it (``eval.fvd``); runs, clip, seed: clip draws; cache_dir: cache of the real set's FVD
    features. device: default cuda when available. Under ``accelerate launch`` the pairs are split between the
    processes and every process returns the whole report.

    Returns the report: {"real", "fake", "settings", "conventions", "counts", "skipped", "results" (per metric:
    {"mean", ...} or {"skipped": reason}), "per_video"}. Raises ``UserError`` on bad options or unusable sets."""
    from cascadev.pipelines.runtime import resolve_device
    from eval import fvd
    from eval.metrics import LPIPS_MIN_SIDE, LpipsUnavailable, load_lpips

    opts = check_options(metrics=metrics, frames=frames, paired_frames=paired_frames, size=size, i3d=i3d,
                         i3d_bn_eps=i3d_bn_eps, i3d_size=i3d_size, fvd_protocol=fvd_protocol, runs=runs, clip=clip,
                         seed=seed, batch_size=batch_size, workers=workers, cache_dir=cache_dir, geometry=geometry,
                         videomae=videomae, fvd_resolution=fvd_resolution, real=real)
    metrics, size, geometry = list(opts.metrics), opts.size, opts.geometry
    paired = [m for m in metrics if m in PAIRED_METRICS]
    accelerator = _accelerator()
    main = accelerator is None or accelerator.is_main_process
    show_progress = main and progress
    device = accelerator.device if accelerator else resolve_device(device)

    # Load what can fail before reading any video: the detector is an error, LPIPS a skip.
    extractor = lpips = None
    results: dict[str, dict] = {}
    if "fvd" in metrics:
        try:
            detector = (opts.videomae if fvd.PROTOCOLS[opts.fvd_protocol].detector == "videomae"
                        else opts.i3d or fvd.default_detector_path())
            extractor = fvd.load_extractor(detector, device, opts.i3d_bn_eps, protocol=opts.fvd_protocol)
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
    single = [is_single_video(real), is_single_video(fake)]
    if any(single) and not all(single):
        given, other = ("--real", "--fake") if single[0] else ("--fake", "--real")
        raise UserError(f"{given} is one video file and {other} is not: give two video files (one pair) or two "
                        "folders / list files")
    reference = opts.reference              # --real is a statistics file: no real videos
    real_videos = {} if reference is not None else scan(str(real), "real", skips, geometry)
    fake_videos = scan(str(fake), "fake", skips, geometry)
    if not real_videos and reference is None:
        raise UserError(f"--real {real}: no readable videos")
    if not fake_videos:
        raise UserError(f"--fake {fake}: no readable videos")
    if all(single):                 # one pair, whatever the two file names
        (f,), (r,) = fake_videos.values(), real_videos.values()
        real_videos = {f.name: replace(r, name=f.name)}

    rows = []
    pairs = []
    if paired:
        pairs = pair_up(real_videos, fake_videos, opts.paired_frames, size is not None, skips, geometry)
        if not pairs:
            for s in skips:
                print(f"skipped {s.set} {s.file}: {s.reason}")
            short = [s for s in skips if s.reason.startswith("too short for paired metrics")]
            hint = (f"; {len(short)} video(s) have fewer than --paired-frames {opts.paired_frames} frames (its default "
                    "is --frames): pass --paired-frames 0 to compare all frames, or a smaller N" if short else "")
            raise UserError(f"no pairs: none of the {len(fake_videos)} fake video(s) has a real video of the same "
                            f"name and enough frames (skips listed above){hint}")
        side = min(size) if size else min(min(r.height, r.width) for r, _ in pairs)
        if lpips is not None and side < LPIPS_MIN_SIDE:
            lpips = None
            results["lpips"] = {"skipped": f"LPIPS skipped: frames of {side} px are smaller than the "
                                           f"{LPIPS_MIN_SIDE} px AlexNet needs"}
        mine = pairs if accelerator is None else pairs[accelerator.process_index::accelerator.num_processes]
        rows = paired_metrics(mine, paired, opts.paired_frames, size, device, lpips, skips, show_progress, geometry)
        if accelerator is not None:
            from accelerate.utils import gather_object

            rows = sorted(gather_object(rows), key=lambda row: row["name"])
            skips = list(dict.fromkeys(gather_object(skips)))


    if extractor is not None:
        results["fvd"] = fvd_of_sets(real_videos, fake_videos, extractor, frames=opts.frames, i3d_size=opts.i3d_size,
                                     size=size, protocol=opts.fvd_protocol, runs=opts.runs, clip=opts.clip,
                                     seed=opts.seed, batch_size=opts.batch_size, workers=opts.workers,
                                     cache_dir=opts.cache_dir, accelerator=accelerator, skips=skips,
                                     show_progress=show_progress, geometry=geometry,
                                     resolution=opts.fvd_resolution, reference=reference)
        if len(metrics) == 1 and "skipped" in results["fvd"]:
            raise UserError(results["fvd"]["skipped"])

    settings = {"metrics": metrics, "frames": opts.frames, "paired_frames": opts.paired_frames,
                "size": list(size) if size else None, "device": str(device), "runs": opts.runs,
                "seed": opts.seed, "fvd_protocol": opts.fvd_protocol, "geometry": geometry,
                **({"fvd_resolution": opts.fvd_resolution, "videomae": opts.videomae}
                   if fvd.PROTOCOLS[opts.fvd_protocol].loader_resolution else {})}
    n_real = reference.count if reference is not None else len(real_videos)
    return build_report(real, fake, metrics, rows, results, settings, skips, n_real, len(fake_videos))


def build_report(real: str | Path, fake: str | Path, metrics: Sequence[str], rows: list[dict], results: dict,
                 settings: dict, skips: Sequence[Skip | dict], n_real: int, n_fake: int) -> dict:
    """The report ``evaluate`` returns (``cascadev eval --json``), from per-video rows of paired scores (as
    ``paired_metrics`` makes them), the results already known (FVD, skips) and ``settings`` (with "geometry").
    ``bench-recon`` builds its per-method reports with it too, so both commands write one format."""
    from eval.metrics import CONVENTIONS, GEOMETRY_TEXT, PAIRED_PROTOCOLS

    geometry = settings["geometry"]
    paired = [m for m in metrics if m in PAIRED_METRICS]
    results = dict(results)
    for m in paired:                 # every number says how it was made
        if m not in results:
            results[m] = _summary(rows, m) if rows else {"skipped": "no pair could be read"}
        if "skipped" not in results[m]:
            results[m] = {**results[m], "protocol": PAIRED_PROTOCOLS[m], "geometry": geometry}
    conventions = {m: f"{CONVENTIONS[m]}; {GEOMETRY_TEXT[geometry]}" for m in paired}
    if "fvd" in metrics and "skipped" not in results.get("fvd", {"skipped": ""}):
        r = results["fvd"]
        conventions["fvd"] = (f"{r['detector']}; protocol {r['protocol']} ({r['protocol_source']}); "
                              f"clips: {r['clip']}; input: {r['input']}; N = {r['n_real']} real / "
                              f"{r['n_fake']} fake; {r['statistics']}; mean and std (N-1) over {len(r['runs'])} run(s)")
    return {
        "real": str(real),
        "fake": str(fake),
        "settings": settings,
        "conventions": conventions,
        "counts": {"real": n_real, "fake": n_fake, "pairs": len(rows)},
        "skipped": [s if isinstance(s, dict) else s.__dict__ for s in skips],
        "results": {m: results[m] for m in metrics},
        "per_video": rows,
    }
