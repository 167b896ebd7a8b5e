"""instances_from_structure(s): parity with HoVer-Net / Nudiff, and the fast paths."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nudiff_postproc import (
    encode_structure,
    evaluate,
    instances_from_structure,
    instances_from_structures,
    read_instance_map,
    synthetic_instance_map,
)
from scipy import ndimage as ndi
from skimage.segmentation import watershed


def same_up_to_relabelling(a: np.ndarray, b: np.ndarray) -> bool:
    """True when the two label maps are one bijective relabelling apart (0 <-> 0)."""
    if a.shape != b.shape or not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


# ---- a direct, slow transcription of HoVer-Net's __proc_np_hv, the test oracle ----------
def _cv_kernels(ksize: int = 21) -> tuple[np.ndarray, np.ndarray]:
    smooth = np.array([1.0])
    for _ in range(ksize - 1):
        smooth = np.convolve(smooth, [1.0, 1.0])
    deriv = np.array([1.0])
    for _ in range(ksize - 2):
        deriv = np.convolve(deriv, [1.0, 1.0])
    return smooth, np.convolve(deriv, [1.0, -1.0])[::-1]


def _norm(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return ((x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)).astype(np.float32)


def _oracle_pass(prob, h_raw, v_raw):
    smooth, deriv = _cv_kernels()
    ellipse = np.array([[0, 0, 1, 0, 0], [1] * 5, [1] * 5, [1] * 5, [0, 0, 1, 0, 0]], bool)
    blb = ndi.label(prob >= 0.5)[0]
    blb[(np.bincount(blb.ravel()) < 10)[blb]] = 0
    blb = (blb > 0).astype(np.int32)
    sh = ndi.correlate1d(
        ndi.correlate1d(_norm(h_raw).astype(np.float64), deriv, 1, mode="mirror"), smooth, 0, mode="mirror"
    )
    sv = ndi.correlate1d(
        ndi.correlate1d(_norm(v_raw).astype(np.float64), smooth, 1, mode="mirror"), deriv, 0, mode="mirror"
    )
    overall = np.maximum(1 - _norm(sh), 1 - _norm(sv)) - (1 - blb)
    overall[overall < 0] = 0
    dist = (1.0 - overall) * blb
    g = np.array([0.25, 0.5, 0.25])
    dist = -ndi.correlate1d(ndi.correlate1d(dist, g, 1, mode="mirror"), g, 0, mode="mirror")
    marker = blb - (overall >= 0.4).astype(np.int32)
    marker[marker < 0] = 0
    marker = ndi.binary_fill_holes(marker)
    marker = ndi.binary_dilation(ndi.binary_erosion(marker, ellipse, border_value=1), ellipse, border_value=0)
    marker = ndi.label(marker)[0]
    marker[(np.bincount(marker.ravel()) < 10)[marker]] = 0
    return watershed(dist, markers=marker, mask=blb)


def _oracle(pred: np.ndarray, orientations: int) -> np.ndarray:
    pred = pred.astype(np.float32)
    if orientations == 1:
        return _oracle_pass(pred[..., 0], pred[..., 1], pred[..., 2])
    best, best_n = np.zeros(pred.shape[:2], np.int32), 0
    for a, b in ((1, 2), (2, 1)):
        for sa, sb in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
            out = _oracle_pass(pred[..., 0], pred[..., a] * sa, pred[..., b] * sb)
            n = len(np.unique(out)) - 1
            if n > best_n:
                best, best_n = out, n
    return best


# ---- parity with the reference implementations ------------------------------------------
@pytest.mark.parametrize(("orientations", "key"), [(1, "postproc_single"), (8, "postproc_nudiff8")])
def test_parity_with_reference_fixtures(parity, orientations, key):
    identical, worst_aji = 0, 1.0
    for pred, expected in zip(parity["noisy_pred"], parity[key], strict=True):
        got = instances_from_structure(pred.astype(np.float32), orientations=orientations)
        assert got.dtype == np.int32
        identical += same_up_to_relabelling(got, expected)
        if expected.any():
            worst_aji = min(worst_aji, evaluate(expected, got)["aji"])
        else:
            assert not got.any()
    n = len(parity[key])
    assert identical / n >= 0.95, f"{identical}/{n} identical up to relabelling"
    assert worst_aji >= 0.99


def test_float64_input_is_taken_as_float32_like_the_reference():
    pred = _noisy_structure(11, 30).astype(np.float64)
    pred[..., 0] = np.where(pred[..., 0] > 0.5, pred[..., 0], 0.5 - 1e-12)  # rounds to 0.5 in float32
    np.testing.assert_array_equal(instances_from_structure(pred), instances_from_structure(pred.astype(np.float32)))


def test_float16_input_equals_float32(parity):
    pred = parity["noisy_pred"][0]
    np.testing.assert_array_equal(instances_from_structure(pred), instances_from_structure(pred.astype(np.float32)))


def _noisy_structure(seed: int, n: int, shape=(72, 88)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    inst = synthetic_instance_map(shape, n_nuclei=n, seed=seed)
    s = encode_structure(inst)
    s = ndi.gaussian_filter(s, sigma=(1.0, 1.0, 0)) + rng.normal(0, 0.15, s.shape)
    s[..., 0] = np.clip(s[..., 0], 0, 1)
    return s.astype(np.float32)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 45), orientations=st.sampled_from([1, 8]))
def test_fast_paths_equal_the_direct_algorithm(seed, n, orientations):
    """Single-marker components, marker counting for the 8 orientations and the
    shift-based opening are exact: compare with the plain algorithm."""
    pred = _noisy_structure(seed, n)
    expected = _oracle(pred, orientations)
    assert same_up_to_relabelling(instances_from_structure(pred, orientations=orientations), expected)
    # the batch path (no helper thread: the flood surface is blurred on a crop)
    batch = instances_from_structures(pred[None], orientations=orientations, workers=1)[0]
    assert same_up_to_relabelling(batch, expected)


def test_components_with_overlapping_boxes_are_flooded_apart():
    """A ring of two touching nuclei around two more touching nuclei: two components with
    two markers each, the inner one's bounding box inside the outer one's. They are
    flooded side by side in one packed canvas; each must keep to its own pixels."""
    yy, xx = np.mgrid[:120, :120]
    r = np.hypot(yy - 60, xx - 60)
    inst = np.zeros((120, 120), np.int32)
    ring, inner = (r >= 30) & (r < 50), r < 20
    inst[ring & (xx < 60)], inst[ring & (xx >= 60)] = 1, 2
    inst[inner & (yy < 60)], inst[inner & (yy >= 60)] = 3, 4
    pred = encode_structure(inst)
    expected = _oracle(pred, 1)
    assert [len(np.unique(expected[inst == k])) for k in range(1, 5)] == [1, 1, 1, 1]
    assert len(np.unique(expected)) == 5  # every nucleus its own instance: both components flooded
    for got in (instances_from_structure(pred), instances_from_structures(pred[None], workers=1)[0]):
        assert same_up_to_relabelling(got, expected)


def test_numbering_is_consecutive():
    out = instances_from_structure(_noisy_structure(5, 40))
    ids = np.unique(out)
    np.testing.assert_array_equal(ids, np.arange(ids.size))


def test_recovers_nearly_every_nucleus_of_real_tiles(kumar):
    for path in sorted((kumar / "instance_maps").glob("*.png"))[:4]:
        inst = read_instance_map(path)
        out = instances_from_structure(encode_structure(inst))
        m = evaluate(inst, out)
        assert m["dq"] >= 0.97 and m["aji"] >= 0.95, (path.name, m)
        assert abs(int(out.max()) - len(np.unique(inst)) + 1) <= 0.03 * inst.max()


def test_batch_equals_one_by_one_for_any_worker_count():
    preds = np.stack([_noisy_structure(s, 30) for s in range(6)])
    singles = np.stack([instances_from_structure(p) for p in preds])
    for workers in (1, 2, 3):
        np.testing.assert_array_equal(instances_from_structures(preds, workers=workers), singles)
    eights = np.stack([instances_from_structure(p, orientations=8) for p in preds])
    np.testing.assert_array_equal(instances_from_structures(preds, orientations=8), eights)


def test_empty_and_background_predictions_give_empty_maps():
    pred = np.zeros((32, 32, 3), np.float32)
    assert not instances_from_structure(pred).any()
    assert not instances_from_structure(pred, orientations=8).any()
    pred[..., 0] = 0.4
    assert not instances_from_structure(pred).any()
    pred[5:8, 5:8, 0] = 1.0  # 9 px: under HoVer-Net's 10-pixel minimum
    assert not instances_from_structure(pred).any()


def test_inputs_are_not_modified():
    preds = np.stack([_noisy_structure(s, 20) for s in range(2)])
    before = preds.copy()
    instances_from_structure(preds[0], orientations=8)
    instances_from_structures(preds)
    np.testing.assert_array_equal(preds, before)


@pytest.mark.parametrize(
    ("pred", "kwargs", "error", "match"),
    [
        (np.zeros((8, 8, 2), np.float32), {}, ValueError, r"\(H, W, 3\).*\(8, 8, 2\)"),
        (np.zeros((8, 8, 3), np.int32), {}, TypeError, "float array.*int32"),
        (np.full((8, 8, 3), np.nan, np.float32), {}, ValueError, "192 NaN or infinite"),
        (np.zeros((8, 8, 3), np.float32), {"threshold": 1.5}, ValueError, "threshold.*1.5"),
        (np.zeros((8, 8, 3), np.float32), {"orientations": 4}, ValueError, "orientations.*4"),
        (np.zeros((8, 8, 3), np.float32), {"threshold": True}, ValueError, "threshold.*True"),
        (np.zeros((8, 8, 3), np.float32), {"orientations": True}, ValueError, "orientations.*True"),
        ([[0.0]], {}, TypeError, "numpy array"),
    ],
)
def test_bad_predictions_are_rejected(pred, kwargs, error, match):
    with pytest.raises(error, match=match):
        instances_from_structure(pred, **kwargs)


def test_bad_batches_are_rejected():
    preds = np.zeros((3, 8, 8, 3), np.float32)
    preds[2, 1, 1, 1] = np.inf
    with pytest.raises(ValueError, match=r"`preds\[2\]` contains 1 NaN or infinite"):
        instances_from_structures(preds)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        instances_from_structures(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="workers"):
        instances_from_structures(np.zeros((1, 8, 8, 3), np.float32), workers=0)
    with pytest.raises(ValueError, match="workers.*True"):
        instances_from_structures(np.zeros((1, 8, 8, 3), np.float32), workers=True)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (3, 40), (12, 12)])
def test_tiny_inputs_equal_the_direct_algorithm(shape):
    rng = np.random.default_rng(sum(shape))
    pred = rng.uniform(-1, 1, shape + (3,)).astype(np.float32)
    pred[..., 0] = (rng.random(shape) > 0.2).astype(np.float32)
    expected = _oracle(pred, 1)
    assert same_up_to_relabelling(instances_from_structure(pred), expected)
    assert same_up_to_relabelling(instances_from_structures(pred[None], workers=1)[0], expected)


def test_scale_post_processes_downscaled_structures_at_full_resolution(kumar):
    """HoVer-Net's pixel-sized filters merge and drop nuclei of 2x-downscaled structures;
    post-processing them upsampled to the original scale recovers most of them."""
    from nudiff_postproc import compact_labels, downscale_instance_map, extract_patches

    names = ["TCGA-21-5784-01Z-00-DX1", "TCGA-G9-6362-01Z-00-DX1"]
    maps = []
    for name in names:
        patches, _ = extract_patches(read_instance_map(kumar / "instance_maps" / f"{name}.png"), 128, 128)
        maps += [compact_labels(downscale_instance_map(p, 2))[0] for p in patches[::7]]
    structures = np.stack([encode_structure(m, min_size=8, centre="nearest") for m in maps])
    dq = {}
    for scale in (1, 2):
        out = instances_from_structures(structures, scale=scale)
        assert out.shape == structures.shape[:3]
        dq[scale] = np.nanmean([evaluate(m, o)["dq"] for m, o in zip(maps, out, strict=True)])
        np.testing.assert_array_equal(out[3], instances_from_structure(structures[3], scale=scale))
    assert dq[2] >= 0.85 and dq[2] > dq[1] + 0.15, dq


@pytest.mark.parametrize("scale", [0, 1.5, True])
def test_bad_scale_is_rejected(scale):
    with pytest.raises(ValueError, match="scale"):
        instances_from_structure(np.zeros((16, 16, 3), np.float32), scale=scale)
