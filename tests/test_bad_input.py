"""Every command answers bad input with one line and exit code 2, before any model loads, and leaves no file behind.

One table of cases, each a command line as a user would type it; ``{dir}`` is the case's own empty folder and
``{clip}``, ``{latents}``, ``{weights}`` are good inputs, so each case breaks exactly one thing.
"""

import math

import pytest
import torch
from safetensors.torch import save_file

from helpers import run_cli
from cascadev.pipelines.upscale import TINY_FPS4X

CASES = [
    # reconstruct: the input video
    ("reconstruct {dir}/missing.mp4 -o {dir}/o.mp4 --weights {weights}", "file not found"),
    ("reconstruct {dir}/text.mp4 -o {dir}/o.mp4 --weights {weights}", "text.mp4"),
    ("reconstruct {dir}/empty.mp4 -o {dir}/o.mp4 --weights {weights}", "empty.mp4"),
    ("reconstruct {clip} -o {dir}/o.mp4 --weights {weights} --start 500", "past the last frame"),
    ("reconstruct {clip} -o {dir}/o.mp4 --weights {weights} --frames 0", "--frames must be >= 1"),
    ("reconstruct {clip} -o {dir}/o.mp4 --weights {weights} --stride 0", "stride >= 1"),
    # reconstruct: where the results go
    ("reconstruct {clip} -o {dir} --weights {weights}", "is a directory"),
    ("reconstruct {clip} -o {dir}/o.gif --weights {weights}", "cannot write .gif"),
    ("reconstruct {clip} -o {dir}/o --weights {weights}", "without extension"),
    ("reconstruct {clip} -o {dir}/o.mp4 --compare {dir}/c.avi --weights {weights}", "--compare"),
    ("reconstruct {clip} -o {dir}/o.mp4 --latents-out {dir}/z.npy --weights {weights}", "--latents-out"),
    # reconstruct: sampling options
    ("reconstruct {clip} -o {dir}/o.mp4 --weights {weights} --steps 0", "--steps must be >= 1"),
    ("reconstruct {clip} -o {dir}/o.mp4 --weights {weights} --colour-fix -1", "--colour-fix must be >= 0"),
    ("reconstruct {clip} -o {dir}/o.mp4 --weights {weights} --window-batch 0", "--window-batch must be >= 1"),
    ("reconstruct {clip} -o {dir}/o.mp4 --weights {weights} --tile-stride 0", "--tile-stride must be >= 1"),
    ("reconstruct {clip} -o {dir}/o.mp4 --weights {weights} --tile-stride 17", "--tile-stride 17 is longer"),
    ("reconstruct {clip} -o {dir}/o.mp4 --weights {weights} --frame-stride 9", "--frame-stride 9 is longer"),
    ("reconstruct {clip} -o {dir}/o.mp4 --weights {weights} --tiling shifted --tile-stride 8",
     "apply to --tiling blend"),
    ("reconstruct {clip} -o {dir}/o.mp4 --weights {weights} --tiling official --tile-detail central",
     "--tile-detail central applies to --tiling blend and shifted"),
    ("reconstruct {clip} -o {dir}/o.mp4 --weights {weights} --device tpu7", "not a device"),
    ("reconstruct {clip} -o {dir}/o.mp4 --weights {weights} --device cuda", "no CUDA GPU"),
    ("reconstruct {clip} -o {dir}/o.mp4 --weights {weights} --crf 99", "--crf 99"),
    ("reconstruct {clip} -o {dir}/o.mp4 --weights {weights} --max-memory -1", "--max-memory must be >= 0"),
    ("reconstruct {clip} -o {dir}/o.mp4 --weights {weights} --offload model --device cpu", "--offload moves models"),
    ("train --config {dir}/bad.yaml", "bad.yaml"),
    ("train --config {dir}/missing.yaml", "missing.yaml"),
    ("reconstruct {clip} -o {dir}/o.mp4 --weights {dir}/nothing", "not found"),
    ("reconstruct {clip} -o {dir}/o.mp4 --weights no_such_weights/", "weights folder not found"),   # not a hub id
    ("reconstruct {clip} -o {dir}/o.mp4 --weights {dir}", "neither a cascade saved by save_pretrained"),
    ("reconstruct {clip} -o {dir}/o.mp4 --weights {fps4x}", "holds a CascadeVUpscalePipeline, not a CascadeVPipeline: "
                                                             "use it with cascadev upscale"),
    ("reconstruct {clip} -o {dir}/o.mp4 --weights {weights} --scheduler flow", "--force-scheduler"),
    # decode: the latents file
    ("decode {dir}/missing.safetensors -o {dir}/o.mp4 --weights {weights}", "not found"),
    ("decode {dir}/empty.safetensors -o {dir}/o.mp4 --weights {weights}", "cannot read latents"),
    ("decode {dir}/zero.safetensors -o {dir}/o.mp4 --weights {weights}", "zero-sized dimension"),
    ("decode {dir}/nan.safetensors -o {dir}/o.mp4 --weights {weights}", "NaN"),
    ("decode {dir}/channels.safetensors -o {dir}/o.mp4 --weights {weights}",
     "4-channel latents of another model? decode them through its VAE: decode --source-vae"),
    ("decode {dir}/tchw.safetensors -o {dir}/o.mp4 --weights {weights}", "is T before C"),
    ("decode {dir}/z.npy -o {dir}/o.mp4 --weights {weights}", ".safetensors or .pt"),
    ("decode {latents} -o {dir}/o.mp4 --weights {weights} --fps 0", "--fps must be positive"),
    ("decode {latents} -o {dir}/o.txt --weights {weights}", "cannot write .txt"),
    ("decode {latents} -o {dir}/o.mp4 --weights {weights} --scale 2", "are for another model's latents"),
    ("decode {latents} -o {dir}/o.mp4 --weights {weights} --raw-latents", "are for another model's latents"),
    ("decode {latents} -o {dir}/o.mp4 --weights {weights} --vae-scale 0.2", "--vae and --vae-scale are for"),
    # decode --source-vae: another model's VAE and latents
    ("decode {latents} -o {dir}/o.mp4 --weights {weights} --source-vae {dir}/nothing", "source VAE folder"),
    ("decode {latents} -o {dir}/o.mp4 --weights {weights} --source-vae {dir}", "no config.json in"),
    ("decode {latents} -o {dir}/o.mp4 --weights {weights} --source-vae {weights} --source-vae-subfolder vea",
     "vea: give the folder"),
    ("decode {latents} -o {dir}/o.mp4 --weights {weights} --source-vae {dir}/unknown", "'AutoencoderXL' is not a VAE"),
    ("decode {latents} -o {dir}/o.mp4 --weights {weights} --source-vae {weights}/vae", "16 channels but the source "
                                                                                        "VAE AutoencoderKL "),
    ("decode {dir}/flat.safetensors -o {dir}/o.mp4 --weights {weights} --source-vae {weights}/vae",
     "expected latents (C, T, h, w)"),
    ("decode {dir}/nan.safetensors -o {dir}/o.mp4 --weights {weights} --source-vae {weights}/vae", "NaN"),
    ("decode {latents} -o {dir}/o.mp4 --weights {weights} --source-vae {weights}/vae --latent-space sd-vae",
     "--source-vae replaces"),
    ("decode {latents} -o {dir}/o.mp4 --weights {weights} --source-vae {weights}/vae --scale 0",
     "--scale must be positive"),
    ("decode {latents} -o {dir}/o.mp4 --weights {weights} --source-vae {weights} --scale 2 --size 64", "not both"),
    ("decode {dir}/four.safetensors -o {dir}/o.mp4 --weights {weights} --source-vae {weights} --size 2k",
     "--size '2k': give a long side"),
    ("decode {latents} -o {dir}/o.mp4 --weights {weights} --size 1024", "semantic latents decode at 32x their size"),
    ("decode {latents} -o {dir}/o.mp4 --weights {weights} --skip-latent-frames 1", "are for another model's latents"),
    ("decode {dir}/four.safetensors -o {dir}/o.mp4 --weights {weights} --source-vae {weights} --skip-latent-frames 2",
     "--skip-latent-frames 2 leaves none of the 2 latent frames"),
    ("decode {dir}/four.safetensors -o {dir}/o.mp4 --weights {weights} --source-vae {weights} --skip-latent-frames -1",
     "--skip-latent-frames must be >= 0"),
    ("bench-recon {dir} -o {dir}/run --weights {weights} --crf 60", "--crf 60"),
    ("bench-recon {dir} -o {dir}/run --weights {weights} --fps -1", "--fps must be >= 0"),
    # generate, eval, convert, demo
    ("generate hello -o {dir}/o.mp4 --text-encoder bigG", "--text-encoder replaces"),
    ("generate hello -o {dir}/o.mp4 --weights {dir} --fps 0", "--fps must be positive"),
    ("generate hello -o {dir} --weights {dir}", "is a directory"),
    ("eval --real {dir}/missing --fake {dir}", "no such folder"),
    ("eval --real {dir} --fake {dir} --metrics psnr,fid", "unknown fid"),
    ("eval --real {dir} --fake {dir} --device nowhere", "not a device"),
    ("eval --real {dir} --fake {dir} --batch-size 0", "--batch-size must be >= 1"),
    ("eval --real {dir} --fake {dir} --metrics fvd --i3d-size 0", "--i3d-size must be >= 1"),
    ("eval --real {dir} --fake {dir} --workers -1", "--workers must be >= 0"),
    ("eval --real {dir} --fake {dir} --frames 0", "--frames must be >= 1"),
    ("eval --real {dir} --fake {dir} --metrics fvd --runs 0", "--runs must be >= 1"),
    ("eval --real {dir} --fake {dir} --size 0", "--size must be positive"),
    ("convert {dir}/missing {dir}/new", "missing: folder not found"),
    ("demo -o {dir}/d --clips 0", "--clips and --frames must be >= 1"),
    ("demo -o {dir}/d --size 50", "multiple of 32"),
    ("demo -o {dir}/d --weights {dir}", "no cascade here"),
    ("demo -o {dir}/d --weights {fps4x}", "holds a CascadeVUpscalePipeline, not a CascadeVPipeline"),
    ("generate hello -o {dir}/o.mp4 --weights {weights}", "holds a CascadeVPipeline, not a TextToVideoPipeline: "
                                                          "use it with cascadev reconstruct"),
    ("demo -o {dir}/d --colour-fix -2", "--colour-fix must be >= 0"),
    ("demo -o {clip}", "is a file, not a folder"),
    ("demo -o {clip} --fps-x4", "is a file, not a folder"),
    ("demo -o {clip}/sub --prompt hello", "is a file, not a folder"),
    ("reconstruct {clip} -o {dir}/o.mp4 --dtype fp64", "invalid choice: 'fp64' (choose from 'bf16', 'fp16', 'fp32') "
                                                      "(see cascadev reconstruct --help)"),
    ("demo -o {dir}/d --kind foo", "--kind must be one of mixed, pan, gradient, shapes, got 'foo'"),
    ("demo -o {dir}/d --fps-x4 --kind foo", "--kind must be one of"),
    ("generate hello -o {dir}/o.mp4 --num 0", "--num must be >= 1"),
    ("cache-latents --config {dir}/missing.yaml --out {dir}/c", "missing.yaml"),
    ("train --config {dir}/bad.yaml --max-steps 3", "bad.yaml"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_pipeline_dir, clip_file):
    root = tmp_path_factory.mktemp("good")
    latents = root / "z.safetensors"
    save_file({"latents": torch.randn(1, 16, 2, 2, 2)}, str(latents))
    return {"clip": clip_file, "latents": latents, "weights": tiny_pipeline_dir, "fps4x": TINY_FPS4X}


def _broken_files(folder):
    (folder / "text.mp4").write_text("not a video at all")
    (folder / "bad.yaml").write_text("stage: dit\nrun: {dir: [unclosed\n")
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "z.npy").write_bytes(b"\x93NUMPY")
    save_file({"latents": torch.zeros(1, 16, 0, 2, 2)}, str(folder / "zero.safetensors"))
    save_file({"latents": torch.full((1, 16, 2, 2, 2), math.nan)}, str(folder / "nan.safetensors"))
    save_file({"latents": torch.randn(1, 4, 2, 2, 2)}, str(folder / "channels.safetensors"))
    save_file({"latents": torch.randn(1, 2, 16, 2, 2)}, str(folder / "tchw.safetensors"))
    save_file({"latents": torch.randn(16, 2, 2)}, str(folder / "flat.safetensors"))
    save_file({"latents": torch.randn(1, 4, 2, 2, 2)}, str(folder / "four.safetensors"))
    (folder / "unknown").mkdir()
    (folder / "unknown" / "config.json").write_text('{"_class_name": "AutoencoderXL"}')


@pytest.mark.parametrize("line, message", CASES, ids=[f"{i:02d}-{c[0].split()[0]}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_and_leaves_nothing(line, message, inputs, tmp_path, capsys):
    _broken_files(tmp_path)
    before = set(tmp_path.iterdir())
    argv = line.format(dir=tmp_path, **inputs).split()
    code, _, err = run_cli(capsys, *argv)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert message in lines[-1], lines[-1]
    assert set(tmp_path.iterdir()) == before                        # no output, no temp file


@pytest.mark.parametrize("argv, debug", [(["info"], False), (["--debug", "info"], True), (["info", "--debug"], True)])
def test_debug_is_taken_before_or_after_the_command(argv, debug):
    from cascadev.cli import build_parser

    assert build_parser().parse_args(argv).debug is debug


def test_version_is_the_package_version(capsys):
    from cascadev import __version__

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"cascadev {__version__}"


def test_run_guarded_names_internal_errors_and_shows_their_traceback_only_under_debug(capsys):
    from cascadev.errors import UserError, run_guarded

    def broken():
        raise RuntimeError("a bug\nsecond line")
    for error, code in ((UserError("bad value"), 2), (FileNotFoundError("x.mp4"), 2), (RuntimeError("a bug"), 1)):
        def fail(error=error):
            raise error
        with pytest.raises(SystemExit) as exit_:
            run_guarded("prog", fail)
        assert exit_.value.code == code
    err = capsys.readouterr().err.splitlines()
    assert err == ["prog: error: bad value", "prog: error: x.mp4",
                   "prog: internal error: RuntimeError: a bug (run with --debug for the traceback)"]
    with pytest.raises(RuntimeError, match="a bug"):
        run_guarded("prog", broken, debug=True)
    assert run_guarded("prog", lambda: 7) == 7
