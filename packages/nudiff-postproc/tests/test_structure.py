"""hv_maps / encode_structure / dihedral transforms."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nudiff_postproc import (
    DIHEDRAL,
    encode_structure,
    hv_maps,
    synthetic_instance_map,
    transform_image,
    transform_instance_map,
    transform_structure,
)
from scipy import ndimage as ndi


def test_hv_maps_match_reference_fixtures(parity):
    for inst, structure, name in zip(parity["inst"], parity["structure"], parity["names"], strict=True):
        got = hv_maps(inst)
        assert got.dtype == np.float32 and got.shape == inst.shape + (2,)
        assert np.abs(got - structure[..., 1:]).max() <= 1e-6, name


def test_encode_structure_matches_reference_fixtures(parity):
    for inst, structure in zip(parity["inst"], parity["structure"], strict=True):
        np.testing.assert_array_equal(encode_structure(inst), structure)


def test_square_nucleus_closed_form():
    inst = np.zeros((9, 9), np.int32)
    inst[2:7, 1:8] = 4  # 5 rows x 7 columns, centre of mass (4, 4)
    near = hv_maps(inst, min_size=0, centre="nearest")
    np.testing.assert_allclose(near[4, 1:8, 0], [-1, -2 / 3, -1 / 3, 0, 1 / 3, 2 / 3, 1], rtol=1e-6)
    np.testing.assert_allclose(near[2:7, 4, 1], [-1, -0.5, 0, 0.5, 1], rtol=1e-6)
    # HoVer-Net's zero sits one pixel before the rounded centre of mass
    ref = hv_maps(inst, min_size=0)
    np.testing.assert_allclose(ref[4, 1:8, 0], [-1, -0.5, 0, 0.25, 0.5, 0.75, 1], rtol=1e-6)
    assert (near[inst == 0] == 0).all()


def test_min_size_keeps_nuclei_of_at_most_min_size_pixels_at_zero():
    inst = np.zeros((20, 40), np.int32)
    inst[2:8, 2:7] = 1  # 30 px
    inst[10:16, 10:15] = 2
    inst[15, 10] = 0  # 29 px
    inst[2:8, 20:25] = 3
    inst[8, 20] = 3  # 31 px
    hv = hv_maps(inst, min_size=30)
    assert not hv[inst == 1].any() and not hv[inst == 2].any()
    assert hv[inst == 3].any()
    assert hv_maps(inst, min_size=0)[inst == 1].any()


def test_line_shaped_nuclei_keep_zero_as_the_reference():
    inst = np.zeros((50, 50), np.int32)
    inst[5, 2:45] = 1  # one row, 43 px
    inst[10:48, 30] = 2  # one column
    assert not hv_maps(inst).any()


def test_large_and_sparse_ids_give_the_same_maps():
    inst = synthetic_instance_map((96, 96), n_nuclei=25, seed=3)
    sparse = np.where(inst > 0, inst.astype(np.int64) * 85_000_000 + 7, 0)
    np.testing.assert_array_equal(hv_maps(sparse), hv_maps(inst))
    np.testing.assert_array_equal(hv_maps(inst.astype(np.uint16)), hv_maps(inst))


def test_disconnected_id_is_one_nucleus():
    inst = np.zeros((30, 30), np.int32)
    inst[2:8, 2:8] = 1
    inst[20:26, 20:26] = 1
    hv = hv_maps(inst, min_size=0, centre="nearest")
    # one centre of mass between the parts: every left part pixel is negative in h
    assert (hv[2:8, 2:8, 0] < 0).all() and (hv[20:26, 20:26, 0] > 0).all()


def test_empty_map_gives_zeros():
    assert not hv_maps(np.zeros((16, 16), np.uint8)).any()
    s = encode_structure(np.zeros((16, 16), np.int32))
    assert s.shape == (16, 16, 3) and not s.any()


def _half_centre_ids(inst: np.ndarray) -> set[int]:
    ids = np.unique(inst)[1:]
    coms = np.array(ndi.center_of_mass(np.ones_like(inst), inst, ids)).reshape(-1, 2)
    half = np.isclose(np.mod(coms, 1.0), 0.5).any(axis=1)
    return set(ids[half].tolist())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(0, 3), flip=st.booleans(), n=st.integers(0, 40))
def test_transform_then_encode_equals_encode_then_transform(seed, k, flip, n):
    inst = synthetic_instance_map((64, 80), n_nuclei=n, seed=seed)
    moved = transform_instance_map(inst, rot90=k, flip=flip)
    lhs = transform_structure(encode_structure(inst, centre="nearest"), rot90=k, flip=flip)
    rhs = encode_structure(moved, centre="nearest")
    ok = np.ones(moved.shape, bool)
    for inst_id in _half_centre_ids(inst):  # the documented exception
        ok &= moved != inst_id
    np.testing.assert_allclose(lhs[ok], rhs[ok], atol=1e-6)


def test_equivariance_holds_on_real_crops(parity):
    for inst in parity["inst"][:24]:
        skip = _half_centre_ids(inst)
        for k, flip in DIHEDRAL:
            moved = transform_instance_map(inst, rot90=k, flip=flip)
            lhs = transform_structure(encode_structure(inst, centre="nearest"), rot90=k, flip=flip)
            rhs = encode_structure(moved, centre="nearest")
            ok = ~np.isin(moved, list(skip))
            np.testing.assert_allclose(lhs[ok], rhs[ok], atol=1e-6)


def test_identity_transforms_return_new_arrays():
    inst = synthetic_instance_map((16, 16), n_nuclei=3, seed=0)
    s = encode_structure(inst)
    assert not np.shares_memory(transform_instance_map(inst), inst)
    assert not np.shares_memory(transform_structure(s), s)
    assert not np.shares_memory(transform_image(s[..., 0]), s)


def test_dihedral_group_laws():
    rng = np.random.default_rng(0)
    s = rng.uniform(-1, 1, (12, 17, 3)).astype(np.float32)
    np.testing.assert_array_equal(transform_structure(s, rot90=4), s)
    twice = transform_structure(transform_structure(s, flip=True), flip=True)
    np.testing.assert_array_equal(twice, s)
    # quarter turn: (h, v) -> (v, -h), pixels as np.rot90
    q = transform_structure(s, rot90=1)
    np.testing.assert_array_equal(q[..., 1], np.rot90(s[..., 2]))
    np.testing.assert_array_equal(q[..., 2], -np.rot90(s[..., 1]))
    images = {transform_image(np.arange(12).reshape(3, 4), rot90=k, flip=f).tobytes() for k, f in DIHEDRAL}
    assert len(images) == 8


def test_inputs_are_not_modified():
    inst = synthetic_instance_map((48, 48), n_nuclei=10, seed=1)
    before = inst.copy()
    s = encode_structure(inst)
    s_before = s.copy()
    hv_maps(inst)
    transform_structure(s, rot90=1, flip=True)
    transform_instance_map(inst, rot90=3)
    np.testing.assert_array_equal(inst, before)
    np.testing.assert_array_equal(s, s_before)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (np.zeros((4, 4), np.float32), TypeError, "integer instance ids.*float32"),
        (-np.ones((4, 4), np.int32), ValueError, "negative instance id -1"),
        (np.zeros((2, 4, 4), np.int32), ValueError, r"2-D instance map.*\(2, 4, 4\)"),
        (np.zeros((0, 4), np.int32), ValueError, "empty"),
        ("map.png", TypeError, "numpy array.*str"),
    ],
)
def test_bad_instance_maps_are_rejected(value, error, match):
    with pytest.raises(error, match=match):
        hv_maps(value)


def test_bad_options_are_rejected():
    inst = np.zeros((8, 8), np.int32)
    with pytest.raises(ValueError, match="min_size"):
        hv_maps(inst, min_size=-1)
    with pytest.raises(ValueError, match="centre"):
        hv_maps(inst, centre="middle")
    with pytest.raises(TypeError, match="rot90"):
        transform_structure(np.zeros((4, 4, 3), np.float32), rot90=1.5)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        transform_structure(np.zeros((4, 4, 2), np.float32))
