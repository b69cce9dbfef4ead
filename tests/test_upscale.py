"""The resize route at inference: ``CascadeVUpscalePipeline`` and ``cascadev upscale`` (4x size or 4x frame rate)."""

import json

import pytest
import torch

from helpers import as_written, mean_abs, randomize_, run_cli

from cascadev.pipelines.conditioning import downsample_video, upsample_condition
from cascadev.pipelines.upscale import TINY_FPS4X, CascadeVUpscalePipeline, load_upscale
from cascadev.synthetic import make_clip
from cascadev.video_io import video_info


def tiny_upscaler(spatial_factor: int, temporal_factor: int, **settings) -> CascadeVUpscalePipeline:
    """Random tiny resize-route pipeline (DiT with 4 condition channels, tiny Stage A, 2 flow steps)."""
    from vae.stage_a import stage_a_settings
    from cascadev.pipelines.sampling import make_scheduler
    from dit import build_dit
    from vae import build_stage_a
    from vae.stage_a import PRESETS as STAGE_A_PRESETS

    return CascadeVUpscalePipeline(dit=randomize_(build_dit("tiny", cond_channels=4, learn_sigma=False), std=0.02),
                                   vae=build_stage_a("tiny").model, scheduler=make_scheduler("flow"),
                                   spatial_factor=spatial_factor, temporal_factor=temporal_factor,
                                   stage_a=stage_a_settings(STAGE_A_PRESETS["tiny"]), num_inference_steps=2, **settings)


@pytest.fixture(scope="module")
def route_dirs(tmp_path_factory):
    """{"x4": folder of a spatial x4 model, "fps4": folder of a temporal x4 model}."""
    root = tmp_path_factory.mktemp("routes")
    dirs = {"x4": root / "x4", "fps4": root / "fps4"}
    tiny_upscaler(4, 1).save_pretrained(str(dirs["x4"]))
    tiny_upscaler(1, 4).save_pretrained(str(dirs["fps4"]))
    return dirs


@pytest.fixture(scope="module")
def low_clip(tmp_path_factory):
    """A 3-frame 32x48 clip at 6 fps."""
    from cascadev.video_io import write_video

    path = tmp_path_factory.mktemp("low") / "low.mp4"
    write_video(path, make_clip(seed=5, frames=3, height=32, width=48), fps=6)
    return path


@pytest.mark.parametrize("factors", [(4, 1), (1, 4)], ids=["spatial_x4", "temporal_x4"])
def test_inference_condition_is_the_training_condition(factors):
    """Same clip: the DiT's condition built by the training task (from pixels or from the latent) equals the pipeline's
    condition for the downsampled clip, as a user gives it."""
    from cascadev.training.config import load_train_config
    from cascadev.training.tasks import DiTTask

    ks, kt = factors
    pipe = tiny_upscaler(ks, kt)
    clip = make_clip(seed=1, frames=8, height=64, width=64)[None]
    for resize_from in ("pixels", "latent"):
        config = load_train_config("configs/dit_tiny.yaml", [
            "condition.route=resize", f"condition.spatial_factor={ks}", f"condition.temporal_factor={kt}",
            f"condition.resize_from={resize_from}", "dit.overrides.cond_channels=4", "stage_a.preset=tiny"])
        task = DiTTask(config, load_weights=False, build_model=False)
        task.stage_a = pipe.stage_a                                   # the same Stage A weights
        x0, cond = task.inputs({"video": clip})
        ours = pipe.condition(pipe.encode(downsample_video(clip, ks, kt)))
        assert ours.shape == cond.shape == x0.shape == (1, 4, 8, 8, 8)
        if resize_from == "pixels":                                   # the release's way: bit-identical
            torch.testing.assert_close(ours, cond, rtol=0, atol=0)
        elif ks == 1:       # every 4th frame of the latent = the latent of every 4th frame (per-frame Stage A)
            torch.testing.assert_close(ours, cond, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factors,shape", [((4, 1), (1, 3, 3, 128, 192)), ((1, 4), (1, 3, 12, 32, 48))],
                         ids=["spatial_x4", "temporal_x4"])
def test_pipeline_output_shapes(factors, shape):
    pipe = tiny_upscaler(*factors)
    clip = make_clip(seed=2, frames=3, height=32, width=48)[None]
    out = pipe.upscale(video=clip)
    assert out.shape == shape and out.abs().max() <= 1
    z = pipe.encode(clip)
    from_latents = pipe.upscale(latents=z)
    assert from_latents.shape == shape
    if factors == (1, 4):     # the given frames are kept, the DiT's go between
        assert torch.equal(out[:, :, ::4], clip)
        assert torch.equal(out[:, :, 1::4], from_latents[:, :, 1::4])
        redone = pipe.upscale(video=clip, keep_input_frames=False)
        assert torch.equal(redone, from_latents)
    else:                     # the video's route is its latents' route (no colour fix here)
        assert torch.equal(out, from_latents)


def test_pipeline_call_is_diffusers_shaped():
    pipe = tiny_upscaler(4, 1)
    clip = make_clip(seed=2, frames=3, height=32, width=48)[None]
    steps = []
    out = pipe(video=clip, num_inference_steps=2, callback_on_step_end=lambda p, i, t, d: steps.append(i))
    assert steps == [0, 1] and torch.equal(out.frames, pipe.upscale(video=clip, steps=2))   # seed 0 without a generator
    as_np = pipe(video=clip, num_inference_steps=1, output_type="np").frames
    assert as_np.shape == (1, 3, 128, 192, 3) and 0 <= as_np.min() and as_np.max() <= 1
    latent = pipe(video=clip, num_inference_steps=1, output_type="latent", return_dict=False)[0]
    assert torch.equal(latent, pipe.upscale_latents(pipe.encode(clip), steps=1))
    runs = [pipe(latents=pipe.encode(clip), num_inference_steps=1, generator=torch.Generator().manual_seed(5)).frames
            for _ in range(2)]
    assert torch.equal(*runs) and not torch.equal(runs[0], pipe.upscale(video=clip, steps=1))  # its own noise
    zeroed = pipe(video=clip, num_inference_steps=1, output_type="latent",
                  callback_on_step_end=lambda p, i, t, d: {"latents": torch.zeros_like(d["latents"])}).frames
    assert torch.equal(zeroed, torch.zeros_like(zeroed))
    with pytest.raises(ValueError, match="output_type"):
        pipe(video=clip, output_type="mp4")


@pytest.mark.parametrize("route,size,frames,fps", [("x4", (192, 128), 3, 6.0), ("fps4", (48, 32), 12, 24.0)])
def test_cli_upscale_video_and_latents(tmp_path, capsys, route_dirs, low_clip, route, size, frames, fps):
    from cascadev.pipelines.latents import save_latents
    from cascadev.video_io import read_video, video_info

    out = tmp_path / "up.mp4"
    code, stdout, err = run_cli(capsys, "upscale", low_clip, "-o", out, "--weights", route_dirs[route],
                                "--compare", tmp_path / "cmp.mp4")
    assert code in (0, None), err
    info = video_info(out)
    assert (info.width, info.height, info.frames, info.fps) == (*size, frames, fps)
    assert video_info(tmp_path / "cmp.mp4").width == 2 * size[0]
    pipe = load_upscale(route_dirs[route])
    z = pipe.encode(make_clip(seed=5, frames=3, height=32, width=48)[None])
    save_latents(tmp_path / "z.safetensors", z, fps=6)
    code, _, err = run_cli(capsys, "upscale", tmp_path / "z.safetensors", "-o", tmp_path / "z.mp4",
                           "--weights", route_dirs[route], "--steps", 1, "--crf", 0)
    assert code in (0, None), err
    info = video_info(tmp_path / "z.mp4")
    assert (info.width, info.height, info.frames, info.fps) == (*size, frames, fps)
    want = as_written(pipe.upscale(latents=z, steps=1), tmp_path / "want.mp4")   # what the API gives
    assert mean_abs(read_video(tmp_path / "z.mp4"), want) < 2e-5


@pytest.mark.parametrize("factors", [(4, 1), (1, 4), (2, 3)])
def test_colour_fix_reference_is_the_condition_in_pixels_piece_by_piece(factors):
    """The colour fix's reference is the input brought to the output grid as the condition is; by pieces as whole."""
    pipe = tiny_upscaler(*factors)
    low = make_clip(seed=4, frames=5, height=16, width=24)[None]
    T, H, W = pipe.output_shape(*low.shape[2:])
    whole = upsample_condition(low, (T, H, W), factors[1])
    torch.testing.assert_close(pipe.colour_reference(low, 0, T), whole)
    cuts = [0, *(c for c in (1, 4, 7) if c < T), T]
    pieces = torch.cat([pipe.colour_reference(low, a, b) for a, b in zip(cuts, cuts[1:])], dim=2)
    torch.testing.assert_close(pieces, whole)


def test_colour_fix_takes_the_low_band_of_the_reference():
    from cascadev.pipelines.frames import fix_colour

    pipe = tiny_upscaler(1, 4, colour_fix=8)
    low = make_clip(seed=6, frames=2, height=32, width=32)[None]
    out = pipe.upscale(video=low)                   # the saved colour fix
    raw = pipe.upscale(video=low, colour_fix=0)     # the same sample, without it
    torch.testing.assert_close(out[:, :, 1:], fix_colour(raw.clone(), pipe.colour_reference(low, 0, 8), 8)[:, :, 1:]
                               .index_copy(2, torch.tensor([3]), low[:, :, 1:]))
    assert torch.equal(out[:, :, ::4], low) and torch.equal(raw[:, :, ::4], low)   # the given frames as given
    with pytest.raises(ValueError, match="colour fix"):
        pipe.check_input(2, 24, 32, colour_fix=16)


def test_route_factors_are_read_from_the_folder(route_dirs):
    saved = json.loads((route_dirs["fps4"] / "model_index.json").read_text())
    assert (saved["spatial_factor"], saved["temporal_factor"]) == (1, 4)
    assert load_upscale(route_dirs["x4"]).factors == (4, 1)


def test_bad_inputs_give_one_clear_line(tmp_path, capsys, route_dirs, low_clip, tiny_pipeline_dir):
    from cascadev.video_io import write_video

    def fails(*argv, says, loads=False):
        code, out, err = run_cli(capsys, "upscale", *argv)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
        assert ("loading weights" in out) == loads, out      # the input and the folder's settings are checked first

    fails(low_clip, "-o", tmp_path / "o.mp4", "--weights", tiny_pipeline_dir,
          says="holds a CascadeVPipeline, not a CascadeVUpscalePipeline: use it with cascadev reconstruct")
    fails(low_clip, "-o", tmp_path / "o.mp4", "--weights", tmp_path, says="not a resize-route model")
    fails(low_clip, "-o", tmp_path / "o.mp4", "--weights", tmp_path / "nope", says="weights folder not found")
    write_video(tmp_path / "odd.mp4", make_clip(seed=1, frames=3, height=36, width=48), fps=6)
    fails(tmp_path / "odd.mp4", "-o", tmp_path / "o.mp4", "--weights", route_dirs["x4"], says="multiple of 8")
    fails(low_clip, "-o", tmp_path / "o.mp4", "--weights", route_dirs["fps4"], "--frames", 1, says="at least 2")
    fails(low_clip, "-o", tmp_path / "o.mp4", "--weights", route_dirs["fps4"], "--steps", 0, says="--steps")
    fails(low_clip, "-o", tmp_path / "o.txt", "--weights", route_dirs["fps4"], says="o.txt")
    fails(low_clip, "-o", tmp_path / "o.mp4", "--weights", route_dirs["x4"], "--regenerate-input-frames",
          says="frame-rate-only")
    fails(low_clip, "-o", tmp_path / "o.mp4", "--weights", route_dirs["fps4"], "--colour-fix", 32, says="colour fix")
    fails(low_clip, "-o", tmp_path / "o.mp4", "--weights", route_dirs["fps4"], "--colour-fix", -1, says="--colour-fix")
    torch.save(torch.zeros(1, 16, 2, 4, 4), tmp_path / "c16.pt")
    fails(tmp_path / "c16.pt", "-o", tmp_path / "o.mp4", "--weights", route_dirs["fps4"], says="(B, 4, T, h, w)")
    # the flow-trained route with an eps sampler would be noise, not an upscale
    fails(low_clip, "-o", tmp_path / "o.mp4", "--weights", route_dirs["fps4"], "--scheduler", "euler_a",
          says="does not fit this DiT", loads=True)
    fails(low_clip, "-o", tmp_path / "o.mp4", "--weights", route_dirs["fps4"], "--tile-stride", 99,
          says="longer than the DiT's window", loads=True)
    fails(low_clip, "-o", tmp_path / "o.mp4", "--weights", route_dirs["fps4"], "--offload", "model",
          says="--offload")
    fails(low_clip, "-o", tmp_path / "o.mp4", "--weights", route_dirs["fps4"], "--max-memory", -1, says="--max-memory")


@pytest.mark.slow
def test_cli_runtime_options_are_the_decoders(tmp_path, capsys, route_dirs, low_clip):
    """``upscale`` runs as ``decode`` does (``options.prepare_pipeline``): batched windows give the default output
    (within fp32 rounding); the sampler and tiling options reach the DiT."""
    from cascadev.video_io import read_video

    def upscale(name, *options):
        code, _, err = run_cli(capsys, "upscale", low_clip, "-o", tmp_path / name, "--weights", route_dirs["fps4"],
                               "--steps", 1, "--crf", 0, *options)
        assert code in (0, None), err
        return read_video(tmp_path / name)

    default = upscale("default.mp4")
    # lossless H.264 (--crf 0): batching's fp32 rounding flips only a few 8-bit levels (mean 4e-7), a stride 2e-3
    assert (upscale("batched.mp4", "--window-batch", 3, "--no-tf32") - default).abs().mean() < 2e-5
    assert (upscale("strided.mp4", "--frame-stride", 1) - default).abs().mean() > 2e-4
    assert not torch.equal(upscale("forced.mp4", "--scheduler", "euler_a", "--force-scheduler"), default)

    pipe = load_upscale(route_dirs["fps4"]).set_precision(torch.bfloat16, attn_fp32=True).set_stage_a_memory(0.5)
    assert pipe.dit.dtype == torch.bfloat16 and pipe.dit.blocks[0].attn.fp32 and pipe.stage_a.config.max_memory == 0.5


def test_the_api_refuses_pixels_of_another_range_and_zero_steps():
    pipe = tiny_upscaler(1, 4)
    with pytest.raises(ValueError, match=r"CascadeVUpscalePipeline.encode: pixel values span"):
        pipe.upscale(video=torch.rand(1, 3, 2, 32, 48) * 255)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        pipe.upscale(latents=torch.zeros(1, 4, 2, 4, 6), steps=0)


def test_a_semantic_route_dit_is_refused():
    from cascadev.pipelines.sampling import make_scheduler
    from dit import build_dit
    from vae import build_stage_a

    with pytest.raises(ValueError, match="not a resize-route DiT"):
        CascadeVUpscalePipeline(dit=build_dit("tiny"), vae=build_stage_a("tiny").model,
                                scheduler=make_scheduler("flow"))


@pytest.mark.skipif(not (TINY_FPS4X / "model_index.json").is_file(), reason="tiny_fps4x not built")
@pytest.mark.slow
def test_shipped_fps4x_loads_and_its_demo_runs(tmp_path, capsys, low_clip):
    pipe = load_upscale(TINY_FPS4X)
    assert pipe.factors == (1, 4) and pipe.dit.dtype == torch.float32
    code, stdout, err = run_cli(capsys, "demo", "--fps-x4", "-o", tmp_path, "--clips", 1, "--frames", 2, "--size", 64)
    assert code in (0, None), err
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) >= {"ours", "repeat", "blend", "ours_without_colour_fix"} and results["output_frames"] == 8
    # measured: ours 19.80 dB, repeat 19.33, without the colour fix 18.96 (blend 21.64 wins at 64 px)
    psnr = {m: results[m]["psnr"] for m in ("ours", "repeat", "ours_without_colour_fix")}
    assert 17 < psnr["ours"] < 25 and psnr["ours"] > psnr["repeat"] and psnr["ours"] > psnr["ours_without_colour_fix"]
    assert all(results[m]["sharpness"] > 0 for m in ("ours", "repeat", "blend", "ours_without_colour_fix"))
    assert (tmp_path / "side_by_side.mp4").is_file()
    # upscale without --weights: the same built-in model, from any working directory
    code, stdout, err = run_cli(capsys, "upscale", low_clip, "-o", tmp_path / "up.mp4", "--steps", 1)
    assert code in (0, None), err
    assert "no --weights: the built-in tiny 4x frame-rate model" in stdout
    info = video_info(tmp_path / "up.mp4")
    assert (info.frames, info.width, info.height, info.fps) == (12, 48, 32, 24)        # 3 frames at 6 fps, x4


def test_init_new_condition_starts_a_resize_dit_from_a_semantic_one(tmp_path):
    """dit.init_new_condition: every weight of the semantic-route DiT, but the condition's patch-embedding columns
    (16 there, 4 here), which start at zero."""
    from cascadev.training.config import load_train_config
    from cascadev.training.tasks import build_dit
    from dit import build_dit as build_video_dit

    source = randomize_(build_video_dit("tiny"))
    source.save_pretrained(str(tmp_path / "semantic_dit"))
    overrides = ["condition.route=resize", "dit.overrides.cond_channels=4",
                 f"dit.init_from={tmp_path / 'semantic_dit'}"]
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_dit(load_train_config("configs/dit_tiny.yaml", overrides), load_weights=True)
    model = build_dit(load_train_config("configs/dit_tiny.yaml", overrides + ["dit.init_new_condition=true"]), True)
    w, w0 = model.x_embedder.proj.weight, source.x_embedder.proj.weight
    assert w.shape[1] == 8 and torch.equal(w[:, :4], w0[:, :4]) and not w[:, 4:].any()
    ours, theirs = model.state_dict(), source.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k != "x_embedder.proj.weight")
    with pytest.raises(ValueError, match="needs dit.init_from"):
        load_train_config("configs/dit_tiny.yaml", ["dit.init_new_condition=true"])


def test_cli_upscale_with_shifted_tiling(tmp_path, capsys, route_dirs, low_clip):
    from cascadev.video_io import read_video

    outputs = {}
    for tiling in ("shifted", "blend"):
        code, _, err = run_cli(capsys, "upscale", low_clip, "-o", tmp_path / f"{tiling}.mp4", "--weights",
                               route_dirs["x4"], "--tiling", tiling, "--crf", 0)
        assert code in (0, None), err
        outputs[tiling] = read_video(tmp_path / f"{tiling}.mp4")
    assert outputs["shifted"].shape == outputs["blend"].shape
