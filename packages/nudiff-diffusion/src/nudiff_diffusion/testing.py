"""Helpers for tests and benchmarks of nudiff's models (public, as ``torch.testing`` is).

A freshly built UNet answers zero for every input: guided-diffusion zero-initialises its
output convolution, and the SPADE UNet its modulation outputs. Comparing two engines, two
layouts or two precisions on such a model compares zeros, so every test and benchmark that
compares outputs starts from :func:`perturbed_copy` instead.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["perturbed_copy"]


def perturbed_copy(model: nn.Module, *, std: float = 0.02, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with Gaussian noise added to every parameter.

    The noise is drawn on the CPU from a generator seeded with ``seed``, parameter by
    parameter in ``model.parameters()`` order, in float32, then cast to each parameter's
    dtype and device: the same model, seed and ``std`` give the same weights on any device
    and after any earlier use of torch's global random state.

    Parameters
    ----------
    model : nn.Module
        Not modified; its buffers (a BatchNorm's running statistics) are copied unchanged.
    std : float, default 0.02
        Standard deviation of the noise; 0 gives an exact copy.
    seed : int, default 0
        Seed of the noise.

    Returns
    -------
    nn.Module
        The perturbed copy, in the training or evaluation mode ``model`` was in.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std < 0:
        raise ValueError(f"`std` must be a finite number >= 0, got {std!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int, got {seed!r}")
    out = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            p.add_(noise.mul_(std).to(device=p.device, dtype=p.dtype))
    return out
