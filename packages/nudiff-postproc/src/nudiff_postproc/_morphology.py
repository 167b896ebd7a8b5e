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

    Notes
    -----
    The shape features are scikit-image's ``regionprops`` (``perimeter``: its default
    4-connected estimate, 0 for nuclei of one or two pixels). An id whose pixels form
    several pieces is one nucleus (its solidity low).
    """
    return _morphology_stats(inst, structure, centre, min_size, "inst")


def _morphology_stats(inst: Any, structure: Any, centre: Centre, min_size: int, name: str) -> dict[str, Any]:
    """:func:`morphology_stats`, naming the instance maps ``name`` in its errors."""
    if isinstance(inst, (list, tuple)):
        inst = np.asarray(inst)
    if isinstance(inst, np.ndarray) and inst.ndim == 2:  # one map: a stack of one
        inst = inst[None]
        if isinstance(structure, (list, tuple)):
            structure = np.asarray(structure)
        if isinstance(structure, np.ndarray) and structure.ndim == 3:
            structure = structure[None]
    inst = as_instance_map(inst, name, ndim=3)
    if structure is not None:
        structure = as_prediction(structure, "structure", ndim=4)
        if structure.shape[:3] != inst.shape:
            raise ValueError(
                f"`structure` (shape {structure.shape}) must match `{name}` (shape {inst.shape}) plus 3 channels"
            )
    per_map = [_one_map(m, None if structure is None else structure[i], centre, min_size) for i, m in enumerate(inst)]
    stats: dict[str, Any] = {k: np.concatenate([p[k] for p in per_map]) for k in MORPHOLOGY_FEATURES}
    stats["nuclei_per_patch"] = np.array([p["area"].size for p in per_map], np.int64)
    return stats


def _as_stats(value: Any, name: str) -> dict[str, Any]:
    """Statistics as :func:`morphology_stats` returns them, from its result (checked) or
    from instance maps; errors name the argument ``name``."""
    if not isinstance(value, dict):
        return _morphology_stats(value, None, "hovernet", 0, name)
    missing = [k for k in (*MORPHOLOGY_FEATURES, "nuclei_per_patch") if k not in value]
    if missing:
        raise ValueError(f"`{name}` lacks the keys {missing}; pass the result of morphology_stats()")
    for key in (*MORPHOLOGY_FEATURES, "nuclei_per_patch"):
        try:
            values = np.asarray(value[key], np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"`{name}['{key}']` must be a 1-D array of numbers ({exc})") from None
        if values.ndim != 1:
            raise ValueError(f"`{name}['{key}']` must be a 1-D array, got shape {values.shape}")
        bad = ~np.isfinite(values)
        no_structure = key == "hv_consistency" and bad.all()  # NaN throughout for maps without one
        if bad.any() and not no_structure:
            raise ValueError(f"`{name}['{key}']` holds {int(bad.sum())} NaN or infinite value(s)")
    sizes = {np.size(value[k]) for k in MORPHOLOGY_FEATURES}
    if len(sizes) > 1 or int(np.sum(value["nuclei_per_patch"])) not in sizes:
        raise ValueError(
            f"`{name}`: the per-nucleus arrays ({', '.join(f'{k} {np.size(value[k])}' for k in MORPHOLOGY_FEATURES)}) "
            f"must all have one entry per nucleus, sum(nuclei_per_patch) = {int(np.sum(value['nuclei_per_patch']))}"
        )
    return value


def morphology_distance(a: Any, b: Any) -> dict[str, float]:
    """How different two sets of nuclei look: per-feature Wasserstein-1 distances.

    Each feature's distance (``scipy.stats.wasserstein_distance`` of the two samples) is
    divided by the standard deviation of both samples pooled, so features of different
    units weigh alike. Measured on the Kumar tiles (2026-12-03): random halves of the
    training structures' patches, which overlap, score 0.03-0.06 (mean); the training
    against the test tiles 0.14 (tiny-64's structures, as nudiff-structure's README), 0.18
    (small-128's) and 0.21 (256 px patches at full resolution); halves of the 30 tiles
    split by tile 0.15-0.49 (8 splits; organs differ: ``area`` up to 0.63,
    ``nuclei_per_patch`` up to 0.82); every area doubled 0.65-0.67 on ``area``. So a set
    is told from its own kind, but a gross error in one feature scores like the
    difference between organs: read the features, not only the mean, and compare with a
    real-vs-real baseline. The pooled deviation includes the gap
    between the two sets, so with samples of equal size a distance is at most 2 (two point
    masses) however far apart they are, and the floor rises when one sample is much smaller
    than the other (16 real patches against 1,008 others: 0.10-0.23): compare distances
    measured on samples of like sizes.

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
