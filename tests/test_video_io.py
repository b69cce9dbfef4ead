"""cascadev.video_io: round trips, frame selection, other containers, and one-line errors."""

from __future__ import annotations

import math

import av
import numpy as np
import pytest
import torch
from torchvision.io import decode_png, read_file

from cascadev.synthetic import make_clip
from cascadev.video_io import (VideoInfo, VideoReadError, iter_video, read_video, video_info, write_png_strip,
                               write_video)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [-1, 1] tensors (peak-to-peak 2)."""
    mse = torch.mean((a - b) ** 2).item()
    return 10 * math.log10(4.0 / mse)


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    return make_clip(seed=1, frames=10, height=64, width=96)[None]           # 1 3 t h w


@pytest.fixture(scope="module")
def mp4(tmp_path_factory, clip) -> str:
    path = tmp_path_factory.mktemp("io") / "clip.mp4"
    write_video(path, clip, fps=8, crf=12)
    return str(path)


def _write_with_pyav(path, clip: torch.Tensor, codec: str, pix_fmt: str) -> None:
    frames = ((clip[0].permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], pix_fmt
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")))
        container.mux(stream.encode())


def test_round_trip_mp4(mp4, clip):
    video = read_video(mp4)
    assert video.shape == (1, 3, 10, 64, 96)
    assert video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    # yuv420p halves chroma resolution: this small clip with 1-px coloured edges tops out near
    # 27 dB even at crf 0; a smooth clip shows the codec itself is near-transparent.
    assert psnr(video, clip) > 25
    assert video_info(mp4) == VideoInfo(frames=10, fps=8.0, height=64, width=96)


def test_round_trip_smooth_clip_is_near_lossless(tmp_path):
    smooth = make_clip(seed=2, frames=4, height=64, width=64, kind="gradient")
    write_video(tmp_path / "smooth.mp4", smooth)
    assert psnr(read_video(tmp_path / "smooth.mp4")[0], smooth) > 38


def test_write_accepts_unbatched_and_leaves_no_temp_files(tmp_path, clip):
    write_video(tmp_path / "a.mp4", clip[0], fps=12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]
    assert video_info(tmp_path / "a.mp4").fps == 12.0
    assert read_video(tmp_path / "a.mp4").shape == (1, 3, 10, 64, 96)


def test_start_stride_num_frames(mp4):
    full = read_video(mp4)
    assert torch.equal(read_video(mp4, start=2, stride=3), full[:, :, 2::3])          # frames 2, 5, 8
    assert torch.equal(read_video(mp4, num_frames=2, start=1, stride=4), full[:, :, [1, 5]])
    assert torch.equal(read_video(mp4, num_frames=4), full[:, :, :4])
    assert read_video(mp4, num_frames=50).shape[2] == 10                              # the file ends first
    assert read_video(mp4, start=9).shape[2] == 1


def test_resize(mp4):
    assert read_video(mp4, num_frames=3, size=(32, 40)).shape == (1, 3, 3, 32, 40)
    same = read_video(mp4, num_frames=3, size=(64, 96))
    assert torch.equal(same, read_video(mp4, num_frames=3))


def test_odd_size_is_padded_to_even(tmp_path, clip):
    write_video(tmp_path / "odd.mp4", clip[..., :63, :95])
    info = video_info(tmp_path / "odd.mp4")
    assert (info.height, info.width) == (64, 96)
    assert psnr(read_video(tmp_path / "odd.mp4")[..., :63, :95], clip[..., :63, :95]) > 25


@pytest.mark.parametrize("suffix, codec, pix_fmt", [("mkv", "libx264", "yuv420p"),
                                                    ("webm", "libvpx-vp9", "yuv420p"),
                                                    ("gif", "gif", "rgb8")])
def test_other_containers(tmp_path, clip, suffix, codec, pix_fmt):
    path = tmp_path / f"clip.{suffix}"
    _write_with_pyav(path, clip[:, :, :6], codec, pix_fmt)
    info = video_info(path)
    assert (info.frames, info.height, info.width) == (6, 64, 96)
    video = read_video(path, start=1, stride=2)
    assert video.shape == (1, 3, 3, 64, 96)
    assert psnr(video, clip[:, :, 1:6:2]) > (15 if suffix == "gif" else 25)       # gif: 256-colour palette


def _one_line_error(path, **kwargs) -> str:
    with pytest.raises(VideoReadError) as info:
        read_video(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_read_errors_are_one_line(tmp_path, mp4):
    assert "not found" in _one_line_error(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").touch()
    assert "empty" in _one_line_error(tmp_path / "empty.mp4")
    (tmp_path / "notes.mp4").write_text("this is not a video\n" * 20)
    assert "not a readable video" in _one_line_error(tmp_path / "notes.mp4")
    assert "not a file" in _one_line_error(tmp_path)
    assert "past the last frame" in _one_line_error(mp4, start=10)
    with pytest.raises(VideoReadError, match="notes.mp4: not a readable video file"):
        video_info(tmp_path / "notes.mp4")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(open(mp4, "rb").read()[:200])
    assert "not a readable video" in _one_line_error(truncated)
    assert issubclass(VideoReadError, ValueError)


def test_read_argument_errors(mp4):
    for kwargs, says in (({"start": -1}, "got start=-1,"), ({"stride": 0}, "stride=0,"),
                         ({"num_frames": 0}, "num_frames=0"), ({"size": (0, 8)}, r"positive sides, got \(0, 8\)")):
        with pytest.raises(ValueError, match=says) as info:
            read_video(mp4, **kwargs)
        assert type(info.value) is ValueError          # a bad argument, not a VideoReadError of the file


def test_write_rejects_bad_tensors(tmp_path, clip):
    bad = clip.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    cases = {
        "NaN": bad,
        "channels last": clip[0].permute(1, 2, 3, 0),
        "batch size 1": torch.cat([clip, clip]),
        "float": (clip * 100).to(torch.int16),
        "no frames": clip[:, :, :0],
    }
    for expected, video in cases.items():
        with pytest.raises(ValueError, match=expected):
            write_video(tmp_path / "bad.mp4", video)
    assert list(tmp_path.iterdir()) == []                    # nothing (not even a temp file) left behind


def test_png_strip(tmp_path, clip):
    write_png_strip(tmp_path / "strip.png", clip, max_frames=4)
    image = decode_png(read_file(str(tmp_path / "strip.png")))
    assert image.shape == (3, 64, 4 * 96)
    expected = ((clip[0, :, 9] + 1) * 127.5).round().to(torch.uint8)              # last tile = last frame
    assert torch.equal(image[:, :, 3 * 96:], expected)
    write_png_strip(tmp_path / "short.png", clip[:, :, :2], max_frames=8)
    assert decode_png(read_file(str(tmp_path / "short.png"))).shape == (3, 64, 2 * 96)


def test_pieces_in_and_out_match_the_whole(tmp_path, clip):
    write_video(tmp_path / "whole.mp4", clip)
    write_video(tmp_path / "pieces.mp4", (clip[:, :, i:i + 3] for i in range(0, 10, 3)))
    whole, pieced = read_video(tmp_path / "whole.mp4"), read_video(tmp_path / "pieces.mp4")
    assert pieced.shape == whole.shape == clip.shape          # x264 itself varies run to run: compare to the clip
    assert psnr(pieced, clip) > 25 and abs(psnr(pieced, clip) - psnr(whole, clip)) < 1
    pieces = list(iter_video(tmp_path / "whole.mp4", 4, num_frames=9, start=1))
    assert [p.shape[2] for p in pieces] == [4, 4, 1]
    assert torch.equal(torch.cat(pieces, dim=2), whole[:, :, 1:10])
    # a failing piece leaves no file behind; pieces of another size are refused
    def broken():
        yield clip[:, :, :2]
        raise RuntimeError("decoder failed")
    with pytest.raises(RuntimeError, match="decoder failed"):
        write_video(tmp_path / "broken.mp4", broken())
    with pytest.raises(ValueError, match="a piece of"):
        write_video(tmp_path / "sizes.mp4", [clip[:, :, :2], clip[:, :, :2, :16]])
    with pytest.raises(ValueError, match="no frames"):
        write_video(tmp_path / "empty.mp4", [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pieces.mp4", "whole.mp4"]


def _write_raw(path, clip, rotation=0, sample_aspect=None):
    """A clip written with PyAV directly, with a display rotation and / or non-square pixels."""
    frames = ((clip[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()   # t h w c
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        stream.options = {"crf": "12"}
        if sample_aspect:
            stream.codec_context.sample_aspect_ratio = sample_aspect
        if rotation:
            stream.set_display_rotation(rotation)
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_rotation_and_pixel_aspect_are_applied_as_players_show_them(tmp_path, clip):
    from fractions import Fraction
    _write_raw(tmp_path / "plain.mp4", clip)
    _write_raw(tmp_path / "turned.mp4", clip, rotation=90)
    _write_raw(tmp_path / "wide.mp4", clip, sample_aspect=Fraction(2, 1))
    plain, turned = read_video(tmp_path / "plain.mp4"), read_video(tmp_path / "turned.mp4")
    assert turned.shape[-2:] == (96, 64) and (video_info(tmp_path / "turned.mp4").height,
                                              video_info(tmp_path / "turned.mp4").width) == (96, 64)
    rotated = torch.rot90(plain, 1, dims=(-2, -1))                          # 90 degrees counter-clockwise
    assert (turned - rotated).abs().mean() < 0.02 < (turned - rotated.flip(-1, -2)).abs().mean()
    wide = read_video(tmp_path / "wide.mp4")
    assert wide.shape[-2:] == (64, 192) and video_info(tmp_path / "wide.mp4").width == 192


def test_a_truncated_stream_says_how_many_frames_it_had(tmp_path, clip, caplog):
    data = (tmp_path / "whole.mp4")
    write_video(data, clip)
    raw = data.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(raw[: int(len(raw) * 0.7)])
    try:
        video = read_video(tmp_path / "cut.mp4")
    except VideoReadError as e:                                # cut inside the index: refused in one line
        assert "cut.mp4" in str(e)
        return
    assert video.shape[2] < 10 and "truncated" in caplog.text
