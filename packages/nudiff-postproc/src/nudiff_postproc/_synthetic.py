"""A procedurally generated instance map: the bundled example (no licensed data needed)."""

from __future__ import annotations

import numpy as np

__all__ = ["synthetic_instance_map"]


def synthetic_instance_map(shape: tuple[int, int] = (256, 256), *, n_nuclei: int = 60, seed: int = 0) -> np.ndarray:
    """Nuclei as random ellipses, some touching, numbered 1..N.

    Ellipses with semi-axes of 4-11 pixels and random orientation are dropped at random
    centres; a later ellipse covers an earlier one where they overlap, which makes
    touching nuclei with straight shared borders, as in annotated H&E tiles. Pieces that
    end up under 20 pixels are removed.

    Parameters
    ----------
    shape : (int, int)
        ``(H, W)`` of the map.
    n_nuclei : int
        Ellipses drawn (the result can hold a few fewer).
    seed : int
        Seed of ``numpy.random.default_rng``: the same seed gives the same map.

    Returns
    -------
    (H, W) ndarray of int32
    """
    from skimage.draw import ellipse

    if len(shape) != 2 or min(shape) < 16:
        raise ValueError(f"`shape` must be (H, W) with both at least 16, got {shape!r}")
    if n_nuclei < 0:
        raise ValueError(f"`n_nuclei` must be >= 0, got {n_nuclei}")
    rng = np.random.default_rng(seed)
    inst = np.zeros(shape, np.int32)
    for label in range(1, n_nuclei + 1):
        r, c = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        a, b = rng.uniform(6, 11), rng.uniform(4, 8)
        rr, cc = ellipse(r, c, a, b, shape=shape, rotation=rng.uniform(-np.pi, np.pi))
        inst[rr, cc] = label
    ids, counts = np.unique(inst, return_counts=True)
    keep = ids[(ids != 0) & (counts >= 20)]
    lut = np.zeros(n_nuclei + 1, np.int32)
    lut[keep] = np.arange(1, keep.size + 1, dtype=np.int32)
    return lut[inst]
