"""``cascadev eval`` on folders of generated clips: pairing, skips, report, JSON/CSV, FVD runs, errors."""

import csv
import json
import shutil

import pytest
import torch

from cascadev.cli import main
from cascadev.synthetic import make_clip, write_clips
from cascadev.video_io import write_video
from eval.i3d import I3D

FRAMES = 12


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """real/: 4 clips. fake/: 2 exact copies, 1 noisy, 1 too short, 1 unmatched name, 1 unreadable."""
    root = tmp_path_factory.mktemp("eval_cli")
    real, fake = root / "real", root / "fake"
    paths = write_clips(real, 4, frames=FRAMES, height=32, width=32)
    fake.mkdir()
    shutil.copy(paths[0], fake / paths[0].name)
    shutil.copy(paths[2], fake / paths[2].name)
    g = torch.Generator().manual_seed(0)
    clip = make_clip(1, FRAMES, 32, 32)
    write_video(fake / "clip_00001.mp4", (clip + 0.15 * torch.randn(clip.shape, generator=g)).clamp(-1, 1))
    write_video(fake / "clip_00003.mp4", make_clip(3, 5, 32, 32))
    write_video(fake / "other.mp4", make_clip(7, FRAMES, 32, 32, kind="shapes"))
    (fake / "broken.mp4").write_bytes(b"this is not a video")
    (fake / "notes.txt").write_text("ignored: not a video extension")
    torch.manual_seed(0)
    i3d = I3D()
    for m in i3d.modules():          # variance-preserving random weights: features differ between clips
        if isinstance(m, torch.nn.Conv3d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(i3d.state_dict(), root / "i3d_pretrained_400.pt")
    return {"root": root, "real": real, "fake": fake, "i3d": root / "i3d_pretrained_400.pt"}


@pytest.fixture(autouse=True)
def empty_hub(tmp_path):
    """No cached LPIPS/I3D weights, whatever the machine has."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield
    torch.hub.set_dir(old)


def _eval(*args):
    main(["eval", *map(str, args)])


def _fails(capsys, *args) -> str:
    with pytest.raises(SystemExit) as info:
        _eval(*args)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("cascadev eval: error: ")
    return err


def test_eval_folder_with_skips(sets, capsys, tmp_path):
    out_json, out_csv = tmp_path / "report.json", tmp_path / "per_video.csv"
    _eval("--real", sets["real"], "--fake", sets["fake"], "--metrics", "psnr,ssim,lpips,fvd", "--frames", FRAMES,
          "--i3d", sets["i3d"], "--i3d-size", 16, "--json", out_json, "--csv", out_csv)
    out = capsys.readouterr().out
    assert "3 pair(s) from 4 real and 5 fake readable video(s); 4 skip(s)" in out     # the report is printed too

    report = json.loads(out_json.read_text())
    assert report["counts"] == {"real": 4, "fake": 5, "pairs": 3}
    fake = sets["fake"]
    assert sorted((s["set"], s["file"], s["reason"].split(":")[0]) for s in report["skipped"]) == [   # no notes.txt
        ("fake", str(fake / "broken.mp4"), "unreadable"),
        ("fake", str(fake / "clip_00003.mp4"), "too short for fvd"),
        ("fake", str(fake / "clip_00003.mp4"), "too short for paired metrics"),
        ("fake", str(fake / "other.mp4"), "unmatched name")]
    reasons = {s["reason"] for s in report["skipped"]}
    assert {"unmatched name: no real video named 'other' (left out of paired metrics)",
            f"too short for paired metrics: 5 < {FRAMES} frames (--paired-frames {FRAMES}; 0 compares all frames)",
            f"too short for fvd: 5 < {FRAMES} frames"} <= reasons
    conventions = report["conventions"]
    assert sorted(conventions) == ["fvd", "lpips", "psnr", "ssim"]
    assert conventions["psnr"].startswith("per frame on [0, 1]")
    assert conventions["ssim"].startswith("per frame on [0, 1]")
    assert "11x11 Gaussian window, sigma 1.5" in conventions["ssim"]
    for text in ("I3D (400-d logits", "first 12 frames of each video", "N = 4 real / 4 fake"):
        assert text in conventions["fvd"]
    rows = {row["name"]: row for row in report["per_video"]}
    assert sorted(rows) == ["clip_00000", "clip_00001", "clip_00002"]
    assert rows["clip_00000"]["psnr"] == rows["clip_00002"]["psnr"] == 100.0          # identical files: capped
    assert rows["clip_00000"]["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert 10 < rows["clip_00001"]["psnr"] < 40 and rows["clip_00001"]["ssim"] < 0.95
    assert all(len(row["per_frame"]["psnr"]) == FRAMES for row in rows.values())
    psnr = report["results"]["psnr"]
    assert psnr["frames"] == 3 * FRAMES and psnr["videos"] == 3
    assert psnr["mean"] == pytest.approx(sum(x for r in rows.values() for x in r["per_frame"]["psnr"]) / (3 * FRAMES))
    assert report["results"]["lpips"]["skipped"].startswith("LPIPS skipped: AlexNet weights not found")
    result = report["results"]["fvd"]
    assert result["n_real"] == 4 and result["n_fake"] == 4 and len(result["runs"]) == 1 and result["std"] is None
    assert result["mean"] > 0
    assert any("not comparable" in note for note in result["notes"])

    with open(out_csv) as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == ["clip_00000", "clip_00001", "clip_00002"]
    assert float(table[1]["psnr"]) == pytest.approx(rows["clip_00001"]["psnr"], abs=1e-5)
    assert table[1]["lpips"] == ""


@pytest.mark.slow
def test_lpips_through_the_cli_with_cached_backbone(sets, capsys, tmp_path):
    import torchvision

    from eval.metrics import alexnet_weights_path

    path = alexnet_weights_path()                  # in the empty per-test hub folder
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)   # stand-in weights: plumbing only
    _eval("--real", sets["real"], "--fake", sets["fake"], "--metrics", "lpips", "--frames", FRAMES,
          "--json", tmp_path / "r.json")
    capsys.readouterr()
    report = json.loads((tmp_path / "r.json").read_text())
    rows = {row["name"]: row for row in report["per_video"]}
    assert report["results"]["lpips"]["frames"] == 3 * FRAMES
    assert rows["clip_00000"]["lpips"] == pytest.approx(0.0, abs=1e-6) and rows["clip_00001"]["lpips"] > 1e-4
    assert "AlexNet" in report["conventions"]["lpips"]


@pytest.mark.slow
def test_fvd_runs_random_clips_and_cache(sets, capsys, tmp_path):
    common = ["--metrics", "fvd", "--frames", 9, "--runs", 2, "--seed", 3, "--i3d", sets["i3d"], "--i3d-size", 16,
              "--cache-dir", tmp_path / "cache"]
    _eval("--real", sets["real"], "--fake", sets["fake"], *common, "--json", tmp_path / "diff.json")
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("fvd_*.npz")}
    assert len(cached) == 2                                        # reference set only, one file per run
    # Against itself: the reference features come from the cache, the "fake" ones are extracted afresh
    # from the same files with the same clip starts (same names), so FVD ~ 0 only if the cache is right.
    _eval("--real", sets["real"], "--fake", sets["real"], *common, "--json", tmp_path / "same.json")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("fvd_*.npz")} == cached   # hit, not rewritten
    capsys.readouterr()
    same = json.loads((tmp_path / "same.json").read_text())["results"]["fvd"]
    diff = json.loads((tmp_path / "diff.json").read_text())["results"]["fvd"]
    assert "random start" in diff["clip"] and "seed 3" in diff["clip"]
    assert len(same["runs"]) == len(diff["runs"]) == 2 and diff["std"] is not None
    assert diff["runs"][0] != diff["runs"][1]                      # the two runs drew different clips
    assert diff["mean"] > 0 and abs(same["mean"]) < 1e-4 * diff["mean"]


def test_mismatched_sets_are_one_line_errors(sets, capsys, tmp_path):
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(sets["fake"] / "other.mp4", lonely / "other.mp4")
    assert "no pairs" in _fails(capsys, "--real", sets["real"], "--fake", lonely)
    assert "fvd needs at least 2 videos" in _fails(capsys, "--real", sets["real"], "--fake", lonely,
                                                   "--metrics", "fvd", "--i3d", sets["i3d"])

    small = tmp_path / "small"
    write_clips(small, 1, frames=FRAMES, height=24, width=24)
    err = _fails(capsys, "--real", sets["real"], "--fake", small, "--metrics", "psnr", "--frames", FRAMES)
    assert "real frames are 32x32, fake frames 24x24" in err and "--size" in err
    _eval("--real", sets["real"], "--fake", small, "--metrics", "psnr,ssim", "--frames", FRAMES, "--size", 24,
          "--json", tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["counts"]["pairs"] == 1

    err = _fails(capsys, "--real", sets["real"], "--fake", sets["fake"], "--metrics", "fvd",
                 "--i3d", tmp_path / "i3d.pt")
    assert "i3d.pt" in err and "i3d_torchscript.pt" in err and "i3d_pretrained_400.pt" in err
    assert "unknown fid" in _fails(capsys, "--real", sets["real"], "--fake", sets["fake"], "--metrics", "psnr,fid")
    assert "--clip random" in _fails(capsys, "--real", sets["real"], "--fake", sets["fake"], "--metrics", "fvd",
                                     "--runs", 2, "--clip", "first")
    assert "no such folder" in _fails(capsys, "--real", tmp_path / "missing", "--fake", sets["fake"])


@pytest.mark.slow
def test_fvd_protocols_on_non_square_clips_and_a_missing_detector(tmp_path, capsys, sets):
    real, fake = tmp_path / "real", tmp_path / "fake"
    write_clips(real, 3, frames=FRAMES, height=32, width=48)
    write_clips(fake, 3, frames=FRAMES, height=32, width=48, kind="shapes")
    values = {}
    for protocol in ("cascadev", "videogpt", "tf"):
        out = tmp_path / f"{protocol}.json"
        _eval("--real", real, "--fake", fake, "--metrics", "fvd", "--frames", 10, "--i3d", sets["i3d"],
              "--i3d-size", 32, "--fvd-protocol", protocol, "--json", out)
        report = json.loads(out.read_text())
        assert report["settings"]["fvd_protocol"] == report["results"]["fvd"]["protocol"] == protocol
        assert f"protocol {protocol}" in report["conventions"]["fvd"]
        values[protocol] = report["results"]["fvd"]["mean"]
    assert len({round(v, 6) for v in values.values()}) == 3          # non-square clips: three different inputs
    err = _fails(capsys, "--real", real, "--fake", fake, "--metrics", "fvd", "--i3d", sets["i3d"],
                 "--fvd-protocol", "stylegan-v")
    assert "TorchScript detector" in err
    # no detector anywhere: beside other metrics FVD is skipped with the reason, the others still computed
    out = tmp_path / "skip.json"
    _eval("--real", real, "--fake", fake, "--metrics", "psnr,fvd", "--frames", 10, "--json", out)
    report = json.loads(out.read_text())
    assert "FVD skipped: no I3D weights given" in report["results"]["fvd"]["skipped"]
    assert report["results"]["psnr"]["mean"] > 0


def test_evaluate_is_the_command_without_argparse(sets, capsys, tmp_path):
    """``eval.evaluation.evaluate`` with typed arguments returns the report ``cascadev eval --json`` writes."""
    from eval.evaluation import evaluate

    _eval("--real", sets["real"], "--fake", sets["fake"], "--metrics", "PSNR,ssim", "--frames", FRAMES, "--size", 24,
          "--json", tmp_path / "r.json")
    capsys.readouterr()
    report = evaluate(sets["real"], sets["fake"], metrics=["ssim", "psnr", "SSIM"], frames=FRAMES, size=24,
                      progress=False)
    assert capsys.readouterr().out == ""                               # the library prints no report
    cli = json.loads((tmp_path / "r.json").read_text())
    assert report["settings"]["metrics"] == ["ssim", "psnr"] and cli["settings"]["metrics"] == ["psnr", "ssim"]
    assert report["settings"]["size"] == cli["settings"]["size"] == [24, 24]
    for key in ("counts", "skipped", "per_video"):
        assert report[key] == cli[key], key
    assert report["results"]["psnr"] == cli["results"]["psnr"]


def test_one_metric_name_parser_for_eval_and_bench_recon():
    from cascadev.errors import UserError
    from eval.metric_names import METRICS, parse_metrics

    assert METRICS == ("psnr", "ssim", "lpips", "fvd")
    assert parse_metrics("PSNR, ssim,,psnr") == ["psnr", "ssim"]              # any case, blanks, duplicates once
    assert parse_metrics(["Fvd", "LPIPS"]) == ["fvd", "lpips"]
    for bad, unknown in (("psnr,FID", "fid"), ("", "(empty)"), (" , ", "(empty)"),
                         (["mse", "ms-ssim"], "mse, ms-ssim")):
        with pytest.raises(UserError) as info:
            parse_metrics(bad)
        assert str(info.value) == f"--metrics: unknown {unknown}; choose from psnr,ssim,lpips,fvd"
