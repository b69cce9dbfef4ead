"""On a CUDA GPU (skipped elsewhere): half precision, the attention kernels, batched windows and offload hooks
give what the CPU's fp32 path gives. Run with ``pytest tests/test_cuda.py`` on a GPU machine."""

import pytest
import torch

from helpers import randomize_, tiny_cascade
from cascadev.pipelines.cascade import TINY_CASCADE
from cascadev.pipelines.cascade import CascadeVPipeline
from cascadev.pipelines.sampling import predict_noise
from dit import build_dit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
# kernels torch SDPA holds on every CUDA build, and flash-attn's when installed
BACKENDS = ["native", "_native_math", "_native_flash", "_native_efficient", "_native_cudnn", "flash"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def semantic_latents():
    torch.manual_seed(0)
    return torch.randn(1, 16, 8, 4, 6) * 0.5


@pytest.fixture(autouse=True)
def _native_attention_after():
    yield
    build_dit("tiny").set_attention_backend("native")   # diffusers keeps the last backend as the global default


def test_shipped_cascade_bf16_on_gpu_is_close_to_fp32_on_cpu(semantic_latents):
    cpu = CascadeVPipeline.from_pretrained(str(TINY_CASCADE))
    gpu = CascadeVPipeline.from_pretrained(str(TINY_CASCADE), torch_dtype=torch.bfloat16).to(CUDA)
    frames = gpu(latents=semantic_latents, generator=torch.Generator(CUDA).manual_seed(0)).frames
    assert frames.shape == (1, 3, 8, 128, 192) and frames.device.type == "cuda"
    # a CUDA generator draws other noise than a CPU one: compare both at the release's seeded noise
    got = gpu.decode(semantic_latents, seed=0).cpu()
    want = cpu.decode(semantic_latents, seed=0)
    assert rel_err(got, want) < 0.05, rel_err(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_kernels_agree_in_bf16(backend):
    """The official block layout (every partition kind), narrow, on a 8x32x32 latent window."""
    dit = randomize_(build_dit("official", depth=4, hidden_size=288, num_heads=4, attn_fp32=False), std=0.02)
    x, t = torch.randn(2, 20, 8, 32, 32), torch.tensor([300.0, 700.0])
    want = dit(x, t)                                               # fp32 on the CPU
    dit = dit.to(CUDA, torch.bfloat16)
    try:
        dit.set_attention_backend(backend)
        got = dit(x.to(CUDA, torch.bfloat16), t.to(CUDA))
    except (RuntimeError, ValueError) as e:
        if "flash-attn" in str(e) or "not usable" in str(e):
            pytest.skip(f"{backend}: {str(e).splitlines()[0]}")
        raise
    assert rel_err(got.cpu(), want) < 0.02, rel_err(got.cpu(), want)


@torch.no_grad()
def test_batched_windows_equal_one_by_one_on_gpu():
    dit = randomize_(build_dit("tiny"), std=0.02).to(CUDA)
    x = torch.randn(2, 20, 10, 24, 40, device=CUDA)
    # cuDNN convolutions default to TF32, whose rounding depends on the batch (1.6e-4 apart on an H100): off here
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        one = predict_noise(dit, x, 300.0)
        batched = predict_noise(dit, x, 300.0, window_batch=24)
    assert rel_err(batched, one) < 1e-5


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_on_gpu_equals_plain(semantic_latents, offload):
    pipe = tiny_cascade().to(CUDA)
    video = torch.rand(1, 3, 8, 128, 192) * 2 - 1
    want = pipe.decode(semantic_latents, seed=0, colour_fix=4), pipe.encode(video)
    pipe.to("cpu")
    getattr(pipe, f"enable_{offload}_cpu_offload")(device=CUDA)
    got = pipe.decode(semantic_latents, seed=0, colour_fix=4), pipe.encode(video)
    assert got[0].device.type == "cuda"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    parked = "cpu" if offload == "model" else "meta"   # model: parked once the next one ran; sequential: always
    assert next(pipe.dit.parameters()).device.type == parked


@pytest.mark.parametrize("name", ["AutoencoderKLWan", "AutoencoderKLLTXVideo"])
def test_decode_from_a_video_vae_on_gpu_equals_cpu_within_tf32(name, tmp_path):
    from test_source_vae import _tiny

    from cascadev.pipelines.source_vae import SourceVAE
    from cascadev.synthetic import make_clip

    torch.manual_seed(0)
    _tiny(name).save_pretrained(str(tmp_path / "vae"))
    vae = SourceVAE.from_pretrained(tmp_path, "vae")
    latents = vae.encode(make_clip(seed=3, frames=9, height=64, width=64)[None])
    want = CascadeVPipeline.from_pretrained(str(TINY_CASCADE)).decode_from(latents, vae, scale=2, seed=0)
    # fp32 on the GPU (TF32 convolutions, torch's default): the route itself; bf16 has its own test above
    gpu = CascadeVPipeline.from_pretrained(str(TINY_CASCADE)).to(CUDA)
    got = gpu.decode_from(latents.to(CUDA), str(tmp_path), scale=2, seed=0).cpu()
    assert got.shape == want.shape == (1, 3, 9, 128, 128)
    assert rel_err(got, want) < 0.01, rel_err(got, want)


def test_shipped_fps4x_upscale_bf16_on_gpu_is_close_to_fp32_on_cpu():
    from cascadev.pipelines.upscale import load_upscale
    from cascadev.synthetic import make_clip

    folder = TINY_CASCADE.parent / "tiny_fps4x"
    video = make_clip(seed=100001, frames=4, height=64, width=64)[None]
    want = load_upscale(folder).upscale(video, steps=2, seed=0)
    gpu = load_upscale(folder, torch_dtype=torch.bfloat16).to(CUDA)
    got = gpu.upscale(video.to(CUDA), steps=2, seed=0).cpu()
    assert got.shape == want.shape == (1, 3, 16, 64, 64)
    assert rel_err(got, want) < 0.05, rel_err(got, want)


@pytest.mark.parametrize("which", ["upscale", "text_to_video"])
def test_model_offload_of_the_other_pipelines_equals_plain(which):
    """``--offload model`` on ``upscale`` and ``generate`` (``options.prepare_pipeline``): the same frames as the
    pipeline on the GPU; the text-to-video pipeline's inner cascade runs on the shared, hooked modules."""
    from cascadev.cli.text2video import load_builtin
    from cascadev.pipelines.upscale import load_upscale
    from cascadev.synthetic import make_clip

    if which == "upscale":
        pipe = load_upscale(TINY_CASCADE.parent / "tiny_fps4x")
        video = make_clip(seed=100001, frames=4, height=64, width=64)[None]
        run = lambda: pipe.upscale(video.to(CUDA), steps=2, seed=0).cpu()     # noqa: E731
    else:
        pipe = load_builtin(with_previewer=True)
        pipe.set_progress_bar_config(disable=True)
        run = lambda: pipe("a red ring moving right", num_inference_steps=2,   # noqa: E731
                           decoder_num_inference_steps=1).frames
    want = (pipe.to(CUDA), run())[1]
    pipe.to("cpu")
    pipe.enable_model_cpu_offload(device=CUDA)
    torch.testing.assert_close(run(), want, rtol=1e-4, atol=1e-4)
