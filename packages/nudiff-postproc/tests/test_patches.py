"""extract_patches / stitch."""

from __future__ import annotations

import numpy as np
import pytest
from nudiff_postproc import extract_patches, patch_origins, stitch


def test_paper_layout_on_a_1000_tile():
    origins = patch_origins((1000, 1000), 256, 128)
    rows = np.unique(origins[:, 0])
    np.testing.assert_array_equal(rows, [0, 128, 256, 384, 512, 640, 744])
    assert len(origins) == 49


def test_exact_fit_adds_no_extra_window():
    np.testing.assert_array_equal(np.unique(patch_origins((512, 512), 256, 128)[:, 1]), [0, 128, 256])


@pytest.mark.parametrize("shape", [(300, 410), (256, 256), (300, 410, 3)])
def test_stitch_inverts_extract(shape):
    arr = np.random.default_rng(0).integers(0, 1000, shape).astype(np.int32)
    patches, origins = extract_patches(arr, 128, (100, 77))
    assert patches.shape[1:3] == (128, 128)
    np.testing.assert_array_equal(stitch(patches, origins, arr.shape[:2]), arr)
    np.testing.assert_allclose(stitch(patches.astype(float), origins, arr.shape[:2], mode="mean"), arr)


def test_patches_are_copies():
    arr = np.zeros((64, 64), np.int32)
    patches, _ = extract_patches(arr, 32, 32)
    patches[0] += 5
    assert not arr.any()


def test_errors():
    with pytest.raises(ValueError, match=r"patch size \(256, 256\) does not fit.*\(100, 300\)"):
        extract_patches(np.zeros((100, 300)), 256, 128)
    with pytest.raises(ValueError, match="stride"):
        extract_patches(np.zeros((100, 100)), 50, 0)
    with pytest.raises(ValueError, match="origins"):
        stitch(np.zeros((2, 8, 8)), np.zeros((3, 2), int), (16, 16))
    with pytest.raises(ValueError, match="outside"):
        stitch(np.zeros((1, 8, 8)), np.array([[10, 0]]), (16, 16))
    with pytest.raises(ValueError, match=r"`stride` \(5, 5\) is larger than `size` \(2, 2\).*uncovered"):
        extract_patches(np.zeros((10, 10)), 2, 5)
    with pytest.raises(ValueError, match=r"`shape` must be the output's \(H, W\), two positive integers, got 16"):
        stitch(np.zeros((1, 8, 8)), np.zeros((1, 2), int), 16)
    with pytest.raises(TypeError, match=r"`origins` must hold integer pixel positions, got dtype float64"):
        stitch(np.zeros((1, 8, 8)), np.zeros((1, 2)), (16, 16))


def _argmax_upsample(inst: np.ndarray, factor: int) -> np.ndarray:
    """The definition, the slow way: every id's indicator upsampled over the whole map."""
    from nudiff_postproc import upsample

    ids = np.unique(np.concatenate([[0], inst.ravel()]))
    stack = np.stack([upsample((inst == i).astype(np.float32), factor) for i in ids])
    return ids[stack.argmax(axis=0)]  # argmax takes the first, i.e. the lower id, on ties


@pytest.mark.parametrize("factor", [1, 2, 3, 4])
def test_upsample_instance_map_is_the_argmax_of_upsampled_indicators_and_downscales_back(factor):
    from nudiff_postproc import downscale_instance_map, synthetic_instance_map, upsample_instance_map

    inst = synthetic_instance_map((40, 48), n_nuclei=14, seed=factor)  # touching nuclei, some at the border
    inst[0:5, 0:6] = 777  # a large id in a corner
    inst[39, 20:23] = 5  # a sliver on the last row, apart from the rest of nucleus 5
    before = inst.copy()
    up = upsample_instance_map(inst, factor)
    np.testing.assert_array_equal(inst, before)  # not modified
    assert up.shape == (40 * factor, 48 * factor) and up.dtype == inst.dtype
    np.testing.assert_array_equal(up, _argmax_upsample(inst, factor))
    np.testing.assert_array_equal(downscale_instance_map(up, factor), inst)
    assert set(np.unique(up)) == set(np.unique(inst))


def test_upsample_instance_map_checks_its_arguments():
    from nudiff_postproc import upsample_instance_map

    with pytest.raises(ValueError, match="`factor` must be a positive integer, got 0"):
        upsample_instance_map(np.zeros((4, 4), np.int32), 0)
    empty = upsample_instance_map(np.zeros((3, 5), np.uint16), 2)
    assert empty.shape == (6, 10) and empty.dtype == np.uint16 and not empty.any()
    with pytest.raises((ValueError, TypeError), match="inst"):
        upsample_instance_map(np.zeros((4, 4), np.float32) + 0.5, 2)
