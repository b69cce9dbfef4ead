"""``cascadev eval`` and ``bench-recon``: outputs that cannot be written and a named I3D file that is not there fail
up front (one line, exit 2), before any video is read or model loaded, and leave nothing behind."""

import json
import sys
from pathlib import Path

import pytest
import torch

from cascadev.synthetic import write_clips
from helpers import run_cli


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return write_clips(tmp_path_factory.mktemp("eval_errors") / "real", 2, frames=9, height=32, width=32)[0].parent


@pytest.fixture(autouse=True)
def nothing_runs(monkeypatch, tmp_path):
    """An empty torch hub (no I3D / AlexNet, whatever the machine has), and a record of every video scan, detector
    and model load, so a test can say none happened."""
    import cascadev.cli.options as options
    import eval.evaluation
    import eval.fvd
    import eval.metrics

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    calls = []
    for module, name in ((eval.evaluation, "scan"), (eval.fvd, "load_extractor"), (eval.metrics, "load_lpips"),
                         (options, "load_pipeline")):
        def record(*args, _real=getattr(module, name), _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, record)
    return calls


def _fails(capsys, command, *argv) -> str:
    code, out, err = run_cli(capsys, command, *argv)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"cascadev {command}: error: "), err
    assert "Errno" not in err and "Traceback" not in err
    assert out == ""                                   # no table, no skip list: the work never started
    return lines[0]


def _listing(folder: Path) -> dict:
    return {p: (p.stat().st_size if p.is_file() else None) for p in folder.rglob("*")}


def test_eval_refuses_json_csv_and_cache_paths_it_cannot_write_before_reading_videos(clips, capsys, tmp_path,
                                                                                     nothing_runs):
    (tmp_path / "adir").mkdir()
    (tmp_path / "input.mp4").write_bytes(b"a user's file")
    before = _listing(tmp_path)
    cases = [
        (["--json", tmp_path / "adir"], f"--json {tmp_path / 'adir'}: is a directory; give a file name"),
        (["--csv", tmp_path / "adir"], f"--csv {tmp_path / 'adir'}: is a directory; give a file name"),
        (["--json", tmp_path / "input.mp4" / "x" / "s.json"], f"{tmp_path / 'input.mp4'} is a file, not a folder"),
        (["--csv", tmp_path / "input.mp4" / "s.csv"], f"{tmp_path / 'input.mp4'} is a file, not a folder"),
        (["--metrics", "psnr,fvd", "--cache-dir", tmp_path / "input.mp4"],
         f"--cache-dir {tmp_path / 'input.mp4'}: {tmp_path / 'input.mp4'} is a file, not a folder"),
    ]
    for extra, message in cases:
        err = _fails(capsys, "eval", "--real", clips, "--fake", clips, "--metrics", "psnr", "--frames", 9, *extra)
        assert message in err, (extra, err)
    assert nothing_runs == []
    assert _listing(tmp_path) == before                # nothing written, no folder made


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc refuses new folders on Linux only")
def test_eval_refuses_a_json_folder_that_cannot_be_created(clips, capsys, nothing_runs):
    err = _fails(capsys, "eval", "--real", clips, "--fake", clips, "--metrics", "psnr", "--json", "/proc/x/s.json")
    # /proc is a kernel file system (named where the mount table says so); else root may write in /proc but not make
    # folders there, and anyone else may do neither
    assert err.startswith("cascadev eval: error: --json /proc/x/s.json: ")
    assert any(why in err for why in ("/proc is on a proc file system", "cannot create the folder /proc/x",
                                      "no permission to write in /proc"))
    assert nothing_runs == [] and not Path("/proc/x").exists()


def test_eval_still_makes_missing_json_and_csv_folders(clips, capsys, tmp_path):
    out_json, out_csv = tmp_path / "new" / "deeper" / "r.json", tmp_path / "other" / "p.csv"
    code, out, err = run_cli(capsys, "eval", "--real", clips, "--fake", clips, "--metrics", "psnr", "--frames", 9,
                             "--json", out_json, "--csv", out_csv)
    assert code == 0, err
    assert json.loads(out_json.read_text())["counts"]["pairs"] == 2
    assert out_csv.read_text().splitlines()[0] == "name,real,fake,frames,psnr"


def test_eval_a_named_i3d_file_that_is_missing_is_an_error_no_i3d_a_skip(clips, capsys, tmp_path, nothing_runs):
    missing = tmp_path / "i3d_pretrained_400.pt"
    err = _fails(capsys, "eval", "--real", clips, "--fake", clips, "--metrics", "psnr,ssim,lpips,fvd",
                 "--i3d", missing, "--json", tmp_path / "r.json")
    assert f"I3D weights not found: {missing}" in err
    assert "Google Drive" in err and "i3d_torchscript.pt" in err            # where to get either detector
    assert nothing_runs == [] and list(tmp_path.iterdir()) == []

    # no --i3d and none in the hub folder: FVD is skipped with the reason, the other metrics still computed
    code, out, err = run_cli(capsys, "eval", "--real", clips, "--fake", clips, "--metrics", "psnr,fvd",
                             "--frames", 9, "--json", tmp_path / "r.json")
    assert code == 0, err
    assert "FVD skipped: no I3D weights given (--i3d PATH)" in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert "no I3D weights given" in report["results"]["fvd"]["skipped"] and report["results"]["psnr"]["mean"] > 0


def test_bench_recon_refuses_an_output_that_is_a_file_before_loading_the_model(clips, capsys, tmp_path,
                                                                              nothing_runs):
    user_file = tmp_path / "input.mp4"
    user_file.write_bytes(b"a user's file")
    before = _listing(tmp_path)
    for output in (user_file, user_file / "run"):
        err = _fails(capsys, "bench-recon", clips, "-o", output, "--size", 64, "--frames", 2, "--metrics", "psnr")
        assert err == f"cascadev bench-recon: error: -o {output}: {user_file} is a file, not a folder"
    assert nothing_runs == []
    assert _listing(tmp_path) == before and user_file.read_bytes() == b"a user's file"


def test_bench_recon_a_named_i3d_file_that_is_missing_is_an_error(clips, capsys, tmp_path, nothing_runs):
    err = _fails(capsys, "bench-recon", clips, "-o", tmp_path / "run", "--size", 64, "--frames", 9,
                 "--metrics", "psnr,fvd", "--i3d", tmp_path / "nope.pt")
    assert f"I3D weights not found: {tmp_path / 'nope.pt'}" in err and "i3d_torchscript.pt" in err
    assert nothing_runs == [] and list(tmp_path.iterdir()) == []
