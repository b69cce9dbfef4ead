import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from cascadev.pipelines.sampling import make_scheduler
from cascadev.training.diffusion import (DiffusionConfig, GaussianDiffusion, RectifiedFlow, build_diffusion,
                                         discretized_gaussian_log_likelihood, normal_kl, shift_sigma)


def latents(B=3, seed=0, shape=(4, 2, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, *shape, generator=g, dtype=torch.float64)


def test_schedule_is_iddpm_linear_1000():
    d = GaussianDiffusion()
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)   # IDDPM get_named_beta_schedule("linear", 1000)
    assert torch.allclose(d.betas, torch.from_numpy(betas), rtol=1e-6)
    assert torch.allclose(d.alpha_bar, torch.from_numpy(np.cumprod(1 - betas)), rtol=1e-5)
    assert d.alpha_bar.shape == (1000,) and d.alpha_bar[-1] < 1e-4


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    m1, m2, lv1, lv2 = (torch.randn(100, generator=g, dtype=torch.float64) for _ in range(4))
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                                 torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), expected, atol=1e-12)
    assert torch.allclose(normal_kl(m1, lv1, m1, lv1), torch.zeros(100, dtype=torch.float64))


@pytest.mark.parametrize("mean,std", [(0.0, 0.01), (0.3, 0.2), (-0.97, 0.05), (0.999, 1e-3), (2.0, 0.3), (0.1, 3.0)])
def test_discretized_likelihood_is_the_bin_mass(mean, std):
    x = torch.arange(256, dtype=torch.float64) / 127.5 - 1           # the 256 bin centres of [-1, 1]
    logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(std)))
    edges = np.concatenate([[-np.inf], (x[:-1].numpy() + x[1:].numpy()) / 2, [np.inf]])
    mass = norm.cdf(edges[1:], mean, std) - norm.cdf(edges[:-1], mean, std)
    assert torch.allclose(logp.exp().sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-9)
    big = mass > 1e-8   # log of the mass where it is representable; closed form via scipy
    assert np.allclose(logp.numpy()[big], np.log(mass[big]), atol=1e-6)


def test_learned_range_variance_endpoints():
    d = GaussianDiffusion()
    t = torch.tensor([0, 1, 500, 999])
    v = torch.ones(4, 1, 1, 1, 1, dtype=torch.float64)
    assert torch.allclose(d.model_log_variance(v, t).flatten(), d.betas[t].log())      # v = 1: beta_t
    assert torch.allclose(d.model_log_variance(-v, t).flatten(), d.log_beta_tilde[t])  # v = -1: beta_tilde_t
    mid = 0.5 * (d.betas[t].log() + d.log_beta_tilde[t])
    assert torch.allclose(d.model_log_variance(0 * v, t).flatten(), mid)               # log-space midpoint
    assert d.log_beta_tilde[0] == d.log_beta_tilde[1]                                  # clipped at t = 0


def test_posterior_is_bayes_rule():
    d = GaussianDiffusion()
    x0, x_t = latents(seed=2), latents(seed=3)
    t = torch.tensor([1, 10, 900])
    mean, log_var = d.posterior(x0, x_t, t)
    for i, ti in enumerate(t.tolist()):
        # q(x_{t-1} | x0) = N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1});  q(x_t | x_{t-1}) = N(sqrt(a_t) x_{t-1}, b_t)
        ab_prev, a_t, b_t = d.alpha_bar[ti - 1], 1 - d.betas[ti], d.betas[ti]
        precision = 1 / (1 - ab_prev) + a_t / b_t
        expected = (ab_prev.sqrt() * x0[i] / (1 - ab_prev) + a_t.sqrt() * x_t[i] / b_t) / precision
        assert torch.allclose(mean[i], expected, atol=1e-10)
        assert torch.allclose(log_var[i], -precision.log().expand_as(log_var[i]), atol=1e-10)


def test_noise_and_x0_from_eps_invert_each_other():
    d = GaussianDiffusion()
    x0, eps, t = latents(seed=4), latents(seed=5), torch.tensor([0, 400, 999])
    x_t = d.noise(x0, t, eps)
    assert torch.allclose(d.x0_from_eps(x_t, t, eps), x0, atol=1e-8)
    ab = d.alpha_bar[400]
    assert torch.allclose(x_t[1], ab.sqrt() * x0[1] + (1 - ab).sqrt() * eps[1])


def test_vlb_is_zero_for_the_true_posterior_and_the_decoder_nll_at_t0():
    d = GaussianDiffusion()
    x0, eps = latents(seed=6).clamp(-1, 1), latents(seed=7)
    t = torch.tensor([0, 1, 700])
    x_t = d.noise(x0, t, eps)
    v = -torch.ones_like(x0)                                       # variance = beta_tilde_t, the true one
    vb = d.vlb(eps, v, x0, x_t, t)
    assert torch.allclose(vb[1:], torch.zeros(2, dtype=torch.float64), atol=1e-9)
    mean, _ = d.posterior(x0, x_t, t)
    nll = -discretized_gaussian_log_likelihood(x0[0], mean[0], 0.5 * d.log_beta_tilde[0].expand_as(x0[0]))
    assert torch.allclose(vb[0], nll.mean() / math.log(2))


def test_hybrid_loss_weights_and_stop_gradient():
    d = GaussianDiffusion()
    x0, eps, t = latents(seed=8).float(), latents(seed=9).float(), torch.tensor([3, 300, 990])
    x_t = d.noise(x0, t, eps)
    out = torch.randn(3, 8, 2, 4, 4, requires_grad=True)
    losses = d.losses(out, x0, x_t, t, eps)
    assert torch.allclose(losses["mse"], ((eps - out[:, :4]) ** 2).flatten(1).mean(1))
    vb_raw = d.vlb(out[:, :4].detach(), out[:, 4:].detach(), x0, x_t, t)
    assert torch.allclose(losses["vb"], vb_raw * 0.001 * 1000)     # lambda * T = 1 for the release
    losses["loss"].sum().backward()
    # the eps channels get only the MSE gradient: the VLB's mean is detached (IDDPM Sec. 3.1)
    assert torch.allclose(out.grad[:, :4], -2 * (eps - out[:, :4].detach()) / eps[0].numel())
    assert out.grad[:, 4:].abs().sum() > 0


def test_eps_only_output_and_bad_shapes():
    d = GaussianDiffusion()
    x0 = latents(B=2).float()
    t = torch.tensor([1, 2])
    losses = d.losses(torch.zeros_like(x0), x0, x0, t, x0)
    assert torch.equal(losses["vb"], torch.zeros(2)) and torch.allclose(losses["loss"], (x0 ** 2).flatten(1).mean(1))
    with pytest.raises(ValueError, match="expected 4 .eps. or 8"):
        d.losses(torch.zeros(2, 6, 2, 4, 4), x0, x0, t, x0)


def test_rectified_flow():
    rf = build_diffusion(DiffusionConfig(objective="rf"))
    assert isinstance(rf, RectifiedFlow)
    x0, eps = latents(B=2, seed=10).float(), latents(B=2, seed=11).float()
    sigma = torch.tensor([0.0, 1.0])
    x_t = rf.noise(x0, sigma, eps)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[1], eps[1])
    assert torch.equal(rf.model_time(torch.tensor([0.25])), torch.tensor([250.0]))
    perfect = torch.cat([eps - x0, torch.randn_like(x0)], dim=1)   # variance channels are ignored
    assert torch.allclose(rf.losses(perfect, x0, x_t, sigma, eps)["loss"], torch.zeros(2))
    s = rf.sample_t(1000, torch.Generator().manual_seed(0))
    assert s.min() >= 0 and s.max() < 1 and abs(s.mean() - 0.5) < 0.05


@pytest.mark.parametrize("objective", ["iddpm", "rf"])
def test_predict_x0_from_a_perfect_output_is_x0(objective):
    d = build_diffusion(DiffusionConfig(objective=objective))
    x0, eps = latents(B=2, seed=12), latents(B=2, seed=13)
    t = torch.tensor([10, 900]) if objective == "iddpm" else torch.tensor([0.1, 1.0], dtype=torch.float64)
    x_t = d.noise(x0, t, eps)
    perfect = eps if objective == "iddpm" else eps - x0
    assert torch.allclose(d.predict_x0(torch.cat([perfect, torch.randn_like(x0)], dim=1), x_t, t), x0, atol=1e-9)


def test_sigma_shift_matches_the_flow_scheduler():
    shifted = build_diffusion(DiffusionConfig(objective="rf", sigma_shift=3.0))
    s = shifted.sample_t(4000, torch.Generator().manual_seed(0))
    assert abs(s.median() - 0.75) < 0.02          # 3 * 0.5 / (1 + 2 * 0.5)
    plain, flow = make_scheduler("flow"), make_scheduler("flow", {"shift": 3.0})   # their 1000 training sigmas
    assert torch.allclose(shift_sigma(plain.sigmas, 3.0), flow.sigmas, atol=1e-6)
    with pytest.raises(ValueError, match="sigma_shift applies to objective 'rf' only"):
        DiffusionConfig(sigma_shift=3.0)
    with pytest.raises(ValueError, match="sigma_shift must be > 0"):
        DiffusionConfig(objective="rf", sigma_shift=0.0)


def test_timesteps_are_per_video_and_config_is_checked():
    d = build_diffusion(DiffusionConfig())
    t = d.sample_t(5, torch.Generator().manual_seed(0))
    assert t.shape == (5,) and t.dtype == torch.int64 and 0 <= t.min() and t.max() < 1000
    with pytest.raises(ValueError, match="beta_start < beta_end"):
        DiffusionConfig(beta_start=0.02, beta_end=1e-4)
