"""Video files <-> tensors, with PyAV.

Layout at this boundary: video tensors are (B, 3, T, H, W) or (3, T, H, W), float in [-1, 1], RGB.
Files are whatever FFmpeg can demux (mp4, mkv, webm, gif, ...); we write H.264 mp4 (yuv420p) and
PNG strips. Frames are read in one of two ``GEOMETRIES``: "display" (the default: as players show them, non-square
pixels stretched and the rotation applied; what reconstruct, decode, upscale and training read) or "stored" (the
decoded pixels as they are in the stream; what evaluation scores, as the reference metric tools do).
Every read problem (missing file, not a video, no frames, a start past the end, a
decode failure) is one ``VideoReadError`` line naming the file, never a PyAV traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import torch
import torch.nn.functional as F
from einops import rearrange

from cascadev.weights import atomic_path, atomic_write

log = logging.getLogger("cascadev")

# what training folders and evaluation sets pick up (anything FFmpeg demuxes; these are the usual ones)
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".gif", ".m4v", ".mpg", ".mpeg", ".ts")


GEOMETRIES = ("display", "stored")


class VideoReadError(ValueError):
    """A video file that cannot be read as asked (missing, not a video, too few frames, corrupt)."""


@dataclass(frozen=True)
class VideoInfo:
    frames: int    # number of frames (exact: counted from the demuxed packets when the header lacks it)
    fps: float     # average frame rate (0.0 when the container does not say)
    height: int
    width: int


def _open(path: Path) -> av.container.InputContainer:
    """Open ``path`` for reading and check it has a video stream; errors become VideoReadError."""
    try:
        exists, is_file = path.exists(), path.is_file()
        size = path.stat().st_size if is_file else None
    except (OSError, ValueError) as e:      # a name too long, a NUL byte in it (from a list file)
        raise VideoReadError(f"{str(path)[:200]!r}: not a file name that can be opened ({_reason(e)})") from None
    if not exists:
        raise VideoReadError(f"{path}: file not found")
    if not is_file:
        raise VideoReadError(f"{path}: not a file")
    if size == 0:
        raise VideoReadError(f"{path}: file is empty (0 bytes)")
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoReadError(f"{path}: not a readable video file ({_reason(e)})") from None
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path}: has no video stream")
    return container


def _reason(e: Exception) -> str:
    """One short line out of an FFmpeg/OS error."""
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text.splitlines()[0]


def _count_frames(container: av.container.InputContainer, path: Path) -> int:
    """Frames in the first video stream: the header's count, else the number of demuxed packets."""
    stream = container.streams.video[0]
    if stream.frames:
        return int(stream.frames)
    try:  # mkv/webm often leave the count out; packets are cheap to demux (no decoding)
        return sum(1 for p in container.demux(stream) if p.size)
    except (av.FFmpegError, OSError) as e:
        raise VideoReadError(f"{path}: cannot demux video stream ({_reason(e)})") from None


def video_info(path: str | Path, geometry: str = "display") -> VideoInfo:
    """Frame count, frame rate and the frame size in ``geometry`` ("display": rotation and pixel aspect applied;
    "stored": the stream's own pixels), as ``read_video`` returns frames, of the first video stream of ``path``."""
    path = Path(path)
    _check_geometry(geometry)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        frames = _count_frames(container, path)
    finally:
        container.close()
    shown = next(iter_video(path, 1, 1, geometry=geometry))
    return VideoInfo(frames=frames, fps=float(rate) if rate else 0.0, height=shown.shape[-2], width=shown.shape[-1])


def _check_geometry(geometry: str) -> None:
    if geometry not in GEOMETRIES:
        raise ValueError(f"read_video: geometry must be one of {', '.join(GEOMETRIES)}, got {geometry!r}")


def _as_shown(frame: av.VideoFrame, sample_aspect: float) -> torch.Tensor:
    """A decoded frame as players show it -> (H, W, 3) uint8: non-square pixels stretched to square ones, then
    rotated by the display matrix (``frame.rotation``, degrees counter-clockwise, as ffmpeg's autorotate)."""
    pixels = torch.from_numpy(frame.to_ndarray(format="rgb24"))                          # h w c
    if abs(sample_aspect - 1) > 1e-6:
        h, w = pixels.shape[:2]
        wide = F.interpolate(rearrange(pixels, "h w c -> 1 c h w").float(), size=(h, round(w * sample_aspect)),
                             mode="bilinear", align_corners=False, antialias=True)
        pixels = rearrange(wide, "1 c h w -> h w c").round().clamp(0, 255).to(torch.uint8)
    turns = round((frame.rotation or 0) / 90) % 4
    return torch.rot90(pixels, turns, dims=(0, 1)).contiguous() if turns else pixels


def read_video(path: str | Path, num_frames: int | None = None, start: int = 0, stride: int = 1,
               size: tuple[int, int] | None = None, geometry: str = "display") -> torch.Tensor:
    """Read frames ``start, start + stride, ...`` (at most ``num_frames``) -> (1, 3, T, H, W) in [-1, 1].

    ``geometry``: "display" (default) stretches non-square pixels to square ones and applies the rotation, as
    players show the video; "stored" returns the decoded pixels as stored (no stretch, no rotation).
    ``size`` = (H, W) resizes every frame (bilinear, antialiased); None keeps the file's size.
    Fewer than ``num_frames`` frames are returned when the file ends first; none at all
    (an empty file, or ``start`` past the last frame) is a VideoReadError.
    """
    return torch.cat(list(iter_video(path, None, num_frames, start, stride, size, geometry)), dim=2)


def iter_video(path: str | Path, chunk_frames: int | None, num_frames: int | None = None, start: int = 0,
               stride: int = 1, size: tuple[int, int] | None = None,
               geometry: str = "display") -> Iterator[torch.Tensor]:
    """``read_video`` in pieces of ``chunk_frames`` frames (None: one piece), each (1, 3, t, H, W) in [-1, 1], so a
    long clip never sits in memory whole. Arguments and errors as ``read_video``."""
    path = Path(path)
    if start < 0 or stride < 1 or (num_frames is not None and num_frames < 1):
        raise ValueError(f"read_video: need start >= 0, stride >= 1, num_frames >= 1 or None; "
                         f"got start={start}, stride={stride}, num_frames={num_frames}")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"read_video: size must be (H, W) with positive sides, got {size}")
    if chunk_frames is not None and chunk_frames < 1:
        raise ValueError(f"read_video: chunk_frames must be >= 1 or None, got {chunk_frames}")
    _check_geometry(geometry)
    container = _open(path)
    frames, seen, kept = [], 0, 0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        sample_aspect = float(stream.sample_aspect_ratio or 1) or 1.0
        expected = int(stream.frames or 0)
        for frame in container.decode(stream):
            index, seen = seen, seen + 1
            if index < start or (index - start) % stride:
                continue
            if geometry == "stored":
                frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))    # h w c, uint8
            else:
                frames.append(_as_shown(frame, sample_aspect))                       # h w c, uint8
            kept += 1
            if len(frames) == chunk_frames:
                yield _to_video(frames, size)
                frames = []
            if num_frames is not None and kept == num_frames:
                break
    except (av.FFmpegError, OSError) as e:
        raise VideoReadError(f"{path}: decoding failed after {seen} frame(s) ({_reason(e)})") from None
    finally:
        container.close()
    if not kept:
        if seen == 0:
            raise VideoReadError(f"{path}: contains no decodable video frames")
        raise VideoReadError(f"{path}: has {seen} frame(s), so start={start} is past the last frame")
    if (num_frames is None or kept < num_frames) and expected and seen < expected:
        log.warning("%s: the stream ends after %d of the %d frames its header announces (truncated?)",
                    path, seen, expected)
    if frames:
        yield _to_video(frames, size)


def _to_video(frames: list[torch.Tensor], size: tuple[int, int] | None) -> torch.Tensor:
    """T frames (H, W, 3) uint8 -> (1, 3, T, H, W) in [-1, 1], resized to ``size`` (H, W) when given."""
    video = rearrange(torch.stack(frames), "t h w c -> 1 c t h w").float().div_(127.5).sub_(1.0)
    if size is not None and tuple(size) != tuple(video.shape[-2:]):
        t = video.shape[2]
        video = rearrange(video, "1 c t h w -> t c h w")
        video = F.interpolate(video, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
        video = rearrange(video, "t c h w -> 1 c t h w", t=t).clamp_(-1.0, 1.0)
    return video


def _to_uint8_frames(video: torch.Tensor, who: str) -> torch.Tensor:
    """(1, 3, T, H, W) or (3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8, checking layout and values."""
    if not isinstance(video, torch.Tensor):
        raise ValueError(f"{who}: expected a torch.Tensor, got {type(video).__name__}")
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise ValueError(f"{who}: expected batch size 1 in (B, 3, T, H, W), got shape {tuple(video.shape)}")
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        hint = " (channels last? expected channels first)" if video.ndim == 4 and video.shape[-1] == 3 else ""
        raise ValueError(f"{who}: expected (B=1, 3, T, H, W) or (3, T, H, W), got shape {tuple(video.shape)}{hint}")
    if video.shape[1] == 0:
        raise ValueError(f"{who}: video has no frames (T=0)")
    if not video.is_floating_point():
        raise ValueError(f"{who}: expected a float tensor in [-1, 1], got {video.dtype}")
    if not torch.isfinite(video).all():
        raise ValueError(f"{who}: video contains NaN or inf values")
    video = video.detach().float().cpu()
    video = ((video.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return rearrange(video, "c t h w -> t h w c")


def write_video(path: str | Path, video: torch.Tensor | Iterable[torch.Tensor], fps: float = 8, crf: int = 18) -> None:
    """Write (1, 3, T, H, W) or (3, T, H, W) in [-1, 1] as H.264 (.mp4, .mov, .mkv) or VP9 (.webm), yuv420p, ``crf``
    quality; any other extension is refused (``check_video_output``). ``video`` may also
    be an iterable of such pieces of one clip, written as they come (``VideoWriter``).

    yuv420p needs even sides: an odd height or width is padded by one replicated row/column.
    The file is written to a temporary name beside ``path`` and renamed, so readers never see
    half a file (nor any file, if the pieces stop with an error).
    """
    with VideoWriter(path, fps, crf) as out:
        for piece in [video] if isinstance(video, torch.Tensor) else video:
            out.write(piece)


# output suffix -> (container, encoder): H.264 where the container holds it, VP9 in WebM
CONTAINERS = {".mp4": ("mp4", "libx264"), ".mov": ("mov", "libx264"), ".mkv": ("matroska", "libx264"),
              ".webm": ("webm", "libvpx-vp9")}


def output_paths(output: str | Path, n: int) -> list[Path]:
    """Where a command writes ``n`` videos: OUT.mp4 for one; OUT_0.mp4, OUT_1.mp4, ... for several."""
    out = Path(output)
    return [out] if n == 1 else [out.with_name(f"{out.stem}_{k}{out.suffix}") for k in range(n)]


# kernel file systems: mounted folders that take no ordinary files (a write there fails, or worse, means something)
SPECIAL_FILE_SYSTEMS = {"proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "configfs",
                        "bpf", "pstore", "efivarfs", "fusectl", "binfmt_misc", "mqueue", "devpts"}


def _special_file_system(folder: Path) -> str | None:
    """What is wrong with writing in ``folder`` when it is on a kernel file system (Linux's mount table), or None."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    folder, best = folder.resolve(), ("", None)
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (folder == Path(point) or Path(point) in folder.parents) and len(point) > len(best[0]):
            best = (point, fields[2])
    if best[1] not in SPECIAL_FILE_SYSTEMS:
        return None
    return f"{folder} is on a {best[1]} file system (the kernel's), which takes no files: write somewhere else"


def _probe(folder: Path) -> str | None:
    """Why no file can be made in the existing ``folder`` (by making and removing one, named as our temp files are:
    ``access()`` says yes to root everywhere, /proc and /sys included), or None."""
    from cascadev.weights import temp_prefix

    if special := _special_file_system(folder):
        return special
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=temp_prefix(Path("probe")), suffix=".tmp")
    except OSError as e:
        return f"cannot create files in {folder} ({(e.strerror or type(e).__name__).lower()})"
    os.close(fd)
    with contextlib.suppress(OSError):
        os.remove(probe)
    return None


def _unwritable(folder: Path) -> str | None:
    """Why no file can be written in ``folder`` (its missing parts made first, as ``atomic_path`` does), or None.
    Several processes of one launch may check the same folder at once, each making and removing its missing part: a
    check whose folder vanished under it (another process removed what it had made) is made anew."""
    for _ in range(5):
        problem, probed = _unwritable_once(folder)
        if problem is None or probed is None or probed.exists():
            return problem
    return problem


def _unwritable_once(folder: Path) -> tuple[str | None, Path | None]:
    """``_unwritable``'s check, once: (why not, or None; the folder a file was tried in, if one was)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder", None
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"no permission to write in {existing}", None
    if existing == folder:
        return _probe(folder), folder
    # make the first missing folder, try a file in it, and remove both
    first = folder
    while first.parent != existing:
        first = first.parent
    if special := _special_file_system(existing):
        return special, None
    try:
        first.mkdir()
    except FileExistsError:        # another process of this run made it meanwhile
        return (_probe(first), first) if first.is_dir() else (f"{first} is a file, not a folder", first)
    except OSError as e:
        return f"cannot create the folder {first} ({(e.strerror or type(e).__name__).lower()})", None
    problem = _probe(first)
    with contextlib.suppress(OSError):
        first.rmdir()
    return problem, None


def check_output_folder(folder: str | Path, option: str) -> Path:
    """A folder to write in that exists or can be made, checked before any compute: one line naming what is wrong."""
    folder = Path(folder)
    if problem := _unwritable(folder):
        raise ValueError(f"{option} {folder}: {problem}")
    return folder


def check_output_file(path: str | Path, option: str, example: str) -> Path:
    """A file to write at the end (its missing folders made then), checked as ``check_output_folder``; ``example``:
    a file name to suggest when ``path`` is a folder."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a directory; give a file name (e.g. {path / example})")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{option} {path}: no permission to overwrite it")
    if problem := _unwritable(path.parent):
        raise ValueError(f"{option} {path}: {problem}")
    return path


def _video_name(path: str | Path, option: str) -> Path:
    """A file name a video can be written to: not a folder, a known container, not below a file (stat calls only)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a directory; give a file name (e.g. {path / 'out.mp4'})")
    if path.suffix.lower() not in CONTAINERS:
        raise ValueError(f"{option} {path}: cannot write {path.suffix or 'a file without extension'}; "
                         f"use one of {', '.join(CONTAINERS)}")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"{option} {path}: {path.parent} is a file, not a folder")
    return path


def check_video_output(path: str | Path, option: str = "-o") -> Path:
    """An output video path that can be written, checked before any compute: one line naming what is wrong."""
    return check_output_file(_video_name(path, option), option, "out.mp4")


class VideoWriter:
    """A video (the container and codec its extension names, ``CONTAINERS``) written piece by piece, so a long
    clip never sits in memory whole::

        with VideoWriter("out.mp4", fps=8) as out:
            for piece in pipe.decode_pieces(latents):   # (1, 3, t, H, W) in [-1, 1]
                out.write(piece)

    The file appears, atomically, when the block ends without error.
    """

    def __init__(self, path: str | Path, fps: float = 8, crf: int = 18):
        if fps <= 0:
            raise ValueError(f"write_video: fps must be positive, got {fps}")
        # the name only: the commands check writability up front, and a probe here (making and removing a missing
        # folder) would race with other processes writing beside it (bench-recon's ranks)
        self.path, self.rate, self.crf = _video_name(path, "write_video:"), Fraction(fps).limit_denominator(1001), crf
        self.container_format, self.codec = CONTAINERS[self.path.suffix.lower()]
        self.stream, self.frames = None, 0

    def __enter__(self) -> "VideoWriter":
        self._files = ExitStack()      # closed in reverse: the container first, then the rename
        tmp = self._files.enter_context(atomic_path(self.path))
        self.container = self._files.enter_context(av.open(tmp, mode="w", format=self.container_format))
        return self

    def write(self, video: torch.Tensor) -> None:
        """Append (1, 3, t, H, W) or (3, t, H, W) in [-1, 1]; every piece has the first one's size."""
        frames = _even_sides(_to_uint8_frames(video, "write_video"))                    # t h w c
        if self.stream is None:
            self.stream = self.container.add_stream(self.codec, rate=self.rate)
            self.stream.height, self.stream.width = frames.shape[1], frames.shape[2]
            self.stream.pix_fmt = "yuv420p"
            self.stream.options = {"crf": str(self.crf), **({"b:v": "0"} if self.codec == "libvpx-vp9" else {})}
        elif (frames.shape[1], frames.shape[2]) != (self.stream.height, self.stream.width):
            raise ValueError(f"write_video: a piece of {frames.shape[2]}x{frames.shape[1]} frames after "
                             f"{self.stream.width}x{self.stream.height} ones")
        for array in frames.numpy():
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = self.frames, 1 / self.rate
            self.container.mux(self.stream.encode(frame))
            self.frames += 1

    def __exit__(self, *exc) -> bool:
        if exc[0] is None:
            try:
                if self.stream is None:
                    raise ValueError("write_video: video has no frames (T=0)")
                self.container.mux(self.stream.encode())                              # flush the encoder
            except BaseException as e:
                self._files.__exit__(type(e), e, e.__traceback__)
                raise
        return self._files.__exit__(*exc)


def _even_sides(frames: torch.Tensor) -> torch.Tensor:
    """(T, H, W, 3) uint8 padded by one replicated row / column where H / W is odd (yuv420p subsamples chroma 2x2)."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if not (pad_h or pad_w):
        return frames
    frames = rearrange(frames, "t h w c -> t c h w")
    frames = F.pad(frames.float(), (0, pad_w, 0, pad_h), mode="replicate").to(torch.uint8)
    return rearrange(frames, "t c h w -> t h w c")


def write_png_strip(path: str | Path, video: torch.Tensor, max_frames: int = 8) -> None:
    """Frames of (1, 3, T, H, W) or (3, T, H, W) in [-1, 1] side by side as one PNG (3, H, n*W).

    At most ``max_frames`` frames, evenly spaced over the clip (first and last included).
    """
    from torchvision.io import encode_png

    path = Path(path)
    frames = _to_uint8_frames(video, "write_png_strip")                       # t h w c
    if max_frames < 1:
        raise ValueError(f"write_png_strip: max_frames must be >= 1, got {max_frames}")
    t = frames.shape[0]
    index = torch.linspace(0, t - 1, min(t, max_frames)).round().long()
    strip = rearrange(frames[index], "n h w c -> c h (n w)").contiguous()
    data = encode_png(strip).numpy().tobytes()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
