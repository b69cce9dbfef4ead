"""The built-in tiny text-to-video cascade: shipped weights, ``cascadev demo --prompt``, ``cascadev generate``."""

import json

import pytest
import torch

from cascadev.cli.text2video import CASCADE
from cascadev.pipelines.latents import read_latents
from cascadev.video_io import video_info
from helpers import run_cli

PROMPT = "a fast yellow striped box with vertical stripes moving up over a dark background"


def test_shipped_weights_load_small_and_float32():
    from cascadev.cli.text2video import BUILTIN, builtin_settings, load_builtin

    assert sum(f.stat().st_size for f in BUILTIN.rglob("*") if f.is_file()) <= 5 * 2**20
    pipe = load_builtin(with_previewer=False)
    assert all(p.dtype == torch.float32 for m in (pipe.text_encoder, pipe.base) for p in m.parameters())
    c = pipe.base.config
    assert (c.caption_channels, c.pooled_channels) == (pipe.text_encoder.width, pipe.text_encoder.embed_dim)
    assert c.window_size * 32 == builtin_settings()["size"] and c.window_frames == builtin_settings()["frames"]
    pipe.set_progress_bar_config(disable=True)
    z = pipe(PROMPT, num_frames=2, height=64, width=64, num_inference_steps=2, guidance_scale=3.0,
             output_type="latent").latents
    assert z.shape == (1, 16, 2, 2, 2) and torch.isfinite(z).all()


def test_set_precision_casts_every_model_once_without_diffusers_warnings(capsys):
    from cascadev.cli.text2video import load_builtin

    pipe = load_builtin(with_previewer=False).set_precision(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for m in (pipe.text_encoder, pipe.base, pipe.dit, pipe.vae)
               for p in m.parameters())
    assert "kept in float32" not in capsys.readouterr().err     # what diffusers' to(dtype) printed per model
    pipe.set_progress_bar_config(disable=True)
    z = pipe(PROMPT, num_frames=2, height=64, width=64, num_inference_steps=2, guidance_scale=3.0,
             output_type="latent").latents
    assert z.shape == (1, 16, 2, 2, 2) and torch.isfinite(z).all()


def test_demo_prompt_end_to_end(tmp_path, capsys):
    code, stdout, err = run_cli(capsys, "demo", "--prompt", PROMPT, "-o", tmp_path, "--frames", 3, "--size", 64,
                                "--base-steps", 2, "--steps", 1)
    assert code == 0, err
    assert "never saw" not in stdout                                    # every word of PROMPT is a caption word
    info = video_info(tmp_path / "text2video.mp4")
    assert (info.frames, info.width, info.height) == (3, 128, 64)       # LDM-VAE | Previewer
    assert (tmp_path / "text2video.png").stat().st_size > 0
    results = json.loads((tmp_path / "text2video.json").read_text())
    assert results["prompt"] == PROMPT and results["base_steps"] == 2 and results["decode_steps"] == 1
    assert results["colour_fix"] == 16                                     # the shipped cascade's
    code, _, err = run_cli(capsys, "demo", "--prompt", PROMPT, "-o", tmp_path / "off", "--frames", 3, "--size", 64,
                           "--base-steps", 2, "--steps", 1, "--colour-fix", 0)
    assert code == 0, err
    assert json.loads((tmp_path / "off" / "text2video.json").read_text())["colour_fix"] == 0
    assert set(results["seconds"]) == {"stage_c", "stage_b_a", "previewer", "write", "total"}   # every stage ran


def test_generate_uses_the_builtin_weights(tmp_path, capsys):
    out, z = tmp_path / "v.mp4", tmp_path / "z.safetensors"
    code, stdout, err = run_cli(capsys, "generate", PROMPT, "-o", out, "--frames", 2, "--size", "64x32", "--steps", 2,
                                "--decode-steps", 1, "--latents-out", z)
    assert code == 0, err
    assert "built-in tiny text-to-video model" in stdout
    info = video_info(out)
    assert (info.frames, info.width, info.height) == (2, 64, 32)
    # the latents name their decoder, the built-in cascade: decode needs no --weights (and no hub)
    assert read_latents(z)[1]["decoder"] == "builtin:tiny_cascade"
    code, stdout, err = run_cli(capsys, "decode", z, "-o", tmp_path / "d.mp4", "--steps", 1)
    assert code == 0, err
    assert "the cascade that made these latents" in stdout and video_info(tmp_path / "d.mp4").frames == 2
    # another decoder folder (here the same tiny cascade): its Previewer is loaded for its saved or asked colour fix
    code, stdout, err = run_cli(capsys, "generate", f"{PROMPT} and a dog", "-o", tmp_path / "c.mp4", "--frames", 2,
                                "--size", "64x32",
                                "--steps", 2, "--decode-steps", 1, "--cascade", CASCADE, "--colour-fix", 16)
    assert code == 0, err
    assert "decode preview" in stdout                      # the colour fix ran the Previewer
    assert "note: the built-in model never saw and, dog: it knows its captions' words (disc, box, ring; red" in stdout


@pytest.mark.parametrize("argv, message", [
    (["demo", "--prompt", ""], "is empty"),
    (["demo", "--prompt", "   "], "is empty"),
    (["demo", "--prompt", PROMPT, "--guidance", "-1"], "--guidance must be >= 0"),
    (["demo", "--prompt", PROMPT, "--base-steps", "0"], "--base-steps must be >= 1"),
    (["demo", "--prompt", PROMPT, "--steps", "0"], "--steps must be >= 1"),
    (["demo", "--prompt", PROMPT, "--size", "50"], "--size 50 is not a positive multiple of 32"),
    (["demo", "--prompt", PROMPT, "--frames", "0"], "--frames must be >= 1"),
    (["demo", "--prompt", PROMPT, "--colour-fix", "-1"], "--colour-fix must be >= 0"),
    (["demo", "--prompt", PROMPT, "--colour-fix", "24"], "colour fix 24: 256x256 frames are not divisible"),
    (["demo", "--prompt", PROMPT, "--weights", "x", "--kind", "shapes"], "--weights, --kind: not used by --prompt"),
    (["demo", "--prompt", PROMPT, "--fps-x4"], "two demos: give one"),
    (["demo", "--steps", "0"], "--steps must be >= 1"),
    (["generate", "", "-o", "{dir}/o.mp4"], "is empty"),
    (["generate", PROMPT, "-o", "{dir}/o.mp4", "--text-encoder", "bigG"], "--text-encoder replaces"),
])
def test_bad_prompt_input_is_one_line_exit_2(argv, message, tmp_path, capsys):
    argv = [a.format(dir=tmp_path) for a in argv] + (["-o", str(tmp_path / "d")] if argv[0] == "demo" else [])
    code, _, err = run_cli(capsys, *argv)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_the_text_following_check_scores_and_probes_the_shipped_model(tmp_path):
    """scripts/eval_text2video.py on a few clips: the table's rows, and the word-swap probe, which must see that
    the shipped model relies on the colour and direction words (its samples follow both) far more than on nothing,
    and the paired word swap moves generated latents the way it moves real ones."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "eval_text2video.py"
    spec = importlib.util.spec_from_file_location("eval_text2video", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result = script.main(["--prompts", "3", "--seen", "6", "--fit", "36", "--guidance", "1,3", "--steps", "4",
                          "--paired", "2", "--out", str(tmp_path / "eval.json")])
    assert set(result["rows"]) == {"real clips, held-out prompts", "chance",
                                   *(f"generated, {s} prompts, guidance {g}" for s in ("held-out", "seen")
                                     for g in (1, 3))}
    assert result["rows"]["real clips, held-out prompts"]["colour"] == 1.0
    assert result["rows"]["chance"]["direction"] == 0.25
    probe = result["word_reliance"]
    assert set(probe) == {"0.5", "0.9", "0.97"}
    assert set(probe["0.9"]) == {"empty", "colour", "shape", "direction", "background"}
    assert probe["0.9"]["colour"] > 0.2 and probe["0.9"]["empty"] > 0.05
    assert probe["0.97"]["direction"] > 0.2            # the model before sigma_shift 6 ignored it (-0.5 %)
    paired = result["paired_swap"]
    assert set(paired) == {"colour", "shape", "direction"}
    assert all(set(v) == {"generated", "real"} for v in paired.values())
    assert paired["colour"]["generated"] > 0.3 and paired["direction"]["generated"] > 0.3
    assert json.loads((tmp_path / "eval.json").read_text())["word_reliance"] == probe
