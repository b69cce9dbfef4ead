import json

import pytest

from cascadev.video_io import video_info
from helpers import run_cli


def test_demo_runs_on_any_cascade_folder(tmp_path, capsys, tiny_pipeline_dir):
    out = tmp_path / "demo"
    code, stdout, err = run_cli(capsys, "demo", "-o", out, "--weights", tiny_pipeline_dir, "--clips", 2,
                                "--frames", 4, "--size", 64, "--steps", 1, "--colour-fix", 32)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    for method in ("cascade", "baseline", "cascade_without_colour_fix"):
        assert 0 < results[method]["psnr"] < 100 and -1 <= results[method]["ssim"] <= 1
    assert results["colour_fix"] == 32 and results["cascade"] != results["cascade_without_colour_fix"]
    for method in ("cascade", "baseline", "cascade_without_colour_fix"):   # random weights: near-flat frames
        assert 0 <= results[method]["sharpness"] < 10
    # one step, 64 px: Stage A latents 8 x 8, one window of the tiny DiT per clip; the Previewer runs no DiT
    assert (results["cascade"]["steps"], results["cascade"]["dit_forwards"]) == (1, 1)
    assert (results["baseline"]["steps"], results["baseline"]["dit_forwards"]) == (0, 0)
    assert results["seeds"] == [100_000, 100_001] and results["clips"] == 2
    info = video_info(out / "side_by_side.mp4")
    assert (info.frames, info.width, info.height) == (8, 192, 64)  # 2 clips x 4 frames, input | cascade | baseline
    assert (out / "frames.png").stat().st_size > 0
    assert results["size"] == [64, 64] and results["steps"] == 1 and results["frames"] == 4


def test_demo_rejects_bad_sizes(tmp_path, capsys, tiny_pipeline_dir):
    code, _, err = run_cli(capsys, "demo", "-o", tmp_path, "--weights", tiny_pipeline_dir, "--size", 100)
    assert code == 2 and "multiple of 32" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "demo", "-o", tmp_path, "--weights", tiny_pipeline_dir, "--size", 64,
                           "--colour-fix", 24)
    assert code == 2 and "--colour-fix must be 0 (off) or divide --size 64" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "demo", "-o", tmp_path, "--weights", tmp_path / "empty")
    assert code == 2 and "no cascade here" in err


@pytest.mark.slow
def test_demo_with_the_shipped_tiny_cascade(tmp_path, capsys):
    from cascadev.pipelines.cascade import TINY_CASCADE

    total = sum(f.stat().st_size for f in TINY_CASCADE.rglob("*") if f.is_file())
    assert total < 20 * 2**20  # weights shipped in the package: 20 MB at most
    code, stdout, err = run_cli(capsys, "demo", "-o", tmp_path, "--clips", 1, "--frames", 8)
    assert code == 0, err
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["kind"] == "shapes" and results["scheduler"] == "flow" and results["steps"] == 4
    assert results["size"] == [256, 256] and results["colour_fix"] == 16
    # regression bounds for the shipped weights (measured on seed 100000: cascade 22.77 dB, baseline 22.61 dB)
    assert 22.2 < results["cascade"]["psnr"] < 30 and 22.2 < results["baseline"]["psnr"] < 30
    assert results["cascade"]["psnr"] > results["baseline"]["psnr"]
    assert 19.0 < results["cascade_without_colour_fix"]["psnr"] < results["cascade"]["psnr"]
    # detail (measured: cascade 0.151, Previewer 0.058): the DiT adds what the Previewer's x8 decoder cannot
    assert results["cascade"]["sharpness"] > 2 * results["baseline"]["sharpness"]
    assert (results["cascade"]["steps"], results["cascade"]["dit_forwards"]) == (4, 4 * 9)   # 3 x 3 tiles at 256 px


def test_demo_distilled_compares_the_built_in_student_with_its_teacher(tmp_path, capsys):
    code, stdout, err = run_cli(capsys, "demo", "--distilled", "-o", tmp_path, "--clips", 1, "--frames", 4,
                                "--size", 128)
    assert code == 0, err
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) >= {"cascade", "distilled", "baseline"}
    # 128 px: Stage A latents 16 x 16, one window of the tiny DiT per step
    assert (results["cascade"]["steps"], results["cascade"]["dit_forwards"]) == (4, 4)
    assert (results["distilled"]["steps"], results["distilled"]["dit_forwards"]) == (2, 2)
    assert results["distilled"]["scheduler"] == "flow"
    for method in ("cascade", "distilled", "baseline"):
        assert 15 < results[method]["psnr"] < 40 and 0 < results[method]["sharpness"] < 2
    assert results["distilled"]["sharpness"] > results["baseline"]["sharpness"]
    assert video_info(tmp_path / "side_by_side.mp4").width == 4 * 128     # input | cascade | distilled | baseline


def test_demo_distilled_is_for_the_reconstruction_demo(tmp_path, capsys):
    code, _, err = run_cli(capsys, "demo", "--distilled", "--fps-x4", "-o", tmp_path)
    assert code == 2 and "--distilled compares decoders" in err and err.count("\n") == 1
