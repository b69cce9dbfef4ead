import pytest
import torch
from einops import repeat

from helpers import config_fields, randomize_
from dit.attention import DispatchProcessor
from dit.text_dit import PRESETS, CrossAttention, TextDiT, build_text_dit

TINY = PRESETS["tiny"]


def tiny_model(**overrides) -> TextDiT:
    return randomize_(TextDiT(**{**TINY, **overrides})).eval()


def inputs(B=2, T=4, H=8, W=6, L=7, seed=1):
    """Latents (B, 16, T, H, W), timesteps, text tokens (B, L, 32), pooled (B, 32), a mask with padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 16, T, H, W, generator=g)
    t = torch.tensor([3.0, 871.0, 500.0][:B])
    context = torch.randn(B, L, TINY["caption_channels"], generator=g)
    pooled = torch.randn(B, TINY["pooled_channels"], generator=g)
    mask = torch.arange(L)[None] < torch.tensor([L, 3, 5][:B])[:, None]
    return x, t, context, pooled, mask


@pytest.mark.parametrize("T,H,W", [(4, 8, 8), (4, 8, 6), (2, 4, 10), (6, 2, 2)])
def test_output_shape_square_and_non_square(T, H, W):
    model = tiny_model()
    x, t, context, pooled, mask = inputs(T=T, H=H, W=W)
    assert model(x, t, context, pooled, mask).shape == (2, 32, T, H, W)
    assert model(x, t, context, pooled).shape == (2, 32, T, H, W)
    assert model(x, t, context, pooled, mask, as_images=True).shape == (2, 32, T, H, W)
    per_frame_t = torch.rand(2, T) * 999
    assert model(x, per_frame_t, context, pooled, mask, as_images=True).shape == (2, 32, T, H, W)


def test_as_images_treats_each_frame_alone():
    """As ``VideoDiT``'s: a frame's output under ``as_images`` depends on that frame alone; as a video, frames mix."""
    model = tiny_model()
    x, t, context, pooled, mask = inputs()
    run = lambda v, **kw: model(v, t, context, pooled, mask, **kw)        # noqa: E731
    changed = x.clone()
    changed[:, :, 1:] = torch.randn_like(changed[:, :, 1:])
    assert torch.equal(run(changed, as_images=True)[:, :, 0], run(x, as_images=True)[:, :, 0])
    assert not torch.allclose(run(changed)[:, :, 0], run(x)[:, :, 0])
    assert torch.equal(model(x, t[:, None].expand(-1, x.shape[2]), context, pooled, mask, as_images=True),
                       run(x, as_images=True))


def test_untrained_model_predicts_zero():
    x, t, context, pooled, mask = inputs()
    assert torch.equal(build_text_dit("tiny")(x, t, context, pooled, mask), torch.zeros(2, 32, 4, 8, 6))


def test_strides_one_one_equal_full_attention_with_cross_attention():
    full = tiny_model(attn_strides=(None,))
    ones = tiny_model(attn_strides=((1, 1),))
    x, t, context, pooled, mask = inputs()
    torch.testing.assert_close(ones(x, t, context, pooled, mask), full(x, t, context, pooled, mask), rtol=0, atol=0)
    grid = tiny_model()
    assert not torch.allclose(grid(x, t, context, pooled, mask), full(x, t, context, pooled, mask), atol=1e-4)


def test_cross_attention_over_parts_equals_the_text_repeated_per_part():
    torch.manual_seed(0)
    attn = randomize_(CrossAttention(48, 4, qk_norm=True, fp32=False), std=0.2)
    B, G, n, L = 2, 6, 5, 7
    x = torch.randn(B * G, n, 48)
    context = torch.randn(B, L, 48)
    mask = torch.arange(L)[None] < torch.tensor([[7], [2]])
    stacked = attn(x, context, mask)
    per_part = attn(x, repeat(context, "b l d -> (b g) l d", g=G), repeat(mask, "b l -> (b g) l", g=G))
    torch.testing.assert_close(stacked, per_part, rtol=1e-5, atol=1e-6)


def test_text_conditions_the_output():
    model = tiny_model()
    x, t, context, pooled, mask = inputs()
    out = model(x, t, context, pooled, mask)
    other = torch.randn_like(context)
    assert not torch.allclose(model(x, t, other, pooled, mask), out, atol=1e-4)
    assert not torch.allclose(model(x, t, context, torch.randn_like(pooled), mask), out, atol=1e-4)
    # the videos of a batch read their own text
    swapped = model(x, t, context.flip(0), pooled, mask.flip(0))
    assert not torch.allclose(swapped, out, atol=1e-4)
    # masked-out (padding) tokens are not read; real ones are
    padded = context.clone()
    padded[1, 3:] = 100.0
    torch.testing.assert_close(model(x, t, padded, pooled, mask), out, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(x, t, padded, pooled, None), model(x, t, context, pooled, None), atol=1e-4)


def test_masked_attention_sdpa_and_math_agree():
    g = torch.Generator().manual_seed(0)   # the dispatcher's layout: (B, N, heads, e)
    q = torch.randn(2, 10, 3, 8, generator=g)
    k, v = torch.randn(2, 6, 3, 8, generator=g), torch.randn(2, 6, 3, 8, generator=g)
    mask = torch.tensor([[True] * 6, [True, True, False, False, False, False]])
    sdpa, math = DispatchProcessor(), DispatchProcessor()
    sdpa._attention_backend, math._attention_backend = "native", "_native_math"
    out = sdpa.attend(q, k, v, mask)
    torch.testing.assert_close(out, math.attend(q, k, v, mask, fp32=True), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1], math.attend(q[1:], k[1:, :2], v[1:, :2])[0], rtol=1e-5, atol=1e-6)
    flash = DispatchProcessor()
    flash._attention_backend = "flash"     # flash-attn takes no padding mask: a masked call runs SDPA
    torch.testing.assert_close(flash.attend(q, k, v, mask), out, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    x, t, context, pooled, mask = inputs()
    model = tiny_model().train()
    out = model(x, t, context, pooled, mask)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    out2 = model(x, t, context, pooled, mask)
    out2.square().mean().backward()
    assert len(calls) == 2                                      # checkpointed: the block runs again in backward
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "base")
    loaded = TextDiT.from_pretrained(tmp_path / "base")
    assert config_fields(loaded) == config_fields(model)
    x, t, context, pooled, mask = inputs()
    torch.testing.assert_close(loaded(x, t, context, pooled, mask), model(x, t, context, pooled, mask), rtol=0, atol=0)


def test_base_preset_builds_on_meta_with_about_one_billion_parameters():
    with torch.device("meta"):
        model = build_text_dit("base")
    count = sum(p.numel() for p in model.parameters())
    assert 1.0e9 < count < 1.2e9, count  # 1,083,781,664
    c = model.config
    for frames in (8, 16):
        model.check_window(frames, 32, 32)  # 1024 px
    model.check_window(16, 18, 32)          # 1024x576
    assert (c.caption_channels, c.pooled_channels, model.in_channels, model.out_channels) == (1280, 1280, 16, 32)


def test_bad_inputs_fail_loudly():
    model = tiny_model()
    x, t, context, pooled, mask = inputs()
    with pytest.raises(ValueError, match=r"expects \(B, 16, T, H, W\).*is T before C"):
        model(x.transpose(1, 2), t, context, pooled, mask)
    with pytest.raises(ValueError, match=r"context must be \(B=2, L, 32\)"):
        model(x, t, context[..., :8], pooled, mask)
    with pytest.raises(ValueError, match=r"pooled must be \(B=2, 32\)"):
        model(x, t, context, pooled[:1], mask)
    with pytest.raises(ValueError, match="without any token"):
        model(x, t, context, pooled, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="multiple of 2"):
        model(*inputs(T=3))
    with pytest.raises(ValueError, match="cond_channels must be 0"):
        TextDiT(cond_channels=16)
    with pytest.raises(ValueError, match="unknown text DiT preset"):
        build_text_dit("huge")
