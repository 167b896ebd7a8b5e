"""NoiseSchedule: schedules, respacing, the forward process and its posterior."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from nudiff_diffusion import NoiseSchedule, space_timesteps


def test_linear_schedule_is_adms():
    s = NoiseSchedule.linear(1000)
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    s4 = NoiseSchedule.linear(4000)  # scaled by 1000 / T
    assert s4.betas[0] == pytest.approx(2.5e-5) and s4.betas[-1] == pytest.approx(0.005)
    assert s.betas.dtype == np.float64 and not s.betas.flags.writeable


def test_cosine_schedule_follows_its_alpha_bar():
    s = NoiseSchedule.cosine(1000)
    f = [math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(1001)]
    want = np.array([f[t + 1] / f[0] for t in range(1000)])
    np.testing.assert_allclose(s.alphas_bar[:990], want[:990], rtol=1e-10)
    assert s.betas.max() <= 0.999


def test_space_timesteps_like_guided_diffusion():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    sections = space_timesteps(300, "10,10,5")
    assert len(sections) == 25 and sections[:2] == [0, 11] and sections[-1] == 299
    # guided-diffusion adds up the fractional stride: 999 / 20 * 10 lands on 499.4999..., not
    # 499.5, and rounds down (a product rounds it to 500), as for 278 of the counts 1..1000
    assert space_timesteps(1000, "21")[9:12] == [450, 499, 549]
    assert space_timesteps(1000, "43")[20:23] == [476, 499, 523]
    with pytest.raises(ValueError, match="ddim6"):
        space_timesteps(10, "ddim6")
    with pytest.raises(ValueError, match="cannot take 20"):
        space_timesteps(30, "20,20,20")


def test_respacing_keeps_the_marginals():
    s = NoiseSchedule.linear(1000)
    r = s.respace("ddim50")
    np.testing.assert_allclose(r.alphas_bar, s.alphas_bar[::20], rtol=1e-12)
    np.testing.assert_array_equal(r.timesteps, np.arange(0, 1000, 20))
    np.testing.assert_array_equal(r.respace("5").timesteps, r.timesteps[[0, 12, 24, 37, 49]])


def test_q_sample_moments():
    s = NoiseSchedule.linear(1000)
    x0 = torch.full((200_000, 1), 0.7, dtype=torch.float64)
    t = torch.full((200_000,), 300, dtype=torch.int64)
    xt = s.q_sample(x0, t, torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    ab = s.alphas_bar[300]
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.005)
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.01)


def test_eps_x0_round_trip():
    s = NoiseSchedule.cosine(100)
    g = torch.Generator().manual_seed(1)
    x0, eps = (
        torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64),
        torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64),
    )
    t = torch.arange(8, dtype=torch.int64) * 12
    xt = s.q_sample(x0, t, eps)
    torch.testing.assert_close(s.x0_from_eps(xt, t, eps), x0)
    torch.testing.assert_close(s.eps_from_x0(xt, t, x0), eps)


def test_posterior_equals_gaussian_conditioning():
    s = NoiseSchedule.linear(1000)
    t = torch.tensor([1, 10, 500, 999], dtype=torch.int64)
    x0 = torch.tensor([0.3, -0.5, 1.0, 0.2], dtype=torch.float64).reshape(4, 1)
    xt = torch.tensor([0.1, 0.4, -1.2, 2.0], dtype=torch.float64).reshape(4, 1)
    mean, var, _ = s.posterior_mean_variance(x0, xt, t)
    for k, tk in enumerate(t.tolist()):
        ab_prev, beta = s.alphas_bar[tk - 1], s.betas[tk]
        # q(x_{t-1} | x0) q(x_t | x_{t-1}), conditioned on x_t: precision-weighted
        precision = 1 / (1 - ab_prev) + (1 - beta) / beta
        want_mean = math.sqrt(ab_prev) * x0[k, 0].item() / (1 - ab_prev) + math.sqrt(1 - beta) * xt[k, 0].item() / beta
        assert var[k, 0].item() == pytest.approx(1 / precision, rel=1e-9)
        assert mean[k, 0].item() == pytest.approx(want_mean / precision, rel=1e-9)


def test_learned_range_ends_are_posterior_and_beta_variances():
    s = NoiseSchedule.linear(1000)
    t = torch.tensor([0, 1, 400, 999], dtype=torch.int64)
    ones = torch.ones(4, 1, dtype=torch.float64)
    np.testing.assert_allclose(s.learned_log_variance(-ones, t)[:, 0], s.posterior_log_variance_clipped[t])
    np.testing.assert_allclose(s.learned_log_variance(ones, t)[:, 0], np.log(s.betas[t]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_learned_variance_keeps_its_gradient_in_half_precision(dtype):
    # log beta_t and the clipped posterior log variance are about 1e-3 apart past t = 200:
    # read in bfloat16 they were one number, and the variance head learned nothing there
    s = NoiseSchedule.linear(1000)
    t = torch.tensor([300, 500, 700], dtype=torch.int64)  # (at t = 900 the gap is float32's rounding)
    exact = np.log(s.betas[t]) / 2 - s.posterior_log_variance_clipped[t] / 2  # d/dv of the interpolation
    v = torch.zeros(3, 1, dtype=dtype, requires_grad=True)
    s.learned_log_variance(v, t).sum().backward()
    np.testing.assert_allclose(v.grad[:, 0].double().numpy(), exact, rtol=1e-2)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"betas. must lie in \(0, 1\), got 1.5"):
        NoiseSchedule(np.array([0.1, 1.5]))
    s = NoiseSchedule.linear(100)
    with pytest.raises(ValueError, match="int64 tensor of shape"):
        s.q_sample(torch.zeros(2, 1), torch.zeros(3, dtype=torch.int64), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="respacing 'ten'"):
        s.respace("ten")
