"""evaluate(): HoVer-Net's compute_stats numbers, from one overlap table."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nudiff_postproc import METRIC_KEYS, evaluate, mean_metrics, overlap_table, synthetic_instance_map
from scipy.optimize import linear_sum_assignment


# ---- a direct transcription of HoVer-Net's metric functions (dense masks), the oracle ----
def _remap(x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x)
    for new, old in enumerate(np.unique(x)[1:], start=1):
        out[x == old] = new
    return out


def _pairwise(true, pred):
    t_ids, p_ids = np.unique(true)[1:], np.unique(pred)[1:]
    inter = np.zeros((t_ids.size, p_ids.size))
    union = np.zeros((t_ids.size, p_ids.size))
    for i, t in enumerate(t_ids):
        tm = true == t
        for j, p in enumerate(p_ids):
            pm = pred == p
            inter[i, j] = (tm & pm).sum()
            union[i, j] = (tm | pm).sum()
    return t_ids, p_ids, inter, union


def _oracle(true, pred):
    true, pred = _remap(true), _remap(pred)
    t_ids, p_ids, inter, union = _pairwise(true, pred)
    area_t = np.array([(true == t).sum() for t in t_ids])
    area_p = np.array([(pred == p).sum() for p in p_ids])
    dice = 2.0 * ((true > 0) & (pred > 0)).sum() / ((true > 0).sum() + (pred > 0).sum())
    iou = inter / (union + 1e-6)
    # AJI
    best = np.argmax(iou, axis=1)
    paired = np.nonzero(np.max(iou, axis=1) > 0)[0]
    aji_i = inter[paired, best[paired]].sum()
    aji_u = union[paired, best[paired]].sum()
    aji_u += area_t[np.setdiff1d(np.arange(t_ids.size), paired)].sum()
    aji_u += area_p[np.setdiff1d(np.arange(p_ids.size), best[paired])].sum()
    # AJI+
    r, c = linear_sum_assignment(-iou)
    keep = iou[r, c] > 0
    r, c = r[keep], c[keep]
    ajp_u = union[r, c].sum() + area_t[np.setdiff1d(np.arange(t_ids.size), r)].sum()
    ajp_u += area_p[np.setdiff1d(np.arange(p_ids.size), c)].sum()
    # PQ
    exact = np.where(union > 0, inter / np.maximum(union, 1), 0)
    tp_r, tp_c = np.nonzero(exact > 0.5)
    tp = tp_r.size
    dq = tp / (tp + 0.5 * (p_ids.size - tp) + 0.5 * (t_ids.size - tp))
    sq = exact[tp_r, tp_c].sum() / (tp + 1e-6)
    return {
        "dice": dice,
        "aji": aji_i / aji_u,
        "aji_plus": inter[r, c].sum() / ajp_u,
        "dq": dq,
        "sq": sq,
        "pq": dq * sq,
    }


def _perturbed(seed: int, shape=(40, 48)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    true = synthetic_instance_map(shape, n_nuclei=int(rng.integers(1, 25)), seed=seed)
    pred = synthetic_instance_map(shape, n_nuclei=int(rng.integers(1, 25)), seed=seed + 1)
    mix = rng.random(shape) < 0.7
    pred = np.where(mix, true * 3 + 1000 * (true > 0), pred)  # sparse, non-contiguous ids
    pred[rng.random(shape) < 0.05] = 0
    return true, pred


def test_parity_with_reference_fixtures(parity):
    assert tuple(parity["stats_keys"]) == METRIC_KEYS
    cases = zip(parity["inst"], parity["seg_pred"], parity["stats"], parity["names"], strict=True)
    for true, pred, expected, name in cases:
        got = evaluate(true, pred)
        values = np.array([got[k] for k in METRIC_KEYS])
        np.testing.assert_allclose(values, expected, rtol=0, atol=1e-9, equal_nan=True, err_msg=str(name))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 2))
def test_equals_direct_transcription_of_hovernet(seed):
    true, pred = _perturbed(seed)
    if not true.any() or not pred.any():
        return
    got, want = evaluate(true, pred), _oracle(true, pred)
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(want[k], abs=1e-12), k


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 2))
def test_map_against_itself_scores_one(seed):
    true, _ = _perturbed(seed)
    if true.any():
        got = evaluate(true, true)
        for k in METRIC_KEYS:
            assert got[k] == pytest.approx(1.0, abs=1e-6), k


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 2), offset=st.integers(1, 2**40))
def test_invariant_under_relabelling(seed, offset):
    true, pred = _perturbed(seed)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(int(pred.max()) + 1) + 1
    perm[0] = 0
    relabelled = np.where(pred > 0, perm[pred].astype(np.int64) + offset, 0)
    a, b = evaluate(true, pred), evaluate(true.astype(np.uint16), relabelled)
    np.testing.assert_allclose([a[k] for k in METRIC_KEYS], [b[k] for k in METRIC_KEYS], atol=1e-12, equal_nan=True)


def test_empty_maps():
    empty = np.zeros((16, 16), np.int32)
    full = np.zeros((16, 16), np.int32)
    full[2:6, 2:6] = 1
    full[9:12, 9:15] = 4
    for a, b in ((empty, empty), (empty, full), (full, empty)):  # the fixtures' convention
        assert all(np.isnan(v) for v in evaluate(a, b).values())
    assert all(np.isnan(v) for v in evaluate(empty, empty, one_empty="zero").values())  # 0 / 0
    # HoVer-Net's functions score an empty true map against false nuclei 0 (compute_stats.py)
    assert evaluate(empty, full, one_empty="zero") == {k: 0.0 for k in METRIC_KEYS} == _oracle(empty, full)
    # against an empty prediction its get_fast_aji raises; 0 is what each formula gives
    with pytest.raises(ValueError, match="argmax of an empty sequence"):
        _oracle(full, empty)
    assert evaluate(full, empty, one_empty="zero") == {k: 0.0 for k in METRIC_KEYS}
    with pytest.raises(ValueError, match="`one_empty` must be 'nan' or 'zero', got 'skip'"):
        evaluate(full, empty, one_empty="skip")


def test_mean_metrics_counts_one_sided_misses_and_skips_undefined_images():
    true, pred = _perturbed(3)
    empty = np.zeros_like(true)
    rows = [evaluate(true, pred, one_empty="zero"), evaluate(true, empty, one_empty="zero")]
    rows.append(evaluate(empty, empty, one_empty="zero"))  # undefined: left out
    mean = mean_metrics(rows)
    assert mean == pytest.approx({k: rows[0][k] / 2 for k in METRIC_KEYS}, abs=1e-15)
    assert all(np.isnan(v) for v in mean_metrics(rows[2:]).values())
    assert all(np.isnan(v) for v in mean_metrics([]).values())


def test_overlap_table_is_reusable_and_inputs_unchanged():
    true, pred = _perturbed(7)
    t0, p0 = true.copy(), pred.copy()
    table = overlap_table(true, pred)
    assert evaluate(true, pred, table=table) == evaluate(true, pred)
    assert table.true_area.sum() == true.size and table.intersection.sum() == ((true > 0) & (pred > 0)).sum()
    np.testing.assert_array_equal(true, t0)
    np.testing.assert_array_equal(pred, p0)


def test_aji_plus_per_component_equals_one_dense_assignment():
    """AJI+ solves the assignment per connected component of the overlap graph; on a
    tile with many touching nuclei this equals HoVer-Net's single dense assignment."""
    true = synthetic_instance_map((400, 400), n_nuclei=900, seed=0)
    pred = np.roll(synthetic_instance_map((400, 400), n_nuclei=900, seed=0), 2, axis=1) * 5
    table = overlap_table(true, pred)
    iou = np.zeros((table.n_true, table.n_pred))
    iou[table.true_index - 1, table.pred_index - 1] = table.intersection / (table.union + 1e-6)
    inter = np.zeros_like(iou)
    inter[table.true_index - 1, table.pred_index - 1] = table.intersection
    union = np.zeros_like(iou)
    union[table.true_index - 1, table.pred_index - 1] = table.union
    r, c = linear_sum_assignment(-iou)
    keep = iou[r, c] > 0
    r, c = r[keep], c[keep]
    total_union = union[r, c].sum()
    total_union += table.true_area[1:][np.setdiff1d(np.arange(table.n_true), r)].sum()
    total_union += table.pred_area[1:][np.setdiff1d(np.arange(table.n_pred), c)].sum()
    assert table.n_true > 500
    assert evaluate(true, pred, table=table)["aji_plus"] == pytest.approx(inter[r, c].sum() / total_union, abs=1e-12)


@pytest.mark.parametrize(
    ("true", "pred", "error", "match"),
    [
        (np.zeros((4, 4), np.int32), np.zeros((4, 5), np.int32), ValueError, r"\(4, 4\).*\(4, 5\).*same shape"),
        (np.zeros((4, 4), np.float64), np.zeros((4, 4), np.int32), TypeError, "`true`.*float64"),
        (np.zeros((4, 4), np.int32), -np.ones((4, 4), np.int64), ValueError, "`pred` has negative"),
    ],
)
def test_bad_inputs_are_rejected(true, pred, error, match):
    with pytest.raises(error, match=match):
        evaluate(true, pred)


def test_bad_options_are_rejected():
    a = np.ones((4, 4), np.int32)
    with pytest.raises(ValueError, match="match_iou"):
        evaluate(a, a, match_iou=0.3)
    with pytest.raises(TypeError, match="OverlapTable"):
        evaluate(a, a, table={"x": 1})


def test_a_table_of_other_maps_is_refused():
    ones = np.ones((6, 6), np.int32)
    other = np.zeros((6, 6), np.int32)
    other[1:4, 1:4] = 2
    with pytest.raises(ValueError, match=r"`table` is not the overlap table of these maps: .* `pred` has 9 of 36"):
        evaluate(ones, other, table=overlap_table(ones, ones))
    with pytest.raises(ValueError, match=r"must have the same shape"):
        evaluate(ones, other[:5], table=overlap_table(ones, other))
    assert evaluate(ones, other, table=overlap_table(ones, other)) == evaluate(ones, other)
