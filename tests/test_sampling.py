import numpy as np
import pytest
import torch

from helpers import randomize_
from cascadev.pipelines.sampling import finishing_step, make_scheduler, predict_noise, sample
from cascadev.pipelines.tiling import (Tiling, central_weights, dit_work, grid_offset, low_band, shifted_spans,
                                      window_crops, window_starts)
from dit import PRESETS, VideoDiT

TINY = PRESETS["tiny"]  # window: 4 frames x 16x16 latents


def tiny_model(seed=0):
    return randomize_(VideoDiT(**TINY), seed=seed).eval()


class CallConstant(torch.nn.Module):
    """Stub DiT whose eps is the number of calls so far: shows exactly how windows/tiles combine."""

    def __init__(self, config=TINY):
        super().__init__()
        with torch.device("meta"):
            real = VideoDiT(**config)   # the config and sizes a DiT of this config has
        self.config, self.calls = real.config, 0
        self.in_channels, self.out_channels = real.in_channels, real.out_channels
        self.frame_multiple, self.spatial_multiple = real.frame_multiple, real.spatial_multiple
        self.window = real.window

    def forward(self, x, t):
        self.calls += 1
        B, _, T, H, W = x.shape
        return torch.full((B, self.out_channels, T, H, W), float(self.calls))


class PassThrough(CallConstant):
    """Stub DiT whose eps is its first input channel: a partition of unity must give the input back."""

    def forward(self, x, t):
        return x[:, :1].expand(-1, self.out_channels, -1, -1, -1).clone()


def test_window_starts_cover_and_end_at_the_edge():
    assert window_starts(16, 8, 4) == [0, 4, 8]
    assert window_starts(10, 8, 4) == [0, 2]
    assert window_starts(8, 8, 4) == [0]
    assert window_starts(300, 128, 96) == [0, 96, 172]
    assert window_starts(5, 5, 4) == [0]


@pytest.mark.parametrize("T,H,W", [(2, 16, 16), (3, 10, 6), (4, 16, 16), (9, 16, 16), (4, 40, 24), (7, 20, 33)])
def test_any_clip_size_gives_eps_of_the_same_size(T, H, W):
    x = torch.randn(1, 20, T, H, W)
    assert predict_noise(tiny_model(), x, 500.0).shape == (1, 4, T, H, W)


def test_exactly_one_window_equals_the_model():
    model = tiny_model()
    x = torch.randn(2, 20, 4, 16, 16)
    direct = model(x, torch.tensor([500.0, 500.0]))[:, :4]
    for mode in ("blend", "official"):
        torch.testing.assert_close(predict_noise(model, x, 500.0, mode), direct, rtol=0, atol=0)


def test_short_clip_is_padded_then_cropped():
    model = tiny_model()
    x = torch.randn(1, 20, 3, 16, 14)
    padded = torch.cat([x, x[:, :, -1:]], dim=2)
    padded = torch.cat([padded, padded[..., -1:], padded[..., -1:]], dim=-1)
    expected = model(padded, torch.tensor([500.0]))[:, :4, :3, :, :14]
    torch.testing.assert_close(predict_noise(model, x, 500.0), expected, rtol=0, atol=0)


def test_official_and_blend_agree_where_only_one_window_and_tile_cover():
    model = tiny_model()
    x = torch.randn(1, 20, 4, 16, 40)  # tiles at columns 0, 12, 24 (stride 12 = round(0.75*16))
    blend, official = predict_noise(model, x, 300.0, "blend"), predict_noise(model, x, 300.0, "official")
    torch.testing.assert_close(blend[..., :12], official[..., :12], rtol=0, atol=0)  # only the first tile
    assert not torch.allclose(blend[..., 12:16], official[..., 12:16], atol=1e-5)   # overlap: they differ


def test_official_rules_overwrite_tiles_and_ramp_windows():
    stub = CallConstant()
    eps = predict_noise(stub, torch.zeros(1, 20, 10, 16, 28), 1.0, "official")
    # windows start at frames 0, 2, 4, 6 (size 4, stride 2); tiles at columns 0 and 12
    assert stub.calls == 4 * 2
    # window 0: tiles are calls 1 (cols 0-15) and 2 (cols 12-27): the later tile wins its overlap
    assert eps[0, 0, 0, 0, 11] == 1 and eps[0, 0, 0, 0, 12] == 2
    # each later window overlaps by 2 frames, weights (0, 1): the first keeps the old value, the
    # second takes the new window's (calls 3, 5, 7 at column 0)
    assert eps[0, 0, :, 0, 0].tolist() == [1, 1, 1, 3, 3, 5, 5, 7, 7, 7]
    # an overlap of k = 3 frames (windows at 0, 1, 2): weights linspace(0, 1, 3) = (0, 0.5, 1), as the release's
    # np.linspace over its k-frame overlap (k = 4 at its stride), then 1 for the frames no earlier window covered
    eps = predict_noise(CallConstant(), torch.zeros(1, 20, 6, 16, 16), 1.0, Tiling("official", frame_stride=1))
    assert eps[0, 0, :, 0, 0].tolist() == [1, 1, 1.5, 2.5, 3, 3]


def test_blend_weights_ramp_linearly_across_the_overlap_and_are_shared_with_stage_a():
    """A window's blend weights along an axis (``cascadev.blend.ramp``, the one ramp Stage A's tiles use too):
    1/(k+1) ... k/(k+1) across a k-unit overlap toward each neighbour, flat at the clip's own edges."""
    from cascadev.blend import ramp
    from cascadev.pipelines.tiling import axis_ramp

    k = torch.arange(1, 5, dtype=torch.float32) / 5
    torch.testing.assert_close(axis_ramp(20, 8, 4, 4, "cpu"), torch.cat([k, k.flip(0)]), rtol=0, atol=0)
    torch.testing.assert_close(axis_ramp(20, 8, 0, 4, "cpu"), torch.cat([torch.ones(4), k.flip(0)]), rtol=0, atol=0)
    torch.testing.assert_close(axis_ramp(20, 8, 12, 4, "cpu"), torch.cat([k, torch.ones(4)]), rtol=0, atol=0)
    # a margin gives the neighbour the shared edge: 0 there, the ramp over the middle
    torch.testing.assert_close(ramp(6, before=4, margin=1), torch.tensor([0, 1 / 3, 2 / 3, 1, 1, 1]))


def test_blend_is_a_partition_of_unity_and_has_no_seams():
    x = torch.zeros(1, 20, 10, 37, 50)
    x[:, 0] = 0.7  # a constant field
    torch.testing.assert_close(predict_noise(PassThrough(), x, 1.0, "blend"), torch.full((1, 4, 10, 37, 50), 0.7))
    # every window/tile returns a different constant: blending must stay smooth (no jumps), official does not
    eps_b = predict_noise(CallConstant(), x, 1.0, "blend")[0, 0]
    eps_o = predict_noise(CallConstant(), x, 1.0, "official")[0, 0]
    overlap = 16 - 12
    spread = eps_b.max() - eps_b.min()
    for dim in (1, 2):
        jump_b = eps_b.diff(dim=dim).abs().max()
        jump_o = eps_o.diff(dim=dim).abs().max()
        assert jump_b <= spread / (overlap + 1) + 1e-5, (dim, jump_b)
        assert jump_o >= 1.0  # official tiles overwrite: a step as large as the difference between calls


class CallNoise(CallConstant):
    """Stub DiT whose eps is fresh unit noise at every call: windows that disagree on every detail."""

    def forward(self, x, t):
        self.calls += 1
        g = torch.Generator().manual_seed(self.calls)
        return torch.randn(x.shape[0], self.out_channels, *x.shape[2:], generator=g)


def test_central_detail_equals_average_where_windows_agree_or_have_no_detail():
    x = torch.randn(1, 20, 10, 37, 50, generator=torch.Generator().manual_seed(0))
    central = Tiling("blend", detail="central")
    # windows that agree (eps a function of each latent): both give the untiled field back
    torch.testing.assert_close(predict_noise(PassThrough(), x, 1.0, central), x[:, :1].expand(-1, 4, -1, -1, -1))
    # windows of constants have no detail band: central is the seam-free average's low band
    average = predict_noise(CallConstant(), x, 1.0, "blend")
    smooth = low_band(torch.nn.functional.pad(average, (1, 1, 1, 1, 0, 0), mode="replicate"))
    torch.testing.assert_close(predict_noise(CallConstant(), x, 1.0, central), smooth, atol=1e-3, rtol=0)


def test_central_detail_keeps_the_detail_that_averaging_blurs():
    x = torch.zeros(1, 20, 4, 20, 20)                 # tiles at 0 and 4: 12 of 16 columns (rows) overlap
    average = predict_noise(CallNoise(), x, 1.0, Tiling("blend", detail="average"))
    central = predict_noise(CallNoise(), x, 1.0, Tiling("blend", detail="central"))
    detail_energy = [(e[..., 1:-1, 1:-1] - low_band(e)).pow(2).mean().item() for e in (average, central)]
    assert detail_energy[1] > 1.3 * detail_energy[0], detail_energy   # averaging independent detail halves it


def test_central_weights_pick_the_deepest_window():
    spec = CallConstant().window
    size = (4, 16, 28)                                       # two tiles side by side: columns [0, 16) and [12, 28)
    crops = window_crops(spec, size, "blend")
    assert [c[2] for c in crops] == [slice(0, 16), slice(12, 28)]
    weights = torch.zeros(len(crops), *size)
    for k, (f, r, col) in enumerate(crops):
        weights[k, f, r, col] = central_weights(size, (f, r, col))
    share = weights / weights.sum(0)
    assert torch.all(share[0, :, :, :12] == 1) and torch.all(share[1, :, :, 16:] == 1)    # one window covers
    assert share[0, 0, 8, 12] > 0.99 and share[1, 0, 8, 15] > 0.99    # in the overlap: the one a column is deeper in
    torch.testing.assert_close(share[:, 0, 8, 13:15].sum(0), torch.ones(2))


def test_central_detail_is_not_for_official_tiling():
    with pytest.raises(ValueError, match="central"):
        Tiling("official", detail="central")
    with pytest.raises(ValueError, match="detail"):
        Tiling("blend", detail="sharp")
    assert Tiling("shifted", detail="central").at_step(3, finishing=3) == Tiling("blend", detail="central")


def test_tile_stride_up_to_the_window_still_covers_every_latent():
    x = torch.zeros(1, 20, 4, 16, 40)
    x[:, 0] = 0.7
    default, widest = CallConstant(), CallConstant()
    predict_noise(default, x, 1.0)                                   # columns 0, 12, 24
    predict_noise(widest, x, 1.0, Tiling(tile_stride=16))            # columns 0, 16, 24
    assert (default.calls, widest.calls) == (3, 3)
    torch.testing.assert_close(predict_noise(PassThrough(), x, 1.0, Tiling(tile_stride=16)),
                               torch.full((1, 4, 4, 16, 40), 0.7))
    stub = CallConstant()
    predict_noise(stub, torch.zeros(1, 20, 4, 16, 64), 1.0, Tiling(tile_stride=16))
    assert stub.calls == 4                                           # 64 = 4 x 16: no overlap at all (default: 5)
    with pytest.raises(ValueError, match="would leave latents no window covers"):
        predict_noise(PassThrough(), x, 1.0, Tiling(tile_stride=17))


def test_shifted_grid_moves_by_a_low_discrepancy_offset():
    assert [grid_offset(i, 16, 1) for i in range(8)] == [0, 8, 4, 12, 2, 10, 6, 14]
    assert [grid_offset(i, 16, 4) for i in range(4)] == [0, 8, 4, 12]
    assert [grid_offset(i, 8, 4) for i in range(4)] == [0, 4, 0, 4]      # rounded to what the partitions divide


@pytest.mark.parametrize("length", [5, 16, 17, 37, 64, 100])
@pytest.mark.parametrize("offset", [0, 2, 4, 8, 12, 14])
def test_shifted_spans_partition_the_clip_into_half_to_whole_windows(length, offset):
    spans = shifted_spans(length, 16, offset, 2)
    assert spans[0].start == 0 and spans[-1].stop == length
    assert all(a.stop == b.start for a, b in zip(spans, spans[1:]))            # no gap, no overlap
    sizes = [s.stop - s.start for s in spans]
    assert max(sizes) <= 16 and (length < 16 or min(sizes) >= 16 / 2 - 2)
    inner = {s.start for s in spans[1:]}                                       # the grid's lines stay where they were
    assert {c for c in range(offset or 16, length, 16) if 16 / 2 <= c <= length - 16 / 2 - 1} <= inner | {length}


def test_shifted_tiling_partitions_the_clip_and_moves_its_seams_every_step():
    spec = CallConstant().window                                # window 4 frames x 16 x 16 latents
    x = torch.zeros(1, 20, 8, 32, 48)
    x[:, 0] = 0.7
    for step in range(4):
        torch.testing.assert_close(predict_noise(PassThrough(), x, 1.0, "shifted", step=step),
                                   torch.full((1, 4, 8, 32, 48), 0.7))
        covered = torch.zeros(8, 32, 48)
        for f, r, c in window_crops(spec, (8, 32, 48), "shifted", step):
            covered[f, r, c] += 1
        assert covered.eq(1).all()
    seams = [{c.start for _, _, c in window_crops(spec, (8, 32, 48), "shifted", step)} - {0} for step in range(2)]
    assert seams[0] == {16, 32} and not seams[0] & seams[1]
    # every window is exactly the model on that crop: no blending, no overlap
    model, x = tiny_model(), torch.randn(1, 20, 8, 32, 48)
    eps = predict_noise(model, x, 300.0, "shifted", step=1)
    for f, r, c in window_crops(spec, (8, 32, 48), "shifted", 1):
        direct = predict_noise(model, x[:, :, f, r, c], 300.0)
        torch.testing.assert_close(eps[:, :, f, r, c], direct, rtol=1e-5, atol=1e-6)
    # windows of several sizes stack by size: the same eps window by window and several per forward
    torch.testing.assert_close(predict_noise(model, x, 300.0, "shifted", window_batch=5, step=1), eps,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="shifted windows are a window apart"):
        Tiling("shifted", tile_stride=8)


def test_shifted_tiling_runs_the_area_through_the_dit():
    spec = CallConstant().window
    area = 8 * 64 * 64
    forwards, blend = dit_work(spec, (8, 64, 64), "blend", steps=4)
    assert (forwards, blend) == (4 * 3 * 5 * 5, 4 * 3 * 5 * 5 * 4 * 16 * 16)   # release spacing: 2.3x the area
    assert dit_work(spec, (8, 64, 64), Tiling(tile_stride=16, frame_stride=4), steps=4)[1] == 4 * area
    assert dit_work(spec, (8, 64, 64), "shifted", steps=4, finishing=-1)[1] == 4 * area   # partial windows, no overlap
    assert dit_work(spec, (8, 60, 62), "shifted", steps=4, finishing=-1)[1] <= 4 * 8 * 64 * 64  # padding counted
    # in time too: frames 0-4, 4-8; then 0-2, 2-6, 6-8 (the grid half a window on); then 0-4, 4-8 again (a quarter
    # window rounded down to the 2 frames the partitions divide)
    assert dit_work(spec, (8, 16, 16), "shifted", steps=3, finishing=-1) == (2 + 3 + 2, 3 * 8 * 16 * 16)


def test_finishing_step_is_the_last_from_real_noise():
    def finishing(name, steps):
        scheduler = make_scheduler(name)
        scheduler.set_timesteps(steps)
        return finishing_step(scheduler)
    assert finishing("flow", 4) == 2          # sigmas 1, 0.67, 0.33, 0.001: the fourth step starts from no noise
    assert finishing("flow", 8) == 6 and finishing("flow", 1) == 0
    assert finishing("euler_a", 8) == 6       # t = 142 (noise/signal 0.45); the eighth starts at t = 0
    assert finishing("ddim", 8) == 6 and finishing("dpmpp", 8) == 7


def test_shifted_sampling_moves_the_grid_and_blends_the_finishing_step():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    cond, noise = torch.randn(1, 16, 4, 32, 32, generator=g), torch.randn(1, 4, 4, 32, 32, generator=g)
    tilings = []
    original = predict_noise

    def spy(model, x, t, tiling, *args, step=0):
        tilings.append(tiling.mode if tiling.mode != "shifted" else f"shifted@{step}")
        return original(model, x, t, tiling, *args, step=step)

    import cascadev.pipelines.sampling as sampling
    sampling.predict_noise = spy
    try:
        shifted = sample(model, cond, noise, "flow", 4, "shifted")
    finally:
        sampling.predict_noise = original
    assert tilings == ["shifted@0", "shifted@1", "blend", "shifted@3"]
    blend = sample(model, cond, noise, "flow", 4, "blend")
    assert (shifted - blend).abs().max() > 1e-3
    # one step is the finishing step: shifted tiling is blend
    torch.testing.assert_close(sample(model, cond, noise, "flow", 1, "shifted"),
                               sample(model, cond, noise, "flow", 1, "blend"), rtol=0, atol=0)
    spec = tiny_model().window
    _, blended = dit_work(spec, (4, 64, 64), "blend", steps=4)
    _, moved = dit_work(spec, (4, 64, 64), "shifted", steps=4, finishing=2)
    assert moved == 3 * 4 * 64 * 64 + blended // 4          # the area at three steps, blend's at the finishing one


def test_official_tiling_rejects_clips_smaller_than_the_window():
    with pytest.raises(ValueError, match="official tiling needs at least 4 latent frames"):
        predict_noise(tiny_model(), torch.randn(1, 20, 3, 16, 16), 1.0, "official")
    with pytest.raises(ValueError, match=r"expects \(B, 20, T, H, W\)"):
        predict_noise(tiny_model(), torch.randn(1, 16, 4, 16, 16), 1.0)
    with pytest.raises(ValueError, match="tiling must be"):
        Tiling("seamless")


@pytest.mark.parametrize("name", ["euler_a", "ddim", "dpmpp", "flow"])
def test_sample_is_seedable_and_shapes_hold(name):
    model = tiny_model()
    cond, noise = torch.randn(1, 16, 6, 16, 24), torch.randn(1, 4, 6, 16, 24)
    runs = [sample(model, cond, noise, name, 3, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert runs[0].shape == (1, 4, 6, 16, 24) and torch.isfinite(runs[0]).all()
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("heun")


@pytest.mark.parametrize("name", ["ddim", "dpmpp", "flow"])
def test_each_deterministic_sampler_is_its_diffusers_loop(name):
    """On one window, ``sample`` is the plain diffusers loop over the DiT's first 4 output channels (eps, or v for
    flow): each name reaches its own scheduler with its own input scaling and start."""
    model = tiny_model()
    cond, noise = torch.randn(1, 16, 4, 16, 16), torch.randn(1, 4, 4, 16, 16)
    scheduler = make_scheduler(name)
    scheduler.set_timesteps(3)
    z = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(z, t) if hasattr(scheduler, "scale_model_input") else z
            eps = model(torch.cat([x, cond], dim=1), t.float().expand(1))[:, :4]
            z = scheduler.step(eps, t, z).prev_sample
    torch.testing.assert_close(sample(model, cond, noise, name, 3), z, rtol=1e-5, atol=1e-6)


def test_flow_sampling_is_euler_on_the_velocity():
    """One flow step from sigma=1: x0 = noise - v, exactly what a rectified-flow model implies."""
    class ConstantVelocity(CallConstant):
        def forward(self, x, t):
            return torch.full((x.shape[0], self.out_channels, *x.shape[2:]), 0.25)

    noise = torch.randn(1, 4, 4, 16, 16)
    out = sample(ConstantVelocity(), torch.zeros(1, 16, 4, 16, 16), noise, "flow", 1)
    torch.testing.assert_close(out, noise - 0.25, rtol=0, atol=1e-6)


def test_schedulers_keep_diffusers_defaults_except_the_ddim_pixel_clamp():
    assert make_scheduler("euler_a").config.num_train_timesteps == 1000
    assert make_scheduler("euler_a").config.beta_schedule == "linear"
    assert make_scheduler("ddim").config.clip_sample is False
    assert make_scheduler("ddim", {"clip_sample": True}).config.clip_sample is True
    assert make_scheduler("dpmpp", {"solver_order": 3}).config.solver_order == 3


# --- the release's loop, frames as a batch (recon/refine_latent.py + forward_with_dpmsolver) ---------

def _release_slices(size, window):
    step, starts, begin = round(window * 0.75), [], 0
    while begin + window < size:
        starts.append(begin)
        begin += step
    return starts + [size - window]


def _release_eps(model, frames, timestep):
    """forward_with_dpmsolver: frames (n, C, h, w), timestep (n,) -> eps (n, 4, h, w)."""
    c = model.config
    L, S = c.window_frames, c.window_size
    n, _, h, w = frames.shape

    def by_slice(x, ts):  # forward_by_slice on one window of L frames
        y = torch.zeros(L, model.out_channels, h, w)
        for r in _release_slices(h, S):
            for col in _release_slices(w, S):
                tile = x[:, :, r:r + S, col:col + S].unsqueeze(0).permute(0, 2, 1, 3, 4)
                y[:, :, r:r + S, col:col + S] = model(tile, ts[:1])[0].permute(1, 0, 2, 3)
        return y

    z = torch.zeros(n, model.out_channels, h, w)
    starts = []
    for i in range(0, n, L // 2):
        begin, end = i, i + L
        if end > n:
            begin, end = n - L, n
        starts.append(begin)
        if end == n:
            break
    last = 0
    for begin in starts:
        zs = by_slice(frames[begin:begin + L], timestep[begin:begin + L])
        overlap = last - begin
        if overlap < 2:
            z[begin:begin + L] = zs
        else:
            wts = np.ones(L, dtype=np.float32)
            wts[:overlap] = np.linspace(0, 1, num=overlap, dtype=np.float32)
            wts = torch.from_numpy(wts).reshape(-1, 1, 1, 1)
            z[begin:begin + L] = z[begin:begin + L] * (1.0 - wts) + zs * wts
        last = begin + L
    return z[:, :4]


def test_official_sampling_equals_the_released_loop():
    model = tiny_model()
    T, H, W = 10, 40, 28
    ref_z = torch.randn(T, 16, H, W)  # release layout: frames as a batch
    torch.manual_seed(123)
    z = torch.randn(T, 4, H, W)
    scheduler = make_scheduler("euler_a")
    scheduler.set_timesteps(3)
    latents = z * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(latents, t)
            eps = _release_eps(model, torch.cat([inp, ref_z], dim=1), t[None].expand(T))
            latents = scheduler.step(eps, t, latents, return_dict=False)[0]
    released = latents.permute(1, 0, 2, 3).unsqueeze(0)

    torch.manual_seed(123)
    noise = torch.randn(T, 4, H, W).permute(1, 0, 2, 3).unsqueeze(0)
    ours = sample(model, ref_z.permute(1, 0, 2, 3).unsqueeze(0), noise, "euler_a", 3, tiling="official")
    rel = (ours - released).norm() / released.norm()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("mode", ["blend", "official"])
@pytest.mark.slow
def test_batched_windows_equal_one_by_one(mode):
    model = tiny_model()
    x = torch.randn(2, 20, 10, 24, 40)  # 4 windows x 2 rows x 3 columns of tiles = 24 crops per step
    one_by_one = predict_noise(model, x, 300.0, mode)
    for batch in (5, 24, 100):  # a last partial batch, all at once, more than there are
        torch.testing.assert_close(predict_noise(model, x, 300.0, mode, window_batch=batch), one_by_one,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="window_batch must be >= 1"):
        predict_noise(model, x, 300.0, mode, window_batch=0)


def test_batched_windows_take_fewer_forwards():
    stub = CallConstant()
    predict_noise(stub, torch.zeros(1, 20, 10, 16, 28), 1.0, "official", window_batch=3)
    assert stub.calls == 3  # 8 crops in batches of 3


@pytest.mark.slow
def test_sampling_with_batched_windows_matches():
    model = tiny_model()
    cond, noise = torch.randn(1, 16, 8, 24, 24), torch.randn(1, 4, 8, 24, 24)
    run = lambda batch: sample(model, cond, noise, "euler_a", 3, generator=torch.Generator().manual_seed(1),  # noqa: E731
                               window_batch=batch)
    torch.testing.assert_close(run(4), run(1), rtol=1e-4, atol=1e-4)


def test_the_sampler_of_a_training_objective():
    """Rectified flow samples with flow Euler at the trained shift, eps objectives with the sampler asked for."""
    from cascadev.pipelines.sampling import scheduler_for_objective, scheduler_name
    from cascadev.training.diffusion import DiffusionConfig

    flow = scheduler_for_objective(DiffusionConfig(objective="rf", sigma_shift=3.0), "euler_a")
    assert scheduler_name(flow) == "flow" and flow.config.shift == 3.0
    assert scheduler_name(scheduler_for_objective(DiffusionConfig(objective="iddpm"), "euler_a")) == "euler_a"
    assert scheduler_name(scheduler_for_objective(DiffusionConfig(objective="iddpm"), "dpmpp")) == "dpmpp"
