"""CascadeVPipeline as a diffusers DiffusionPipeline: save / load, dtypes, offload hooks, the call's vocabulary,
and folders of the previous format."""

import json

import numpy as np
import pytest
import torch
from accelerate import cpu_offload

from helpers import run_cli, tiny_cascade, write_legacy_cascade
from cascadev.pipelines.cascade import CascadeVPipeline, CascadeVPipelineOutput, load_cascade
from cascadev.pipelines.conditioning import semantic_small, upsample_condition
from cascadev.pipelines.runtime import RECOMPILE_LIMIT
from cascadev.pipelines.sampling import make_scheduler, sample

LATENTS = torch.randn(1, 16, 4, 4, 4, generator=torch.Generator().manual_seed(7))   # 4 frames of 128x128 px


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    pipe = tiny_cascade(colour_fix=16)
    pipe.save_pretrained(str(root))
    return pipe, root


def test_save_pretrained_writes_diffusers_layout_and_round_trips(saved):
    pipe, root = saved
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "CascadeVPipeline"
    assert index["dit"] == ["dit.video_dit", "VideoDiT"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "EulerAncestralDiscreteScheduler"]
    assert index["colour_fix"] == 16 and index["stage_a"]["tile_size"] == 256
    for part in ("dit", "semantic_encoder", "previewer", "vae"):
        assert (root / part / "diffusion_pytorch_model.safetensors").is_file()
        assert not (root / part / "model.safetensors").exists()
    loaded = CascadeVPipeline.from_pretrained(str(root))
    assert loaded.config.colour_fix == 16 and loaded.stage_a.config.tile_size == 256
    expected = pipe(latents=LATENTS, generator=torch.Generator().manual_seed(0), num_inference_steps=2).frames
    out = loaded(latents=LATENTS, generator=torch.Generator().manual_seed(0), num_inference_steps=2)
    assert isinstance(out, CascadeVPipelineOutput) and out.frames.shape == (1, 3, 4, 128, 128)
    torch.testing.assert_close(out.frames, expected, rtol=0, atol=0)


def test_call_without_previewer_decodes_without_the_saved_colour_fix(saved):
    """``colour_fix=None`` means the saved fix only where its Previewer is loaded, in ``__call__`` as in ``decode``."""
    _, root = saved                                                   # saved with colour_fix=16
    pipe = CascadeVPipeline.from_pretrained(str(root), previewer=None)
    out = pipe(latents=LATENTS, generator=torch.Generator().manual_seed(0), num_inference_steps=2).frames
    plain = pipe.decode(LATENTS, steps=2, seed=None, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs the Previewer"):
        pipe(latents=LATENTS, num_inference_steps=1, colour_fix=16)


def test_bf16_load_is_close_to_fp32(saved):
    _, root = saved
    fp32 = CascadeVPipeline.from_pretrained(str(root))
    bf16 = CascadeVPipeline.from_pretrained(str(root), torch_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.dit.parameters())
    assert all(p.dtype == torch.bfloat16 for p in bf16.vae.parameters())
    kwargs = dict(latents=LATENTS, num_inference_steps=2, colour_fix=0)
    a = fp32(generator=torch.Generator().manual_seed(1), **kwargs).frames
    b = bf16(generator=torch.Generator().manual_seed(1), **kwargs).frames
    assert b.dtype == torch.float32
    rel = ((b - a).norm() / a.norm()).item()
    assert rel < 0.05, rel     # measured 0.01-0.02 on the tiny random cascade


def sequential_offload_on_cpu(pipe: CascadeVPipeline) -> None:
    """The hooks ``enable_sequential_cpu_offload`` installs (weights on the meta device between uses, brought in leaf
    by leaf), placed directly: on a CPU diffusers names the execution device "cpu:0", and accelerate's hook copies a
    Parameter to "cpu:0" into a plain tensor, which it then cannot offload. tests/test_cuda.py calls the method."""
    for name in ("dit", "semantic_encoder", "vae", "previewer"):
        cpu_offload(getattr(pipe, name), execution_device=torch.device("cpu"), offload_buffers=True)


@pytest.mark.parametrize("offload", ["model", "sequential"])
@pytest.mark.slow
def test_offloaded_output_equals_plain(saved, offload):
    _, root = saved
    video = torch.rand(1, 3, 4, 128, 128, generator=torch.Generator().manual_seed(3)) * 2 - 1
    plain = CascadeVPipeline.from_pretrained(str(root))
    run = lambda pipe, **inputs: pipe(generator=torch.Generator().manual_seed(2), num_inference_steps=2,  # noqa: E731
                                      **inputs).frames
    expected = run(plain, latents=LATENTS), run(plain, video=video)   # colour fix 16: the Previewer runs too
    pipe = CascadeVPipeline.from_pretrained(str(root))
    if offload == "model":
        pipe.enable_model_cpu_offload(device="cpu")
        assert type(pipe.dit._hf_hook).__name__ == "CpuOffload"                # accelerate's hook is in place
    else:
        sequential_offload_on_cpu(pipe)
        assert pipe.dit.x_embedder.proj.weight.device.type == "meta"
    torch.testing.assert_close(run(pipe, latents=LATENTS), expected[0], rtol=0, atol=0)
    torch.testing.assert_close(run(pipe, video=video), expected[1], rtol=0, atol=0)


def test_callback_runs_after_every_step_and_may_replace_latents():
    pipe = tiny_cascade()
    calls = []

    def record(p, i, t, tensors):
        assert p is pipe and tensors["latents"].shape == (1, 4, 4, 16, 16)
        calls.append((i, float(t)))
        return {}
    pipe(latents=LATENTS, num_inference_steps=3, callback_on_step_end=record, output_type="latent")
    assert [i for i, _ in calls] == [0, 1, 2]
    assert [t for _, t in calls] == [float(t) for t in pipe.scheduler.timesteps]
    zeroed = pipe(latents=LATENTS, num_inference_steps=3, output_type="latent",
                  callback_on_step_end=lambda p, i, t, d: {"latents": torch.zeros_like(d["latents"])}).frames
    assert zeroed.abs().max() == 0


def test_output_types_and_video_input():
    pipe = tiny_cascade()
    video = torch.rand(1, 3, 4, 64, 96) * 2 - 1
    pt = pipe(video=video, num_inference_steps=1).frames
    assert pt.shape == video.shape and pt.abs().max() <= 1
    np_frames = pipe(video=video, num_inference_steps=1, output_type="np").frames
    assert isinstance(np_frames, np.ndarray) and np_frames.shape == (1, 4, 64, 96, 3)
    np.testing.assert_allclose(np_frames, ((pt + 1) / 2).permute(0, 2, 3, 4, 1).numpy(), atol=1e-6)
    pil = pipe(video=video, num_inference_steps=1, output_type="pil").frames
    assert len(pil) == 1 and len(pil[0]) == 4 and pil[0][0].size == (96, 64)
    assert pipe(video=video, num_inference_steps=1, return_dict=False)[0].shape == video.shape
    with pytest.raises(ValueError, match="either latents= .* or video="):
        pipe(num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type"):
        pipe(video=video, output_type="mp4")


def test_a_seeded_generator_draws_the_release_noise_in_official_tiling():
    """The release seeds torch's global RNG once: the noise (T, C, H, W) comes first, then every ancestral
    step's noise from the same stream. A CPU generator seeded alike gives the same numbers."""
    pipe = tiny_cascade()
    latents = torch.randn(1, 16, 5, 6, 5)          # T > the window (4): two official windows; tiles in both directions
    ours = pipe(latents=latents, generator=torch.Generator().manual_seed(123), num_inference_steps=3,
                tiling="official", output_type="latent").frames
    cond = upsample_condition(semantic_small(latents, pipe.scale_factor), (5, 24, 20))
    torch.manual_seed(123)
    noise = torch.randn(5, 4, 24, 20).permute(1, 0, 2, 3)[None]     # the release: frames first
    released = sample(pipe.dit, cond, noise, make_scheduler("euler_a"), 3, "official")
    rel = ((ours - released).norm() / released.norm()).item()
    assert rel < 1e-6, rel


@pytest.mark.slow
def test_previous_format_folder_says_how_to_convert_and_converts(tmp_path, capsys, clip_file):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny_cascade(num_inference_steps=3, colour_fix=16)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    legacy, new = tmp_path / "old", tmp_path / "new"
    write_legacy_cascade(pipe, legacy)
    with pytest.raises(FileNotFoundError, match=f"cascadev convert {legacy} NEW_FOLDER"):
        load_cascade(legacy)
    code, _, err = run_cli(capsys, "reconstruct", clip_file, "-o", tmp_path / "o.mp4", "--weights", legacy)
    assert code == 2 and "cascadev convert" in err and err.count("\n") == 1

    code, _, err = run_cli(capsys, "convert", legacy, new)
    assert code == 0, err
    converted = CascadeVPipeline.from_pretrained(str(new))
    assert type(converted.scheduler) is FlowMatchEulerDiscreteScheduler
    assert (converted.config.num_inference_steps, converted.config.colour_fix) == (3, 16)
    assert converted.config.demo == {"kind": "shapes", "size": 64}
    expected = pipe(latents=LATENTS, generator=torch.Generator().manual_seed(4)).frames
    out = converted(latents=LATENTS, generator=torch.Generator().manual_seed(4)).frames
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    code, _, err = run_cli(capsys, "convert", legacy, new)
    assert code == 2 and "not empty" in err


def test_load_cascade_takes_the_previewer_for_the_saved_colour_fix_and_replaces_parts(saved, tiny_pipeline_dir,
                                                                                       tmp_path):
    pipe, root = saved                                               # saved with colour_fix=16
    assert load_cascade(root).previewer is not None                  # the saved colour fix needs its reference
    assert load_cascade(root, with_previewer=False).previewer is None
    assert load_cascade(tiny_pipeline_dir).previewer is None         # no colour fix saved: not loaded
    other = tiny_cascade().previewer
    torch.nn.init.constant_(other.blocks[-1].bias, 0.25)
    other.save_pretrained(tmp_path / "previewer")
    replaced = load_cascade(root, previewer=tmp_path / "previewer")
    torch.testing.assert_close(replaced.previewer.blocks[-1].bias, torch.full_like(other.blocks[-1].bias, 0.25))
    torch.testing.assert_close(replaced.dit.x_embedder.proj.weight, pipe.dit.x_embedder.proj.weight)


def test_set_precision_keeps_latents_and_scheduler_in_fp32(saved):
    _, root = saved
    pipe = CascadeVPipeline.from_pretrained(str(root)).set_precision(torch.bfloat16)
    assert pipe.dit.dtype == pipe.vae.dtype == pipe.semantic_encoder.dtype == torch.bfloat16
    assert not pipe.dit.config.attn_fp32 and not any(b.attn.fp32 for b in pipe.dit.blocks)   # flash / cuDNN kernels
    steps = []
    pipe(latents=LATENTS, num_inference_steps=2, output_type="latent",
         callback_on_step_end=lambda p, i, t, tensors: steps.append(tensors["latents"].dtype) or {})
    assert steps == [torch.float32, torch.float32]
    reloaded = CascadeVPipeline.from_pretrained(str(root)).set_precision(torch.bfloat16, attn_fp32=True)
    assert reloaded.dit.blocks[0].attn.fp32
    pipe.vae.register_to_config(force_upcast=True)         # diffusers' flag for VAEs that overflow in fp16
    pipe.set_precision(torch.float16)
    assert pipe.dit.dtype == torch.float16 and pipe.vae.dtype == torch.float32


@pytest.mark.slow
def test_compiled_models_give_the_eager_output(saved):
    _, root = saved
    pipe = CascadeVPipeline.from_pretrained(str(root))
    kwargs = dict(latents=LATENTS, num_inference_steps=1, colour_fix=0, generator=torch.Generator().manual_seed(4))
    eager = pipe(**kwargs).frames
    compiled = pipe.compile_models()(**{**kwargs, "generator": torch.Generator().manual_seed(4)}).frames
    assert all(b._compiled_call_impl is not None for b in pipe.dit.blocks)     # torch.nn.Module.compile's wrapper
    assert pipe.vae.decoder._compiled_call_impl is not None
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT   # layouts x batches x sizes share one forward
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_a_scheduler_of_the_other_family_is_refused_unless_forced(saved):
    pipe, _ = saved                                           # saved with the release's Euler-ancestral (eps)
    with pytest.raises(ValueError, match="trained for eps prediction.*--force-scheduler"):
        pipe.resolve_scheduler("flow")
    assert type(pipe.resolve_scheduler("flow", force=True)).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert type(pipe.resolve_scheduler("ddim")).__name__ == "DDIMScheduler"      # another eps sampler is fine
    shipped = CascadeVPipeline.from_pretrained("cascadev/assets/tiny_cascade")
    with pytest.raises(ValueError, match="trained for flow matching"):
        shipped.resolve_scheduler("euler_a")
