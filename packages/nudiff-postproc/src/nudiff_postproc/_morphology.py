"""Morphology statistics of instance maps and a distance between two sets of them."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._labels import compact_checked
from ._structure import Centre, hv_maps
from ._validate import as_instance_map, as_prediction

__all__ = ["morphology_stats", "morphology_distance", "MORPHOLOGY_FEATURES"]

#: Per-nucleus features of :func:`morphology_stats`.
MORPHOLOGY_FEATURES: tuple[str, ...] = ("area", "perimeter", "eccentricity", "solidity", "hv_consistency")


def _one_map(inst: np.ndarray, structure: np.ndarray | None, centre: Centre, min_size: int) -> dict[str, np.ndarray]:
    from skimage.measure import regionprops_table

    # ids 1..N (in the same order): regionprops and bincount size their tables by the
    # largest id, which any non-negative integer may be
    inst, _ = compact_checked(inst)
    props = regionprops_table(inst, properties=("label", "area", "perimeter", "eccentricity", "solidity"))
    out = {k: np.asarray(props[k], np.float64) for k in ("area", "perimeter", "eccentricity", "solidity")}
    labels = np.asarray(props["label"], np.int64)
    if structure is None:
        out["hv_consistency"] = np.full(labels.size, np.nan)
    else:
        # agreement of the given h/v maps with the maps of the instance map itself,
        # 1 - mean |difference| / 2 over each nucleus's pixels, in [0, 1]
        diff = np.abs(structure[..., 1:].astype(np.float64) - hv_maps(inst, min_size=min_size, centre=centre)).mean(-1)
        flat = inst.ravel()
        sums = np.bincount(flat, weights=diff.ravel(), minlength=int(flat.max()) + 1)
        counts = np.bincount(flat, minlength=int(flat.max()) + 1)
        out["hv_consistency"] = 1.0 - sums[labels] / counts[labels] / 2.0
    return out


def morphology_stats(
    inst: np.ndarray, structure: np.ndarray | None = None, *, centre: Centre = "hovernet", min_size: int = 0
) -> dict[str, Any]:
    """Per-nucleus shape statistics of one instance map or a stack of them.

    Parameters
    ----------
    inst : (H, W) or (N, H, W) ndarray of int
        Instance map(s), 0 = background. Not modified.
    structure : (H, W, 3) or (N, H, W, 3) ndarray of float, optional
        The structure(s) the maps came from (e.g. generated ``[fg, h, v]``); gives
        ``hv_consistency``, how well its h/v maps agree with the maps' own.
    centre : {"hovernet", "nearest"}
        The distance-map convention of ``structure`` (see :func:`hv_maps`).
    min_size : int
        The ``min_size`` ``structure`` was encoded with (see :func:`hv_maps`): nuclei of at
        most this many pixels carry h = v = 0 there, and are compared with zeros.

    Returns
    -------
    dict
        ``area``, ``perimeter``, ``eccentricity``, ``solidity`` and ``hv_consistency``
        (NaN without ``structure``): (K,) float64 arrays over all K nuclei;
        ``nuclei_per_patch``: (N,) int64, the number of nuclei in each map.
    """
    if isinstance(inst, np.ndarray) and inst.ndim == 2:
        inst = inst[None]
        structure = None if structure is None else structure[None]
    inst = as_instance_map(inst, "inst", ndim=3)
    if structure is not None:
        structure = as_prediction(structure, "structure", ndim=4)
        if structure.shape[:3] != inst.shape:
            raise ValueError(
                f"`structure` (shape {structure.shape}) must match `inst` (shape {inst.shape}) plus 3 channels"
            )
    per_map = [_one_map(m, None if structure is None else structure[i], centre, min_size) for i, m in enumerate(inst)]
    stats: dict[str, Any] = {k: np.concatenate([p[k] for p in per_map]) for k in MORPHOLOGY_FEATURES}
    stats["nuclei_per_patch"] = np.array([p["area"].size for p in per_map], np.int64)
    return stats


def _as_stats(value: Any, name: str) -> dict[str, Any]:
    if isinstance(value, dict):
        missing = [k for k in (*MORPHOLOGY_FEATURES, "nuclei_per_patch") if k not in value]
        if missing:
            raise ValueError(f"`{name}` lacks the keys {missing}; pass the result of morphology_stats()")
        return value
    return morphology_stats(np.asarray(value))


def morphology_distance(a: Any, b: Any) -> dict[str, float]:
    """How different two sets of nuclei look: per-feature Wasserstein-1 distances.

    Each feature's distance (``scipy.stats.wasserstein_distance`` of the two samples) is
    divided by the standard deviation of both samples pooled, so features of different
    units weigh alike: two halves of one dataset score well under 1 (0.03-0.04 on the
    Kumar training structures, whose patches overlap; the training against the test tiles
    0.14), and the Kumar nuclei with every area doubled score 0.8 on ``area``. The pooled
    deviation includes the gap between the two sets, so with samples of equal size a
    distance stays below 2 however far apart they are, and it grows when one sample is
    much smaller than the other: compare distances measured on samples of like sizes.

    Parameters
    ----------
    a, b : dict or ndarray
        Results of :func:`morphology_stats`, or instance maps ((H, W) or (N, H, W)).

    Returns
    -------
    dict
        One entry per feature (``area``, ``perimeter``, ``eccentricity``, ``solidity``,
        ``hv_consistency`` when both sides have it, ``nuclei_per_patch``) and ``mean``,
        their average. A feature is ``inf`` when only one side has nuclei.
    """
    from scipy.stats import wasserstein_distance

    sa, sb = _as_stats(a, "a"), _as_stats(b, "b")
    out: dict[str, float] = {}
    for key in (*MORPHOLOGY_FEATURES, "nuclei_per_patch"):
        xa = np.asarray(sa[key], np.float64)
        xb = np.asarray(sb[key], np.float64)
        xa, xb = xa[np.isfinite(xa)], xb[np.isfinite(xb)]
        if xa.size == 0 or xb.size == 0:
            if key == "hv_consistency":
                continue
            # one side has no nuclei at all (e.g. an untrained model's samples): as far
            # from any set with nuclei as can be, and equal to another empty set
            out[key] = 0.0 if xa.size == xb.size else float("inf")
            continue
        scale = np.concatenate([xa, xb]).std()
        out[key] = float(wasserstein_distance(xa, xb) / scale) if scale > 0 else 0.0
    out["mean"] = float(np.mean(list(out.values())))
    return out
