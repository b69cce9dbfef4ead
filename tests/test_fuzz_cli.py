"""Fuzzing every option of the commands that read and write media (hypothesis, derandomised so CI is stable).

Each example takes a good command line, sets one option to a drawn value (numbers at and around the edges, words,
NaN, missing and broken files, a folder), and runs it in-process. Properties: the exit code is 0 or 2 (never an
internal error), there is never a traceback, an error is one line and leaves the folder as it was, and whatever
a successful run writes our own readers read back.
"""

import argparse
import contextlib
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from helpers import run_cli
from cascadev.cli import build_parser
from cascadev.pipelines.cascade import TINY_CASCADE

pytestmark = pytest.mark.slow     # hundreds of command runs; the one-line errors have fast tests in test_bad_input.py

VALUES = ["-1", "0", "1", "2", "3", "0.5", "-0", "1e-9", "nan", "inf", "", "x", "{dir}", "{dir}/missing.mp4",
          "{dir}/text.mp4", "{dir}/empty.safetensors", "{dir}/out.gif", "{dir}/noext"]
FAST = ["--steps", "1", "--size", "64"]                       # successful runs stay small: tiny frames, one step
TRAIN = "--config {dit_tiny} --set data.videos={clips} data.height=32 data.width=32"
BASES = {    # command -> (a good command line, examples drawn)
    "reconstruct": ("reconstruct {clip} -o {dir}/o.mp4 --weights {weights} --frames 2 " + " ".join(FAST), 25),
    "decode": ("decode {latents} -o {dir}/o.mp4 --weights {weights} --steps 1", 25),
    "eval": ("eval --real {real} --fake {real} --metrics psnr,ssim --frames 2", 25),
    "bench-recon": ("bench-recon {real} -o {dir}/run --weights {weights} --frames 2 --metrics psnr "
                    + " ".join(FAST), 25),
    "info": ("info --dtype fp32", 25),
    "demo": ("demo -o {dir}/demo --clips 1 --frames 2 " + " ".join(FAST), 6),
    "generate": ("generate red -o {dir}/g.mp4 --frames 2 --size 64x64 --steps 1 --decode-steps 1", 15),
    "upscale": ("upscale {clip} -o {dir}/o.mp4 --weights {fps4x} --frames 2 --steps 1", 15),
    "train": ("train " + TRAIN + " run.tensorboard=false --max-steps 1 --run-dir {dir}/run", 10),
    "cache-latents": ("cache-latents " + TRAIN + " --out {dir}/cache", 10),
}
# inductor is slow; the base's paths
SKIP = {"--help", "--compile", "--output", "--real", "--fake", "--i3d", "--config"}


def options_of(command: str) -> list[argparse.Action]:
    """The options of one subcommand that take a value, as its parser declares them (train and cache-latents: the
    training modules' parsers, which ``cascadev train`` / ``cache-latents`` hand their arguments to)."""
    if command in ("train", "cache-latents"):
        from cascadev.training import cache_latents, train

        sub = (train if command == "train" else cache_latents).command_parser()
    else:
        sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return [a for a in sub._actions if a.option_strings and a.nargs != 0 and not SKIP & set(a.option_strings)]


def with_option(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag`` set to ``value`` (replacing its value when the base sets it)."""
    if flag in argv:
        i = argv.index(flag)
        return argv[:i + 1] + [value] + argv[i + 2:]
    return argv + [flag, value]


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_pipeline_dir, clip_file):
    from cascadev.synthetic import write_clips

    root = tmp_path_factory.mktemp("fuzz")
    write_clips(root / "clips", 2, frames=5, height=48, width=48)
    save_file({"latents": torch.randn(1, 16, 2, 2, 2)}, str(root / "z.safetensors"))
    (root / "real").mkdir()
    shutil.copy(clip_file, root / "real" / "a.mp4")
    return {"clip": clip_file, "latents": root / "z.safetensors", "weights": tiny_pipeline_dir, "real": root / "real",
            "clips": root / "clips", "fps4x": TINY_CASCADE.parent / "tiny_fps4x",
            "dit_tiny": Path(__file__).resolve().parents[1] / "configs" / "dit_tiny.yaml"}


def check_outputs_readable(paths: set[Path]) -> None:
    from cascadev.pipelines.latents import read_latents
    from cascadev.video_io import iter_video

    for path in (f for p in paths for f in ([p] if p.is_file() else p.rglob("*"))):
        if path.suffix in (".mp4", ".mkv", ".webm", ".avi", ".mov"):
            assert sum(piece.shape[2] for piece in iter_video(path, 4)) >= 1, path
        elif path.suffix == ".safetensors":          # a latents file, or a latent cache's clip
            tensors = load_file(str(path))
            assert (read_latents(path)[0].ndim == 5) if "latents" in tensors else tensors, path


def broken_files(folder: Path) -> None:
    (folder / "text.mp4").write_text("not a video")
    (folder / "empty.safetensors").write_bytes(b"")


@pytest.mark.parametrize("command", sorted(BASES))
def test_any_single_option_value_is_handled(command, good, capsys):
    actions = options_of(command)

    line, examples = BASES[command]
    with tempfile.TemporaryDirectory() as d:           # the good line itself succeeds: each example breaks one thing
        code, _, err = run_cli(capsys, *line.format(dir=d, **good).split())
        assert code == 0, err

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def run(data):
        action = data.draw(st.sampled_from(actions), label="option")
        words = st.sampled_from(VALUES) | st.integers(-3, 70).map(str)
        raw = data.draw(st.sampled_from([str(c) for c in action.choices]) | words if action.choices else words,
                        label="value")
        with tempfile.TemporaryDirectory() as d, contextlib.chdir(d):    # a relative output path lands here too
            folder = Path(d)
            broken_files(folder)
            before = set(folder.iterdir())
            value = raw.format(dir=folder)
            argv = with_option(line.format(dir=folder, **good).split(), action.option_strings[-1], value)
            code, _, err = run_cli(capsys, *argv)
            lines = [line for line in err.strip().splitlines() if line.strip() and "%|" not in line]   # bars closed
            assert code in (0, 2), (argv, err)
            assert "Traceback" not in err and "internal error" not in err, (argv, err)
            if code == 2:    # one line, what argparse rejects included
                assert len(lines) == 1 and lines[0].startswith(f"cascadev {command}: error: "), (argv, err)
                assert set(folder.iterdir()) == before, argv                      # nothing written, no temp file
            else:
                check_outputs_readable(set(folder.iterdir()) - before)

    run()
