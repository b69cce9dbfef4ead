"""``cascadev train`` and ``cache-latents`` refuse bad input in one line before any model is built, and a start
that fails -- bad input, or weights that do not load -- leaves no run directory or cache contents behind."""

from pathlib import Path

import pytest

import cascadev.training.train as train_module
from helpers import run_cli
from cascadev.synthetic import write_clips

ROOT = Path(__file__).resolve().parents[1]
DIT_TINY = ROOT / "configs" / "dit_tiny.yaml"
OFFICIAL = ROOT / "configs" / "dit_official_finetune.yaml"
SMALL = ["data.height=32", "data.width=32"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    write_clips(folder, 3, frames=5, height=32, width=32)
    return folder


@pytest.fixture
def no_models(monkeypatch):
    """Training fails the test if it gets as far as building models."""
    def build_task(config, *args, **kwargs):
        raise AssertionError("models were built before the input was checked")
    monkeypatch.setattr(train_module, "build_task", build_task)


def one_line_error(code: int, err: str, command: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"cascadev {command}: error: "), err
    assert "Traceback" not in err and "Errno" not in err and "codec" not in err, err
    return lines[0]


def write_config(folder: Path, name: str) -> Path:
    path = folder / name
    if name == "input.mp4":        # an mp4 header: binary, with the byte the walkthrough's codec error named
        path.write_bytes(b"\x00\x00\x00\x20ftypisom" + bytes([0xD0, 0x9F, 0xFF, 0x00]) * 16)
    elif name == "list.yaml":
        path.write_text("- stage: dit\n- data: {}\n")
    elif name == "scalar.yaml":
        path.write_text("just words\n")
    else:
        path.mkdir()
    return path


@pytest.mark.parametrize("name, message", [
    ("input.mp4", "input.mp4 is not a YAML config (binary data, not text): videos go in data.videos"),
    ("list.yaml", "list.yaml is not a training config: its top level is a list, expected a mapping"),
    ("scalar.yaml", "scalar.yaml is not a training config: its top level is a string"),
    ("folder", "folder is a folder, not a YAML config file"),
])
def test_a_config_that_is_not_a_yaml_mapping_is_one_line(name, message, tmp_path, capsys, no_models):
    config = write_config(tmp_path, name)
    before = set(tmp_path.iterdir())
    for command in ("train", "cache-latents"):
        argv = [command, "--config", config] + (["--run-dir", tmp_path / "run"] if command == "train" else
                                                ["--out", tmp_path / "cache"])
        line = one_line_error(*run_cli(capsys, *argv)[::2], command)
        assert message in line and str(config) in line
        assert set(tmp_path.iterdir()) == before                           # no run dir, no cache


@pytest.mark.parametrize("overrides, message", [
    ([], "no data source given: set data.videos to a folder or a list file"),
    (["data.videos=nope.txt"], "data.videos: data source nope.txt not found"),
    (["data.videos=clip.mp4"], "data.videos: clip.mp4 is not a list of files (binary data, not text)"),
    (["data.videos=bad.json"], "data.videos: bad.json: not a valid json list"),
    (["data.videos={clips}", "data.images=nope/"], "data.images: data source nope not found"),
    (["data.latents=nocache", 'data.videos=""'], "nocache/cache.yaml not found: write the cache"),
    (["data.videos={clips}", "dit.init_from=official:weights/s1024.effn-f32.pth"],
     "dit.init_from: weights/s1024.effn-f32.pth not found: download s1024.effn-f32.pth from the CascadeV release "
     "(hf download ByteDance/CascadeV s1024.effn-f32.pth --local-dir weights)"),
    (["data.videos={clips}", "dit.init_from=nothing"], "dit.init_from: nothing/config.json not found"),
    (["data.videos={clips}", "condition.semantic_weights=effnet.safetensors"],
     "condition.semantic_weights: effnet.safetensors not found"),
    (["data.videos={clips}", "run.dir=clip.mp4"], "run.dir clip.mp4: clip.mp4 is a file, not a folder"),
    (["data.videos={clips}", "run.dir=clip.mp4/run"], "run.dir clip.mp4/run: clip.mp4 is a file, not a folder"),
])
def test_missing_data_or_weights_fail_before_models_and_leave_no_run_dir(overrides, message, clips, tmp_path,
                                                                         monkeypatch, capsys, no_models):
    monkeypatch.chdir(tmp_path)                          # the config's own run.dir, runs/dit_tiny, would land here
    (tmp_path / "clip.mp4").write_bytes((clips / "clip_00000.mp4").read_bytes())
    (tmp_path / "bad.json").write_text("[{'path': 'single quotes'}]")
    before = set(tmp_path.iterdir())
    sets = [o.format(clips=clips) for o in overrides]
    line = one_line_error(*run_cli(capsys, "train", "--config", DIT_TINY, *(["--set", *sets] if sets else []))[::2],
                          "train")
    assert message in line
    assert set(tmp_path.iterdir()) == before and not (tmp_path / "runs").exists()


def test_the_official_finetune_command_names_what_is_missing_before_writing(clips, tmp_path, monkeypatch, capsys,
                                                                           no_models):
    # neither the release's example list nor its weights are in the repo; the first missing one is named
    monkeypatch.chdir(tmp_path)
    line = one_line_error(*run_cli(capsys, "train", "--config", OFFICIAL)[::2], "train")
    assert "data.videos: data source example/train.demo.txt not found" in line
    line = one_line_error(*run_cli(capsys, "train", "--config", OFFICIAL, "--set", f"data.videos={clips}",
                                   "data.val_count=1")[::2], "train")
    assert "dit.init_from: pretrained/s1024.effn-f32.pth not found: download s1024.effn-f32.pth" in line
    assert "hf download ByteDance/CascadeV" in line
    assert list(tmp_path.iterdir()) == []


def test_weights_that_fail_to_load_leave_no_run_dir(clips, tmp_path, capsys):
    # a Stage A on the hub, which the tests cannot reach (offline), fails while models are built:
    # the run dir is written only after they are, so nothing of the failed start stays
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--config", DIT_TINY, "--run-dir", run, "--set", f"data.videos={clips}",
                           "stage_a.overrides.pretrained=nobody/no-such-vae", *SMALL)
    assert code == 2 and "Stage A VAE" in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_cache_refuses_a_file_as_out_and_a_failed_start_leaves_no_cache(clips, tmp_path, capsys):
    taken = tmp_path / "taken.txt"
    taken.write_text("mine")
    base = ["cache-latents", "--config", DIT_TINY, "--set", f"data.videos={clips}", *SMALL]
    line = one_line_error(*run_cli(capsys, *base, "--out", taken)[::2], "cache-latents")
    assert f"--out {taken}: {taken} is a file, not a folder" in line and taken.read_text() == "mine"
    # a missing videos list, and a Stage A VAE that cannot load: cache.yaml used to be written before either failed
    cache = tmp_path / "cache"
    line = one_line_error(*run_cli(capsys, *base, "data.videos=nope.txt", "--out", cache)[::2], "cache-latents")
    assert "data.videos: data source nope.txt not found" in line
    code, _, err = run_cli(capsys, *base, "stage_a.overrides.pretrained=nobody/no-such-vae", "--out", cache)
    assert code == 2 and "Stage A VAE" in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.txt"]


def test_the_training_commands_are_the_modules_command_lines(capsys):
    """``cascadev train`` / ``cache-latents`` hand their arguments to the modules' ``main`` (one declaration of each
    option): the same options and usage errors, under the command's name; --debug is taken after the command too."""
    from cascadev.cli import build_parser, parse

    for command, option, required in (("train", "--resume-from", []), ("cache-latents", "--windows-per-clip",
                                                                          ["--out", "cache"])):
        code, out, _ = run_cli(capsys, command, "--help")
        assert code == 0 and out.startswith(f"usage: cascadev {command} ") and option in out
        code, _, err = run_cli(capsys, command, "--config", DIT_TINY, *required, "--bogus")
        assert code == 2 and err.strip().startswith(f"cascadev {command}: error: unrecognized arguments: --bogus")
    args = parse(build_parser(), ["train", "--config", "c.yaml", "--debug", "--set", "a=1", "b=2"])
    assert args.debug and args.forwarded == ["--config", "c.yaml", "--set", "a=1", "b=2"]
