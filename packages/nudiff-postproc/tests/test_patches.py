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
