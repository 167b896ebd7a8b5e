"""The OpenCV operations of HoVer-Net's post-processing, with scipy.ndimage.

Each function states which OpenCV call it reproduces and how. nudiff-postproc must not
depend on OpenCV; these are the exact kernels and border rules OpenCV uses, so that the
results match the reference implementation.
"""

from __future__ import annotations

from functools import lru_cache
from math import comb

import numpy as np
from numpy.lib.stride_tricks import as_strided, sliding_window_view
from scipy import ndimage as ndi

__all__ = ["normalize_minmax", "sobel", "gaussian_blur_3x3", "open_ellipse_5x5", "ELLIPSE_5X5"]

#: ``cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))``
ELLIPSE_5X5 = np.array(
    [[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]], dtype=bool
)

#: OpenCV's fixed kernel for a 3-tap Gaussian with sigma <= 0 (``small_gaussian_tab``)
_GAUSS3 = np.array([0.25, 0.5, 0.25])


@lru_cache(maxsize=8)
def sobel_kernels(ksize: int) -> tuple[np.ndarray, np.ndarray]:
    """The 1-D kernels of ``cv2.getDerivKernels(1, 0, ksize)``.

    Returns
    -------
    smooth, deriv : (ksize,) ndarray of float64
        Binomial smoothing ``C(ksize-1, k)`` and the first difference of the binomial of
        order ``ksize-2`` (negative on the left), both applied as correlations.
    """
    smooth = np.array([comb(ksize - 1, k) for k in range(ksize)], dtype=np.float64)
    b = [comb(ksize - 2, k) for k in range(ksize - 1)] + [0]
    deriv = np.array([(b[j - 1] if j > 0 else 0) - b[j] for j in range(ksize)], dtype=np.float64)
    smooth.flags.writeable = False
    deriv.flags.writeable = False
    return smooth, deriv


def normalize_minmax(src: np.ndarray, *, overwrite: bool = False) -> np.ndarray:
    """``cv2.normalize(src, None, 0, 1, cv2.NORM_MINMAX, dtype=cv2.CV_32F)``.

    OpenCV forms ``scale = 1 / (max - min)`` and ``shift = -min * scale`` in float64
    (scale 0 when ``max - min`` is below float64 epsilon) and converts with
    ``src * scale + shift``; for float32 input the conversion runs in float32.
    ``overwrite=True`` lets a float64 ``src`` (a temporary) hold the intermediate.
    """
    lo, hi = float(src.min()), float(src.max())
    delta = hi - lo
    scale = 1.0 / delta if delta > np.finfo(np.float64).eps else 0.0
    shift = -lo * scale
    if src.dtype == np.float32:
        out = src * np.float32(scale)
        out += np.float32(shift)
        return out
    out = np.multiply(src, scale, out=src if overwrite else None)
    out += shift
    return out.astype(np.float32)


def _along_rows(src: np.ndarray, kernel: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Correlate every row (axis 1) with ``kernel``, border reflect-101, float64 out."""
    return ndi.correlate1d(src, kernel, axis=1, mode="mirror", output=np.float64 if out is None else out)


def _along_cols_inplace(src: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate every column (axis 0) of the C-contiguous float64 temporary ``src``:
    rows of a transposed copy, about twice as fast as a strided pass over axis 0; the
    result goes into ``src``'s buffer and comes back as a transposed (Fortran) view."""
    transposed = np.ascontiguousarray(src.T)
    return _along_rows(transposed, kernel, out=src.reshape(transposed.shape)).T


#: output pixels per block of the banded matrix products in :func:`sobel` (32 measured
#: best with 16 and 64 on 256 px maps: larger blocks waste more products on the band's
#: zeros, smaller ones make the products too small for BLAS)
_BLOCK = 32
_SKEW = 8  # spare float64 samples per row of the column pass's buffer
#: the largest side the products are used for: they took 0.4-0.6x of correlate1d's time
#: from 256 to 768 px a side and 1.05-1.15x at 1000 px, where the buffers outgrow the cache
_BLOCKED_MAX = 768


def _reflect_borders(padded: np.ndarray, radius: int) -> None:
    """Fill the first and last ``radius`` rows of ``padded`` in place from the ``n > radius``
    rows between them, by ``BORDER_REFLECT_101`` (``dcb|abcd|cba``)."""
    n = padded.shape[0] - 2 * radius
    padded[:radius] = padded[2 * radius : radius : -1]
    padded[n + radius :] = padded[n + radius - 2 : n - 2 : -1]


@lru_cache(maxsize=8)
def _band(ksize: int, derivative: bool) -> np.ndarray:
    """``(_BLOCK + ksize - 1, _BLOCK)`` float64: column ``c`` holds the Sobel kernel
    (derivative or smoothing) at rows ``c .. c + ksize - 1``, so that a window of
    ``_BLOCK + ksize - 1`` padded samples times this matrix is the correlation at the
    window's ``_BLOCK`` output positions."""
    kernel = sobel_kernels(ksize)[0 if not derivative else 1]
    band = np.zeros((_BLOCK + ksize - 1, _BLOCK))
    for c in range(_BLOCK):
        band[c : c + ksize, c] = kernel
    band.flags.writeable = False
    return band


def _sobel_blocked(src: np.ndarray, axis: int, ksize: int) -> np.ndarray:
    """:func:`sobel` as two banded matrix products (BLAS): each block of ``_BLOCK``
    outputs along a line is a window of padded samples times :func:`_band`. About twice
    as fast as ``correlate1d`` for the 21-tap kernels on 256 px maps, and equal to it up
    to the order of float64 summation (relative differences of ~1e-16)."""
    h, w = src.shape
    radius = ksize // 2
    span = _BLOCK + 2 * radius
    wide, tall = -(-w // _BLOCK) * _BLOCK, -(-h // _BLOCK) * _BLOCK
    # rows first, as OpenCV: reflect-101 padded float64 rows, zeros past the last block
    padded = np.empty((h, wide + 2 * radius))
    padded[:, radius : w + radius] = src
    _reflect_borders(padded[:, : w + 2 * radius].T, radius)
    padded[:, w + 2 * radius :] = 0.0
    windows = sliding_window_view(padded, span, axis=1)[:, ::_BLOCK].transpose(1, 0, 2)
    rows = np.matmul(windows, _band(ksize, axis == 1))  # (wide / B, h, B)
    # then columns: the padded copy also undoes the block layout of ``rows``
    # (rows _SKEW samples longer than needed: a row stride of a power of two, 8 KiB for
    # 1000 px maps, made the products below 1.8x slower through cache-set conflicts)
    buffer = np.empty((tall + 2 * radius, wide + _SKEW))
    padded = buffer[:, :wide]
    blocks = as_strided(buffer[radius:], (h, wide // _BLOCK, _BLOCK), (buffer.strides[0], _BLOCK * 8, 8))
    blocks[...] = rows.transpose(1, 0, 2)
    _reflect_borders(padded[: h + 2 * radius], radius)
    padded[h + 2 * radius :] = 0.0
    windows = sliding_window_view(padded, span, axis=0)[::_BLOCK]  # (tall / B, wide, span)
    out = np.matmul(_band(ksize, axis == 0).T, windows.transpose(0, 2, 1))  # (tall / B, B, wide)
    return out.reshape(tall, wide)[:h, :w]


def sobel(src: np.ndarray, axis: int, ksize: int = 21) -> np.ndarray:
    """``cv2.Sobel(src, cv2.CV_64F, dx, dy, ksize)`` with ``dx=1`` for ``axis=1`` and
    ``dy=1`` for ``axis=0``: separable, float64, border ``BORDER_REFLECT_101``
    (scipy's ``"mirror"``), the row filter applied first as in OpenCV.

    Maps of ``_BLOCK`` (and ``ksize``) to ``_BLOCKED_MAX`` pixels a side go through banded
    matrix products (:func:`_sobel_blocked`), others through ``scipy.ndimage.correlate1d``;
    the two agree to float64 rounding. The result may be a non-contiguous view.
    """
    if max(_BLOCK, ksize) <= min(src.shape) and max(src.shape) <= _BLOCKED_MAX:
        return _sobel_blocked(src, axis, ksize)
    smooth, deriv = sobel_kernels(ksize)
    if axis == 1:
        return _along_cols_inplace(_along_rows(src, deriv), smooth)
    return _along_cols_inplace(_along_rows(src, smooth), deriv)


def gaussian_blur_3x3(src: np.ndarray) -> np.ndarray:
    """``cv2.GaussianBlur(src, (3, 3), 0)``: OpenCV's fixed ``[1/4, 1/2, 1/4]`` kernel
    (the tabulated kernel it uses for 3 taps and sigma 0), border ``BORDER_REFLECT_101``
    (numpy's ``"reflect"`` padding), rows first. ``src`` is 2-D float64."""
    h, w = src.shape
    p = np.empty((h + 2, w + 2), src.dtype)
    p[1:-1, 1:-1] = src
    p[0, 1:-1], p[-1, 1:-1] = src[min(1, h - 1)], src[max(h - 2, 0)]
    p[:, 0], p[:, -1] = (p[:, 2], p[:, w - 1]) if w > 1 else (p[:, 1], p[:, 1])
    rows = 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]
    return 0.25 * rows[:-2] + 0.5 * rows[1:-1] + 0.25 * rows[2:]


def _shift_reduce(mask: np.ndarray, erode: bool) -> np.ndarray:
    # ELLIPSE_5X5 is the union of a 3x5 rectangle and a 5x1 column. Erosion by a union
    # of structuring elements is the intersection of the erosions (dilation: the union),
    # and each rectangle separates into 1-D runs of shifted ANDs (ORs) of a padded copy.
    h, w = mask.shape
    p = np.full((h + 4, w + 4), erode, bool)
    p[2:-2, 2:-2] = mask
    op = np.logical_and if erode else np.logical_or

    def combine(views: list[np.ndarray]) -> np.ndarray:
        acc = views[0].copy()
        for view in views[1:]:
            op(acc, view, out=acc)
        return acc

    rows = combine([p[:, i : i + w] for i in range(5)])
    wide = combine([rows[i : i + h] for i in range(1, 4)])
    col = p[:, 2 : 2 + w]
    tall = combine([col[i : i + h] for i in range(5)])
    return op(wide, tall, out=wide)


def open_ellipse_5x5(mask: np.ndarray) -> np.ndarray:
    """``cv2.morphologyEx(mask, cv2.MORPH_OPEN, ELLIPSE_5X5)`` on a binary mask.

    OpenCV's default border for erosion is the maximum value (the border never erodes)
    and for dilation the minimum (the border never dilates).

    Parameters
    ----------
    mask : (H, W) ndarray of bool

    Returns
    -------
    (H, W) ndarray of bool
    """
    return _shift_reduce(_shift_reduce(mask.astype(bool, copy=False), True), False)
