"""The bundled example data: procedural H&E-like tiles, and the bilinear upsample."""

from __future__ import annotations

import numpy as np
import pytest
from nudiff_postproc import (
    downscale_image,
    read_image,
    read_instance_map,
    synthetic_he_image,
    synthetic_instance_map,
    upsample,
    write_synthetic_dataset,
)


def test_he_image_is_deterministic_and_stains_nuclei_with_haematoxylin():
    from skimage.color import rgb2hed

    inst = synthetic_instance_map((256, 256), n_nuclei=90, seed=1)
    before = inst.copy()
    image = synthetic_he_image(inst, seed=1)
    np.testing.assert_array_equal(inst, before)  # input untouched
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, synthetic_he_image(inst, seed=1))
    assert not np.array_equal(image, synthetic_he_image(inst, seed=2))
    hed = rgb2hed(image)
    inside, outside = hed[..., 0][inst > 0].mean(), hed[..., 0][inst == 0].mean()
    assert inside > 2 * outside  # real Kumar patches: about 2.6-3.3 (nudiff-histo's alignment)
    eosin_bg = hed[..., 1][inst == 0].mean()
    assert eosin_bg > hed[..., 1][inst > 0].mean()  # the stroma is pinker than the nuclei


def test_he_image_without_nuclei_and_bad_input():
    image = synthetic_he_image(np.zeros((64, 64), np.int32))
    assert image.shape == (64, 64, 3)
    with pytest.raises(ValueError, match="`inst` must be an \\(H, W\\) integer instance map, got shape \\(4, 4, 3\\)"):
        synthetic_he_image(np.zeros((4, 4, 3), np.int32))
    with pytest.raises(ValueError, match="dtype float32"):
        synthetic_he_image(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="non-negative ids, got minimum -2"):
        synthetic_he_image(np.full((4, 4), -2, np.int32))


def test_write_synthetic_dataset_writes_readable_pairs(tmp_path):
    names = write_synthetic_dataset(tmp_path / "ds", 3, size=128, seed=5)
    assert names == ["synthetic_000", "synthetic_001", "synthetic_002"]
    for i, name in enumerate(names):
        inst = read_instance_map(tmp_path / "ds" / "instance_maps" / f"{name}.png")
        np.testing.assert_array_equal(inst, synthetic_instance_map((128, 128), n_nuclei=128 * 128 // 700, seed=5 + i))
        image = read_image(tmp_path / "ds" / "images" / f"{name}.png")
        np.testing.assert_array_equal(image, synthetic_he_image(inst, seed=5 + i))
    with pytest.raises(ValueError, match="`n_tiles` must be a positive integer, got 0"):
        write_synthetic_dataset(tmp_path / "x", 0)
    with pytest.raises(ValueError, match="`size` must be an integer >= 64, got 32"):
        write_synthetic_dataset(tmp_path / "x", 1, size=32)
    assert not (tmp_path / "x").exists()


def test_upsample_closed_forms():
    ramp = np.tile(np.arange(8, dtype=np.float32), (8, 1))  # value = column
    up = upsample(ramp, 2)
    assert up.shape == (16, 16) and up.dtype == np.float32
    # pixel areas aligned: output column j sits at input coordinate (j + 0.5) / 2 - 0.5
    expected = np.clip((np.arange(16) + 0.5) / 2 - 0.5, 0, 7)
    np.testing.assert_allclose(up[3], expected, atol=1e-6)
    constant = np.full((5, 7, 3), 9, np.uint8)
    np.testing.assert_array_equal(upsample(constant, 3), np.full((15, 21, 3), 9, np.uint8))
    rows, cols = np.mgrid[:16, :16]
    plane = np.repeat((3 * rows + 5 * cols)[..., None], 3, -1).astype(np.uint8)
    back = downscale_image(upsample(plane, 2), 2)  # a linear image comes back (rounding aside) off the border
    assert np.abs(back.astype(int) - plane.astype(int))[1:-1, 1:-1].max() <= 1
    with pytest.raises(ValueError, match="`factor` must be a positive integer, got 0"):
        upsample(ramp, 0)
    with pytest.raises(ValueError, match="`array` must be \\(H, W\\) or \\(H, W, C\\)"):
        upsample(np.zeros(4), 2)
