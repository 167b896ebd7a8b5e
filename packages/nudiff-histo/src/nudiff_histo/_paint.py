"""Painting images for structures: classifier-free guidance as one batched UNet call per
step, with the SPADE modulation computed once per batch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from nudiff_diffusion import NoiseSchedule, sample

__all__ = ["paint_images"]


def check_guidance(guidance: float) -> None:
    """Refuse a classifier-free guidance scale that is not a finite number >= 0 (``--guidance``)."""
    if (
        isinstance(guidance, bool)
        or not isinstance(guidance, (int, float))
        or not (math.isfinite(guidance) and guidance >= 0)
    ):
        raise ValueError(f"`guidance` (--guidance) must be a finite number >= 0, got {guidance!r}")


def paint_images(
    runtime,  # type: ignore[no-untyped-def]  # a runtime: guided(cond, null, scale, batched=...), in_channels, image_size
    cond: torch.Tensor,
    *,
    guidance: float = 2.0,
    sampler: str = "dpmpp2m",
    steps: int = 20,
    x_T: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    clip: float | None = 1.0,
    batched_guidance: bool = True,
) -> torch.Tensor:
    """Sample images for structures.

    Parameters
    ----------
    runtime : object
        A runtime (:class:`HistoDenoiser`, an ONNX or TensorRT one): its
        ``guided(cond, null_cond, scale, batched=...)`` (``nudiff_diffusion.GuidedRuntime``:
        guidance over ``eps`` and ``prepare``, or inside a ``--guided`` graph), plus
        ``in_channels`` and ``image_size``.
    cond : (N, 3, s, s) float tensor
        The structures as the model was trained on them (``encode_condition`` with its
        ``cond_foreground``).
    guidance : float
        Classifier-free guidance scale (the paper: 2); 1 is the plain conditional model.
    sampler, steps : str, int
        Any sampler of ``nudiff_diffusion.sample``.
    x_T : (N, 3, s, s) tensor, optional
        The starting noise (per-sample noise makes results independent of batching).
    generator : torch.Generator or sequence of N of them, optional
        The step noise of a stochastic sampler (one generator per image: independent of
        batching too), and the starting noise when ``x_T`` is not given.
    batched_guidance : bool
        True: the conditional and the unconditional half run as one 2N batch per step
        (nudiff). False: two sequential N-batch calls per step (the paper's code), for
        comparison; both give the same eps.

    Returns
    -------
    (N, 3, s, s) float32 tensor in [-clip, clip]
    """
    check_guidance(guidance)
    size = runtime.image_size
    if not isinstance(cond, torch.Tensor) or cond.ndim != 4 or tuple(cond.shape[1:]) != (3, size, size):
        got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
        raise ValueError(f"`cond` must be (N, 3, {size}, {size}) structures for this {size} px model, got {got}")
    if not torch.isfinite(cond).all():
        raise ValueError(f"`cond` holds {int((~torch.isfinite(cond)).sum())} NaN or inf value(s); expected [-1, 1]")
    n = cond.shape[0]
    null = torch.zeros_like(cond)
    eps_fn = runtime.guided(cond, null, guidance, batched=batched_guidance)
    shape = (n, runtime.in_channels, runtime.image_size, runtime.image_size)
    return sample(
        eps_fn,
        shape=tuple(x_T.shape) if x_T is not None else shape,
        schedule=NoiseSchedule.linear(1000),
        method=sampler,
        steps=steps,
        clip=clip,
        x_T=x_T,
        generator=generator,
        progress=False,
        device=getattr(runtime, "device", None),  # a GPU runtime: the sampler runs there too
    )
