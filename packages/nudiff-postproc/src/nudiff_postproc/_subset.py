"""Labelled subsets: representative patches holding a requested fraction of the nuclei."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import numpy as np

from ._labels import compact_checked, compact_labels, instance_stats
from ._validate import as_instance_map

__all__ = ["patch_features", "select_subset", "nuclei_share"]


def patch_features(image: np.ndarray, inst: np.ndarray) -> np.ndarray:
    """Colour and morphology descriptors of one patch (no learned weights needed).

    Parameters
    ----------
    image : (H, W, 3) ndarray of uint8
    inst : (H, W) ndarray of int

    Returns
    -------
    (12,) ndarray of float64
        RGB mean and standard deviation; nuclei per 10,000 px; foreground fraction; mean
        and standard deviation of nucleus area; mean bounding-box elongation; mean
        fill ratio (area / bounding box).
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"`image` must be an (H, W, 3) RGB array, got {getattr(image, 'shape', type(image))}")
    inst = as_instance_map(inst, "inst")
    if image.shape[:2] != inst.shape:
        raise ValueError(f"`image` {image.shape[:2]} and `inst` {inst.shape} must have the same height and width")
    pixels = image.reshape(-1, 3).astype(np.float64)
    compact, ids = compact_checked(inst)
    n = ids.size
    feats = [*pixels.mean(0), *pixels.std(0), 1e4 * n / inst.size, float(np.count_nonzero(inst)) / inst.size]
    if n:
        s = instance_stats(compact, n)
        area = s.area[1:].astype(np.float64)
        height = (s.row_max - s.row_min + 1)[1:].astype(np.float64)
        width = (s.col_max - s.col_min + 1)[1:].astype(np.float64)
        feats += [
            area.mean(),
            area.std(),
            float(np.mean(np.maximum(height, width) / np.minimum(height, width))),
            float(np.mean(area / (height * width))),
        ]
    else:
        feats += [0.0, 0.0, 1.0, 0.0]
    return np.array(feats, dtype=np.float64)


def _nuclei_held(ids: Sequence[np.ndarray], sources: Sequence[str] | None, indices: Iterable[int]) -> int:
    """How many nuclei the patches ``indices`` hold: per patch without ``sources``, else
    the distinct (tile, id) pairs."""
    if sources is None:
        return int(sum(ids[i].size for i in indices))
    return len({(str(sources[i]), int(v)) for i in indices for v in ids[i]})


def nuclei_share(
    patches: Sequence[tuple[np.ndarray, np.ndarray]], chosen: Iterable[int], sources: Sequence[str] | None = None
) -> tuple[int, int]:
    """``(held, total)``: the nuclei the ``chosen`` patches hold and all patches hold,
    counted as :func:`select_subset` counts them (``sources``: distinct per tile)."""
    ids = [compact_labels(inst)[1] for _, inst in patches]
    return _nuclei_held(ids, sources, chosen), _nuclei_held(ids, sources, range(len(patches)))


def select_subset(
    patches: Sequence[tuple[np.ndarray, np.ndarray]],
    fraction: float,
    *,
    seed: int = 0,
    features: np.ndarray | None = None,
    n_clusters: int | None = None,
    sources: Sequence[str] | None = None,
) -> np.ndarray:
    """Pick representative patches that hold ``fraction`` of all nuclei instances.

    The patches are clustered with k-means on standardised features (:func:`patch_features`
    unless ``features`` are given, e.g. ResNet embeddings); then the clusters take turns,
    each giving its patch closest to its centre, until the chosen patches hold at least
    ``fraction`` of the nuclei (the paper tuned a proportion by hand until the fraction came
    out right; here the fraction is the stopping rule).

    Parameters
    ----------
    patches : sequence of (image, instance map)
        ``image`` (H, W, 3) uint8, ``inst`` (H, W) int. Not modified.
    fraction : float
        In (0, 1]: the share of all nuclei instances the subset must hold.
    seed : int
        Seed of the k-means initialisation: the same seed gives the same subset.
    features : (N, F) ndarray, optional
        Precomputed features of the patches.
    n_clusters : int, optional
        Default: the number of patches the fraction needs on average (at least 1).
    sources : sequence of N str, optional
        The tile each patch was cut from, its instance ids being the tile's (as
        ``nudiff-postproc patches`` keeps them): nuclei are then counted once however many
        overlapping patches hold them, so that the fraction is the share of the tiles'
        labels the subset holds. Without it a nucleus counts once per patch that holds it:
        with patches at half their size's stride, a subset that holds 10% counted so holds
        about 31% of the distinct nuclei (the Kumar training tiles, 256 px patches).

    Returns
    -------
    (K,) ndarray of int64
        Indices of the chosen patches, in increasing order.
    """
    from scipy.cluster.vq import kmeans2

    real = isinstance(fraction, (int, float, np.integer, np.floating)) and not isinstance(fraction, (bool, np.bool_))
    if not real or not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"`fraction` (--fraction) must be a number in (0, 1], got {fraction!r}")
    n = len(patches)
    if n == 0:
        raise ValueError("`patches` is empty")
    whole = isinstance(n_clusters, (int, np.integer)) and not isinstance(n_clusters, (bool, np.bool_))
    if n_clusters is not None and not (whole and 1 <= n_clusters <= n):
        raise ValueError(f"`n_clusters` must be None or an integer in [1, {n}] (the patches), got {n_clusters!r}")
    if sources is not None and len(sources) != n:
        raise ValueError(f"`sources` names {len(sources)} tiles for {n} patches; give one per patch")
    ids = [  # the instance ids of each patch
        compact_checked(as_instance_map(inst, f"patches[{i}] instance map"))[1] for i, (_, inst) in enumerate(patches)
    ]
    counts = np.array([a.size for a in ids])
    total = _nuclei_held(ids, sources, range(n))
    if total == 0:
        raise ValueError("the patches hold no nuclei; a subset by nuclei fraction is undefined")
    if fraction >= 1.0:
        return np.arange(n, dtype=np.int64)
    if features is None:
        features = np.stack([patch_features(img, inst) for img, inst in patches])
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] != n:
        raise ValueError(f"`features` must have shape ({n}, F), got {features.shape}")
    if not np.isfinite(features).all():
        rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
        raise ValueError(
            f"`features` must be finite; rows {rows[:5].tolist()}{' ...' if rows.size > 5 else ''} "
            f"({rows.size} of {n}) hold NaN or inf"
        )
    std = features.std(axis=0)
    z = (features - features.mean(axis=0)) / np.where(std > 0, std, 1.0)
    # the patches the fraction needs on average (fraction x n when nuclei count per patch)
    k = n_clusters or max(1, min(n, round(fraction * total / counts.mean())))
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        # duplicate patches leave clusters empty (scipy warns; their queues are empty here)
        warnings.simplefilter("ignore", UserWarning)
        centres, assign = kmeans2(z, k, minit="++", seed=np.random.default_rng(seed))
    distance = np.linalg.norm(z - centres[assign], axis=1)
    # each cluster's patches, closest to its centre first
    queues = [list(np.flatnonzero(assign == c)[np.argsort(distance[assign == c], kind="stable")]) for c in range(k)]
    order = sorted(range(k), key=lambda c: distance[queues[c][0]] if queues[c] else np.inf)
    chosen: list[int] = []
    held, target = 0, fraction * total
    taken: dict[str, set[int]] = {}  # with sources: the ids of each tile the subset holds

    def gain(i: int) -> int:
        if sources is None:
            return int(counts[i])
        have = taken.setdefault(str(sources[i]), set())
        new = set(ids[i].tolist()) - have
        have |= new
        return len(new)

    while held < target:
        progressed = False
        for c in order:
            if queues[c] and held < target:
                i = int(queues[c].pop(0))
                chosen.append(i)
                held += gain(i)
                progressed = True
        if not progressed:
            break
    return np.sort(np.array(chosen, dtype=np.int64))
