import json
import logging
from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from cascadev.pipelines.conditioning import (downsample_video, resize_small_from_latent, temporal_upsample,
                                             upsample_condition)
from cascadev.synthetic import make_clip, write_clips
from cascadev.training.data import (DataConfig, ImageDataset, LatentDataset, ResumableSampler, Sample, VideoDataset,
                                    clip_starts, collate, cover_size, image_step, image_steps_before, list_samples,
                                    load_clip, make_loader, split_validation)
from cascadev.video_io import VideoReadError, read_video
from cascadev.weights import save_state_dict


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    write_clips(folder, 3, frames=6, height=40, width=56)
    return folder


def config(**changes) -> DataConfig:
    return DataConfig(**{"num_frames": 3, "frame_stride": 2, "height": 32, "width": 48, "batch_size": 2,
                         "num_workers": 0, **changes})


def test_sources_folder_txt_csv_jsonl_json(clips, tmp_path):
    names = sorted(p.name for p in clips.glob("*.mp4"))
    (clips / "notes.txt").write_text("not a video")
    assert [s.path.name for s in list_samples(clips)] == names                 # folder: videos only, sorted
    (tmp_path / "list.txt").write_text("\n".join(str(clips / n) for n in names) + "\n\n")
    assert [s.path.name for s in list_samples(tmp_path / "list.txt")] == names
    (clips / "rel.txt").write_text(names[0] + "\n")                             # relative to the list's folder
    assert list_samples(clips / "rel.txt")[0].path == clips / names[0]
    (tmp_path / "list.csv").write_text("path,caption\n"
                                       + "".join(f"{clips / n},clip {i}\n" for i, n in enumerate(names)))
    assert [s.caption for s in list_samples(tmp_path / "list.csv")] == ["clip 0", "clip 1", "clip 2"]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps({"path": str(clips / n), "caption": n}) + "\n"
                                                 for n in names))
    assert list_samples(tmp_path / "list.jsonl")[2] == Sample(clips / names[2], names[2])
    (tmp_path / "list.json").write_text(json.dumps([{"path": str(clips / n)} for n in names]))
    assert len(list_samples(tmp_path / "list.json")) == 3
    (tmp_path / "bad.csv").write_text("file\nx.mp4\n")
    with pytest.raises(ValueError, match="'path' column"):
        list_samples(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError):
        list_samples(tmp_path / "missing")
    train, val = split_validation(config(videos=str(clips), val_count=1))
    assert len(train) == 2 and val[0].path.name == names[-1]


def test_clip_is_resized_keeping_aspect_then_cropped(clips):
    assert cover_size(40, 56, 32, 48) == (34, 48) and cover_size(100, 50, 32, 32) == (64, 32)
    c = config(videos=str(clips), crop="center", flip_prob=0.0, start_jitter=False)
    path = sorted(clips.glob("*.mp4"))[0]
    item = VideoDataset([Sample(path)], c)[0, 123]
    assert item["video"].shape == (3, 3, 32, 48) and item["skipped"] == 0
    full = read_video(path, 3, 0, 2, size=(34, 48))[0]                          # frames 0, 2, 4; crop rows 1..33
    assert torch.equal(item["video"], full[:, :, 1:33])
    flipped = VideoDataset([Sample(path)], config(videos=str(clips), crop="center", flip_prob=1.0, start_jitter=False))
    assert torch.equal(flipped[0, 123]["video"], item["video"].flip(-1))


def test_resize_off_crops_at_native_resolution(clips):
    path = sorted(clips.glob("*.mp4"))[0]                                       # 40 x 56
    c = config(videos=str(clips), crop="center", flip_prob=0.0, start_jitter=False, resize=False, height=16, width=24)
    item = VideoDataset([Sample(path)], c)[0, 7]
    full = read_video(path, 3, 0, 2)[0]                                         # native size, frames 0, 2, 4
    assert item["video"].shape == (3, 3, 16, 24) and torch.equal(item["video"], full[:, :, 12:28, 16:40])
    with pytest.raises(VideoReadError, match="smaller than the 48x48 crop"):
        load_clip(path, config(resize=False, height=48, width=48), torch.Generator().manual_seed(0))


def test_augmentation_is_a_function_of_the_item_seed(clips):
    ds = VideoDataset(list_samples(clips), config(videos=str(clips)))
    a, b = ds[1, 7]["video"], ds[1, 7]["video"]
    assert torch.equal(a, b)
    assert any(not torch.equal(a, ds[1, s]["video"]) for s in range(8, 12))   # start, crop or flip changes
    assert clip_starts(10, config(), 3) == [0, 2, 5] and clip_starts(4, config(), 2) == []


def test_unreadable_and_too_short_files_are_skipped_and_counted(clips, tmp_path, caplog):
    folder = tmp_path / "mixed"
    good = write_clips(folder, 2, frames=6, height=40, width=56)
    (folder / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    (folder / "empty.mp4").write_bytes(b"")
    write_clips(folder / "short", 1, frames=2, height=40, width=56)             # 2 frames < span 5
    samples = list_samples(folder)
    assert len(samples) == 5
    ds = VideoDataset(samples, config())
    with caplog.at_level(logging.WARNING, logger="cascadev.training.data"):
        batches = list(islice(make_loader(ds, 5, seed=0), 4))
    assert all(b["video"].shape == (5, 3, 3, 32, 48) for b in batches)
    assert sum(b["skipped"] for b in batches) >= 4 * 3                           # 3 of 5 files are bad in each epoch
    warned = caplog.text
    assert "corrupt.mp4" in warned and "empty.mp4" in warned and "too short" in warned
    assert warned.count("corrupt.mp4") == 1                                      # reported once, counted every time
    with pytest.raises(RuntimeError, match="could not be loaded"):
        VideoDataset([Sample(folder / "corrupt.mp4")], config())[0]
    assert set(good) <= {s.path for s in samples}


def test_sampler_shards_ranks_and_resumes_mid_stream():
    n = 7
    whole = list(islice(ResumableSampler(n, seed=3), 21))
    # permutation per epoch
    assert all(sorted(i for i, _ in whole[e * n:(e + 1) * n]) == list(range(n)) for e in range(3))
    assert [i for i, _ in whole[:n]] != [i for i, _ in whole[n:2 * n]]      # reshuffled
    ranks = [list(islice(ResumableSampler(n, 3, rank=r, world=2), 7)) for r in range(2)]
    assert [x for pair in zip(*ranks) for x in pair] == whole[:14]          # ranks interleave the stream
    assert list(islice(ResumableSampler(n, 3, start=5), 6)) == whole[5:11]  # resume = same stream
    assert len({s for _, s in whole}) == 21                                 # a seed per position


def test_workers_do_not_change_the_batches(clips):
    ds = VideoDataset(list_samples(clips), config())
    serial = list(islice(make_loader(ds, 2, seed=1), 3))
    parallel = list(islice(make_loader(ds, 2, seed=1, num_workers=2), 3))
    for a, b in zip(serial, parallel):
        assert torch.equal(a["video"], b["video"])
    resumed = next(make_loader(ds, 2, seed=1, start_batch=2))
    assert torch.equal(resumed["video"], serial[2]["video"])


def test_images_and_latent_files(tmp_path, caplog):
    from torchvision.io import write_png
    for i in range(2):
        image = ((make_clip(i, 1, 40, 30)[:, 0] + 1) * 127.5).round().to(torch.uint8)
        write_png(image, str(tmp_path / f"img{i}.png"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    ds = ImageDataset(list_samples(tmp_path, (".png",)), config(flip_prob=0.0))
    items = [ds[i, i] for i in range(3)]
    assert all(item["video"].shape == (3, 1, 32, 48) for item in items)
    assert sum(item["skipped"] for item in items) >= 1
    cache = tmp_path / "cache"
    save_state_dict({"latent": torch.ones(4, 2, 4, 6), "cond": torch.zeros(16, 2, 1, 2)},
                    cache / "000000_00.safetensors", metadata={"caption": "a clip"})
    (cache / "000001_00.safetensors").write_bytes(b"truncated")
    latents = LatentDataset(cache)
    batch = collate([latents[i, i] for i in range(2)])
    assert batch["latent"].shape == (2, 4, 2, 4, 6) and batch["caption"] == ["a clip", "a clip"]
    assert batch["skipped"] >= 1


def test_image_steps_follow_the_probability_and_resume():
    flags = [image_step(0, s, 0.1) for s in range(2000)]
    assert 0.07 < sum(flags) / 2000 < 0.13
    assert image_steps_before(0, 500, 0.1) == sum(flags[:500])
    assert not any(image_step(0, s, 0.0) for s in range(100))


def test_conditioning_upsampling():
    g = torch.Generator().manual_seed(0)
    semantic = torch.randn(2, 16, 3, 2, 3, generator=g)
    up = upsample_condition(semantic, (3, 8, 12))
    frames = rearrange(semantic, "b c t h w -> (b t) c h w")                     # the release: x4 bilinear per frame
    expected = F.interpolate(frames, scale_factor=4, mode="bilinear", align_corners=False)
    assert torch.allclose(up, rearrange(expected, "(b t) c h w -> b c t h w", t=3))
    low = torch.randn(1, 4, 2, 4, 4, generator=g)                                # frames 0 and 4 of 8
    full = temporal_upsample(low, 4, 8)
    assert torch.equal(full[:, :, 0], low[:, :, 0]) and torch.equal(full[:, :, 4], low[:, :, 1])
    assert torch.allclose(full[:, :, 2], 0.5 * (low[:, :, 0] + low[:, :, 1]))
    assert torch.equal(full[:, :, 7], low[:, :, 1])                              # held after the last kept frame
    latent = torch.randn(1, 4, 8, 16, 16, generator=g)
    assert resize_small_from_latent(latent, 4, 4).shape == (1, 4, 2, 4, 4)
    assert downsample_video(torch.zeros(1, 3, 8, 64, 64), 4, 1).shape == (1, 3, 8, 16, 16)
    with pytest.raises(ValueError, match="not divisible"):
        resize_small_from_latent(torch.zeros(1, 4, 1, 6, 6), 4, 1)



def test_atomic_writes_leave_no_temp_file_and_follow_the_umask(tmp_path):
    import os
    import stat

    from safetensors.torch import load_file

    from cascadev.weights import atomic_write

    path = tmp_path / "w.safetensors"
    save_state_dict({"x": torch.ones(2)}, path)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask          # readable like any file the user writes

    def interrupted(tmp: str) -> None:
        Path(tmp).write_text("half a file")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, interrupted)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]    # the old file stays, the temp is gone
    assert torch.equal(load_file(str(path))["x"], torch.ones(2))
