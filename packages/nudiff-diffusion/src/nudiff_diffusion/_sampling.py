"""Samplers over a denoiser callable: DDPM (ancestral), DDIM and DPM-Solver++(2M)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

from ._schedule import NoiseSchedule

__all__ = ["sample", "sampling_timesteps", "check_sampler_settings", "seeded_generator", "gaussian_eps_fn", "EpsFn"]

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Method = Literal["ddpm", "ddim", "dpmpp2m"]
Spacing = Literal["uniform", "quadratic", "logsnr"]
_DEFAULT_SPACING: dict[str, Spacing] = {"ddpm": "uniform", "ddim": "uniform", "dpmpp2m": "logsnr"}
#: DPM-Solver++(2M) runs of fewer updates (model evaluations less the final one) take
#: their last update in first order: ``lower_order_final`` of DPM-Solver's reference code
LOWER_ORDER_FINAL_BELOW = 10


def gaussian_eps_fn(schedule: NoiseSchedule, mean: float, std: float) -> EpsFn:
    """The exact noise predictor for data ``x0 ~ N(mean, std^2 I)``: a denoiser whose
    samples have a known answer, for testing and benchmarking samplers.

    ``eps(x_t, t) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mean) / (abar_t std^2 + 1 - abar_t)``
    """
    alphas_bar = torch.tensor(schedule.alphas_bar)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = alphas_bar.to(x.device)[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (1 - ab).sqrt() * (x - ab.sqrt() * mean) / (ab * std * std + 1 - ab)

    return eps_fn


def sampling_timesteps(schedule: NoiseSchedule, steps: int, spacing: Spacing) -> np.ndarray:
    """Indices (increasing) of the ``steps`` schedule steps a sampler visits.

    ``uniform``: evenly in index, both ends included; ``quadratic``: evenly in the square
    root of the index; ``logsnr``: evenly in log-SNR between the two ends, each target
    mapped to the nearest step. Duplicates are dropped, so very large ``steps`` may give
    fewer (never more) than asked. One step is the last one (from noise straight to x0).
    ``logsnr`` follows the schedule's log-SNR to its very end: on the cosine schedule,
    whose clipped last betas take it from -8.5 at step 990 to -19.8 at 999 (the linear one
    ends at -10.1), targets crowd the last steps and duplicates drop (20 asked, 17 kept);
    nudiff's models use the linear schedule, where 20 give 20.
    """
    n = schedule.num_timesteps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= n:
        raise ValueError(f"`steps` must be an integer in [1, {n}], got {steps!r}")
    if spacing not in ("uniform", "quadratic", "logsnr"):
        raise ValueError(f"`spacing` must be 'uniform', 'quadratic' or 'logsnr', got {spacing!r}")
    if steps == 1:  # one step goes from pure noise (the last step) straight to x0
        return np.array([n - 1], dtype=np.int64)
    if spacing == "uniform":
        idx = np.round(np.linspace(0, n - 1, steps))
    elif spacing == "quadratic":
        idx = np.round(np.linspace(0, np.sqrt(n - 1), steps) ** 2)
    elif spacing == "logsnr":
        lam = schedule.log_snr
        targets = np.linspace(lam[0], lam[-1], steps)
        idx = np.abs(lam[None, :] - targets[:, None]).argmin(axis=1)
    else:
        raise ValueError(f"`spacing` must be 'uniform', 'quadratic' or 'logsnr', got {spacing!r}")
    return np.unique(idx.astype(np.int64))


def _split_output(out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    channels = x.shape[1]
    if out.shape == x.shape:
        return out, None
    if (
        out.ndim == x.ndim
        and out.shape[0] == x.shape[0]
        and out.shape[1] == 2 * channels
        and out.shape[2:] == x.shape[2:]
    ):
        return out[:, :channels], out[:, channels:]
    raise ValueError(
        f"eps_fn returned shape {tuple(out.shape)} for input {tuple(x.shape)}; expected the input's shape, "
        f"or {2 * channels} channels (eps and the learned-range variance)"
    )


def _clip_x0(x0: torch.Tensor, clip: float | Literal["dynamic"] | None) -> torch.Tensor:
    if clip is None:
        return x0
    if clip == "dynamic":
        # Imagen's dynamic thresholding: clip at the 99.5th percentile of |x0| (>= 1), rescale
        s = torch.quantile(x0.reshape(x0.shape[0], -1).abs().float(), 0.995, dim=1).clamp(min=1.0)
        s = s.to(x0.dtype).reshape((-1,) + (1,) * (x0.ndim - 1))
        return x0.clamp(-s, s) / s
    return x0.clamp(-float(clip), float(clip))


Generators = torch.Generator | Sequence[torch.Generator] | None


def _randn(
    shape: tuple[int, ...], generator: Generators, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal noise on ``device``, drawn on the generator's own device: a CPU
    generator gives the same noise whether the sampler runs on the CPU or a GPU. A
    sequence of generators draws row ``k`` of ``shape`` from generator ``k``."""
    if isinstance(generator, torch.Generator) or generator is None:
        where = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=where, dtype=dtype).to(device)
    rows = [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype).to(device) for g in generator]
    return torch.stack(rows) if rows else torch.empty(shape, device=device, dtype=dtype)


def _check_generators(generator: Generators, n: int) -> None:
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, Sequence) or not all(isinstance(g, torch.Generator) for g in generator):
        raise TypeError(f"`generator` must be a torch.Generator or a sequence of them, got {type(generator).__name__}")
    if len(generator) != n:
        raise ValueError(f"`generator` holds {len(generator)} generators for {n} samples; give one per sample")


def seeded_generator(value: int) -> torch.Generator:
    """A CPU generator seeded with ``value``, any integer: values torch accepts (64 bits)
    are used as they are, larger ones (a large ``--seed`` mixed with an index) hashed to 63
    bits (SHA-256) instead of failing with an overflow."""
    if not -(2**63) <= value < 2**64:
        value = int.from_bytes(hashlib.sha256(str(value).encode()).digest()[:8], "big") >> 1
    return torch.Generator().manual_seed(value)


def check_sampler_settings(
    method: str, steps: int, clip: float | Literal["dynamic"] | None, *, num_timesteps: int = 1000
) -> None:
    """Refuse a sampler, step count or x0 clip that :func:`sample` cannot use, with the
    argument named (``--sampler``, ``--steps``, ``--clip``); commands call it before they
    create any folder.
    """
    if method not in ("ddpm", "ddim", "dpmpp2m"):
        raise ValueError(f"`method` (--sampler) must be 'ddpm', 'ddim' or 'dpmpp2m', got {method!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"`steps` (--steps) must be an integer in [1, {num_timesteps}], got {steps!r}")
    number = isinstance(clip, (int, float)) and not isinstance(clip, bool)
    if clip is not None and clip != "dynamic" and not (number and math.isfinite(clip) and clip > 0):
        raise ValueError(
            f"`clip` (--clip) must be finite > 0, 'dynamic' or None (0 on the command line: no clipping), got {clip!r}"
        )


def sample(
    eps_fn: EpsFn,
    *,
    shape: tuple[int, ...],
    schedule: NoiseSchedule,
    method: Method = "dpmpp2m",
    steps: int = 20,
    spacing: Spacing | None = None,
    generator: Generators = None,
    clip: float | Literal["dynamic"] | None = None,
    eta: float = 0.0,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
    x_T: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw samples from a diffusion model given as its noise predictor.

    Parameters
    ----------
    eps_fn : callable
        ``eps_fn(x, t)`` with ``x`` (N, C, H, W) float and ``t`` (N,) int64 indices into
        ``schedule``'s original steps (``schedule.timesteps``); returns eps (N, C, H, W), or
        (N, 2C, H, W) whose second half is the learned-range variance in [-1, 1].
    shape : tuple of int
        ``(N, C, H, W)`` (any number of trailing dims works).
    schedule : NoiseSchedule
        The schedule the model was trained with (e.g. ``NoiseSchedule.linear(1000)``).
    method : {"ddpm", "ddim", "dpmpp2m"}
        Ancestral sampling (learned variance if given, else the posterior variance);
        DDIM (deterministic for ``eta=0``); DPM-Solver++(2M) in data prediction (as
        DPM-Solver's multistep sampler with ``denoise_to_zero``: ``steps`` evaluations are
        its ``steps - 1`` updates and a final data prediction; with under 10 updates the
        last is first order, its ``lower_order_final``).
    steps : int
        Model evaluations (steps of the visited grid).
    spacing : {"uniform", "quadratic", "logsnr"}, optional
        How the visited steps are chosen (:func:`sampling_timesteps`); default
        ``"logsnr"`` for dpmpp2m and ``"uniform"`` otherwise.
    generator : torch.Generator or sequence of N torch.Generator, optional
        Source of the initial noise and of the noise of stochastic steps. A sequence draws
        sample ``k``'s noise from generator ``k`` only, so a sample's result does not depend
        on the batch it is drawn in (with ``ddpm``, or ``ddim`` with ``eta > 0``; the
        deterministic samplers draw no step noise).
    clip : float, "dynamic" or None
        Clip predicted x0 to [-clip, clip], or dynamic thresholding (Imagen), or nothing.
    eta : float
        DDIM's stochasticity (0: deterministic).
    callback : callable, optional
        Called after every step with ``{"i", "t", "x", "x0"}``.
    progress : bool
        Show a tqdm bar.
    x_T : tensor, optional
        Initial noise; drawn from ``generator`` when not given.
    device : torch.device or str, optional
        Where the sampler's arithmetic runs and ``eps_fn`` gets ``x`` (default: the
        generator's device, else the CPU); the noise is drawn on the generator's device and
        moved, so a run on a GPU with a CPU generator starts from the CPU run's noise.
    dtype : torch.dtype
        The dtype of ``x`` (float32).

    Returns
    -------
    tensor of ``shape``
        The samples (``x0``).
    """
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"`schedule` must be a NoiseSchedule, got {type(schedule).__name__}")
    check_sampler_settings(method, steps, clip, num_timesteps=schedule.num_timesteps)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise ValueError(f"`eta` must be a number in [0, 1] (DDIM's share of the posterior noise), got {eta!r}")
    if eta and method != "ddim":
        raise ValueError(f"`eta` applies to the ddim sampler only, got eta={eta} with {method!r}")
    spacing = spacing or _DEFAULT_SPACING[method]
    kept = sampling_timesteps(schedule, steps, spacing)
    sub = schedule.subset(kept)  # betas recomputed from the kept alphas-bar
    _check_generators(generator, int(shape[0]))
    if device is None:
        generators = [generator] if isinstance(generator, torch.Generator) else list(generator or ())
        device = generators[0].device if generators else "cpu"
    if x_T is None:
        x = _randn(shape, generator, device, dtype)
    else:
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"`x_T` has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
        if not torch.isfinite(x_T).all():
            raise ValueError(f"`x_T` holds {int((~torch.isfinite(x_T)).sum())} NaN or inf value(s); expected noise")
        x = x_T.to(device=device, dtype=dtype)
    n = x.shape[0]
    order = range(sub.num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        order = tqdm(order, desc=f"{method} {sub.num_timesteps} steps", unit="step")

    def predict(i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        t_model = torch.full((n,), int(sub.timesteps[i]), dtype=torch.int64, device=x.device)
        eps, v = _split_output(eps_fn(x, t_model), x)
        t_sub = torch.full((n,), i, dtype=torch.int64, device=x.device)
        x0 = _clip_x0(sub.x0_from_eps(x, t_sub, eps), clip)
        if clip is not None:
            eps = sub.eps_from_x0(x, t_sub, x0)
        return eps, v, x0, t_sub

    history: list[tuple[float, torch.Tensor]] = []  # (lambda, x0) of earlier dpmpp2m steps
    # DPM-Solver's lower_order_final (its default): with under 10 updates, the last one is
    # first order, which steadies few-step runs (dpm_solver_pytorch's multistep sample)
    first_order_last = sub.num_timesteps - 1 < LOWER_ORDER_FINAL_BELOW
    x0 = x
    for i in order:
        eps, v, x0, t_sub = predict(i, x)
        if method == "ddpm":
            mean, _, log_var = sub.posterior_mean_variance(x0, x, t_sub)
            if v is not None:
                log_var = sub.learned_log_variance(v, t_sub)
            if i > 0:
                noise = _randn(x.shape, generator, x.device, x.dtype)
                x = mean + torch.exp(0.5 * log_var) * noise
            else:
                x = mean
        elif method == "ddim":
            ab, ab_prev = float(sub.alphas_bar[i]), float(sub.alphas_bar_prev[i])
            sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab)) * np.sqrt(1 - ab / ab_prev)
            x = np.sqrt(ab_prev) * x0 + np.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
            if i > 0 and sigma > 0:
                x = x + sigma * _randn(x.shape, generator, x.device, x.dtype)
        else:
            lam = 0.5 * float(sub.log_snr[i])
            if i > 0:
                ab_next = float(sub.alphas_bar[i - 1])
                lam_next = 0.5 * float(np.log(ab_next) - np.log1p(-ab_next))
                h = lam_next - lam
                sigma_ratio = np.sqrt((1 - ab_next) / (1 - float(sub.alphas_bar[i])))
                d = x0
                if history and not (i == 1 and first_order_last):
                    lam_prev, x0_prev = history[-1]
                    r = (lam - lam_prev) / h
                    d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
                x = sigma_ratio * x - np.sqrt(ab_next) * np.expm1(-h) * d
            history.append((lam, x0))
        if callback is not None:
            callback({"i": i, "t": int(sub.timesteps[i]), "x": x, "x0": x0})
    return x0 if method == "dpmpp2m" else x
