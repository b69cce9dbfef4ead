"""cascadev.synthetic: deterministic procedural clips with real structure."""

from __future__ import annotations

import time

import pytest
import torch

from cascadev.synthetic import KINDS, make_clip, write_clips
from cascadev.video_io import read_video


@pytest.mark.parametrize("kind", KINDS)
def test_shape_range_determinism(kind):
    clip = make_clip(seed=3, frames=5, height=48, width=80, kind=kind)
    assert clip.shape == (3, 5, 48, 80)
    assert clip.dtype == torch.float32
    assert clip.min() >= -1 and clip.max() <= 1
    assert torch.equal(clip, make_clip(seed=3, frames=5, height=48, width=80, kind=kind))
    assert not torch.allclose(clip, make_clip(seed=4, frames=5, height=48, width=80, kind=kind), atol=0.05)


@pytest.mark.parametrize("kind", KINDS)
def test_content_has_structure_and_motion(kind):
    clip = make_clip(seed=0, frames=8, height=64, width=64, kind=kind)
    assert clip.std() > 0.1                                                   # not flat
    motion = (clip[:, 1:] - clip[:, :-1]).abs().mean()
    assert motion > 0.003                                                     # frames differ
    if kind != "gradient":                                                    # textures and edges
        edges = (clip[..., 1:] - clip[..., :-1]).abs()
        assert edges.amax() > 0.3
        assert edges.mean() > 0.01


def test_kinds_differ_and_bad_arguments():
    clips = [make_clip(0, 2, 32, 32, kind) for kind in KINDS]
    for i in range(len(clips)):
        for j in range(i):
            assert not torch.equal(clips[i], clips[j])
    with pytest.raises(ValueError, match="unknown kind"):
        make_clip(0, 2, 32, 32, kind="noise")
    with pytest.raises(ValueError, match=">= 1"):
        make_clip(0, 0, 32, 32)


def test_fast_enough():
    torch.set_num_threads(1)            # CPU time of one thread: not inflated by other jobs on the machine
    make_clip(0, 16, 256, 256)                                                # warm-up (allocator)
    start = time.process_time()
    make_clip(seed=1, frames=16, height=256, width=256)
    assert time.process_time() - start < 2.0                                  # ~0.2 CPU s


def test_write_clips(tmp_path):
    paths = write_clips(tmp_path / "clips", n=2, frames=4, height=32, width=48, seed0=5)
    assert [p.name for p in paths] == ["clip_00005.mp4", "clip_00006.mp4"]
    video = read_video(paths[1])
    assert video.shape == (1, 3, 4, 32, 48)
    assert (video - make_clip(6, 4, 32, 48)[None]).abs().mean() < 0.15        # lossy mp4 of a tiny clip
    assert (video - make_clip(5, 4, 32, 48)[None]).abs().mean() > 0.2         # ... of the right seed
