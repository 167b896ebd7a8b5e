"""Noise schedules, respacing and the Gaussian forward process (DDPM / improved DDPM)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["NoiseSchedule", "space_timesteps"]


def _betas_from_alphas_bar(alphas_bar: np.ndarray) -> np.ndarray:
    previous = np.concatenate(([1.0], alphas_bar[:-1]))
    return 1.0 - alphas_bar / previous


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> list[int]:
    """Timesteps to keep from a ``num_timesteps`` schedule, as guided-diffusion does.

    Parameters
    ----------
    num_timesteps : int
        Steps of the original schedule.
    section_counts : str, int or list of int
        ``"250"`` or ``250``: that many steps, evenly spread (ends included);
        ``"ddim50"``: every k-th step from 0, k the smallest stride that gives exactly 50
        steps (guided-diffusion's rule: 20 for ddim50 of 1000, 34 for ddim30);
        ``"10,10,5"``: the schedule cut into equal sections, with that many steps in each.

    Returns
    -------
    list of int
        Sorted, unique indices into the original schedule.
    """
    if isinstance(section_counts, bool):
        raise ValueError(f"respacing {section_counts!r}: expected a count, 'ddimN' or section counts, not a bool")
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            try:
                desired = int(text[4:])
            except ValueError:
                raise ValueError(f"respacing {section_counts!r}: expected 'ddimN' with an integer N") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(
                f"respacing {section_counts!r}: no integer stride gives {desired} of {num_timesteps} steps"
            )
        try:
            counts = [int(x) for x in text.split(",")]
        except ValueError:
            raise ValueError(
                f"respacing {section_counts!r}: expected a count ('250'), 'ddimN' or section counts ('10,10,5')"
            ) from None
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(x) for x in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"respacing {section_counts!r}: every section needs at least one step")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"respacing {section_counts!r}: cannot take {count} steps from a section of {size}")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        # accumulated as guided-diffusion accumulates it: a sum of strides that should land
        # on .5 lands just below it (499.4999... for 21 of 1000 steps) and rounds down
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete Gaussian diffusion schedule (float64 arrays, cast when used).

    Attributes
    ----------
    betas : (T,) ndarray of float64
        Noise variances of the forward steps.
    timesteps : (T,) ndarray of int64
        For a respaced schedule, the index of each step in the original schedule (the
        ``t`` a model trained on that schedule expects); ``arange(T)`` otherwise.
    """

    betas: np.ndarray
    timesteps: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"`betas` must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas < 1)):
            bad = betas[~((betas > 0) & (betas < 1))]
            raise ValueError(
                f"`betas` must lie in (0, 1), got {float(bad[0])}: a beta of 1 leaves no signal (alpha-bar 0), and "
                "predicting x0 from eps then divides by zero"
            )
        steps = np.arange(betas.size) if self.timesteps is None else np.asarray(self.timesteps, dtype=np.int64)
        if steps.shape != betas.shape:
            raise ValueError(f"`timesteps` (shape {steps.shape}) must match `betas` (shape {betas.shape})")
        betas.flags.writeable = False
        steps = steps.copy()
        steps.flags.writeable = False
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "timesteps", steps)

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def linear(cls, num_timesteps: int = 1000) -> NoiseSchedule:
        """ADM's linear schedule: betas from 1e-4 to 0.02, scaled by 1000 / T."""
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 51:
            raise ValueError(
                f"the linear schedule needs more than 50 steps (its betas scale with 1000 / T), got {num_timesteps!r}"
            )
        scale = 1000.0 / int(num_timesteps)
        return cls(np.linspace(scale * 1e-4, scale * 0.02, int(num_timesteps), dtype=np.float64))

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """Improved DDPM's cosine schedule (betas clipped at ``max_beta`` < 1)."""
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 2:
            raise ValueError(f"`num_timesteps` must be an integer >= 2, got {num_timesteps!r}")
        if not (math.isfinite(s) and s >= 0):
            raise ValueError(f"`s` must be a finite offset >= 0, got {s!r}")
        if not 0 < max_beta < 1:
            raise ValueError(f"`max_beta` must be in (0, 1), got {max_beta!r}")

        def alpha_bar(t: float) -> float:
            return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

        betas = [
            min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
            for i in range(num_timesteps)
        ]
        return cls(np.array(betas, dtype=np.float64))

    def respace(self, section_counts: str | int | list[int]) -> NoiseSchedule:
        """Keep a subset of the steps; betas are recomputed from the kept alphas-bar so that
        the marginals ``q(x_t | x_0)`` at the kept steps are unchanged."""
        keep = np.array(space_timesteps(self.num_timesteps, section_counts))
        return NoiseSchedule(_betas_from_alphas_bar(self.alphas_bar[keep]), self.timesteps[keep])

    def subset(self, indices: np.ndarray | list[int]) -> NoiseSchedule:
        """Keep the given (increasing) step indices of this schedule."""
        keep = np.asarray(indices, dtype=np.int64)
        if (
            keep.ndim != 1
            or keep.size == 0
            or np.any(np.diff(keep) <= 0)
            or keep[0] < 0
            or keep[-1] >= self.num_timesteps
        ):
            raise ValueError(f"`indices` must be increasing indices in [0, {self.num_timesteps}), got {keep.tolist()}")
        return NoiseSchedule(_betas_from_alphas_bar(self.alphas_bar[keep]), self.timesteps[keep])

    # ---- derived arrays (float64) ---------------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        return int(self.betas.size)

    @property
    def alphas_bar(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas)

    @property
    def alphas_bar_prev(self) -> np.ndarray:
        return np.concatenate(([1.0], self.alphas_bar[:-1]))

    @property
    def posterior_variance(self) -> np.ndarray:
        """Variance of ``q(x_{t-1} | x_t, x_0)``: ``beta_t (1 - abar_{t-1}) / (1 - abar_t)``."""
        return self.betas * (1.0 - self.alphas_bar_prev) / (1.0 - self.alphas_bar)

    @property
    def posterior_log_variance_clipped(self) -> np.ndarray:
        """Log posterior variance with the t = 0 entry (0) replaced by the t = 1 one."""
        var = self.posterior_variance
        return np.log(np.concatenate(([var[1]], var[1:]))) if var.size > 1 else np.log(self.betas)

    @property
    def log_snr(self) -> np.ndarray:
        """``log(abar / (1 - abar))`` per step, decreasing."""
        ab = self.alphas_bar
        return np.log(ab) - np.log1p(-ab)

    # ---- the forward process and its posterior ---------------------------------------------
    def _at(self, array: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``array[t]`` as a tensor broadcastable to ``like`` (N, 1, 1, ...)."""
        if t.dtype not in (torch.int64, torch.int32) or t.ndim != 1 or t.shape[0] != like.shape[0]:
            raise ValueError(f"`t` must be an int64 tensor of shape ({like.shape[0]},), got {tuple(t.shape)} {t.dtype}")
        values = torch.as_tensor(array, dtype=torch.float64, device=like.device)[t.long()]
        # at least float32: in bfloat16 (autocast) log beta_t and the clipped posterior log
        # variance, about 1e-3 apart past t = 200, round to one value, and the learned variance
        # got no gradient there (guided-diffusion reads its tables in float32 too)
        dtype = torch.promote_types(like.dtype, torch.float32)
        return values.to(dtype).reshape((-1,) + (1,) * (like.ndim - 1))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw ``x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` with the given noise."""
        ab = self._at(self.alphas_bar, t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        ab = self._at(self.alphas_bar, t, x_t)
        return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        ab = self._at(self.alphas_bar, t, x_t)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    def posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log variance of ``q(x_{t-1} | x_t, x_0)``."""
        ab, ab_prev = self.alphas_bar, self.alphas_bar_prev
        coef_x0 = self.betas * np.sqrt(ab_prev) / (1.0 - ab)
        coef_xt = (1.0 - ab_prev) * np.sqrt(1.0 - self.betas) / (1.0 - ab)
        mean = self._at(coef_x0, t, x_t) * x0 + self._at(coef_xt, t, x_t) * x_t
        return mean, self._at(self.posterior_variance, t, x_t), self._at(self.posterior_log_variance_clipped, t, x_t)

    def learned_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Improved DDPM's learned range: ``v`` in [-1, 1] interpolates the log variance
        between the clipped posterior variance (-1) and ``beta_t`` (+1)."""
        min_log = self._at(self.posterior_log_variance_clipped, t, v)
        max_log = self._at(np.log(self.betas), t, v)
        frac = (v.to(max_log.dtype) + 1) / 2  # in half precision the two ends' gradients cancel
        return frac * max_log + (1 - frac) * min_log
