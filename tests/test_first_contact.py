"""What a new user hit first (issue 32): outputs on a file system that takes no files, temp files of killed runs,
latents that say which cascade made them, the hub out of reach, several processes of a launch, and progress bars in
a log file."""

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import ROOT, run_cli, subprocess_env
from cascadev import weights as weights_module
from cascadev.weights import atomic_path, atomic_write, is_stale_temp_file, remove_stale_temp_files, temp_prefix

KERNEL_FOLDERS = [folder for folder in ("/proc", "/sys") if os.path.ismount(folder)]


def error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- 1. output checks: a file is made where the output goes, before any model loads -------------------------------

@pytest.mark.skipif(not KERNEL_FOLDERS, reason="no /proc or /sys mounted")
@pytest.mark.parametrize("name", ["x.mp4", "new/sub/x.mp4"])
def test_an_output_on_a_kernel_file_system_is_refused_up_front_naming_the_users_path(name, clip_file, capsys):
    for folder in KERNEL_FOLDERS:
        out = f"{folder}/{name}"
        code, stdout, err = run_cli(capsys, "reconstruct", clip_file, "-o", out, "--weights", "no_such_weights/")
        line = error_line(err)
        assert code == 2 and line.startswith(f"cascadev reconstruct: error: -o {out}: "), line
        assert "file system" in line and ".tmp" not in line
        assert "loading weights" not in stdout                       # refused before the weights' folder is read


def test_a_folder_that_refuses_files_is_named_by_the_check(tmp_path, monkeypatch):
    from cascadev.video_io import check_output_folder, check_video_output

    def refuse(*args, **kwargs):       # what a read-only or full file system answers, for root as for anyone
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("tempfile.mkstemp", refuse)
    with pytest.raises(ValueError, match=rf"^-o {tmp_path}/o.mp4: cannot create files in {tmp_path} \(permission"):
        check_video_output(tmp_path / "o.mp4")
    with pytest.raises(ValueError, match=r"^-o .*/a/b: cannot create files in .*/a \(permission denied\)$"):
        check_output_folder(tmp_path / "a" / "b", "-o")
    assert list(tmp_path.iterdir()) == []                              # the folder made to try was removed


def test_the_check_leaves_nothing_in_a_writable_folder(tmp_path):
    from cascadev.video_io import check_output_folder, check_video_output

    assert check_video_output(tmp_path / "o.mp4") == tmp_path / "o.mp4"
    assert check_output_folder(tmp_path / "run" / "a", "-o") == tmp_path / "run" / "a"
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_names_the_users_path_not_the_temp_file(tmp_path):
    target = tmp_path / "z.bin"

    def fail(tmp):
        raise OSError(28, "No space left on device", tmp)
    with pytest.raises(OSError) as info:
        atomic_write(target, fail)
    assert info.value.errno == 28 and info.value.filename == str(target) and ".tmp" not in str(info.value)

    class EncoderError(Exception):      # PyAV's errors carry errno, strerror and filename; not all are OSErrors
        def __init__(self, filename):
            super().__init__(filename)
            self.errno, self.strerror, self.filename = 22, "Invalid argument", filename

    def fail_encoding(tmp):
        raise EncoderError(tmp)
    with pytest.raises(OSError) as info:
        atomic_write(target, fail_encoding)
    assert info.value.errno == 22 and info.value.filename == str(target)
    if KERNEL_FOLDERS:       # no temp file can be made there (the "[Errno 2] ... '/proc/.x.mp4...tmp'")
        with pytest.raises(OSError) as info:
            atomic_write(f"{KERNEL_FOLDERS[0]}/x.bin", lambda tmp: None)
        assert info.value.filename == f"{KERNEL_FOLDERS[0]}/x.bin" and ".tmp" not in str(info.value)
    assert list(tmp_path.iterdir()) == []                              # a clean failure leaves nothing


# -- 2. temp files of killed runs ------------------------------------------------------------------------------

def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temp_files_are_those_of_dead_writers_here_or_a_day_old_elsewhere(tmp_path):
    mine, dead = temp_prefix(tmp_path / "a.mp4"), _dead_pid()
    machine = mine.split(".")[-2].split("-")[0]
    files = {
        f"{mine}abcd1234.tmp": False,                                  # this process: alive
        f".a.mp4.{machine}-{dead}.abcd1234.tmp": True,                 # this machine, its writer gone
        f".a.mp4.{'0' * 8}-{dead}.abcd1234.tmp": False,                # another machine, fresh
        f".b.mp4.{'0' * 8}-1.old_1234.tmp": True,                      # another machine, untouched for two days
        ".c.mp4.abcd1234.tmp": False,                                  # no writer's mark: maybe not ours
        "notes.tmp": False,
        f".d.mp4.{machine}-{dead}.abcd1234.tmp.keep": False,
    }
    for name in files:
        (tmp_path / name).write_bytes(b"x")
    two_days_ago = time.time() - 2 * weights_module.STALE_TEMP_AGE_S
    for name in (f".b.mp4.{'0' * 8}-1.old_1234.tmp", ".c.mp4.abcd1234.tmp", "notes.tmp"):
        os.utime(tmp_path / name, (two_days_ago, two_days_ago))
    assert {name: is_stale_temp_file(tmp_path / name) for name in files} == files
    assert sorted(p.name for p in remove_stale_temp_files(tmp_path)) == sorted(n for n, stale in files.items() if stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, stale in files.items() if not stale)


@pytest.mark.slow
def test_the_next_write_to_a_folder_removes_what_a_killed_run_left(tmp_path, monkeypatch):
    killed = subprocess.run(
        [sys.executable, "-c", "import os, signal, sys\nfrom cascadev.weights import atomic_path\n"
         "with atomic_path(sys.argv[1]) as tmp:\n    open(tmp, 'wb').write(b'half')\n"
         "    os.kill(os.getpid(), signal.SIGKILL)", str(tmp_path / "out.mp4")],
        env=subprocess_env(tmp_path, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".out.mp4.")
    monkeypatch.setattr(weights_module, "_swept", set())               # a new process: the folder not yet swept
    from cascadev.pipelines.latents import save_latents
    save_latents(tmp_path / "z.safetensors", torch.zeros(1, 16, 1, 1, 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp", "z.safetensors"]


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_removes_its_temp_file_and_says_so(tmp_path):
    stopped = subprocess.run(
        [sys.executable, "-c", "import os, signal, sys, time\nfrom cascadev.errors import run_guarded\n"
         "from cascadev.weights import atomic_path\ndef body():\n    with atomic_path(sys.argv[1]) as tmp:\n"
         "        open(tmp, 'wb').write(b'half')\n        os.kill(os.getpid(), signal.SIGTERM)\n"
         "        time.sleep(60)\nrun_guarded('cascadev decode', body)", str(tmp_path / "out.mp4")],
        env=subprocess_env(tmp_path, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 143 and stopped.stderr == "cascadev decode: terminated\n", stopped.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]


def test_a_writer_of_this_process_keeps_its_temp_file_while_another_file_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(weights_module, "_swept", set())
    with atomic_path(tmp_path / "long.mp4") as tmp:
        Path(tmp).write_bytes(b"piece")
        monkeypatch.setattr(weights_module, "_swept", set())
        atomic_write(tmp_path / "short.json", lambda t: Path(t).write_text("{}"))
        assert Path(tmp).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4", "short.json"]


# -- 6. latents record the cascade that made them ----------------------------------------------------------------

def test_the_decoder_record_names_built_in_cascades_portably_and_folders_absolutely(tmp_path, monkeypatch):
    from cascadev.cli.options import DECODER_KEY, decoder_record, recorded_decoder
    from cascadev.errors import UserError
    from cascadev.pipelines.cascade import TINY_CASCADE, TINY_DISTILLED

    assert decoder_record(TINY_CASCADE) == {DECODER_KEY: "builtin:tiny_cascade"}
    assert recorded_decoder(decoder_record(TINY_DISTILLED), "z") == str(TINY_DISTILLED)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    assert decoder_record("mine") == {DECODER_KEY: str(tmp_path / "mine")}
    assert decoder_record("owner/cascade") == {DECODER_KEY: "owner/cascade"}
    assert decoder_record(None) == {} and decoder_record("mine", (None, "dit.pth")) == {}
    assert recorded_decoder({}, "z") is None and recorded_decoder({"fps": "8"}, "z") is None
    with pytest.raises(UserError, match=r"^z.safetensors was made by the cascade in /gone/run, which is not there"):
        recorded_decoder({DECODER_KEY: "/gone/run"}, "z.safetensors")
    for name in ("tiny_future", "../assets/tiny_cascade", ""):
        with pytest.raises(UserError, match=f"built-in cascade '{name}', which this install does not have"):
            recorded_decoder({DECODER_KEY: "builtin:" + name}, "z.safetensors")


@pytest.mark.slow
def test_decode_without_weights_uses_the_cascade_that_made_the_latents(tmp_path, capsys, clip_file, tiny_pipeline_dir):
    from cascadev.pipelines.latents import read_latents

    z = tmp_path / "z.safetensors"
    code, _, err = run_cli(capsys, "reconstruct", clip_file, "-o", tmp_path / "r.mp4", "--weights", tiny_pipeline_dir,
                           "--frames", 4, "--steps", 1, "--latents-out", z)
    assert code == 0, err
    assert read_latents(z)[1]["decoder"] == str(tiny_pipeline_dir.resolve())
    code, out, err = run_cli(capsys, "decode", z, "-o", tmp_path / "d.mp4", "--steps", 1)     # no --weights, no hub
    assert code == 0, err
    assert f"the cascade that made these latents, {tiny_pipeline_dir.resolve()}" in out
    assert (tmp_path / "d.mp4").is_file()


# -- 5. the hub out of reach, several processes -----------------------------------------------------------------

def test_without_weights_offline_decode_fails_at_once_naming_the_built_in_cascade(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    from cascadev.cli.options import builtin_name
    from cascadev.pipelines.cascade import TINY_CASCADE
    from cascadev.pipelines.latents import save_latents

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)            # as a machine without network finds it
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))                # an empty cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    save_latents(tmp_path / "z.safetensors", torch.zeros(1, 16, 2, 2, 2))    # no record: the release decodes it
    start = time.perf_counter()
    code, _, err = run_cli(capsys, "decode", tmp_path / "z.safetensors", "-o", tmp_path / "o.mp4")
    assert code == 2 and time.perf_counter() - start < 20
    line = error_line(err)
    assert "hub cannot be reached" in line and line.endswith("--weights " + builtin_name(TINY_CASCADE)), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z.safetensors"]


def test_another_models_vae_from_an_unreachable_hub_is_one_line_at_once(tmp_path, capsys, monkeypatch):
    """`decode --source-vae OWNER/NAME` asks the hub once before loading the VAE, as the cascade's loading does: on a
    machine without network huggingface_hub's retry notices stayed beside our line."""
    from types import SimpleNamespace

    import huggingface_hub.utils
    from huggingface_hub import constants

    from cascadev.pipelines.latents import save_latents

    def unreachable(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)           # not told: the command must find out
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: SimpleNamespace(head=unreachable))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))                # an empty cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    save_latents(tmp_path / "z.safetensors", torch.zeros(1, 16, 2, 2, 2))
    code, _, err = run_cli(capsys, "decode", tmp_path / "z.safetensors", "-o", tmp_path / "o.mp4", "--source-vae",
                           "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "--source-vae-subfolder", "vae")
    assert code == 2 and constants.HF_HUB_OFFLINE, err
    assert err.strip().splitlines() == [error_line(err)] and "hf download Wan-AI" in err, err


@pytest.mark.slow
def test_the_readmes_torchrun_line_offline_is_one_line_of_ours_at_once(tmp_path):
    from cascadev.pipelines.latents import save_latents

    save_latents(tmp_path / "z.safetensors", torch.zeros(1, 16, 2, 2, 2))    # no record: the release decodes it
    env = subprocess_env(tmp_path, PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1",
                         HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "cascadev", "decode", "z.safetensors", "-o", "out.mp4"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and run.stdout.count("loading weights") == 1, run.stdout
    ours = [line for line in run.stderr.splitlines() if line.startswith("cascadev decode:")]
    assert len(ours) == 1 and "--weights" in ours[0] and "tiny_cascade" in ours[0], run.stderr[-3000:]
    assert "Retry" not in run.stderr and not (tmp_path / "out.mp4").exists()


@pytest.mark.parametrize("local_rank, said", [(None, True), ("0", True), ("1", False)])
def test_an_input_error_is_said_by_the_first_process_of_a_machine_only(local_rank, said, capsys, monkeypatch):
    from cascadev.errors import UserError, run_guarded

    if local_rank is not None:
        monkeypatch.setenv("LOCAL_RANK", local_rank)

    def bad():
        raise UserError("--steps must be >= 1, got 0")
    with pytest.raises(SystemExit) as info:
        run_guarded("cascadev decode", bad)
    assert info.value.code == 2
    assert capsys.readouterr().err == ("cascadev decode: error: --steps must be >= 1, got 0\n" if said else "")


# -- 8. progress bars and log records in a log file ----------------------------------------------------------------

def test_in_a_log_bars_are_whole_lines_ending_in_their_final_state_and_records_start_their_own_line(capsys,
                                                                                                   monkeypatch):
    from cascadev import progress

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    log = logging.getLogger("test_first_contact.bars")     # training's records, to stderr as train.py's handler
    handler = logging.StreamHandler(sys.stderr)
    log.addHandler(handler)
    monkeypatch.setattr(log, "propagate", False)           # (other tests leave handlers on the loggers above)
    try:
        bar = progress.progress_bar(total=3, desc="train")
        for step in range(3):
            bar.update(1)
            bar.set_postfix(loss=f"{1 / (step + 1):.3f}", refresh=False)
            log.warning("step %d logged", step + 1)
        bar.close()
        for _ in progress.progress_bar(range(1), desc="Stage A decode"):
            pass
    finally:
        log.removeHandler(handler)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [line for line in lines if "logged" in line] == ["step 1 logged", "step 2 logged", "step 3 logged"]
    assert all(line.startswith(("train:", "Stage A decode:", "step ")) for line in lines), lines
    assert "3/3" in [line for line in lines if line.startswith("train:")][-1]
    assert "1/1" in lines[-1] and lines[-1].startswith("Stage A decode: 100%")


def test_on_a_terminal_a_record_clears_the_live_bar_and_takes_a_line_of_its_own():
    import io

    from tqdm.auto import tqdm

    from cascadev.progress import BarAwareHandler

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    terminal = Terminal()
    log = logging.getLogger("test_first_contact.terminal")
    handler, log.propagate = BarAwareHandler(terminal), False
    log.addHandler(handler)
    try:
        with tqdm(total=3, desc="train", file=terminal, leave=False, mininterval=0) as bar:
            bar.update(1)
            log.warning("step 1 logged")
            bar.update(1)
    finally:
        log.removeHandler(handler)
    [line] = [line for line in terminal.getvalue().split("\n") if "logged" in line]
    assert line.rsplit("\r", 1)[-1] == "step 1 logged", repr(line)      # what the terminal shows on that line


def test_in_a_log_a_quick_bar_prints_nothing(capsys):
    from cascadev.progress import progress_bar

    for _ in progress_bar(range(4), desc="Stage A decode"):
        pass
    assert capsys.readouterr().err == ""


def test_a_saved_cascade_with_a_tiny_stage_a_loads_without_diffusers_config_notice(tmp_path):
    import json

    from diffusers.utils import logging as diffusers_logging

    from cascadev.pipelines.cascade import load_cascade
    from helpers import SHIPPED_CASCADE

    pipe = load_cascade(SHIPPED_CASCADE)
    assert "block_out_channels" in pipe.vae.config     # diffusers' pipelines read it from the loaded model
    pipe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert "block_out_channels" not in saved and saved["decoder_block_out_channels"] == [48, 48, 48, 48]
    notices = []
    handler = logging.Handler()
    handler.emit = lambda record: notices.append(record.getMessage())
    logger = diffusers_logging.get_logger("diffusers")
    logger.addHandler(handler)
    try:
        load_cascade(tmp_path)
    finally:
        logger.removeHandler(handler)
    assert not [n for n in notices if "were passed to" in n], notices
