import json
import math

import numpy as np
import pytest
import torch

from helpers import config_fields, randomize_
from dit import PRESETS, VideoDiT, build_dit
from dit.attention import partition, unpartition
from dit.video_dit import OFFICIAL_ATTN_STRIDES, RELEASED_PREFIXES, convert_released_state_dict, position_embedding

TINY = PRESETS["tiny"]


def tiny_model(**overrides) -> VideoDiT:
    return randomize_(VideoDiT(**{**TINY, **overrides})).eval()


def inputs(B=2, T=4, H=16, W=24, C=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, T, H, W, generator=g), torch.tensor([3.0, 871.0][:B])


@pytest.mark.parametrize("T,H,W", [(4, 16, 16), (4, 16, 24), (8, 32, 8), (2, 8, 16)])
def test_output_shape_square_and_non_square(T, H, W):
    model = tiny_model()
    x, t = inputs(T=T, H=H, W=W)
    assert model(x, t).shape == (2, 8, T, H, W)
    assert model(x, t, as_images=True).shape == (2, 8, T, H, W)


def test_as_images_treats_each_frame_alone():
    """Training's image batches (``as_images``): no token attends across frames, so a frame's output depends on that
    frame alone (as a video, frames mix); a timestep per video equals the same timestep for each frame."""
    model = tiny_model()
    x, t = inputs()
    out = model(x, t, as_images=True)
    changed = x.clone()
    changed[:, :, 1:] = torch.randn_like(changed[:, :, 1:])
    assert torch.equal(model(changed, t, as_images=True)[:, :, 0], out[:, :, 0])
    assert not torch.allclose(model(changed, t)[:, :, 0], model(x, t)[:, :, 0])
    torch.testing.assert_close(model(x[:, :, :1], t, as_images=True), out[:, :, :1], rtol=1e-5, atol=1e-6)
    assert torch.equal(model(x, t[:, None].expand(-1, x.shape[2]), as_images=True), out)


def test_bad_sizes_say_what_would_work():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"multiple of 2 \(e.g. 2 or 4\)"):
        model(*inputs(T=3))
    with pytest.raises(ValueError, match=r"latent width 18 must be a multiple of 4.*16 or 20"):
        model(*inputs(W=18))
    with pytest.raises(ValueError, match=r"expects \(B, 20, T, H, W\)"):
        model(*inputs(C=16))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        VideoDiT(hidden_size=96, num_heads=5)


def test_partition_then_unpartition_is_identity_and_parts_are_contiguous():
    T, h, w = 4, 6, 8
    ids = torch.arange(T * h * w).reshape(1, -1, 1).float()  # token id = (t*h + row)*w + col
    for strides in [None, (1, 1), (2, 1), (1, 2), (4, 2), (2, 2)]:
        parts = partition(ids, (T, h, w), strides)
        assert torch.equal(unpartition(parts, (T, h, w), strides), ids)
    parts = partition(ids, (T, h, w), (2, 2))  # 2 frame chunks x 2x2 spatial blocks of 2 x 3 x 4 tokens
    assert parts.shape == (8, 2 * 3 * 4, 1)
    grid = ids.reshape(T, h, w)
    assert torch.equal(parts[0, :, 0], grid[:2, :3, :4].flatten())
    assert torch.equal(parts[1, :, 0], grid[:2, :3, 4:].flatten())  # second spatial block: right half
    assert torch.equal(parts[2, :, 0], grid[:2, 3:, :4].flatten())
    assert torch.equal(parts[4, :, 0], grid[2:, :3, :4].flatten())  # second frame chunk


def test_strides_one_one_equal_full_attention():
    full = tiny_model(attn_strides=(None,))
    ones = tiny_model(attn_strides=((1, 1),))
    x, t = inputs()
    torch.testing.assert_close(ones(x, t), full(x, t), rtol=0, atol=0)


def test_grid_attention_changes_the_output():
    x, t = inputs()
    assert not torch.allclose(tiny_model()(x, t), tiny_model(attn_strides=(None,))(x, t), atol=1e-4)


def test_native_and_math_attention_backends_agree():
    """diffusers' set_attention_backend reaches every block: SDPA and the explicit math kernel agree."""
    x, t = inputs()
    out = {}
    for backend, fp32 in [("native", False), ("_native_math", True)]:
        model = tiny_model(attn_fp32=fp32)
        model.set_attention_backend(backend)
        assert {b.attn.processor._attention_backend for b in model.blocks} == {backend}
        out[backend] = model(x, t)
    model.set_attention_backend("native")  # also diffusers' global active backend: back to its default
    torch.testing.assert_close(out["native"], out["_native_math"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="must be one of"):
        model.set_attention_backend("sdpa")


def test_gradient_checkpointing_same_loss_and_gradients():
    x, t = inputs()
    grads, calls = {}, {}
    for ckpt in (False, True):
        model = tiny_model().train()
        if ckpt:
            model.enable_gradient_checkpointing()  # diffusers' ModelMixin method
        calls[ckpt] = []
        model.blocks[0].register_forward_pre_hook(lambda *_, c=calls[ckpt]: c.append(1))
        loss = model(x, t).square().mean()
        loss.backward()
        grads[ckpt] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert (len(calls[False]), len(calls[True])) == (1, 2)      # checkpointed: the block runs again in backward
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=0, atol=0)
    for name, g in grads[False][1].items():
        torch.testing.assert_close(grads[True][1][name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_initialisation_zeroes_the_output_layer():
    model = build_dit("tiny")
    x, t = inputs()
    assert torch.count_nonzero(model(x, t)) == 0
    assert model.blocks[0].scale_shift_table.std() > 0


def released_names(state_dict: dict) -> dict:
    """Our keys -> the release's (t_embedder.mlp.*, t_block.1.*): a fake s1024.effn-f32.pth."""
    ours = {new: old for old, new in RELEASED_PREFIXES.items()}
    out = {}
    for k, v in state_dict.items():
        prefix = next((p for p in ours if k.startswith(p)), None)
        out[ours[prefix] + k.removeprefix(prefix) if prefix else k] = v
    return out


def test_official_checkpoint_round_trip(tmp_path):
    model = tiny_model()
    released = released_names(model.state_dict())
    assert {"t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias", "t_block.1.weight"} <= set(released)
    assert convert_released_state_dict(released).keys() == model.state_dict().keys()
    state = {"state_dict": {**released, "pos_embed": torch.zeros(1, 8, 96)}, "step": 10}
    torch.save(state, tmp_path / "s1024.effn-f32.pth")
    loaded = VideoDiT.from_single_file(tmp_path / "s1024.effn-f32.pth", config=TINY)
    assert not loaded.training
    x, t = inputs()
    torch.testing.assert_close(loaded(x, t), model(x, t), rtol=0, atol=0)

    del state["state_dict"]["blocks.1.attn.qkv.weight"]
    state["state_dict"]["blocks.1.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError,
                       match=r"missing keys: blocks\.1\.attn\.qkv\.weight; unexpected keys: blocks\.1\.extra"):
        VideoDiT.from_single_file(tmp_path / "broken.pth", config=TINY)
    with pytest.raises(FileNotFoundError, match="s1024.effn-f32.pth"):
        VideoDiT.from_single_file(tmp_path / "missing.pth")


def test_save_and_from_pretrained_round_trip(tmp_path):
    model = tiny_model(attn_strides=((1, 2), None))
    model.save_pretrained(tmp_path / "dit")
    assert sorted(p.name for p in (tmp_path / "dit").iterdir()) == ["config.json",
                                                                    "diffusion_pytorch_model.safetensors"]
    loaded = VideoDiT.from_pretrained(tmp_path / "dit")
    assert config_fields(loaded) == config_fields(model)
    assert loaded.config.attn_strides == ((1, 2), None)  # JSON lists back to tuples
    assert json.loads((tmp_path / "dit/config.json").read_text())["_class_name"] == "VideoDiT"
    x, t = inputs()
    torch.testing.assert_close(loaded(x, t), model(x, t), rtol=0, atol=0)


def test_official_preset_on_meta_device_has_released_layout():
    with torch.device("meta"):
        model = VideoDiT(**PRESETS["official"])
    assert sum(p.numel() for p in model.parameters()) == 456_117_152
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["x_embedder.proj.weight"] == (1152, 20, 2, 2)
    assert shapes["adaln_single.emb.timestep_embedder.linear_1.weight"] == (1152, 256)
    assert shapes["adaln_single.linear.weight"] == (6 * 1152, 1152)
    assert shapes["blocks.27.scale_shift_table"] == (6, 1152)
    assert shapes["blocks.0.attn.qkv.weight"] == (3 * 1152, 1152)
    assert shapes["blocks.0.mlp.fc1.weight"] == (4608, 1152)
    assert shapes["final_layer.scale_shift_table"] == (2, 1152)
    assert shapes["final_layer.linear.weight"] == (2 * 2 * 8, 1152)
    assert len(shapes) == 2 + 4 + 2 + 28 * 9 + 3  # x_embedder, t_embedder, t_block (adaln_single), blocks, final_layer
    assert set(convert_released_state_dict(released_names(model.state_dict()))) == set(shapes)
    assert [model.block_strides(i) for i in (0, 1, 7, 8, 11, 12, 19, 20, 27)] == [
        (1, 4), (4, 1), (4, 1), None, None, (1, 4), (4, 1), None, None]
    assert len(OFFICIAL_ATTN_STRIDES) == 28


def test_position_embedding_layout():
    with torch.device("meta"):
        config = VideoDiT(**{**TINY, "hidden_size": 48, "num_heads": 4, "pe_interpolation": 2.0}).config
    pe = position_embedding(config, T=3, h=2, w=5).reshape(3, 2, 5, 48)
    temporal, spatial = pe[..., :16], pe[..., 16:]
    # sin before cos: frame 0 is [0]*8 + [1]*8; frame index only, not interpolated
    torch.testing.assert_close(temporal[0, 0, 0], torch.cat([torch.zeros(8), torch.ones(8)]))
    torch.testing.assert_close(temporal[2, 1, 3, 0], torch.tensor(math.sin(2.0)))
    # spatial: first half encodes the column (x / pe_interpolation), second half the row
    torch.testing.assert_close(spatial[0, 1, 4, 0], torch.tensor(math.sin(4 / 2.0)))
    torch.testing.assert_close(spatial[0, 1, 4, 16], torch.tensor(math.sin(1 / 2.0)))
    assert torch.equal(spatial[0], spatial[2]) and torch.equal(temporal[:, 0, 0], temporal[:, 1, 4])


# --- the released numerics, written out the way the release computes them ----------------------

def _sincos_np(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _reference_forward(model: VideoDiT, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The release's computation, independent of VideoDiT.forward: frames as a batch, per-frame
    timesteps, numpy position embedding, reshape/permute partitions, explicit fp32 attention."""
    c = model.config
    B, C, T, H, W = x.shape
    p, D, nh = c.patch_size, c.hidden_size, c.num_heads
    frames = x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)
    t_frames = t.repeat_interleave(T)
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t_frames[:, None].float() * freqs[None]
    mlp = model.adaln_single.emb.timestep_embedder  # the release's t_embedder.mlp.{0,2}
    t_emb = mlp.linear_2(torch.nn.functional.silu(mlp.linear_1(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))))
    tok = model.x_embedder.proj(frames).flatten(2).transpose(1, 2)  # (B*T, n, D)
    h, w = H // p, W // p
    n = h * w
    gh_, gw_ = np.meshgrid(np.arange(w, dtype=np.float32) / c.pe_interpolation,
                           np.arange(h, dtype=np.float32) / c.pe_interpolation)
    D_t = D // 3
    spatial = np.concatenate([_sincos_np((D - D_t) // 2, gh_), _sincos_np((D - D_t) // 2, gw_)], axis=1)
    temporal = _sincos_np(D_t, np.arange(T, dtype=np.float32))
    pe = np.concatenate([np.repeat(temporal[:, None], n, 1), np.repeat(spatial[None], T, 0)], axis=2)
    x3d = tok.reshape(B, T * n, D) + torch.from_numpy(pe).float().reshape(1, T * n, D)
    t3d = model.adaln_single.linear(torch.nn.functional.silu(t_emb.reshape(B, T, D)[:, 0]))  # the release's t_block

    def block_forward(blk, z, tt):
        b, N, _ = z.shape
        sh1, sc1, g1, sh2, sc2, g2 = (blk.scale_shift_table[None] + tt.reshape(b, 6, -1)).chunk(6, dim=1)
        y = blk.norm1(z) * (1 + sc1) + sh1
        qkv = blk.attn.qkv(y).reshape(b, N, 3, nh, D // nh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = (q @ k.transpose(-1, -2) / math.sqrt(D // nh)).softmax(-1) @ v
        z = z + g1 * blk.attn.proj(a.transpose(1, 2).reshape(b, N, D))
        y = blk.norm2(z) * (1 + sc2) + sh2
        return z + g2 * blk.mlp.fc2(torch.nn.functional.gelu(blk.mlp.fc1(y), approximate="tanh"))

    for i, blk in enumerate(model.blocks):
        s = c.attn_strides[i % len(c.attn_strides)]
        if s is None:
            x3d = block_forward(blk, x3d, t3d)
            continue
        ts, xs = s
        gt, gh, gw = T // ts, h // xs, w // xs
        g = x3d.reshape(B, ts, gt, xs, gh, xs, gw, D).permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(B * ts * xs * xs, -1, D)
        g = block_forward(blk, g, t3d.repeat_interleave(ts * xs * xs, dim=0))
        x3d = g.reshape(B, ts, xs, xs, gt, gh, gw, D).permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, T * n, D)
    out = x3d.reshape(B * T, n, D)
    fl = model.final_layer
    shift, scale = (fl.scale_shift_table[None] + t_emb[:, None]).chunk(2, dim=1)
    out = fl.linear(fl.norm_final(out) * (1 + scale) + shift)
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(B * T, h, w, p, p, model.out_channels))
    return out.reshape(B, T, model.out_channels, H, W).permute(0, 2, 1, 3, 4)


def test_forward_matches_the_released_computation_on_the_trained_window():
    model = randomize_(VideoDiT(**{**TINY, "hidden_size": 96, "depth": 6,
                                   "attn_strides": ((1, 2), (2, 1), None)})).eval()
    config = model.config
    x, t = inputs(T=config.window_frames, H=config.window_size, W=config.window_size)
    with torch.no_grad():
        ours, ref = model(x, t), _reference_forward(model, x, t)
    rel = (ours - ref).norm() / ref.norm()
    assert rel < 1e-5, rel
