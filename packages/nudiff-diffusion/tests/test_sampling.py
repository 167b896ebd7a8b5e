"""Samplers on Gaussian data, where the exact noise predictor is known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nudiff_diffusion import NoiseSchedule, gaussian_eps_fn, guided, sample, sampling_timesteps

MU, S = 0.3, 0.5
SCHEDULE = NoiseSchedule.linear(1000)
gaussian_eps = gaussian_eps_fn(SCHEDULE, MU, S)  # the exact eps predictor for x0 ~ N(MU, S^2 I)


def test_gaussian_eps_fn_is_the_closed_form():
    ab = float(SCHEDULE.alphas_bar[500])
    x = torch.tensor([[[[0.7]]]])
    want = np.sqrt(1 - ab) * (0.7 - np.sqrt(ab) * MU) / (ab * S * S + 1 - ab)
    assert gaussian_eps(x, torch.tensor([500])).item() == pytest.approx(want, rel=1e-5)


# (method, steps, spacing) -> the standard deviation a correct implementation gives
EXPECTED_STD = [
    ("ddpm", 1000, "uniform", 0.495),
    ("ddpm", 250, "uniform", 0.487),
    ("ddim", 50, "uniform", 0.473),
    ("ddim", 50, "logsnr", 0.476),
    ("dpmpp2m", 20, "uniform", 0.62),
    ("dpmpp2m", 20, "logsnr", 0.508),
    ("dpmpp2m", 10, "logsnr", 0.517),
    ("dpmpp2m", 50, "logsnr", 0.502),
]


@pytest.mark.parametrize(("method", "steps", "spacing", "std"), EXPECTED_STD)
def test_samplers_reach_the_gaussian(method, steps, spacing, std):
    x = sample(
        gaussian_eps,
        shape=(16384, 1, 8, 8),
        schedule=SCHEDULE,
        method=method,
        steps=steps,
        spacing=spacing,
        generator=torch.Generator().manual_seed(0),
    )
    assert x.shape == (16384, 1, 8, 8) and x.dtype == torch.float32
    assert x.mean().item() == pytest.approx(MU, abs=0.0025)
    assert x.std().item() == pytest.approx(std, abs=0.01)


def test_more_logsnr_steps_mean_less_error():
    """The same starting noise for every run, so the errors differ by discretisation
    alone. Not 10 steps: its first-order last update (``lower_order_final``, under 10
    updates) leaves it as close as 20 steps (std error 0.0088 against 0.0090 here), as in
    DPM-Solver's reference code."""
    errors = []
    for steps in (3, 5, 20, 50):
        x = sample(
            gaussian_eps,
            shape=(4096, 1, 4, 4),
            schedule=SCHEDULE,
            method="dpmpp2m",
            steps=steps,
            generator=torch.Generator().manual_seed(1),
        )
        errors.append(abs(x.std().item() - S))
    assert errors == sorted(errors, reverse=True), errors


def test_learned_variance_at_minus_one_is_the_fixed_small_variance():
    def with_v(x, t):
        return torch.cat([gaussian_eps(x, t), -torch.ones_like(x)], dim=1)

    a = sample(
        gaussian_eps,
        shape=(64, 1, 4, 4),
        schedule=SCHEDULE,
        method="ddpm",
        steps=50,
        generator=torch.Generator().manual_seed(2),
    )
    b = sample(
        with_v,
        shape=(64, 1, 4, 4),
        schedule=SCHEDULE,
        method="ddpm",
        steps=50,
        generator=torch.Generator().manual_seed(2),
    )
    torch.testing.assert_close(a, b)


def test_model_sees_original_timesteps_and_callback_runs():
    seen, steps = [], []
    sample(
        lambda x, t: (seen.append(t[0].item()), gaussian_eps(x, t))[1],
        shape=(2, 1, 2, 2),
        schedule=SCHEDULE,
        method="ddim",
        steps=10,
        callback=lambda info: steps.append(info["i"]),
    )
    np.testing.assert_array_equal(seen, sampling_timesteps(SCHEDULE, 10, "uniform")[::-1])
    assert seen[0] == 999 and seen[-1] == 0 and steps == list(range(9, -1, -1))


def test_stochastic_ddim_is_reproducible_and_differs_from_eta0():
    kw = dict(shape=(8, 1, 4, 4), schedule=SCHEDULE, method="ddim", steps=20)
    a = sample(gaussian_eps, eta=1.0, generator=torch.Generator().manual_seed(3), **kw)
    b = sample(gaussian_eps, eta=1.0, generator=torch.Generator().manual_seed(3), **kw)
    c = sample(gaussian_eps, eta=0.0, generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize(("method", "eta"), [("ddpm", 0.0), ("ddim", 1.0)])
def test_one_generator_per_sample_makes_a_sample_independent_of_its_batch(method, eta):
    """With a generator per sample, row k of a batch is what sample k alone gives: the
    batch, a rank's share or a resume's cut do not change it."""

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    kw = dict(schedule=SCHEDULE, method=method, steps=10, eta=eta)
    x_T = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    whole = sample(gaussian_eps, shape=(4, 1, 4, 4), x_T=x_T, generator=gens([10, 11, 12, 13]), **kw)
    halves = [
        sample(gaussian_eps, shape=(2, 1, 4, 4), x_T=x_T[i : i + 2], generator=gens([10 + i, 11 + i]), **kw)
        for i in (0, 2)
    ]
    torch.testing.assert_close(whole, torch.cat(halves), rtol=0, atol=1e-6)
    alone = sample(gaussian_eps, shape=(1, 1, 4, 4), x_T=x_T[2:3], generator=gens([12]), **kw)
    torch.testing.assert_close(whole[2:3], alone, rtol=0, atol=1e-6)
    # one shared generator: row 2 depends on the rows drawn before it
    shared = sample(gaussian_eps, shape=(4, 1, 4, 4), x_T=x_T, generator=torch.Generator().manual_seed(12), **kw)
    assert not torch.allclose(shared[2:3], alone)
    # no x_T: the starting noise of row k comes from generator k too
    drawn = sample(gaussian_eps, shape=(2, 1, 4, 4), generator=gens([5, 6]), **kw)
    first = sample(gaussian_eps, shape=(1, 1, 4, 4), generator=gens([5]), **kw)
    torch.testing.assert_close(drawn[:1], first, rtol=0, atol=1e-6)


def test_generators_must_match_the_batch():
    kw = dict(shape=(3, 1, 2, 2), schedule=SCHEDULE, method="ddpm", steps=3)
    with pytest.raises(ValueError, match="`generator` holds 2 generators for 3 samples; give one per sample"):
        sample(gaussian_eps, generator=[torch.Generator(), torch.Generator()], **kw)
    with pytest.raises(TypeError, match="`generator` must be a torch.Generator or a sequence of them, got list"):
        sample(gaussian_eps, generator=[1, 2, 3], **kw)
    empty = dict(kw, shape=(0, 1, 2, 2))  # an empty batch: as with one generator or none
    assert sample(gaussian_eps, generator=[], **empty).shape == (0, 1, 2, 2)


def test_clipping_bounds_the_output():
    x = sample(
        lambda x, t: torch.zeros_like(x) - 3,
        shape=(4, 1, 4, 4),
        schedule=SCHEDULE,
        method="ddim",
        steps=10,
        clip=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert x.abs().max() <= 1.0 + 1e-6
    y = sample(
        gaussian_eps,
        shape=(4, 1, 4, 4),
        schedule=SCHEDULE,
        method="dpmpp2m",
        steps=10,
        clip="dynamic",
        generator=torch.Generator().manual_seed(0),
    )
    assert y.abs().max() <= 1.0 + 1e-6


def test_spacings():
    for spacing in ("uniform", "quadratic", "logsnr"):
        idx = sampling_timesteps(SCHEDULE, 25, spacing)
        assert idx[0] == 0 and idx[-1] == 999 and np.all(np.diff(idx) > 0)
    quad = sampling_timesteps(SCHEDULE, 25, "quadratic")
    assert np.diff(quad)[0] < np.diff(quad)[-1]  # denser near the data end


def test_guidance_mixes_eps_in_one_batch():
    calls = []

    def model(x, t, cond):
        calls.append(x.shape[0])
        eps = x * 0 + cond  # eps = the condition value
        return torch.cat([eps, torch.full_like(x, 0.5)], dim=1)

    x = torch.zeros(3, 2, 4, 4)
    t = torch.zeros(3, dtype=torch.int64)
    cond = torch.full((3, 2, 4, 4), 2.0)
    out = guided(model, cond, torch.zeros(1, 2, 4, 4), 3.0)(x, t)
    assert calls == [6]  # conditional and unconditional halves in one call
    torch.testing.assert_close(out[:, :2], torch.full((3, 2, 4, 4), 6.0))  # 0 + 3 * (2 - 0)
    torch.testing.assert_close(out[:, 2:], torch.full((3, 2, 4, 4), 0.5))
    same = guided(model, cond, torch.zeros(1, 2, 4, 4), 1.0)(x, t)
    torch.testing.assert_close(same[:, :2], cond)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "euler"}, ValueError, "method"),
        ({"steps": 0}, ValueError, r"steps.*\[1, 1000\]"),
        ({"spacing": "cubic"}, ValueError, "spacing"),
        ({"schedule": "linear"}, TypeError, "NoiseSchedule"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = dict(shape=(1, 1, 2, 2), schedule=SCHEDULE, method="ddim", steps=5)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        sample(gaussian_eps, **args)


def test_wrong_model_output_shape_is_named():
    with pytest.raises(ValueError, match=r"eps_fn returned shape \(1, 3, 2, 2\).*expected"):
        sample(lambda x, t: torch.zeros(1, 3, 2, 2), shape=(1, 1, 2, 2), schedule=SCHEDULE, method="ddim", steps=3)


@pytest.mark.parametrize(("steps", "first_order"), [(3, True), (6, True), (10, True), (11, False), (20, False)])
def test_dpmpp2m_takes_its_last_update_in_first_order_below_10_updates(steps, first_order):
    """DPM-Solver's ``lower_order_final``: ``steps`` evaluations make ``steps - 1`` updates;
    with under 10 of them the last (from grid index 1 to 0) is the first-order update
    ``sigma_0 / sigma_1 * x_1 - alpha_0 * expm1(-h) * x0_1`` of the state and data prediction
    at index 1, and with 10 or more it uses the previous prediction too."""
    seen = {}
    sample(
        gaussian_eps,
        shape=(4, 1, 4, 4),
        schedule=SCHEDULE,
        method="dpmpp2m",
        steps=steps,
        generator=torch.Generator().manual_seed(4),
        dtype=torch.float64,
        callback=lambda info: seen.update({info["i"]: (info["x"], info["x0"])}),
    )
    sub = SCHEDULE.subset(sampling_timesteps(SCHEDULE, steps, "logsnr"))
    ab1, ab0 = float(sub.alphas_bar[1]), float(sub.alphas_bar[0])
    h = 0.5 * (np.log(ab0 / (1 - ab0)) - np.log(ab1 / (1 - ab1)))
    x1, x0_1 = seen[2][0], seen[1][1]  # the state at index 1 (after the update at 2) and its prediction
    first = np.sqrt((1 - ab0) / (1 - ab1)) * x1 - np.sqrt(ab0) * np.expm1(-h) * x0_1
    assert torch.allclose(seen[1][0], first, rtol=0, atol=1e-12) == first_order
