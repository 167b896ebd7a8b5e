"""Segmentation metrics of HoVer-Net (Dice, AJI, AJI+, DQ, SQ, PQ) from one overlap table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ._labels import compact_checked
from ._validate import as_instance_map

__all__ = ["OverlapTable", "overlap_table", "evaluate", "mean_metrics", "METRIC_KEYS"]

#: The keys of :func:`evaluate`, in the order of the tables nudiff prints (HoVer-Net's ``compute_stats``
#: prints dice, dq, sq, pq, aji_plus, aji: compare by name, not by position).
METRIC_KEYS: tuple[str, ...] = ("dice", "aji", "aji_plus", "dq", "sq", "pq")


@dataclass(frozen=True)
class OverlapTable:
    """Sparse pairwise overlap of two instance maps (ids compacted to 1..N in id order).

    Attributes
    ----------
    true_area : (Nt + 1,) ndarray of int64
        Pixels per true instance (index 0: background).
    pred_area : (Np + 1,) ndarray of int64
        Pixels per predicted instance (index 0: background).
    true_index, pred_index : (K,) ndarray of int64
        Compact ids (1-based) of every overlapping pair, sorted by true id then pred id.
    intersection : (K,) ndarray of int64
        Overlapping pixels of each pair.
    true_ids, pred_ids : ndarray of int64
        The original id of each compact id (``true_ids[k - 1]``).
    """

    true_area: np.ndarray
    pred_area: np.ndarray
    true_index: np.ndarray
    pred_index: np.ndarray
    intersection: np.ndarray
    true_ids: np.ndarray
    pred_ids: np.ndarray

    @property
    def n_true(self) -> int:
        return self.true_area.size - 1

    @property
    def n_pred(self) -> int:
        return self.pred_area.size - 1

    @property
    def union(self) -> np.ndarray:
        """(K,) int64 union of every overlapping pair."""
        return self.true_area[self.true_index] + self.pred_area[self.pred_index] - self.intersection


def overlap_table(true: np.ndarray, pred: np.ndarray) -> OverlapTable:
    """Build the overlap table of two instance maps in one pass over the pixels.

    Parameters
    ----------
    true, pred : (H, W) ndarray of int
        Instance maps of the same shape, 0 = background, any non-negative ids.

    Returns
    -------
    OverlapTable
    """
    true = as_instance_map(true, "true")
    pred = as_instance_map(pred, "pred")
    if true.shape != pred.shape:
        raise ValueError(f"`true` (shape {true.shape}) and `pred` (shape {pred.shape}) must have the same shape")
    t, t_ids = compact_checked(true)
    p, p_ids = compact_checked(pred)
    nt, np_ = t_ids.size, p_ids.size
    true_area = np.bincount(t.ravel(), minlength=nt + 1).astype(np.int64)
    pred_area = np.bincount(p.ravel(), minlength=np_ + 1).astype(np.int64)
    both = (t != 0) & (p != 0)
    code = t[both].astype(np.int64) * (np_ + 1) + p[both]
    if (nt + 1) * (np_ + 1) <= 4 * code.size + 4096:
        counts = np.bincount(code, minlength=0)
        codes = np.flatnonzero(counts)
        inter = counts[codes]
    else:
        codes, inter = np.unique(code, return_counts=True)
    return OverlapTable(
        true_area=true_area,
        pred_area=pred_area,
        true_index=codes // (np_ + 1),
        pred_index=codes % (np_ + 1),
        intersection=inter.astype(np.int64),
        true_ids=t_ids,
        pred_ids=p_ids,
    )


def _aji(table: OverlapTable, iou: np.ndarray) -> float:
    """AJI (Kumar et al. 2017) as HoVer-Net's ``get_fast_aji``: each true instance takes
    the prediction of highest IoU (a prediction may be taken more than once)."""
    nt = table.n_true
    # best prediction per true instance: highest IoU, then lowest pred id (numpy argmax)
    order = np.lexsort((table.pred_index, -iou, table.true_index))
    first = np.ones(order.size, bool)
    first[1:] = table.true_index[order][1:] != table.true_index[order][:-1]
    best = order[first]
    best = best[iou[best] > 0.0]
    inter = table.intersection[best].astype(np.float64).sum()
    union = table.union[best].astype(np.float64).sum()
    paired_true = np.zeros(nt + 1, bool)
    paired_true[table.true_index[best]] = True
    paired_pred = np.zeros(table.n_pred + 1, bool)
    paired_pred[table.pred_index[best]] = True
    union += table.true_area[1:][~paired_true[1:]].sum() + table.pred_area[1:][~paired_pred[1:]].sum()
    return float(inter / union)


def _aji_plus(table: OverlapTable, iou: np.ndarray) -> float:
    """AJI+ (Graham et al. 2019) as HoVer-Net's ``get_fast_aji_plus``: a maximal unique
    pairing by IoU (Hungarian), solved per connected component of the overlap graph,
    which gives the same pairing as one dense assignment and scales to large tiles."""
    nt, np_ = table.n_true, table.n_pred
    graph = coo_matrix(
        (np.ones(iou.size), (table.true_index - 1, nt + table.pred_index - 1)),
        shape=(nt + np_, nt + np_),
    )
    _, comp = connected_components(graph, directed=False)
    pair_comp = comp[table.true_index - 1]
    chosen: list[np.ndarray] = []
    order = np.argsort(pair_comp, kind="stable")
    bounds = np.flatnonzero(np.diff(pair_comp[order])) + 1
    for idx in np.split(order, bounds):
        if idx.size == 1:
            chosen.append(idx)
            continue
        rows, r_inv = np.unique(table.true_index[idx], return_inverse=True)
        cols, c_inv = np.unique(table.pred_index[idx], return_inverse=True)
        dense = np.zeros((rows.size, cols.size))
        dense[r_inv, c_inv] = iou[idx]
        lookup = np.full((rows.size, cols.size), -1, np.int64)
        lookup[r_inv, c_inv] = idx
        r, c = linear_sum_assignment(-dense)
        chosen.append(lookup[r, c][lookup[r, c] >= 0])
    sel = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    sel = np.sort(sel[iou[sel] > 0.0])
    inter = table.intersection[sel].astype(np.float64).sum()
    union = table.union[sel].astype(np.float64).sum()
    paired_true = np.zeros(nt + 1, bool)
    paired_true[table.true_index[sel]] = True
    paired_pred = np.zeros(np_ + 1, bool)
    paired_pred[table.pred_index[sel]] = True
    union += table.true_area[1:][~paired_true[1:]].sum() + table.pred_area[1:][~paired_pred[1:]].sum()
    return float(inter / union)


def _pq(table: OverlapTable, match_iou: float) -> tuple[float, float, float]:
    """DQ, SQ, PQ (Kirillov et al. 2019) as HoVer-Net's ``get_fast_pq`` with
    ``match_iou >= 0.5`` (pairs with IoU above it are unique, so no assignment needed)."""
    iou = table.intersection / table.union
    matched = iou > match_iou
    tp = int(np.count_nonzero(matched))
    fn = table.n_true - tp
    fp = table.n_pred - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = iou[matched].sum() / (tp + 1.0e-6)
    return dq, sq, dq * sq


def evaluate(
    true: np.ndarray,
    pred: np.ndarray,
    *,
    match_iou: float = 0.5,
    table: OverlapTable | None = None,
    one_empty: Literal["nan", "zero"] = "nan",
) -> dict[str, float]:
    """Dice, AJI, AJI+, DQ, SQ and PQ of a predicted instance map.

    The definitions and numbers are those of HoVer-Net's ``compute_stats.py``
    (``get_dice_1``, ``get_fast_aji``, ``get_fast_aji_plus``, ``get_fast_pq``), for any
    ids (no relabelling needed), computed from a single overlap table.

    Parameters
    ----------
    true, pred : (H, W) ndarray of int
        Reference and predicted instance maps, same shape, 0 = background. Not modified.
    match_iou : float, default 0.5
        PQ matches pairs with IoU strictly above this value; must be >= 0.5 (matches are
        then unique).
    table : OverlapTable, optional
        A precomputed :func:`overlap_table` of ``(true, pred)`` (refused when its pixel
        counts disagree with the maps).
    one_empty : {"nan", "zero"}, default "nan"
        The value when exactly one of the maps has no nuclei. ``"nan"``: undefined, as the
        parity fixtures record it. ``"zero"``: every metric 0, as HoVer-Net's
        ``compute_stats.py`` scores such an image (its functions return 0 for an empty
        true map; for an empty prediction ``get_fast_aji`` raises, and 0 is what each
        formula gives): a prediction of nothing, or only of false nuclei, is a total miss.
        Use it for means over images (:func:`mean_metrics`), so that such images lower
        the mean instead of dropping out of it.

    Returns
    -------
    dict
        ``dice, aji, aji_plus, dq, sq, pq`` as floats. When both maps have no nuclei, all
        six are NaN (0 / 0 in every definition; HoVer-Net's functions raise); when only
        one has none, as ``one_empty`` says.

    Examples
    --------
    >>> a = np.zeros((8, 8), np.int32); a[1:4, 1:4] = 1; a[5:8, 5:8] = 2
    >>> evaluate(a, a * 7)["aji"]
    1.0
    """
    if not 0.5 <= float(match_iou) < 1.0:
        raise ValueError(f"`match_iou` must be in [0.5, 1), got {match_iou!r}")
    if one_empty not in ("nan", "zero"):
        raise ValueError(f"`one_empty` must be 'nan' or 'zero', got {one_empty!r}")
    if table is None:
        table = overlap_table(true, pred)
    elif not isinstance(table, OverlapTable):
        raise TypeError(f"`table` must be an OverlapTable from overlap_table(), got {type(table).__name__}")
    else:  # a table of other maps would give their numbers: check what is cheap to check
        true, pred = as_instance_map(true, "true"), as_instance_map(pred, "pred")
        if true.shape != pred.shape:
            raise ValueError(f"`true` (shape {true.shape}) and `pred` (shape {pred.shape}) must have the same shape")
        for name, labels, area in (("true", true, table.true_area), ("pred", pred, table.pred_area)):
            foreground = np.count_nonzero(labels)
            if int(area.sum()) != labels.size or int(area[1:].sum()) != foreground:
                raise ValueError(
                    f"`table` is not the overlap table of these maps: it counts {int(area[1:].sum())} of "
                    f"{int(area.sum())} pixels in {name} nuclei, `{name}` has {foreground} of {labels.size}"
                )
    if table.n_true == 0 or table.n_pred == 0:
        both = table.n_true == table.n_pred
        return {key: float("nan") if both or one_empty == "nan" else 0.0 for key in METRIC_KEYS}
    # Dice of the foregrounds
    inter_fg = table.intersection.sum()
    dice = 2.0 * inter_fg / (table.true_area[1:].sum() + table.pred_area[1:].sum())
    iou_eps = table.intersection / (table.union + 1.0e-6)  # HoVer-Net's AJI uses +1e-6
    dq, sq, pq = _pq(table, match_iou)
    return {
        "dice": float(dice),
        "aji": _aji(table, iou_eps),
        "aji_plus": _aji_plus(table, iou_eps),
        "dq": float(dq),
        "sq": float(sq),
        "pq": float(pq),
    }


def mean_metrics(per_image: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """The mean of each metric over the images where it is defined.

    Parameters
    ----------
    per_image : iterable of dict
        :func:`evaluate` results (for HoVer-Net's means, made with ``one_empty="zero"``:
        then only images with no nuclei in either map are left out).

    Returns
    -------
    dict
        ``dice, aji, aji_plus, dq, sq, pq``: the mean of the finite values, NaN where no
        image has one.
    """
    rows = list(per_image)
    mean = {}
    for key in METRIC_KEYS:
        values = np.array([row[key] for row in rows], dtype=np.float64)
        finite = values[np.isfinite(values)]
        mean[key] = float(finite.mean()) if finite.size else float("nan")
    return mean
