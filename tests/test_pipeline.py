import pytest
import torch

from helpers import ROOT, run_cli, tiny_cascade
from cascadev.pipelines.cascade import CascadeVPipeline, resolve_colour_fix, seeded_noise
from cascadev.pipelines.latents import load_latents, save_latents
from cascadev.pipelines.frames import round_size
from cascadev.video_io import read_video, video_info


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return CascadeVPipeline.from_pretrained(str(tiny_pipeline_dir))


def test_reconstruct_api_shapes_range_and_seeding(pipe, clip_file):
    video = read_video(clip_file, num_frames=5)
    latents = pipe.encode(video)
    assert latents.shape == (1, 16, 5, 3, 5)
    recon = pipe.decode(latents, steps=2, seed=1)
    assert recon.shape == video.shape and recon.abs().max() <= 1
    torch.testing.assert_close(pipe.decode(latents, steps=2, seed=1), recon, rtol=0, atol=0)
    assert not torch.allclose(pipe.decode(latents, steps=2, seed=2), recon)
    assert pipe.preview(latents).shape == video.shape
    assert set(pipe.timings) >= {"encode", "dit", "stage_a", "preview"}


def test_progress_bars_follow_set_progress_bar_config(capfd, monkeypatch):
    """The DiT's steps go through diffusers' ``progress_bar``; ``set_progress_bar_config(disable=True)`` silences
    them, Stage A's and the semantic encoder's."""
    monkeypatch.setattr("cascadev.progress.LOG_INTERVAL_S", 0.0)    # captured output is a log: bars show when slow
    pipe, video = tiny_cascade(), torch.rand(1, 3, 2, 64, 64) * 2 - 1
    capfd.readouterr()
    pipe.reconstruct(video, steps=3)
    err = capfd.readouterr().err
    assert "denoising" in err and "0/3" in err and "semantic encode" in err and "Stage A decode" in err
    pipe.set_progress_bar_config(disable=True)
    pipe.reconstruct(video, steps=3)
    assert capfd.readouterr().err == ""


def test_the_api_refuses_pixels_of_another_range_zero_steps_and_no_frames(pipe):
    """Frames in [0, 255] (a common slip) fail in one line naming the convention; steps=0 is refused, not read as
    the default; a clip of no frames is refused before the DiT divides by its length."""
    frames = torch.rand(1, 3, 2, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    with pytest.raises(ValueError, match=r"CascadeVPipeline.encode: pixel values span \[0.*, 25.*\]; videos are in"):
        pipe.reconstruct(frames, steps=1)
    assert pipe.reconstruct(frames / 127.5 - 1, steps=1).shape == (1, 3, 2, 64, 64)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        pipe.decode(torch.randn(1, 16, 2, 2, 2), steps=0)
    with pytest.raises(ValueError, match=r"CascadeVPipeline.decode: empty input of shape \(1, 16, 0, 2, 2\)"):
        pipe.decode(torch.randn(1, 16, 0, 2, 2), steps=1)


def test_colour_fix_none_is_the_saved_setting_where_the_previewer_is_loaded():
    """As ``steps=None`` is the saved steps: ``colour_fix=None`` is the folder's (16 for the shipped cascade), 0 is
    off, and without the Previewer it needs None is off."""
    from helpers import SHIPPED_CASCADE

    shipped = CascadeVPipeline.from_pretrained(str(SHIPPED_CASCADE))
    z = shipped.encode(torch.rand(1, 3, 2, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    run = lambda p, **kw: p.decode(z, steps=1, **kw)        # noqa: E731
    assert shipped.config.colour_fix == 16
    assert torch.equal(run(shipped), run(shipped, colour_fix=16))
    assert not torch.equal(run(shipped), run(shipped, colour_fix=0))
    bare = CascadeVPipeline.from_pretrained(str(SHIPPED_CASCADE), previewer=None)
    assert torch.equal(run(bare), run(shipped, colour_fix=0))


def test_noise_is_drawn_frames_first_like_the_release():
    noise = seeded_noise((1, 4, 3, 2, 2), seed=5)
    expected = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(5)).permute(1, 0, 2, 3)
    torch.testing.assert_close(noise[0], expected, rtol=0, atol=0)


def test_round_size_keeps_aspect():
    assert round_size(1080, 1920, 1024) == (576, 1024)
    assert round_size(100, 150) == (96, 160)


def test_cli_reconstruct_end_to_end(tmp_path, capsys, tiny_pipeline_dir, clip_file):
    out, side, z = tmp_path / "recon.mp4", tmp_path / "side.mp4", tmp_path / "z.safetensors"
    code, stdout, err = run_cli(capsys, "reconstruct", clip_file, "-o", out, "--weights", tiny_pipeline_dir,
                                "--steps", 2, "--compare", side, "--latents-out", z, "--frames", 8, "--start", 1,
                                "--crf", 0)
    assert code == 0, err
    assert "PSNR" in stdout and "time: encode" in stdout
    info = video_info(out)
    assert (info.frames, info.height, info.width) == (8, 96, 160)
    assert video_info(side).width == 320
    assert load_latents(z).shape == (1, 16, 8, 3, 5)
    want = CascadeVPipeline.from_pretrained(str(tiny_pipeline_dir)).encode(read_video(clip_file, 8, start=1))
    assert (load_latents(z) - want).norm() / want.norm() < 1e-4     # frames 1-8 as the API encodes them (in pieces)

    # decode those latents again, from safetensors and from a 4D .pt: the same frames as the reconstruction
    torch.save(load_latents(z)[0], tmp_path / "z.pt")
    for latents in (z, tmp_path / "z.pt"):
        code, stdout, err = run_cli(capsys, "decode", latents, "-o", tmp_path / "dec.mp4", "--weights",
                                    tiny_pipeline_dir, "--steps", 2, "--crf", 0)
        assert code == 0, err
        assert torch.equal(read_video(tmp_path / "dec.mp4"), read_video(out))


def test_cli_resizes_to_multiples_of_32_and_says_so(tmp_path, capsys, tiny_pipeline_dir, clip_file):
    code, stdout, err = run_cli(capsys, "reconstruct", clip_file, "-o", tmp_path / "r.mp4",
                                "--weights", tiny_pipeline_dir, "--steps", 1, "--size", 200, "--frames", 4)
    assert code == 0, err
    assert stdout.count("resizing 160x96 -> 192x128") == 1
    assert (video_info(tmp_path / "r.mp4").width, video_info(tmp_path / "r.mp4").height) == (192, 128)


def test_sd_vae_route_upscales_through_the_cascade(tmp_path, capsys, tiny_pipeline_dir):
    their_latents = torch.randn(4, 5, 6, 8) * 0.5  # a 5-frame 64x48 video in an SD-family VAE's f8 latent space
    save_latents(tmp_path / "sd.safetensors", their_latents[None])
    code, stdout, err = run_cli(capsys, "decode", tmp_path / "sd.safetensors", "-o", tmp_path / "up.mp4",
                                "--latent-space", "sd-vae", "--vae", tiny_pipeline_dir / "vae", "--scale", 2,
                                "--weights", tiny_pipeline_dir, "--steps", 1)
    assert code == 0, err
    assert "upscaling 64x48 -> 128x96" in stdout
    info = video_info(tmp_path / "up.mp4")
    assert (info.frames, info.width, info.height) == (5, 128, 96)


def test_bad_inputs_give_one_clear_line(tmp_path, capsys, tiny_pipeline_dir):
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    code, _, err = run_cli(capsys, "reconstruct", tmp_path / "broken.mp4", "-o", tmp_path / "o.mp4",
                           "--weights", tiny_pipeline_dir)
    assert code == 2 and err.count("\n") == 1 and "broken.mp4" in err and "not a readable video" in err

    save_latents(tmp_path / "c8.safetensors", torch.randn(1, 8, 4, 3, 5))
    code, _, err = run_cli(capsys, "decode", tmp_path / "c8.safetensors", "-o", tmp_path / "o.mp4",
                           "--weights", tiny_pipeline_dir)
    assert code == 2 and err.count("\n") == 1 and "expected latents (16, T, h, w)" in err

    bad = torch.randn(16, 4, 3, 5)
    bad[0, 0, 0, 0] = float("nan")
    save_latents(tmp_path / "nan.safetensors", bad[None])
    code, _, err = run_cli(capsys, "decode", tmp_path / "nan.safetensors", "-o", tmp_path / "o.mp4",
                           "--weights", tiny_pipeline_dir)
    assert code == 2 and err.count("\n") == 1 and "NaN" in err

    save_latents(tmp_path / "ok.safetensors", torch.randn(1, 16, 4, 3, 5))
    code, _, err = run_cli(capsys, "decode", tmp_path / "ok.safetensors", "-o", tmp_path / "o.mp4",
                           "--weights", tmp_path / "nowhere")
    assert code == 2 and err.count("\n") == 1 and "nowhere" in err
    code, _, err = run_cli(capsys, "decode", tmp_path / "ok.safetensors", "-o", tmp_path / "o.mp4",
                           "--weights", tiny_pipeline_dir, "--colour-fix", -1)
    assert code == 2 and err.count("\n") == 1 and "--colour-fix must be >= 0" in err
    code, _, err = run_cli(capsys, "decode", tmp_path / "ok.safetensors", "-o", tmp_path / "o.mp4",
                           "--weights", tiny_pipeline_dir, "--colour-fix", 64, "--steps", 1)
    assert code == 2 and err.count("\n") == 1 and "frames are not divisible by 64" in err

    with pytest.raises(ValueError, match=r"expected 3 channels.*is T before C"):
        CascadeVPipeline.from_pretrained(str(tiny_pipeline_dir)).encode(torch.zeros(1, 4, 3, 32, 32))
    with pytest.raises(ValueError, match="H=40 is not a positive multiple of 32"):
        CascadeVPipeline.from_pretrained(str(tiny_pipeline_dir)).encode(torch.zeros(1, 3, 2, 40, 32))


def test_dit_and_stage_a_must_agree_on_latent_channels():
    from cascadev.pipelines.sampling import make_scheduler
    from dit import build_dit
    from vae import build_semantic_encoder, build_stage_a

    with pytest.raises(ValueError, match="4-channel latents but the Stage A VAE decodes 8"):
        CascadeVPipeline(dit=build_dit("tiny"), semantic_encoder=build_semantic_encoder("tiny"),
                         vae=build_stage_a("tiny", latent_channels=8).model, scheduler=make_scheduler("euler_a"))


def test_sampler_defaults_follow_the_folder(tiny_pipeline_dir):
    from diffusers import EulerAncestralDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    from cascadev.pipelines.cascade import TINY_CASCADE

    # the built-in tiny cascade is a flow model, saved with its scheduler and step count
    shipped = CascadeVPipeline.from_pretrained(str(TINY_CASCADE))
    assert type(shipped.scheduler) is FlowMatchEulerDiscreteScheduler and shipped.config.num_inference_steps == 4
    # other family: forced
    assert type(shipped.resolve_scheduler("euler_a", force=True)) is EulerAncestralDiscreteScheduler
    # a scheduler of the saved one's class keeps the saved config (e.g. the flow shift it was trained at)
    shifted = tiny_cascade(num_inference_steps=3)
    shifted.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert shifted.resolve_scheduler("flow").config.shift == 3.0
    assert shifted.resolve_scheduler(None) is shifted.scheduler
    # the release's sampler: 8 steps of EulerAncestralDiscreteScheduler()
    release = CascadeVPipeline.from_pretrained(str(tiny_pipeline_dir))
    assert type(release.scheduler) is EulerAncestralDiscreteScheduler and release.config.num_inference_steps == 8
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(release.scheduler.config) == public(EulerAncestralDiscreteScheduler().config)


def test_colour_fix_takes_the_low_band_from_the_reference():
    from cascadev.pipelines.frames import fix_colour

    torch.manual_seed(0)
    video = 0.4 * torch.rand(1, 3, 2, 64, 96) - 0.2
    torch.testing.assert_close(fix_colour(video, video, 16), video, rtol=0, atol=1e-6)
    shift = torch.tensor([0.1, -0.2, 0.05]).view(1, 3, 1, 1, 1)    # a colour cast over the whole frame
    torch.testing.assert_close(fix_colour(video, video + shift, 16), video + shift, rtol=0, atol=1e-6)
    # a video = smooth colour field + fine detail; the reference has another smooth field and no detail: the fix
    # keeps the detail on the reference's field
    detail = 0.2 * torch.rand(1, 3, 2, 64, 96) - 0.1
    field_a = torch.linspace(-0.3, 0.3, 96).expand(1, 3, 2, 64, 96)
    field_b = torch.linspace(0.4, -0.2, 64)[:, None].expand(1, 3, 2, 64, 96)
    fixed = fix_colour(field_a + detail, field_b, 8)
    target = field_b + detail
    assert (fixed - target).abs().mean() < 0.05 * (field_a - field_b).abs().mean()
    with pytest.raises(ValueError, match="frames are not divisible by 24"):
        fix_colour(video, video, 24)


def test_decode_with_colour_fix_equals_the_fix_applied_to_the_plain_decode(pipe, tiny_pipeline_dir):
    from cascadev.pipelines.frames import fix_colour

    latents = torch.randn(1, 16, 2, 2, 2)
    plain = pipe.decode(latents, steps=1, seed=3)
    fixed = pipe.decode(latents, steps=1, seed=3, colour_fix=16)
    torch.testing.assert_close(fixed, fix_colour(plain, pipe.preview(latents), 16), rtol=0, atol=0)
    assert not torch.allclose(fixed, plain)
    without = CascadeVPipeline.from_pretrained(str(tiny_pipeline_dir), previewer=None)
    with pytest.raises(ValueError, match="colour_fix needs the Previewer"):
        without.decode(latents, steps=1, colour_fix=16)


def test_colour_fix_default_follows_the_folder(pipe):
    from cascadev.pipelines.cascade import TINY_CASCADE

    shipped = CascadeVPipeline.from_pretrained(str(TINY_CASCADE))
    assert resolve_colour_fix(shipped, None) == 16 and resolve_colour_fix(shipped, 0) is None
    assert resolve_colour_fix(shipped, 8) == 8
    assert resolve_colour_fix(pipe, None) is None   # the release: off
    with pytest.raises(ValueError, match="must be >= 0"):
        resolve_colour_fix(shipped, -1)


@pytest.mark.slow
def test_the_cascade_imports_without_the_text_side():
    """Decoding needs no open_clip (the GPU image and many users' environments lack it)."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['open_clip'] = None\n"
            "import cascadev.pipelines.cascade, cascadev.pipelines.sampling, cascadev.cli.decode")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-500:]


def test_the_command_line_parses_without_torch():
    """``cascadev --help`` and a mistyped option answer at once: building the parser imports neither torch nor
    diffusers (each command imports them when it runs; they took 5 s here)."""
    import subprocess
    import sys
    code = ("import sys; from cascadev.cli import build_parser; build_parser().parse_args(['decode', 'z.pt', '-o', "
            "'o.mp4', '--dtype', 'bf16', '--window-batch', '2']); "
            "heavy = {'torch', 'diffusers', 'av'} & set(sys.modules); assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-500:]


@pytest.mark.slow
def test_cli_half_precision_batched_windows_and_bad_options(tmp_path, capsys, tiny_pipeline_dir, clip_file):
    fp32, bf16 = tmp_path / "fp32.safetensors", tmp_path / "bf16.safetensors"
    common = ["--weights", tiny_pipeline_dir, "--steps", 2, "--frames", 8, "--size", "256x128"]
    code, _, err = run_cli(capsys, "reconstruct", clip_file, "-o", tmp_path / "a.mp4", "--latents-out", fp32, *common)
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "reconstruct", clip_file, "-o", tmp_path / "b.mp4", "--latents-out", bf16,
                                "--dtype", "bf16", "--window-batch", 3, *common)
    assert code == 0, err
    rel = ((load_latents(bf16) - load_latents(fp32)).norm() / load_latents(fp32).norm()).item()
    assert 0 < rel < 0.02, rel          # the semantic encoder in bf16
    assert "PSNR" in stdout
    for option, message in ((["--window-batch", 0], "--window-batch must be >= 1"),
                            (["--offload", "model", "--device", "cpu"], "--offload moves models to a GPU")):
        code, _, err = run_cli(capsys, "reconstruct", clip_file, "-o", tmp_path / "c.mp4", *common, *option)
        assert code == 2 and message in err and "Traceback" not in err, err


@pytest.mark.slow
def test_cli_streams_a_long_clip_and_matches_the_in_memory_path(tmp_path, capsys):
    """24 frames: three Stage A chunks and two pieces of input read; the CLI never holds the whole clip, yet it writes
    the frames of the pipeline's in-memory decode. The shipped cascade, whose output follows its input: a piece read
    twice or out of order would show."""
    from cascadev.synthetic import make_clip
    from cascadev.video_io import write_video
    from helpers import SHIPPED_CASCADE, as_written, mean_abs
    from eval.metrics import psnr

    clip = tmp_path / "long.mp4"
    write_video(clip, make_clip(seed=5, frames=24, height=64, width=96), fps=8)
    code, stdout, err = run_cli(capsys, "reconstruct", clip, "-o", tmp_path / "r.mp4", "--weights", SHIPPED_CASCADE,
                                "--steps", 1, "--compare", tmp_path / "side.mp4", "--crf", 0)
    assert code == 0, err
    video = read_video(clip)
    shipped = CascadeVPipeline.from_pretrained(str(SHIPPED_CASCADE))
    expected = shipped.reconstruct(video, steps=1)          # the saved colour fix, as the CLI
    assert mean_abs(read_video(tmp_path / "r.mp4"), as_written(expected, tmp_path / "expected.mp4")) < 2e-5
    assert psnr(expected, video).mean().item() > 18          # it reconstructs this clip, not any clip
    assert f"PSNR {psnr(expected, video).mean().item():.2f} dB" in stdout
    assert video_info(tmp_path / "side.mp4").frames == 24
    assert len(list(shipped.stage_a.decode_pieces(torch.zeros(1, 4, 24, 8, 12)))) == 3


def test_cli_noise_device_draws_one_stream_as_the_release(tmp_path, tiny_pipeline_dir):
    """``--noise device``: one generator on the run's device, seeded with --seed, for the noise and every ancestral
    step (the release's global CUDA generator, here on the CPU); the default draws the steps from seed + 1."""
    from cascadev.cli import build_parser
    from cascadev.cli.options import decode_kwargs

    pipe = CascadeVPipeline.from_pretrained(str(tiny_pipeline_dir))
    z = torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(1))

    def stage_a_latents(*options):
        args = build_parser().parse_args(["decode", "z.pt", "-o", "o.mp4", "--seed", "3", "--steps", "2", *options])
        kwargs = decode_kwargs(args, pipe)
        kwargs.pop("colour_fix")
        return pipe.decode_latents(z, **kwargs)

    one_stream = pipe.decode_latents(z, steps=2, seed=None, generator=torch.Generator().manual_seed(3))
    device, cpu = stage_a_latents("--noise", "device"), stage_a_latents()
    torch.testing.assert_close(device, one_stream, rtol=0, atol=0)
    assert (device - cpu).abs().mean() > 1e-3         # the ancestral steps drew other noise (measured 0.011)


def test_the_dits_condition_is_the_semantic_latent_times_0_13025_upsampled_x4_as_released():
    """Independent of ``conditioning``: the release multiplies the upsampled semantic latent by 0.13025
    (recon/refine_latent.py); the DiT must see exactly that beside the noisy latent."""
    import torch.nn.functional as F
    from einops import rearrange

    pipe = tiny_cascade()
    assert pipe.scale_factor == 0.13025
    z = torch.randn(1, 16, 2, 2, 3, generator=torch.Generator().manual_seed(2))
    seen = []
    pipe.dit.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    pipe.decode_latents(z, steps=1)
    frames = F.interpolate(rearrange(z, "b c t h w -> (b t) c h w"), scale_factor=4, mode="bilinear",
                           align_corners=False) * 0.13025
    torch.testing.assert_close(seen[0][:, 4:], rearrange(frames, "(b t) c h w -> b c t h w", t=2),
                               rtol=1e-6, atol=1e-7)     # scaled before vs after the (linear) upsampling


def test_cli_shifted_tiling_on_reconstruct_and_decode(tmp_path, capsys, tiny_pipeline_dir, clip_file):
    z, common = tmp_path / "z.safetensors", ("--weights", tiny_pipeline_dir, "--steps", 2, "--crf", 0)
    code, _, err = run_cli(capsys, "reconstruct", clip_file, "-o", tmp_path / "r.mp4", "--latents-out", z,
                           "--tiling", "shifted", *common)
    assert code == 0, err
    outputs = {}
    for tiling in ("shifted", "blend"):
        code, _, err = run_cli(capsys, "decode", z, "-o", tmp_path / f"{tiling}.mp4", "--tiling", tiling, *common)
        assert code == 0, err
        outputs[tiling] = read_video(tmp_path / f"{tiling}.mp4")
    assert torch.equal(outputs["shifted"], read_video(tmp_path / "r.mp4"))
    assert not torch.equal(outputs["shifted"], outputs["blend"])       # 20 latent columns: 2 tiles, then 3 shifted


def test_the_saved_tile_detail_is_how_overlaps_combine_unless_given(pipe):
    from cascadev.pipelines.tiling import Tiling

    latents = torch.randn(1, 16, 2, 3, 5, generator=torch.Generator().manual_seed(0))   # 20 latent columns: 2 tiles
    common = dict(steps=1, seed=3, colour_fix=0)
    average, central = (pipe.decode(latents, tiling=Tiling("blend", detail=d), **common)
                        for d in ("average", "central"))
    assert pipe.config.tile_detail == "average" and torch.equal(pipe.decode(latents, **common), average)
    assert not torch.equal(average, central)
    pipe.register_to_config(tile_detail="central")
    try:
        assert torch.equal(pipe.decode(latents, **common), central)
        assert pipe.tiling("official") == Tiling("official")                            # the release's rule stays
        assert pipe.tiling(Tiling("blend", detail="average")).detail == "average"       # given beats saved
    finally:
        pipe.register_to_config(tile_detail="average")
    with pytest.raises(ValueError, match="tile_detail"):
        type(pipe)(**pipe.components, tile_detail="sharp")


def test_decode_options_are_one_value_for_every_decode_method(pipe):
    from cascadev.pipelines.cascade import DecodeOptions

    latents = torch.randn(1, 16, 2, 3, 5, generator=torch.Generator().manual_seed(0))
    options = DecodeOptions(steps=2, seed=3, tiling="shifted", colour_fix=0)
    by_keywords = pipe.decode(latents, steps=2, seed=3, tiling="shifted", colour_fix=0)
    assert torch.equal(pipe.decode(latents, options), by_keywords)
    assert torch.equal(pipe.decode(latents, DecodeOptions(steps=1), steps=2, seed=3, tiling="shifted", colour_fix=0),
                       by_keywords)                                                 # keywords change the options given
    assert torch.equal(torch.cat(list(pipe.decode_pieces(latents, options)), dim=2), by_keywords)
    with pytest.raises(TypeError, match="unknown decode option.*stepz"):
        pipe.decode(latents, stepz=2)
