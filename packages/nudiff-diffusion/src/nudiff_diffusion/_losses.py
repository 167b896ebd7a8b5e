"""Training losses: epsilon MSE, the variational bound, and improved DDPM's hybrid loss."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ._schedule import NoiseSchedule

__all__ = ["normal_kl", "discretized_gaussian_log_likelihood", "vlb_terms", "training_losses"]


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # the tanh approximation guided-diffusion uses, kept for comparable numbers
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of 8-bit data ``x`` in [-1, 1] (bins of width 2/255) under a Gaussian,
    elementwise, in nats; the outermost bins extend to infinity."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def vlb_terms(
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    v: torch.Tensor,
) -> torch.Tensor:
    """The variational bound term of each sample, in bits per dimension.

    ``KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` for t > 0 and the discretized
    Gaussian negative log-likelihood of ``x0`` for t = 0, where ``p`` has the mean implied
    by ``eps`` and the learned-range variance ``v``.

    Returns
    -------
    (N,) tensor
    """
    true_mean, _, true_log_var = schedule.posterior_mean_variance(x0, x_t, t)
    pred_x0 = schedule.x0_from_eps(x_t, t, eps)
    pred_mean, _, _ = schedule.posterior_mean_variance(pred_x0, x_t, t)
    pred_log_var = schedule.learned_log_variance(v, t)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, pred_mean, pred_log_var)) / math.log(2.0)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, pred_mean, 0.5 * pred_log_var)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def training_losses(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    learn_sigma: bool = True,
    vlb_weight: float = 0.001,
) -> dict[str, torch.Tensor]:
    """Per-sample losses of one training step (improved DDPM's "hybrid" loss).

    ``mse`` is the epsilon MSE (the "simple" loss); with ``learn_sigma`` the model's
    second half of channels is the learned-range variance and ``vlb`` (its variational
    bound, with the predicted mean detached so that only the variance learns from it,
    scaled by ``num_timesteps``) is added with ``vlb_weight``: ``loss = mse + vlb_weight *
    vlb``. With the default 0.001 that is improved-diffusion's ``RESCALED_MSE`` (``mse + vb *
    num_timesteps / 1000``); at 1,000 steps, as nudiff's models train, it equals the ``MSE``
    loss type with learned sigma of the paper's code (``mse + vb``).

    Returns
    -------
    dict of (N,) tensors: ``loss``, ``mse`` and (with ``learn_sigma``) ``vlb``.
    """
    if noise is None:
        noise = torch.randn_like(x0)
    x_t = schedule.q_sample(x0, t, noise)
    out = model(x_t, t)
    channels = x0.shape[1]
    expected = 2 * channels if learn_sigma else channels
    if out.shape[1] != expected or out.shape[0] != x0.shape[0] or out.shape[2:] != x0.shape[2:]:
        raise ValueError(
            f"model output has shape {tuple(out.shape)}; expected {expected} channels for {channels}-channel "
            f"data with learn_sigma={learn_sigma}"
        )
    eps = out[:, :channels]
    terms = {"mse": _mean_flat((noise - eps) ** 2)}
    if learn_sigma:
        v = out[:, channels:]
        terms["vlb"] = vlb_terms(schedule, x0, x_t, t, eps.detach(), v) * schedule.num_timesteps
        terms["loss"] = terms["mse"] + vlb_weight * terms["vlb"]
    else:
        terms["loss"] = terms["mse"]
    return terms
