"""The OpenCV-equivalent building blocks against their definitions."""

from __future__ import annotations

import numpy as np
import pytest
from nudiff_postproc._opencv_equiv import (
    ELLIPSE_5X5,
    gaussian_blur_3x3,
    normalize_minmax,
    open_ellipse_5x5,
    sobel,
    sobel_kernels,
)
from scipy import ndimage as ndi


def test_sobel_kernels_are_opencvs():
    # cv2.getDerivKernels(1, 0, 3) and (1, 0, 5)
    smooth, deriv = sobel_kernels(3)
    np.testing.assert_array_equal(smooth, [1, 2, 1])
    np.testing.assert_array_equal(deriv, [-1, 0, 1])
    smooth, deriv = sobel_kernels(5)
    np.testing.assert_array_equal(smooth, [1, 4, 6, 4, 1])
    np.testing.assert_array_equal(deriv, [-1, -2, 0, 2, 1])
    smooth, deriv = sobel_kernels(21)
    assert smooth.sum() == 2**20 and deriv.sum() == 0 and deriv[-1] == 1 and deriv[0] == -1


# below 32 px a side and above 768: scipy's correlate1d; between: banded matrix products in
# blocks of 32, with partial last blocks where the side is no multiple of 32
@pytest.mark.parametrize(
    "shape", [(1, 1), (2, 9), (9, 2), (31, 47), (32, 32), (33, 95), (256, 256), (70, 300), (40, 768), (800, 40)]
)
def test_filters_equal_scipy_with_reflect_101(shape):
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    x64 = x.astype(np.float64)
    smooth, deriv = sobel_kernels(21)
    want_h = ndi.correlate1d(ndi.correlate1d(x64, deriv, 1, mode="mirror"), smooth, 0, mode="mirror")
    want_v = ndi.correlate1d(ndi.correlate1d(x64, smooth, 1, mode="mirror"), deriv, 0, mode="mirror")
    # the matrix products sum in another order than correlate1d: equal to float64 rounding
    # of the output's scale (21 x 21 terms of up to 2**20 * 184756 times the input)
    for got, want in ((sobel(x, 1), want_h), (sobel(x, 0), want_v)):
        assert got.shape == want.shape and got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-13 * np.abs(want).max())
    x = x64
    g = np.array([0.25, 0.5, 0.25])
    np.testing.assert_allclose(
        gaussian_blur_3x3(x), ndi.correlate1d(ndi.correlate1d(x, g, 1, mode="mirror"), g, 0, mode="mirror"), atol=1e-15
    )


@pytest.mark.parametrize("shape", [(1, 1), (3, 4), (5, 5), (40, 57)])
def test_opening_equals_binary_morphology_with_opencv_borders(shape):
    rng = np.random.default_rng(1)
    for _ in range(20):
        m = ndi.binary_dilation(rng.random(shape) > 0.85, iterations=int(rng.integers(0, 3)))
        want = ndi.binary_dilation(ndi.binary_erosion(m, ELLIPSE_5X5, border_value=1), ELLIPSE_5X5, border_value=0)
        np.testing.assert_array_equal(open_ellipse_5x5(m), want)


def test_normalize_minmax():
    x = np.array([[2.0, 4.0], [6.0, 10.0]], np.float32)
    np.testing.assert_allclose(normalize_minmax(x), [[0, 0.25], [0.5, 1]])
    assert normalize_minmax(np.full((3, 3), 7.0)).max() == 0.0  # constant input: OpenCV gives 0
    assert normalize_minmax(x.astype(np.float64)).dtype == np.float32
