import pytest
import torch
from safetensors.torch import save_file

from helpers import run_cli
from cascadev.pipelines.cascade import CascadeVPipeline
from cascadev.pipelines.latents import load_latents
from cascadev.pipelines.text_to_video import TextToVideoPipeline, guided_noise, make_scheduler, repeat_text, sample_base
from cascadev.training.diffusion import DiffusionConfig, build_diffusion
from cascadev.training.losses import base_training_loss
from cascadev.video_io import video_info
from helpers import config_fields, randomize_
from dit.text_dit import build_text_dit
from dit.text_encoder import TextEmbedding, TextEncoder, build_text_encoder

FAST = dict(frames=3, size=(96, 64), steps=2, progress=False)  # 3 x 2 x 3 latents: padded to 4 x 2 x 4, cropped


@pytest.fixture(scope="module")
def encoder():
    return build_text_encoder("tiny")


@pytest.fixture(scope="module")
def pipe(encoder, tiny_pipeline_dir):
    cascade = CascadeVPipeline.from_pretrained(str(tiny_pipeline_dir), previewer=None)
    return TextToVideoPipeline.from_parts(encoder, randomize_(build_text_dit("tiny"), std=0.02), cascade)


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
    got = sample_base(model, noise, text, null, guidance=1.0, scheduler="ddim", steps=3, progress=False)
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


def test_generate_latents_shapes_seeds_and_guidance(pipe):
    z = pipe.generate_latents(["a cat", "a dog"], num_per_prompt=2, seed=7, **FAST)
    assert z.shape == (4, 16, 3, 2, 3) and torch.isfinite(z).all()
    assert pipe.generate_latents("a cat", **{**FAST, "size": (64, 64)}).shape == (1, 16, 3, 2, 2)
    # video k starts from seed + k: the second video of "a cat" alone
    torch.testing.assert_close(pipe.generate_latents("a cat", seed=8, **FAST)[0], z[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pipe.generate_latents(["a cat", "a dog"], num_per_prompt=2, seed=7, **FAST), z,
                               rtol=0, atol=0)
    assert not torch.allclose(pipe.generate_latents("a dog", seed=7, **FAST)[0], z[0], atol=1e-4)  # text matters
    assert not torch.allclose(pipe.generate_latents("a cat", seed=7, negative="a dog", **FAST)[0], z[0], atol=1e-4)
    assert not torch.allclose(pipe.generate_latents("a cat", seed=7, guidance=1.0, **FAST)[0], z[0], atol=1e-4)


def test_generate_end_to_end_api_and_reload(pipe, weights_dir):
    video = pipe.generate("a red ball", num_per_prompt=2, decode_kwargs={"steps": 1}, **FAST)
    assert video.shape == (2, 3, 3, 64, 96) and video.abs().max() <= 1
    loaded = TextToVideoPipeline.from_pretrained(str(weights_dir))
    torch.testing.assert_close(loaded.generate_latents("a red ball", **FAST),
                               pipe.generate_latents("a red ball", **FAST), rtol=0, atol=0)


def test_bad_requests_raise_value_errors(pipe):
    for kwargs, message in [({"prompt": "  "}, "is empty"), ({"prompt": []}, "no prompt"),
                            ({"size": (100, 64)}, "width 100 is not a positive multiple of 32"),
                            ({"frames": 0}, "frames must be >= 1"), ({"steps": 0}, "steps must be >= 1"),
                            ({"guidance": -1.0}, "guidance must be >= 0"), ({"num_per_prompt": 0}, "num_per_prompt"),
                            ({"negative": ["a", "b"]}, "2 negative prompts for 1 prompts")]:
        with pytest.raises(ValueError, match=message):
            pipe.generate_latents(**{**FAST, "prompt": "a cat", **kwargs})
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
