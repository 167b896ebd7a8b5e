"""Classifier-free guidance as a wrapper that turns a conditional model into an ``eps_fn``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["guided"]


def guided(
    eps_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    cond: torch.Tensor,
    null_cond: torch.Tensor,
    scale: float,
    *,
    prepare: Callable[[torch.Tensor], Any] | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """An ``eps_fn(x, t)`` that runs the conditional ``eps_fn`` on the conditional and the
    unconditional input as one batch and mixes ``eps_u + scale * (eps_c - eps_u)``.

    Parameters
    ----------
    eps_fn : callable
        ``eps_fn(x, t, cond)`` -> (N, C or 2C, ...); with 2C channels the second half (the
        learned variance) is taken from the conditional pass, unmixed.
    cond, null_cond : tensor
        The condition of each sample, (N, ...), and the "no condition" input (the same
        shape, or broadcastable to it: zeros for a dropped structure).
    scale : float
        Guidance scale (>= 0); 1 gives the conditional model (same code path, same type),
        0 the unconditional one.
    prepare : callable, optional
        Applied once to the stacked ``[cond, null_cond]`` batch; its result is what every
        call passes to ``eps_fn`` (e.g. a cache of the condition's SPADE modulation).
    """
    if not scale >= 0:
        raise ValueError(f"guidance `scale` must be >= 0, got {scale}")
    if null_cond.shape != cond.shape:
        null_cond = null_cond.expand_as(cond)
    both_cond = torch.cat([cond, null_cond])
    if prepare is not None:
        both_cond = prepare(both_cond)

    def guided_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != cond.shape[0]:
            raise ValueError(f"batch of {x.shape[0]} samples but {cond.shape[0]} conditions")
        out = eps_fn(torch.cat([x, x]), torch.cat([t, t]), both_cond)
        out_c, out_u = out.chunk(2)
        channels = x.shape[1]
        eps = out_u[:, :channels] + scale * (out_c[:, :channels] - out_u[:, :channels])
        return torch.cat([eps, out_c[:, channels:]], dim=1) if out.shape[1] > channels else eps

    return guided_eps
