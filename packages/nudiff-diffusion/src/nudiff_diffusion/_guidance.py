"""Classifier-free guidance as a wrapper that turns a conditional model into an ``eps_fn``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["guided", "mix_guidance", "GuidedRuntime"]


def guided(
    eps_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    cond: torch.Tensor,
    null_cond: torch.Tensor,
    scale: float,
    *,
    prepare: Callable[[torch.Tensor], Any] | None = None,
    batched: bool = True,
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
    batched : bool
        True: one ``eps_fn`` call on the 2N batch per step. False: two sequential N-batch
        calls (the paper's code; ``prepare`` then applies to each half): the same eps, and on
        a 2-core CPU the faster of the two when the halves are cached.
    """
    number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
    if not (number and math.isfinite(scale) and scale >= 0):
        raise ValueError(f"guidance `scale` must be a finite number >= 0, got {scale!r}")
    if null_cond.shape != cond.shape:
        null_cond = null_cond.expand_as(cond)
    prep = prepare if prepare is not None else (lambda c: c)
    if batched:
        both_cond = prep(torch.cat([cond, null_cond]))
    else:
        cond_half, null_half = prep(cond), prep(null_cond)

    def guided_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != cond.shape[0]:
            raise ValueError(f"batch of {x.shape[0]} samples but {cond.shape[0]} conditions")
        if batched:
            out_c, out_u = eps_fn(torch.cat([x, x]), torch.cat([t, t]), both_cond).chunk(2)
        else:
            out_c, out_u = eps_fn(x, t, cond_half), eps_fn(x, t, null_half)
        return mix_guidance(out_c, out_u, scale, x.shape[1])

    return guided_eps


def mix_guidance(out_c: torch.Tensor, out_u: torch.Tensor, scale: float | torch.Tensor, channels: int) -> torch.Tensor:
    """``eps_u + scale * (eps_c - eps_u)`` on the first ``channels`` channels of the two
    model outputs (N, C or 2C, ...); a second half (learned variance) comes from ``out_c``.

    The one place of the guidance arithmetic: :func:`guided` and the exported guided ONNX
    graph (``scale`` a tensor there) both call it.
    """
    if isinstance(scale, (int, float)) and scale == 1:  # exactly the conditional model, not to rounding
        eps = out_c[:, :channels]
    else:
        eps = out_u[:, :channels] + scale * (out_c[:, :channels] - out_u[:, :channels])
    return torch.cat([eps, out_c[:, channels:]], dim=1) if out_c.shape[1] > channels else eps


class GuidedRuntime:
    """What every runtime shares: :meth:`guided`, classifier-free guidance over the
    runtime's own ``eps(x, t, cond)`` and ``prepare(cond)``, and the check of ``eps``'s
    inputs. A runtime whose graph does guidance inside (an ONNX graph exported with
    ``--guided``) overrides :meth:`guided`."""

    def check_eps_inputs(self, x: torch.Tensor, t: torch.Tensor) -> None:
        """Refuse an ``x`` that is not (N, in_channels, image_size, image_size) floating
        point or a ``t`` that is not N integer timesteps, naming both shapes (the engines'
        own errors do not)."""
        size, channels = self.image_size, self.in_channels  # type: ignore[attr-defined]
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (channels, size, size):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"`x` must be (N, {channels}, {size}, {size}) for this model, got {got}")
        if not x.is_floating_point():
            raise TypeError(f"`x` must be floating point, got {x.dtype}")
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (x.shape[0],) or t.is_floating_point():
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"`t` must be {x.shape[0]} integer timesteps (one per sample of `x`), got {got}")

    def guided(
        self, cond: torch.Tensor, null_cond: torch.Tensor, scale: float, *, batched: bool = True
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """An ``eps_fn(x, t)`` for conditions ``cond`` (see :func:`guided`)."""
        return guided(self.eps, cond, null_cond, scale, prepare=self.prepare, batched=batched)  # type: ignore[attr-defined]

    def check_sampling_batch(self, n: int, *, guided: bool = False) -> None:
        """Refuse, before any work, sampling batches of ``n`` that this runtime cannot run
        (``guided``: under classifier-free guidance with both halves in one call). A
        PyTorch model takes any batch; exported graphs override this with their limit."""
