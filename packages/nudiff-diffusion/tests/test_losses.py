"""Losses: KL, discretized likelihood, the vlb and the hybrid loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from nudiff_diffusion import NoiseSchedule, discretized_gaussian_log_likelihood, normal_kl, training_losses, vlb_terms


def test_normal_kl_equals_torch():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(100, generator=g), torch.randn(100, generator=g)
    lv1, lv2 = torch.randn(100, generator=g), torch.randn(100, generator=g)
    want = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), want, rtol=1e-5, atol=1e-6)


def test_discretized_likelihood_against_exact_cdf():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.25, 1.0], dtype=torch.float64)
    means = torch.tensor([-0.9, -0.45, 0.1, 0.3, 0.8], dtype=torch.float64)
    log_scales = torch.log(torch.tensor([0.1, 0.05, 0.2, 0.04, 0.3], dtype=torch.float64))
    got = discretized_gaussian_log_likelihood(x, means, log_scales)
    normal = torch.distributions.Normal(means, log_scales.exp())
    upper, lower = normal.cdf(x + 1 / 255), normal.cdf(x - 1 / 255)
    want = torch.where(x < -0.999, upper.log(), torch.where(x > 0.999, (1 - lower).log(), (upper - lower).log()))
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)  # guided-diffusion's tanh approximation of the CDF


def test_vlb_term_is_the_kl_of_the_posterior_to_the_model():
    s = NoiseSchedule.linear(1000)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor([5, 200, 900])
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = s.q_sample(x0, t, noise)
    eps = noise + 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    v = torch.rand(x0.shape, generator=g, dtype=torch.float64) * 2 - 1
    got = vlb_terms(s, x0, xt, t, eps, v)
    for k, tk in enumerate(t.tolist()):
        ab, ab_prev, beta = s.alphas_bar[tk], s.alphas_bar[tk - 1], s.betas[tk]
        coef0, coeft = beta * math.sqrt(ab_prev) / (1 - ab), (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab)
        x0_hat = (xt[k] - math.sqrt(1 - ab) * eps[k]) / math.sqrt(ab)
        true = torch.distributions.Normal(coef0 * x0[k] + coeft * xt[k], math.sqrt(beta * (1 - ab_prev) / (1 - ab)))
        frac = (v[k] + 1) / 2
        log_var = frac * math.log(beta) + (1 - frac) * float(s.posterior_log_variance_clipped[tk])
        model = torch.distributions.Normal(coef0 * x0_hat + coeft * xt[k], (0.5 * log_var).exp())
        want = torch.distributions.kl_divergence(true, model).mean() / math.log(2)
        assert got[k].item() == pytest.approx(want.item(), rel=1e-6)


def test_vlb_at_t0_is_the_discretized_nll():
    s = NoiseSchedule.linear(1000)
    x0 = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0])
    eps = torch.zeros_like(x0)
    v = torch.zeros_like(x0)
    got = vlb_terms(s, x0, s.q_sample(x0, t, eps), t, eps, v)
    assert got.item() > 0 and np.isfinite(got.item())


def test_hybrid_loss_trains_the_variance_only_through_the_vlb():
    s = NoiseSchedule.linear(100)
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(4, 2, 4, 4, generator=g) * 2 - 1
    t = torch.tensor([0, 10, 50, 99])
    out = torch.zeros(4, 4, 4, 4, requires_grad=True)
    losses = training_losses(lambda x, tt: out, s, x0, t, torch.randn(x0.shape, generator=g))
    assert set(losses) == {"loss", "mse", "vlb"}
    torch.testing.assert_close(losses["loss"], losses["mse"] + 0.001 * losses["vlb"])
    losses["vlb"].sum().backward()
    assert out.grad[:, :2].abs().max() == 0 and out.grad[:, 2:].abs().max() > 0  # mean detached
    with pytest.raises(ValueError, match="expected 4 channels"):
        training_losses(lambda x, tt: x, s, x0, t)
