"""Training data: video clips, images and cached latents, with a resumable, deterministic order.

Sources (``DataConfig.videos`` / ``images``): a folder (searched recursively), a ``.txt`` list of
paths (one per line, as the release's ``video_list``), a ``.csv`` with a ``path`` column, or a
``.jsonl`` / ``.json`` of objects with ``path``; an optional ``caption`` is carried along. Relative
paths in a list are relative to the list file's folder.

A clip is ``num_frames`` frames ``frame_stride`` apart from a start drawn at random (``start_jitter``),
resized keeping the aspect ratio so it covers ``height x width`` (or not, with ``resize`` off: crops
at the file's own resolution, e.g. to train on details of larger frames), then cropped (random or centre)
and flipped horizontally with ``flip_prob``. Items are dicts: ``video`` (3, T, H, W) in [-1, 1],
``caption`` (str), ``skipped`` (files passed over to produce this item). Images are (3, 1, H, W).

Randomness: every item takes its own ``torch.Generator`` seeded from (seed, position in the
stream), and ``ResumableSampler`` yields (index, seed) pairs in a per-epoch permutation, sharded by
rank. So the data a run sees depends only on the seed and the step, not on the number of
workers, and a resumed run continues the exact stream (``start``).

Unreadable or too-short files are skipped: the item is replaced by another drawn from the same
generator, a warning names the file once per worker, and ``skipped`` counts it so the trainer can
log the total. Only a dataset in which nothing can be read raises.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from cascadev.video_io import VIDEO_EXTENSIONS, VideoReadError, read_video, video_info

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_ATTEMPTS = 64  # replacement draws before concluding that nothing in the dataset can be read


@dataclass(frozen=True)
class DataConfig:
    """Where clips come from and how they are cut. Defaults are the release's (8 frames, stride 4, 1024 px)."""

    videos: str = ""                  # folder, .txt list, .csv or .jsonl/.json with `path` (+ `caption`)
    images: str | None = None         # optional image folder/list for joint image-video training
    image_prob: float = 0.1           # fraction of steps trained as images (release: joint_training = 0.1)
    latents: str | None = None        # a cache written by cascadev.training.cache_latents: train the DiT from it
    val_videos: str | None = None     # held-out clips; None holds out the last `val_count` of `videos`
    val_count: int = 2
    num_frames: int = 8
    frame_stride: int = 4
    start_jitter: bool = True         # random first frame (else frame 0)
    height: int = 1024
    width: int = 1024
    crop: Literal["random", "center"] = "random"
    resize: bool = True               # cover-resize to height x width before cropping; False: crop at native size
    flip_prob: float = 0.5
    batch_size: int = 4               # per process
    image_batch_size: int = 0         # images per image batch; 0 = batch_size * num_frames
    num_workers: int = 4

    def __post_init__(self):
        if self.num_frames < 1 or self.frame_stride < 1:
            raise ValueError(f"num_frames and frame_stride must be >= 1, got {self.num_frames}, {self.frame_stride}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"height and width must be >= 1, got {self.height}, {self.width}")
        if not 0 <= self.image_prob <= 1 or not 0 <= self.flip_prob <= 1:
            raise ValueError(f"image_prob and flip_prob must be in [0, 1], got {self.image_prob}, {self.flip_prob}")
        if self.batch_size < 1 or self.num_workers < 0 or self.val_count < 0 or self.image_batch_size < 0:
            raise ValueError("batch_size must be >= 1; num_workers, val_count and image_batch_size >= 0")

    @property
    def images_per_batch(self) -> int:
        """Images in an image batch: ``image_batch_size``, or as many as a video batch has frames."""
        return self.image_batch_size or self.batch_size * self.num_frames

    @property
    def span(self) -> int:
        """Frames of the source a clip covers: (num_frames - 1) * frame_stride + 1."""
        return (self.num_frames - 1) * self.frame_stride + 1


# -- sources ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    path: Path
    caption: str = ""


def list_samples(source: str | Path, extensions: tuple[str, ...] = VIDEO_EXTENSIONS, key: str = "") -> list[Sample]:
    """The files a source names: a folder (recursive, sorted), .txt, .csv, .jsonl or .json list. ``key``: the
    config key that gave ``source`` (e.g. "data.videos"), named in errors."""
    where = f"{key}: " if key else ""
    if not str(source):
        raise ValueError(f"no data source given: set {key or 'data.videos (or data.images)'} to a folder or a list "
                         f"file (--set {key or 'data.videos'}=...)")
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in extensions and p.is_file())
        return [Sample(p) for p in files]
    if not source.is_file():
        raise FileNotFoundError(f"{where}data source {source} not found (expected a folder or a "
                                ".txt/.csv/.jsonl/.json list)")
    suffix = source.suffix.lower()
    try:       # one line for what a list cannot be: unreadable, binary (a video given as the list), broken JSON
        if suffix == ".csv":
            with open(source, newline="") as f:
                rows = list(csv.DictReader(f))
        elif suffix == ".jsonl":
            rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
        elif suffix == ".json":
            rows = json.loads(source.read_text())
        else:  # the release's plain list: one path per line
            rows = [{"path": line.strip()} for line in source.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise OSError(f"{where}cannot read data source {source}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{where}{source} is not a list of files (binary data, not text): give a folder of "
                         "videos or a .txt/.csv/.jsonl/.json list") from None
    except (json.JSONDecodeError, csv.Error) as e:
        raise ValueError(f"{where}{source}: not a valid {suffix[1:]} list ({e})") from None
    except (ValueError, RecursionError) as e:      # a number of 5000 digits, arrays nested 100000 deep
        raise ValueError(f"{where}{source}: not a valid {suffix[1:]} list ({type(e).__name__})") from None
    if suffix == ".csv" and rows and "path" not in rows[0]:
        raise ValueError(f"{source}: a CSV source needs a 'path' column, found {list(rows[0])}")
    if not isinstance(rows, list):
        raise ValueError(f"{where}{source}: expected a list of objects with 'path', got a {type(rows).__name__}")
    samples = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not row.get("path"):
            raise ValueError(f"{source}: entry {i} has no 'path': {str(row)[:200]}")
        if not isinstance(row["path"], str) or not isinstance(row.get("caption") or "", str):
            wrong = "path" if not isinstance(row["path"], str) else "caption"
            raise ValueError(f"{source}: entry {i}'s {wrong} is a {type(row[wrong]).__name__}, expected text")
        path = Path(row["path"])
        samples.append(Sample(path if path.is_absolute() else source.parent / path, row.get("caption") or ""))
    return samples


def split_validation(config: DataConfig) -> tuple[list[Sample], list[Sample]]:
    """(train, validation) samples: ``val_videos`` if given, else the last ``val_count`` of ``videos``."""
    samples = list_samples(config.videos, key="data.videos")
    if not samples:
        raise ValueError(f"data.videos: no videos in {config.videos}")
    if config.val_videos:
        return samples, list_samples(config.val_videos, key="data.val_videos")
    if config.val_count >= len(samples):
        raise ValueError(f"{config.videos}: {len(samples)} video(s) cannot spare val_count={config.val_count} "
                         "for validation; add files, lower data.val_count or set data.val_videos")
    cut = len(samples) - config.val_count
    return samples[:cut], samples[cut:]


# -- geometry --------------------------------------------------------------------------------------

def cover_size(height: int, width: int, out_height: int, out_width: int) -> tuple[int, int]:
    """Smallest (H, W) with the aspect ratio of (height, width) that covers (out_height, out_width)."""
    scale = max(out_height / height, out_width / width)
    return max(out_height, round(height * scale)), max(out_width, round(width * scale))


def load_size(path: Path, height: int, width: int, config: DataConfig) -> tuple[int, int]:
    """The size a (height x width) file is brought to before cropping: covering the configured size, or its own
    size with ``resize`` off (then it must be at least as large as the crop)."""
    if config.resize:
        return cover_size(height, width, config.height, config.width)
    if height < config.height or width < config.width:
        raise VideoReadError(f"{path}: {height}x{width} is smaller than the {config.height}x{config.width} "
                             f"crop (data.resize is false)")
    return height, width


def crop_offsets(size: tuple[int, int], out: tuple[int, int], mode: str, g: torch.Generator) -> tuple[int, int]:
    """Top-left corner of an ``out`` crop in ``size``: uniform at random, or centred."""
    (H, W), (h, w) = size, out
    if mode == "center":
        return (H - h) // 2, (W - w) // 2
    return int(torch.randint(H - h + 1, (1,), generator=g)), int(torch.randint(W - w + 1, (1,), generator=g))


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# -- datasets --------------------------------------------------------------------------------------

LOAD_ERRORS = (VideoReadError, OSError, ValueError, RuntimeError)    # what makes a file skipped, not fatal


class _SkippingDataset(Dataset):
    """Items indexed by (index, seed); a file that fails to load is replaced by another and counted."""

    kind = "file"

    def __init__(self, samples: list[Sample]):
        if not samples:
            raise ValueError(f"no {self.kind}s to train on (empty source)")
        self.samples = samples
        self._bad: set[int] = set()   # per worker: files already reported

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, sample: Sample, g: torch.Generator) -> dict:
        raise NotImplementedError

    def check_loadable(self) -> None:
        """Load samples in order until one works: a source where nothing loads is one line before the first step
        (not a worker's traceback after every file was tried)."""
        reasons = []
        for index, sample in enumerate(self.samples):
            try:
                self.load(sample, torch.Generator().manual_seed(index_seed(index)))
                return
            except LOAD_ERRORS as e:
                reasons.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise ValueError(f"none of the {len(self.samples)} {self.kind}(s) could be loaded, e.g. {reasons[0]}")

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, index_seed(key))
        g = torch.Generator().manual_seed(seed)
        for skipped in range(MAX_ATTEMPTS):
            sample = self.samples[index]
            try:
                item = self.load(sample, g)
            except LOAD_ERRORS as e:
                if index not in self._bad:
                    self._bad.add(index)
                    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                    log.warning("skipping %s %s", self.kind,
                                reason if str(sample.path) in reason else f"{sample.path}: {reason}")
                index = int(torch.randint(len(self.samples), (1,), generator=g))
                continue
            return {"caption": sample.caption, **item, "skipped": skipped}
        raise RuntimeError(f"{MAX_ATTEMPTS} {self.kind}s in a row could not be loaded; "
                           f"last tried {self.samples[index].path}")


def index_seed(index: int) -> int:
    """Seed of an item read by index alone (validation, tests): a fixed function of the index."""
    return mix_seed(0, index)


class VideoDataset(_SkippingDataset):
    """Clips from video files -> {"video": (3, T, H, W) in [-1, 1], "caption", "skipped"}."""

    kind = "video"

    def __init__(self, samples: list[Sample], config: DataConfig, train: bool = True):
        super().__init__(samples)
        self.config, self.train = config, train

    def load(self, sample: Sample, g: torch.Generator) -> dict:
        return {"video": load_clip(sample.path, self.config, g, train=self.train)}


def clip_starts(frames: int, config: DataConfig, clips: int) -> list[int]:
    """``clips`` first frames evenly spaced over a video of ``frames`` frames (the first at 0)."""
    last = frames - config.span
    if last < 0:
        return []
    return sorted({round(i * last / (clips - 1)) for i in range(clips)}) if clips > 1 else [0]


def load_clip(path: Path, config: DataConfig, g: torch.Generator, start: int | None = None,
              train: bool = True) -> torch.Tensor:
    """One clip (3, T, H, W) in [-1, 1] of ``path``: from ``start`` (None: random with start_jitter in
    training, else 0), resized to cover the configured size (unless ``resize`` is off), cropped and flipped
    (``augment``)."""
    info = video_info(path)
    if info.frames < config.span:
        raise VideoReadError(f"{path}: too short ({info.frames} frames; {config.num_frames} frames "
                             f"at stride {config.frame_stride} need {config.span})")
    if start is None:
        jitter = train and config.start_jitter
        start = int(torch.randint(info.frames - config.span + 1, (1,), generator=g)) if jitter else 0
    size = load_size(path, info.height, info.width, config)
    video = read_video(path, config.num_frames, start, config.frame_stride, size=size)[0]   # c t h w
    if video.shape[1] < config.num_frames:   # the header over-counted frames
        raise VideoReadError(f"{path}: too short (decoded {video.shape[1]} of {config.num_frames} frames)")
    return augment(video, config, g, train)


class ImageDataset(_SkippingDataset):
    """Single images as one-frame clips -> {"video": (3, 1, H, W) in [-1, 1], "caption", "skipped"}."""

    kind = "image"

    def __init__(self, samples: list[Sample], config: DataConfig, train: bool = True):
        super().__init__(samples)
        self.config, self.train = config, train

    def load(self, sample: Sample, g: torch.Generator) -> dict:
        from torchvision.io import ImageReadMode, decode_image, read_file

        image = decode_image(read_file(str(sample.path)), mode=ImageReadMode.RGB)        # 3 h w uint8
        c = self.config
        size = load_size(sample.path, image.shape[1], image.shape[2], c)
        image = image.float().div(127.5).sub(1.0)[None]
        if size != tuple(image.shape[-2:]):
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(-1, 1)
        return {"video": augment(image[0][:, None], c, g, self.train)}                   # 3 1 h w


def augment(video: torch.Tensor, config: DataConfig, g: torch.Generator, train: bool) -> torch.Tensor:
    """Crop (3, T, H, W) to the configured size (random or centre) and flip it horizontally with flip_prob."""
    out = (config.height, config.width)
    top, left = crop_offsets(tuple(video.shape[-2:]), out, config.crop if train else "center", g)
    video = video[..., top:top + out[0], left:left + out[1]]
    if train and config.flip_prob > 0 and float(torch.rand(1, generator=g)) < config.flip_prob:
        video = video.flip(-1)
    return video.contiguous()


class LatentDataset(_SkippingDataset):
    """Clips cached by ``cascadev.training.cache_latents``: every tensor of a ``*.safetensors`` file, plus "skipped"."""

    kind = "latent file"

    def __init__(self, folder: str | Path, required: tuple[str, ...] = ()):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"latent cache {folder} not found: write it with "
                                    "python -m cascadev.training.cache_latents")
        super().__init__([Sample(p) for p in sorted(folder.glob("*.safetensors"))])
        self.folder, self.required = folder, required      # the tensors every file must hold

    def load(self, sample: Sample, g: torch.Generator) -> dict:
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(sample.path), framework="pt") as f:
                item = {key: f.get_tensor(key) for key in f.keys()}
                caption = (f.metadata() or {}).get("caption", "")
        except SafetensorError as e:
            raise ValueError(f"{sample.path}: not a readable safetensors file ({e})") from None
        if not all(t.isfinite().all() for t in item.values() if t.is_floating_point()):
            raise ValueError(f"{sample.path}: holds NaN or inf values")
        return {**item, "caption": caption}

    def check_loadable(self) -> None:
        """The tensor names, shapes and dtypes of every file (headers only) against the cache's most common ones:
        files that differ (of another cache, damaged) are left out with a warning, as unreadable ones are when
        they come up; a cache where nothing is left is one line."""
        from collections import Counter

        from safetensors import safe_open

        def layout(path: Path):
            with safe_open(str(path), framework="pt") as f:
                return tuple(sorted((k, tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                                    for k in f.keys()))

        layouts = {}
        for sample in self.samples:
            try:
                layouts[sample.path] = layout(sample.path)
            except Exception as e:      # safetensors' own error type, OSError
                log.warning("skipping %s %s: not a readable safetensors file (%s)", self.kind, sample.path,
                            str(e).splitlines()[0] if str(e) else type(e).__name__)
                continue
            if missing := set(self.required) - {name for name, _, _ in layouts[sample.path]}:
                log.warning("skipping %s %s: it holds no %s", self.kind, sample.path, " or ".join(sorted(missing)))
                del layouts[sample.path]
        if not layouts:
            raise ValueError(f"none of the {len(self.samples)} {self.kind}(s) of {self.folder} could be read")
        common, _ = Counter(layouts.values()).most_common(1)[0]
        for path, found in layouts.items():
            if found != common:
                log.warning("skipping %s %s: it holds %s where the cache's others hold %s", self.kind, path,
                            _describe(found), _describe(common))
        self.samples = [sample for sample in self.samples if layouts.get(sample.path) == common]
        super().check_loadable()


def _describe(layout: tuple) -> str:
    """A cache file's tensors, as ``latent (4, 4, 8, 8) F32, cond ...``."""
    return ", ".join(f"{name} {shape} {dtype}" for name, shape, dtype in layout) or "no tensors"


# -- order and loading -----------------------------------------------------------------------------

class ResumableSampler(Sampler):
    """Endless (index, seed) stream: a fresh permutation of the dataset per epoch, sharded by rank.

    Stream position p counts samples over all ranks; rank r takes p = k * world + r for k >= start.
    Epoch e = p // n is permuted with a generator seeded from (seed, e); the item seed is (seed, p).
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, start: int = 0, shuffle: bool = True):
        self.n, self.seed, self.rank, self.world, self.start, self.shuffle = n, seed, rank, world, start, shuffle

    def __iter__(self) -> Iterator[tuple[int, int]]:
        k, epoch, order = self.start, -1, None
        while True:
            p = k * self.world + self.rank
            if p // self.n != epoch:
                epoch = p // self.n
                order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch)))
                         if self.shuffle else torch.arange(self.n))
            yield int(order[p % self.n]), mix_seed(self.seed, p)
            k += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for its length, which we never ask
        return 2 ** 62


def collate(items: list[dict]) -> dict:
    """Stack tensors, list captions, sum the skip counts."""
    out = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key == "skipped":
            out[key] = sum(values)
        elif isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


def make_loader(dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1, start_batch: int = 0,
                num_workers: int = 0) -> Iterator[dict]:
    """An endless iterator of collated batches, starting after ``start_batch`` batches of this rank."""
    sampler = ResumableSampler(len(dataset), seed, rank, world, start=start_batch * batch_size)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate,
                        persistent_workers=num_workers > 0, prefetch_factor=2 if num_workers > 0 else None)
    return iter(loader)


def image_step(seed: int, step: int, prob: float) -> bool:
    """Whether training step ``step`` is an image step (joint training): a coin fixed by (seed, step)."""
    return prob > 0 and float(torch.rand(1, generator=torch.Generator().manual_seed(mix_seed(seed, step, 1)))) < prob


def image_steps_before(seed: int, step: int, prob: float) -> int:
    """How many of steps 0 .. step-1 were image steps (where a resumed image stream restarts)."""
    return sum(image_step(seed, s, prob) for s in range(step)) if prob > 0 else 0
