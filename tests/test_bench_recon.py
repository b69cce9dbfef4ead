import json

import pytest

from cascadev.synthetic import write_clips
from helpers import run_cli


def test_bench_recon_on_generated_clips(tmp_path, capsys, tiny_pipeline_dir):
    data = tmp_path / "data"
    write_clips(data, 3, frames=5, height=72, width=96)
    (data / "zz_broken.mp4").write_bytes(b"garbage")
    run_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "bench-recon", data, "-o", run_dir, "--size", 64, "--frames", 4, "--limit", 3,
                             "--weights", tiny_pipeline_dir, "--steps", 1, "--metrics", "psnr,ssim,fvd")
    assert code == 0, err
    results = json.loads((run_dir / "results.json").read_text())
    assert results["videos"] == 3 and results["skipped"] == []  # --limit 3 takes the first three by name
    for method in ("cascade", "baseline"):
        assert 0 < results[method]["psnr"] < 100 and -1 <= results[method]["ssim"] <= 1
        assert len(list((run_dir / method).glob("*.mp4"))) == 3
    assert results["notes"]["fvd"].startswith("FVD skipped: I3D needs >= 9 frames") and "fvd" not in results["cascade"]
    assert results["settings"]["frames"] == 4 and results["settings"]["size"] == 64

    code, out, err = run_cli(capsys, "bench-recon", data, "-o", tmp_path / "run2", "--size", 64, "--frames", 4,
                             "--weights", tiny_pipeline_dir, "--steps", 1,
                             "--metrics", "PSNR")   # any case, as cascadev eval
    assert code == 0, err
    results = json.loads((tmp_path / "run2" / "results.json").read_text())
    assert results["videos"] == 3 and [s["file"] for s in results["skipped"]] == ["zz_broken.mp4"]
    assert set(results["cascade"]) == set(results["baseline"]) == {"psnr"}
    report = json.loads((tmp_path / "run2" / "report_cascade.json").read_text())
    assert list(report["results"]) == ["psnr"]
    assert {k for row in report["per_video"] for k in row["per_frame"]} == {"psnr"}

    code, _, err = run_cli(capsys, "bench-recon", data, "-o", run_dir, "--metrics", "psnr,FID",
                           "--weights", tiny_pipeline_dir)
    assert code == 2 and err == "cascadev bench-recon: error: --metrics: unknown fid; choose from psnr,ssim,lpips,fvd\n"

    code, _, err = run_cli(capsys, "bench-recon", data, "-o", run_dir, "--size", 50, "--weights", tiny_pipeline_dir)
    assert code == 2 and "multiple of 32" in err and err.count("\n") == 1


@pytest.mark.slow
def test_fvd_without_detector_is_skipped_up_front_and_the_rest_still_runs(tmp_path, capsys, tiny_pipeline_dir,
                                                                          monkeypatch):
    import torch
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))      # no I3D anywhere
    data = tmp_path / "data"
    write_clips(data, 2, frames=9, height=64, width=64)
    code, out, err = run_cli(capsys, "bench-recon", data, "-o", tmp_path / "run", "--size", 64, "--frames", 9,
                             "--weights", tiny_pipeline_dir, "--steps", 1, "--metrics", "psnr,fvd")
    assert code == 0, err
    assert out.index("FVD skipped: no I3D weights given") < out.index("PSNR")      # said before the work
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["cascade"]["psnr"] > 0 and "fvd" not in results["cascade"]
    assert "FVD skipped" in results["notes"]["fvd"]


@pytest.mark.slow
def test_frames_are_taken_near_the_release_sets_30_fps(tmp_path, capsys, tiny_pipeline_dir):
    """Inter4K's originals are 60 fps, the release's set 30: every 2nd frame; --fps 0 takes every frame."""
    from cascadev.synthetic import make_clip
    from cascadev.video_io import write_video
    from eval.bench_recon import frame_stride

    assert [frame_stride(f, 30) for f in (60, 59.94, 50, 30, 25, 8, None)] == [2, 2, 2, 1, 1, 1, 1]
    assert frame_stride(60, 0) == 1 and frame_stride(120, 30) == 4
    data = tmp_path / "data"
    write_video(data / "fast.mp4", make_clip(seed=1, frames=6, height=64, width=64)[None], fps=60)
    write_video(data / "long.mp4", make_clip(seed=2, frames=8, height=64, width=64)[None], fps=60)
    common = ["-o", tmp_path / "run", "--size", 64, "--frames", 4, "--weights", tiny_pipeline_dir, "--steps", 1,
              "--metrics", "psnr"]
    code, _, err = run_cli(capsys, "bench-recon", data, *common)
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["videos"] == 1 and results["settings"]["fps"] == 30
    assert results["skipped"] == [{"file": "fast.mp4", "reason": "only 3 frames at every 2, need 4"}]
    code, _, err = run_cli(capsys, "bench-recon", data, *common, "--fps", 0)
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "results.json").read_text())["videos"] == 2


def test_release_frames_blur_with_opencvs_border_resize_and_crop_as_the_release_loader():
    import torch

    from eval.bench_recon import release_frames

    impulse = torch.full((1, 3, 1, 64, 64), -1.0)
    impulse[..., 0, 0] = impulse[..., 10, 20] = 1.0                   # 255 in 8-bit levels
    levels = ((release_frames(impulse, 64) + 1) * 127.5).round()[0, 0, 0]
    # 255 / 9 = 28.3 -> 28 in the 3 x 3 around each; at the corner OpenCV's reflect-101 border repeats no pixel (a
    # symmetric border would count the corner 4 times: 113)
    assert levels[9:12, 19:22].eq(28).all() and levels[0:2, 0:2].eq(28).all() and levels.sum() == 28 * 13
    wide = release_frames(torch.rand(1, 3, 2, 90, 160) * 2 - 1, 32)    # short side 90 -> 32, 57 wide -> 32 -> 32 x 32
    assert wide.shape == (1, 3, 2, 32, 32) and wide.min() >= -1 and wide.max() <= 1
    levels = (wide + 1) * 127.5
    assert (levels - levels.round()).abs().max() < 1e-4                  # 8-bit levels (up to float rounding)


def test_bench_recon_with_the_built_in_distilled_decoder_runs_at_its_two_steps(tmp_path, capsys):
    from cascadev.pipelines.cascade import TINY_DISTILLED

    data = tmp_path / "data"
    write_clips(data, 1, frames=4, height=64, width=64, kind="shapes")
    code, _, err = run_cli(capsys, "bench-recon", data, "-o", tmp_path / "run", "--size", 64, "--frames", 4,
                           "--weights", TINY_DISTILLED, "--metrics", "psnr", "--tiling", "shifted")
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["settings"]["steps"] == 2 and results["settings"]["tiling"] == "shifted"
    assert results["cascade"]["psnr"] > 20      # measured 23.01 dB (the teacher at 4 steps: 22.73); untrained: ~10


def test_bench_recon_keeps_the_source_rate_writes_evals_report_and_its_folders_evaluate(tmp_path, capsys,
                                                                                       tiny_pipeline_dir):
    """Issue 32 item 7 and issue 29 (3): written videos at the rate of the frames taken (25 fps source, every frame;
    50 fps, every 2nd at --fps 30 -> 25), PSNR printed to 2 decimals, per-method reports in ``cascadev eval``'s format
    whose numbers are results.json's, protocol and geometry named; eval on the output folders names
    --paired-frames when it refuses, and with --paired-frames 0 scores them."""
    from cascadev.synthetic import make_clip
    from cascadev.video_io import video_info, write_video

    data = tmp_path / "data"
    write_video(data / "a.mp4", make_clip(seed=1, frames=4, height=64, width=64)[None], fps=25)
    write_video(data / "b.mp4", make_clip(seed=2, frames=8, height=64, width=64)[None], fps=50)
    run_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "bench-recon", data, "-o", run_dir, "--size", 64, "--frames", 4,
                             "--weights", tiny_pipeline_dir, "--steps", 1, "--metrics", "psnr,SSIM")
    assert code == 0, err
    for method in ("real", "cascade", "baseline"):
        assert [video_info(run_dir / method / f"{n}.mp4").fps for n in "ab"] == [25.0, 25.0]
    results = json.loads((run_dir / "results.json").read_text())
    cells = next(ln for ln in out.splitlines() if ln.startswith("cascade ")).split()
    assert cells[1:3] == [f"{results['cascade']['psnr']:.2f}", f"{results['cascade']['ssim']:.4f}"]
    assert results["settings"]["geometry"] == "stored" and "psnr: protocol per-frame RGB" in out
    assert results["protocols"]["psnr"]["geometry"] == "stored"
    for method in ("cascade", "baseline"):
        report = json.loads((run_dir / f"report_{method}.json").read_text())
        assert set(report) == {"real", "fake", "settings", "conventions", "counts", "skipped", "results", "per_video"}
        assert report["results"]["psnr"]["mean"] == pytest.approx(results[method]["psnr"], abs=1e-9)
        assert report["results"]["ssim"]["protocol"].startswith("per-frame RGB, Gaussian 11/1.5")
        assert report["results"]["ssim"]["geometry"] == "stored" and report["counts"]["pairs"] == 2
        assert [row["frames"] for row in report["per_video"]] == [4, 4]

    code, out, err = run_cli(capsys, "eval", "--real", run_dir / "real", "--fake", run_dir / "cascade",
                             "--metrics", "psnr")
    assert code == 2 and err.count("\n") == 1
    assert "fewer than --paired-frames 16 frames" in err and "--paired-frames 0" in err
    code, out, err = run_cli(capsys, "eval", "--real", run_dir / "real", "--fake", run_dir / "cascade",
                             "--metrics", "psnr", "--paired-frames", 0)
    assert code == 0, err
    assert "2 pair(s)" in out and "[protocol per-frame RGB, data range 1, mean over all frames; stored frames]" in out


@pytest.mark.slow
def test_bench_recon_content_debiased_fvd_from_a_videomae_checkpoint(tmp_path, capsys, tiny_pipeline_dir):
    """--fvd-protocol cd-fvd with the user's VideoMAE-v2 file (a small random one here): 8-frame clips are enough
    (VideoMAE takes any even length), FVD is reported under its protocol; without the file, FVD is skipped up front."""
    import torch

    from eval.videomae import VideoMAEv2

    torch.manual_seed(0)
    torch.save({"model": VideoMAEv2(embed_dim=176, depth=1, num_heads=2, mlp_hidden=64).state_dict()},
               tmp_path / "videomae.pth")
    data = tmp_path / "data"
    write_clips(data, 2, frames=8, height=64, width=64)
    common = ["bench-recon", data, "--size", 64, "--frames", 8, "--weights", tiny_pipeline_dir, "--steps", 1,
              "--metrics", "psnr,fvd", "--fvd-protocol", "cd-fvd"]
    code, out, err = run_cli(capsys, *common, "-o", tmp_path / "run", "--videomae", tmp_path / "videomae.pth")
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["cascade"]["fvd"] > 0 and results["baseline"]["fvd"] > 0
    assert results["protocols"]["fvd"] == {"protocol": "cd-fvd", "geometry": "stored"}
    fvd = json.loads((tmp_path / "run" / "report_cascade.json").read_text())["results"]["fvd"]
    assert fvd["mean"] == results["cascade"]["fvd"] and "VideoMAE-v2" in fvd["detector"]
    assert "short side scaled to 128 (" in fvd["input"] and fvd["input"].startswith("stored frames, ")

    code, out, err = run_cli(capsys, *common, "-o", tmp_path / "run2")
    assert code == 0, err
    assert "FVD skipped: no VideoMAE-v2 checkpoint given" in out and "--videomae PATH" in out
