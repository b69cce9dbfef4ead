import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from helpers import run_cli
from cascadev.pipelines.cascade import CascadeVPipeline
from cascadev.pipelines.latents import load_latents
from cascadev.pipelines.text_to_video import (TextToVideoPipeline, guided_noise, make_scheduler, repeat_text,
                                              sample_base, seed_generators)
from cascadev.training.diffusion import DiffusionConfig, build_diffusion
from cascadev.training.losses import base_training_loss
from cascadev.video_io import video_info
from helpers import config_fields, randomize_
from cascadev.pipelines.text_encoder import TextEmbedding, TextEncoder, build_text_encoder
from dit.text_dit import build_text_dit

FAST = dict(num_frames=3, height=64, width=96, num_inference_steps=2)  # 3 x 2 x 3 latents: padded to 4 x 2 x 4, cropped
LATENT = dict(FAST, output_type="latent")


@pytest.fixture(scope="module")
def encoder():
    return build_text_encoder("tiny")


@pytest.fixture(scope="module")
def pipe(encoder, tiny_pipeline_dir):
    cascade = CascadeVPipeline.from_pretrained(str(tiny_pipeline_dir), previewer=None)
    pipe = TextToVideoPipeline.from_parts(encoder, randomize_(build_text_dit("tiny"), std=0.02), cascade)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def weights_dir(pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("t2v")
    pipe.save_pretrained(root)
    return root


# -- text encoder ----------------------------------------------------------------------------------

def test_text_encoder_tokens_mask_and_states(encoder):
    text = encoder.encode(["a red ball", "", "a dog on a skateboard"])
    assert text.context.shape == (3, 77, 32) and text.pooled.shape == (3, 32) and text.mask.shape == (3, 77)
    assert text.mask.sum(1).tolist() == [5, 2, 7]  # start, words, end of text
    tokens, _ = encoder.tokenize(["a red ball"])
    assert torch.equal(encoder.tower(tokens), encoder.encode("a red ball").pooled)  # open_clip's own pooled features
    # the per-token states are a block's output before ln_final: the last block by default, the one before with -2
    penultimate = TextEncoder(**{**config_fields(encoder), "hidden_layer": -2})
    penultimate.load_state_dict(encoder.state_dict())
    assert not torch.allclose(penultimate.encode("a red ball").context, text.context[:1])
    torch.testing.assert_close(penultimate.encode("a red ball").pooled, text.pooled[:1])


def test_text_encoder_round_trip_and_open_clip_checkpoints(encoder, tmp_path):
    encoder.save_pretrained(tmp_path / "ours")
    loaded = TextEncoder.from_pretrained(tmp_path / "ours")
    assert loaded.config.pretrained is None and not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded.encode("a cat").context, encoder.encode("a cat").context, rtol=0, atol=0)

    tower = encoder.tower.state_dict()
    clip = {**tower, "visual.conv1.weight": torch.zeros(4, 3, 2, 2), "logit_scale": torch.ones(())}
    torch.save(clip, tmp_path / "open_clip_pytorch_model.bin")  # a CLIP checkpoint: image tower + text keys
    save_file({f"text.{k}": v.contiguous() for k, v in tower.items()},
              tmp_path / "custom.safetensors")  # CustomTextCLIP
    for source in (tmp_path, tmp_path / "custom.safetensors"):
        other = build_text_encoder("tiny", pretrained=str(source))
        torch.testing.assert_close(other.encode("a cat").pooled, encoder.encode("a cat").pooled, rtol=0, atol=0)


def test_text_encoder_missing_weights_name_what_to_download(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nowhere.bin not found"):
        build_text_encoder("tiny", pretrained=str(tmp_path / "nowhere.bin"))
    import open_clip

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    with pytest.raises(FileNotFoundError) as e:
        build_text_encoder("H")
    message = str(e.value)
    assert "\n" not in message and "huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in message
    with pytest.raises(ValueError, match="not an open_clip pretrained tag"):
        build_text_encoder("tiny", pretrained="no_such_tag")
    with pytest.raises(ValueError, match="unknown open_clip text config field"):
        build_text_encoder("tiny", text_overrides={"depth": 2})


# -- guidance and sampling -------------------------------------------------------------------------

def _text(encoder, prompts, n=1):
    return repeat_text(encoder.encode(prompts), n)


def test_guidance_one_is_the_unguided_path_exactly(pipe, encoder):
    model = pipe.base
    x = torch.randn(2, 16, 2, 2, 4)
    text, null = _text(encoder, ["a cat", "a dog"]), _text(encoder, ["", ""])
    calls = []
    handle = model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        eps = guided_noise(model, x, 500, text, null, guidance=1.0)
    finally:
        handle.remove()
    assert calls == [2]  # one conditional pass, no unconditional one
    torch.testing.assert_close(eps, model(x, torch.full((2,), 500.0), *text)[:, :16], rtol=0, atol=0)

    # the whole loop: guidance 1 equals a plain scheduler loop over the conditional model
    noise = torch.randn(2, 16, 2, 2, 4)
    got = sample_base(model, noise, text, null, guidance=1.0, scheduler="ddim", steps=3)
    scheduler = make_scheduler("ddim")
    scheduler.set_timesteps(3)
    z = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = model(scheduler.scale_model_input(z, t), t.float().expand(2), *text)[:, :16]
        z = scheduler.step(eps, t, z).prev_sample
    torch.testing.assert_close(got, z, rtol=0, atol=0)


def test_guidance_batches_both_passes_and_extrapolates(pipe, encoder):
    model = pipe.base
    x = torch.randn(2, 16, 2, 2, 4)
    text, null = _text(encoder, ["a cat", "a dog"]), _text(encoder, ["blurry", "blurry"])
    calls = []
    handle = model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        eps = guided_noise(model, x, 500, text, null, guidance=4.0)
    finally:
        handle.remove()
    assert calls == [4]  # unconditional and conditional in one batch
    t = torch.full((2,), 500.0)
    eps_text, eps_null = model(x, t, *text)[:, :16], model(x, t, *null)[:, :16]
    torch.testing.assert_close(eps, eps_null + 4.0 * (eps_text - eps_null), rtol=1e-5, atol=1e-5)


def latents(pipe, prompt, **kwargs) -> torch.Tensor:
    return pipe(prompt, **{**LATENT, **kwargs}).latents


def test_call_latents_shapes_seeds_and_guidance(pipe):
    z = latents(pipe, ["a cat", "a dog"], num_videos_per_prompt=2, generator=seed_generators(7, 4))
    assert z.shape == (4, 16, 3, 2, 3) and torch.isfinite(z).all()
    assert latents(pipe, "a cat", width=64).shape == (1, 16, 3, 2, 2)
    # video k starts from generator k: the second video of "a cat" alone
    torch.testing.assert_close(latents(pipe, "a cat", generator=seed_generators(8, 1))[0], z[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(latents(pipe, ["a cat", "a dog"], num_videos_per_prompt=2,
                                       generator=seed_generators(7, 4)), z, rtol=0, atol=0)
    seven = seed_generators(7, 1)
    assert not torch.allclose(latents(pipe, "a dog", generator=seven)[0], z[0], atol=1e-4)  # text matters
    assert not torch.allclose(latents(pipe, "a cat", generator=seed_generators(7, 1), negative_prompt="a dog")[0], z[0],
                              atol=1e-4)
    assert not torch.allclose(latents(pipe, "a cat", generator=seed_generators(7, 1), guidance_scale=1.0)[0], z[0],
                              atol=1e-4)
    # no generator: video k from seed k, as seed 0 always did
    torch.testing.assert_close(latents(pipe, "a cat", num_videos_per_prompt=2), latents(
        pipe, "a cat", num_videos_per_prompt=2, generator=seed_generators(0, 2)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="3 generators for 4 videos"):
        latents(pipe, ["a cat", "a dog"], num_videos_per_prompt=2, generator=seed_generators(0, 3))


def test_call_with_a_generator_is_reproducible_and_steps_call_back(pipe):
    """diffusers' ``generator``: one or a list; the same seeds give the same video, exactly; ``callback_on_step_end``
    sees every base step's latents and may replace them."""
    kwargs = dict(FAST, decoder_num_inference_steps=1)
    one = pipe("a red ball", generator=torch.Generator().manual_seed(3), **kwargs)
    again = pipe("a red ball", generator=[torch.Generator().manual_seed(3)], **kwargs)
    assert one.frames.shape == (1, 3, 3, 64, 96)
    assert torch.equal(one.frames, again.frames) and torch.equal(one.latents, again.latents)
    assert not torch.equal(pipe("a red ball", generator=torch.Generator().manual_seed(4), **kwargs).latents,
                           one.latents)
    seen = []

    def zero_last(p, i, t, tensors):
        seen.append((i, tuple(tensors["latents"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 1 else {}
    z = latents(pipe, "a red ball", callback_on_step_end=zero_last)
    assert seen == [(0, (1, 16, 4, 2, 4)), (1, (1, 16, 4, 2, 4))] and torch.equal(z, torch.zeros_like(z))
    with pytest.raises(ValueError, match="can only hold 'latents'"):
        latents(pipe, "a red ball", callback_on_step_end_tensor_inputs=("noise",))
    # an ancestral sampler's steps draw from one stream seeded with the first generator's seed, as seed= did
    saved, pipe.base_scheduler = pipe.base_scheduler, make_scheduler("euler_a")
    try:
        z = latents(pipe, "a red ball", generator=torch.Generator().manual_seed(5))
        assert torch.equal(z, latents(pipe, "a red ball", generator=seed_generators(5, 1)))
        assert torch.equal(latents(pipe, "a red ball"), latents(pipe, "a red ball", generator=seed_generators(0, 1)))
    finally:
        pipe.base_scheduler = saved


def test_progress_bars_follow_set_progress_bar_config(pipe, capfd, monkeypatch):
    """The base model's and the decoder's bars, silenced by diffusers' ``set_progress_bar_config(disable=True)``."""
    monkeypatch.setattr("cascadev.progress.LOG_INTERVAL_S", 0.0)    # captured output is a log: bars show when slow
    kwargs = dict(FAST, decoder_num_inference_steps=1)
    capfd.readouterr()
    pipe("a red ball", **kwargs)
    assert capfd.readouterr().err == ""
    pipe.set_progress_bar_config(disable=False)
    try:
        pipe("a red ball", **kwargs)
    finally:
        pipe.set_progress_bar_config(disable=True)
    err = capfd.readouterr().err
    assert "2/2" in err and "denoising" in err             # the base model's 2 steps, the decoder's


def test_call_end_to_end_api_and_reload(pipe, weights_dir):
    out = pipe("a red ball", num_videos_per_prompt=2, decoder_num_inference_steps=1, **FAST)
    assert out.frames.shape == (2, 3, 3, 64, 96) and out.frames.abs().max() <= 1
    assert out.latents.shape == (2, 16, 3, 2, 3)
    # video k decodes with Stage B seed k (DecodeOptions' seed + k): the second video alone, from its latents
    torch.testing.assert_close(pipe.cascade.decode(out.latents[1:], steps=1, seed=1), out.frames[1:],
                               rtol=0, atol=0)
    np_frames, = pipe("a red ball", decoder_num_inference_steps=1, output_type="np", return_dict=False, **FAST)
    assert np_frames.shape == (1, 3, 64, 96, 3) and 0 <= np_frames.min() and np_frames.max() <= 1
    loaded = TextToVideoPipeline.from_pretrained(str(weights_dir))
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(latents(loaded, "a red ball"), latents(pipe, "a red ball"), rtol=0, atol=0)


def test_a_folder_naming_the_text_encoders_old_module_still_loads(weights_dir, tmp_path):
    index = json.loads((weights_dir / "model_index.json").read_text())
    assert index["text_encoder"] == ["cascadev.pipelines.text_encoder", "TextEncoder"]
    old = tmp_path / "old"
    shutil.copytree(weights_dir, old)
    (old / "model_index.json").write_text(json.dumps({**index, "text_encoder": ["dit.text_encoder", "TextEncoder"]}))
    assert type(TextToVideoPipeline.from_pretrained(str(old)).text_encoder) is TextEncoder


def test_bad_requests_raise_value_errors(pipe):
    for kwargs, message in [({"prompt": "  "}, "is empty"), ({"prompt": []}, "no prompt"),
                            ({"width": 100}, "width 100 is not a positive multiple of 32"),
                            ({"num_frames": 0}, "frames must be >= 1"),
                            ({"num_inference_steps": 0}, "steps must be >= 1"),
                            ({"guidance_scale": -1.0}, "guidance must be >= 0"),
                            ({"num_videos_per_prompt": 0}, "num_videos_per_prompt"),
                            ({"negative_prompt": ["a", "b"]}, "2 negative prompts for 1 prompts"),
                            ({"output_type": "mp4"}, "output_type must be")]:
        with pytest.raises(ValueError, match=message):
            pipe(**{**LATENT, "prompt": "a cat", **kwargs})
    with pytest.raises(ValueError, match="reads text of width 48"):
        TextToVideoPipeline.from_parts(build_text_encoder("tiny"), build_text_dit("tiny", caption_channels=48),
                                       pipe.cascade)


# -- CLI -------------------------------------------------------------------------------------------

def test_cli_generate_then_decode_the_saved_latents(tmp_path, capsys, weights_dir, tiny_pipeline_dir):
    out, z = tmp_path / "clip.mp4", tmp_path / "z.safetensors"
    code, stdout, err = run_cli(capsys, "generate", "a red ball bouncing", "-o", out, "--weights", weights_dir,
                                "--frames", 3, "--size", "96x64", "--steps", 2, "--num", 2, "--latents-out", z,
                                "--decode-steps", 1, "--guidance", 3)
    assert code == 0, err
    assert "generating 2 video(s) of 3 frames at 96x64" in stdout
    for k in range(2):
        info = video_info(tmp_path / f"clip_{k}.mp4")
        assert (info.frames, info.width, info.height) == (3, 96, 64)
    assert load_latents(z).shape == (2, 16, 3, 2, 3)

    code, stdout, err = run_cli(capsys, "decode", z, "-o", tmp_path / "dec.mp4", "--weights", tiny_pipeline_dir,
                                "--steps", 1)
    assert code == 0, err
    assert video_info(tmp_path / "dec_1.mp4").frames == 3


@pytest.mark.slow
def test_cli_generate_runs_its_decoder_as_decode_does(tmp_path, capsys, weights_dir):
    """``generate``'s device and speed options are ``decode``'s (``options.prepare_pipeline``): batched windows give
    the default video (within fp32 rounding), a frame stride changes it; the runtime settings reach the cascade."""
    from cascadev.video_io import read_video

    def generate(name, *options):
        code, _, err = run_cli(capsys, "generate", "a red ball", "-o", tmp_path / name, "--weights", weights_dir,
                               "--frames", 6, "--size", "96x64", "--steps", 1, "--decode-steps", 1, "--crf", 0,
                               *options)
        assert code == 0, err
        return read_video(tmp_path / name)

    default = generate("default.mp4")
    # lossless H.264 (--crf 0): batching's fp32 rounding flips only a few 8-bit levels (mean 2e-6), a stride changes
    # the blend of overlapping windows (2e-4 to 6e-4 with the random models the fixtures draw)
    assert (generate("batched.mp4", "--window-batch", 2, "--no-tf32") - default).abs().mean() < 2e-5
    assert (generate("strided.mp4", "--frame-stride", 1) - default).abs().mean() > 2e-5

    pipe = TextToVideoPipeline.from_pretrained(str(weights_dir)).set_precision(torch.bfloat16).set_stage_a_memory(0.5)
    assert pipe.cascade.stage_a.config.max_memory == 0.5
    assert {m.dtype for m in (pipe.text_encoder, pipe.base, pipe.dit, pipe.cascade.dit)} == {torch.bfloat16}


@pytest.mark.slow
def test_cli_bad_inputs_give_one_clear_line(tmp_path, capsys, weights_dir):
    out = tmp_path / "x.mp4"
    for argv, message in [(["", "--weights", weights_dir], "is empty"),
                          (["a cat", "--weights", weights_dir, "--size", "100x64"],
                           "width 100 is not a positive multiple of 32"),
                          (["a cat", "--weights", weights_dir, "--size", "big"], "--size must be WxH"),
                          (["a cat", "--weights", weights_dir, "--frames", 0], "frames must be >= 1"),
                          (["a cat", "--weights", tmp_path / "nowhere"], "nowhere: weights folder not found"),
                          (["a cat", "--weights", tmp_path], "no base model (Stage C) weights"),
                          (["a cat", "--text-encoder", "bigG"], "--text-encoder replaces"),
                          (["a cat", "--weights", weights_dir, "--window-batch", 0], "--window-batch must be >= 1"),
                          (["a cat", "--weights", weights_dir, "--tile-stride", 99], "longer than the DiT's window"),
                          (["a cat", "--weights", weights_dir, "--offload", "model"], "--offload"),
                          (["a cat", "--colour-fix", 7], "colour fix 7: 256x256 frames are not divisible by 7")]:
        code, _, err = run_cli(capsys, "generate", *argv, "-o", out)
        assert code == 2 and err.count("\n") == 1 and message in err, (argv, err)
    assert not out.exists()


# -- training --------------------------------------------------------------------------------------

def test_base_training_loss_trains_and_drops_captions_to_the_empty_prompt(encoder):
    model = randomize_(build_text_dit("tiny"), std=0.02).train()
    latents = torch.randn(2, 16, 2, 2, 4)
    text, null = encoder.encode(["a cat", "a dog"]), encoder.encode([""])
    diffusion = build_diffusion(DiffusionConfig())
    loss, logs = base_training_loss(model, diffusion, latents, text, null, torch.Generator().manual_seed(0),
                                    drop_prob=0.1)
    loss.backward()
    assert torch.isfinite(loss) and set(logs) == {"loss", "mse", "vb"}
    assert model.blocks[0].cross_attn.kv_linear.weight.grad.abs().sum() > 0
    with torch.no_grad():
        dropped, _ = base_training_loss(model, diffusion, latents, text, null, torch.Generator().manual_seed(0),
                                        drop_prob=1.0)
        empty = TextEmbedding(*(z.expand(2, *z.shape[1:]) for z in null))
        expected, _ = base_training_loss(model, diffusion, latents, empty, null, torch.Generator().manual_seed(0),
                                         drop_prob=0.0)
    torch.testing.assert_close(dropped, expected, rtol=0, atol=0)


def test_cli_generate_decodes_with_shifted_tiling(tmp_path, capsys, weights_dir):
    code, _, err = run_cli(capsys, "generate", "a red ball", "-o", tmp_path / "s.mp4", "--weights", weights_dir,
                           "--frames", 3, "--size", "160x64", "--steps", 1, "--decode-steps", 2, "--tiling", "shifted")
    assert code == 0, err
    assert video_info(tmp_path / "s.mp4").width == 160


def test_cli_generate_decodes_with_the_built_in_distilled_decoder_at_its_steps(tmp_path, capsys, monkeypatch):
    import cascadev.pipelines.cascade as cascade_module
    import cascadev.pipelines.text_to_video as t2v_module
    from cascadev.pipelines.cascade import TINY_DISTILLED

    decoded = []
    real_sample = cascade_module.sample
    monkeypatch.setattr(cascade_module, "sample", lambda *a, **k: decoded.append(a[4]) or real_sample(*a, **k))
    code, _, err = run_cli(capsys, "generate", "a red disc", "-o", tmp_path / "d.mp4", "--cascade", TINY_DISTILLED,
                           "--frames", 2, "--size", "64x64", "--steps", 1)
    assert code == 0, err
    assert decoded == [2] and video_info(tmp_path / "d.mp4").frames == 2        # the student's saved 2 steps

    # 1 step is more than its scheduler spaces: one line before the base model samples anything
    monkeypatch.setattr(t2v_module, "sample_base", lambda *a, **k: pytest.fail("sampled before the check"))
    code, _, err = run_cli(capsys, "generate", "a red disc", "-o", tmp_path / "e.mp4", "--cascade", TINY_DISTILLED,
                           "--frames", 2, "--size", "64x64", "--steps", 1, "--decode-steps", 1)
    assert code == 2 and err.strip().splitlines() == [
        "cascadev generate: error: FlowMatchEulerDiscreteScheduler gives no finite noise levels at 1 step(s) "
        "(its shift_terminal 0.5 needs at least 2 steps)"], err
    assert not (tmp_path / "e.mp4").exists()
