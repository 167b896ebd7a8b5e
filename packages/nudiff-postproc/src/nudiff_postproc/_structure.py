"""Nuclei structures: HoVer-Net distance maps, the 3-channel encoding, dihedral transforms."""

from __future__ import annotations

from typing import Literal

import numpy as np

from ._labels import _LUT_FACTOR, compact_checked, instance_stats
from ._validate import as_image, as_instance_map

__all__ = [
    "hv_maps",
    "encode_structure",
    "transform_structure",
    "transform_instance_map",
    "transform_image",
    "DIHEDRAL",
]

Centre = Literal["hovernet", "nearest"]

#: The 8 dihedral transforms as ``(rot90, flip)`` keyword pairs, identity first.
DIHEDRAL: tuple[tuple[int, bool], ...] = tuple((k, f) for f in (False, True) for k in range(4))


def _axis_table(
    lo: np.ndarray,
    hi: np.ndarray,
    coord_sum: np.ndarray,
    area: np.ndarray,
    keep: np.ndarray,
    extent: int,
    centre: Centre,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-label lookup table of one distance map along one axis.

    Returns ``(table, base)`` such that the map value of a pixel with label ``l`` at
    coordinate ``c`` is ``table[base[l] + c]``; labels that are not kept point into a
    leading block of ``extent`` zeros.
    """
    labels = np.flatnonzero(keep)
    lo_k, hi_k = lo[labels], hi[labels]
    # centre of mass relative to the box, exactly as scipy's center_of_mass of the box
    com = (coord_sum[labels] - area[labels] * lo_k) / area[labels]
    rounded = np.floor(com + 0.5).astype(np.int64)
    # HoVer-Net puts 0 one pixel before the rounded centre (its coordinate grid starts at 1)
    zero = lo_k + rounded - (1 if centre == "hovernet" else 0)
    neg = (zero - lo_k).astype(np.float32)
    pos = (hi_k - zero).astype(np.float32)
    lengths = hi_k - lo_k + 1
    offsets = extent + np.concatenate(([0], np.cumsum(lengths)[:-1]))
    total = int(extent + lengths.sum())
    owner = np.repeat(np.arange(labels.size), lengths)
    coord = np.arange(total - extent) - np.repeat(offsets - extent, lengths) + lo_k[owner]
    x = (coord - zero[owner]).astype(np.float32)
    values = np.zeros(total - extent, np.float32)
    negative, positive = x < 0, x > 0
    values[negative] = x[negative] / neg[owner[negative]]
    values[positive] = x[positive] / pos[owner[positive]]
    table = np.concatenate((np.zeros(extent, np.float32), values))
    if total >= np.iinfo(np.int32).max:
        raise ValueError(f"distance-map table of {total} entries is too large")
    base = np.zeros(lo.size, np.int32)
    base[labels] = offsets - lo_k
    return table, base


def hv_maps(
    inst: np.ndarray, *, min_size: int = 30, centre: Centre = "hovernet", map_lines: bool = False
) -> np.ndarray:
    """Horizontal and vertical distance maps of HoVer-Net.

    For each nucleus, the horizontal map runs from -1 at its leftmost pixel through 0 at
    its centre column to +1 at its rightmost pixel, the negative and positive sides each
    scaled by their own extreme (likewise the vertical map from top to bottom).

    Parameters
    ----------
    inst : (H, W) ndarray of int
        Instance map, 0 = background, any non-negative ids. Not modified.
    min_size : int, default 30
        Nuclei of at most ``min_size`` pixels keep 0 in both maps. This is what the
        reference computation does (scikit-image >= 0.26 ``remove_small_objects``
        removes objects of size <= its bound); nuclei whose bounding box is a single
        row or column also keep 0, as in Nudiff's ``get_hv`` (unless ``map_lines``).
    centre : {"hovernet", "nearest"}, default "hovernet"
        Where the zero sits. ``"hovernet"``: one pixel left of / above the centre of
        mass rounded to the nearest pixel, exactly as HoVer-Net's and Nudiff's target
        code does (its coordinate grid starts at 1). ``"nearest"``: at the rounded
        centre of mass itself, which makes the maps exactly equivariant under flips and
        quarter turns (see :func:`transform_structure`), except where a centre of mass
        lies exactly halfway between two pixels.
    map_lines : bool, default False
        Give nuclei one pixel tall or wide their maps too, as HoVer-Net's training
        targets (``gen_instance_hv_map``) do: it grows each nucleus's box by 2 px before
        the same single-row-or-column test, which then never skips one. Such a nucleus
        gets +1 across its one row (column) with ``centre="hovernet"``, 0 with ``"nearest"``.

    Returns
    -------
    (H, W, 2) ndarray of float32
        ``[..., 0]`` the horizontal map, ``[..., 1]`` the vertical map, in [-1, 1].

    Examples
    --------
    >>> inst = np.zeros((7, 7), np.int32); inst[1:6, 1:6] = 1
    >>> hv_maps(inst, min_size=0, centre="nearest")[3, 1:6, 0]
    array([-1. , -0.5,  0. ,  0.5,  1. ], dtype=float32)
    """
    inst = as_instance_map(inst, "inst")
    if not isinstance(min_size, (int, np.integer)) or isinstance(min_size, bool) or min_size < 0:
        raise ValueError(f"`min_size` must be a non-negative integer, got {min_size!r}")
    if centre not in ("hovernet", "nearest"):
        raise ValueError(f"`centre` must be 'hovernet' or 'nearest', got {centre!r}")
    if not isinstance(map_lines, (bool, np.bool_)):
        raise TypeError(f"`map_lines` must be a bool, got {map_lines!r}")
    h, w = inst.shape
    max_id = int(inst.max())
    if max_id <= _LUT_FACTOR * inst.size + 1024:
        labels, n = inst, max_id
    else:
        labels, ids = compact_checked(inst)
        n = ids.size
    out = np.zeros((h, w, 2), np.float32)
    if n == 0:
        return out
    s = instance_stats(labels, n)
    keep = s.area > min_size
    if not map_lines:
        keep &= (s.row_max > s.row_min) & (s.col_max > s.col_min)
    keep[0] = False
    if not keep.any():
        return out
    table_h, base_h = _axis_table(s.col_min, s.col_max, s.col_sum, s.area, keep, w, centre)
    table_v, base_v = _axis_table(s.row_min, s.row_max, s.row_sum, s.area, keep, h, centre)
    # Row blocks of ~64k pixels keep every temporary small: whole-image temporaries
    # (several MB each) are handed back to the OS after each call, and faulting them in
    # again costs more than the arithmetic.
    rows_per_block = max(1, (1 << 16) // w)
    cols = np.arange(w, dtype=np.int32)
    for r0 in range(0, h, rows_per_block):
        r1 = min(h, r0 + rows_per_block)
        block = labels[r0:r1]
        index = np.take(base_h, block)
        index += cols
        out[r0:r1, :, 0] = np.take(table_h, index)
        np.take(base_v, block, out=index)
        index += np.arange(r0, r1, dtype=np.int32)[:, None]
        out[r0:r1, :, 1] = np.take(table_v, index)
    return out


def encode_structure(inst: np.ndarray, *, min_size: int = 30, centre: Centre = "hovernet") -> np.ndarray:
    """Nuclei structure of an instance map: ``[foreground, h, v]``.

    Parameters
    ----------
    inst : (H, W) ndarray of int
        Instance map, 0 = background. Not modified.
    min_size, centre
        As in :func:`hv_maps`. Use ``centre="nearest"`` for structures that are
        transformed with :func:`transform_structure` (exact equivariance).

    Returns
    -------
    (H, W, 3) ndarray of float32
        Channel 0 in {0, 1}; channels 1 and 2 the distance maps in [-1, 1].
    """
    inst = as_instance_map(inst, "inst")
    out = np.empty(inst.shape + (3,), np.float32)
    out[..., 0] = inst > 0
    out[..., 1:] = hv_maps(inst, min_size=min_size, centre=centre)
    return out


def _check_dihedral(rot90: int, flip: bool) -> int:
    if not isinstance(rot90, (int, np.integer)) or isinstance(rot90, bool):
        raise TypeError(f"`rot90` must be an integer number of quarter turns, got {rot90!r}")
    if not isinstance(flip, (bool, np.bool_)):
        raise TypeError(f"`flip` must be a bool, got {flip!r}")
    return int(rot90) % 4


def _spatial(arr: np.ndarray, k: int, flip: bool) -> np.ndarray:
    if flip:
        arr = arr[:, ::-1]
    return np.array(np.rot90(arr, k, axes=(0, 1)), order="C", copy=True)  # always a new array


def transform_instance_map(inst: np.ndarray, *, rot90: int = 0, flip: bool = False) -> np.ndarray:
    """Apply a dihedral transform to an instance map (a left-right flip, then ``rot90``
    counter-clockwise quarter turns, as ``np.rot90``). Returns a new array."""
    k = _check_dihedral(rot90, flip)
    return _spatial(as_instance_map(inst, "inst"), k, bool(flip))


def transform_image(image: np.ndarray, *, rot90: int = 0, flip: bool = False) -> np.ndarray:
    """Apply a dihedral transform to an ``(H, W)`` or ``(H, W, C)`` image (pixels only)."""
    k = _check_dihedral(rot90, flip)
    return _spatial(as_image(image, "image"), k, bool(flip))


def transform_structure(structure: np.ndarray, *, rot90: int = 0, flip: bool = False) -> np.ndarray:
    """Apply a dihedral transform to a structure, equivariantly.

    The pixels move as in :func:`transform_image`, and the distance maps change with
    the axes: a left-right flip negates ``h``; a counter-clockwise quarter turn maps
    ``(h, v)`` to ``(v, -h)``. With structures encoded with ``centre="nearest"``,
    ``transform_structure(encode_structure(m), ...) == encode_structure(
    transform_instance_map(m, ...))`` except where a centre of mass lies exactly
    halfway between two pixels.

    Parameters
    ----------
    structure : (H, W, C) ndarray of float, C >= 3
        ``[foreground, h, v, ...]``; extra channels move as pixels.
    rot90 : int
        Counter-clockwise quarter turns applied after the flip.
    flip : bool
        Left-right flip, applied first.

    Returns
    -------
    (H', W', C) ndarray
        New array of the input dtype.
    """
    k = _check_dihedral(rot90, flip)
    if not isinstance(structure, np.ndarray) or structure.ndim != 3 or structure.shape[-1] < 3:
        got = getattr(structure, "shape", type(structure).__name__)
        raise ValueError(f"`structure` must be an (H, W, 3) array [foreground, h, v], got {got}")
    if not np.issubdtype(structure.dtype, np.floating):
        raise TypeError(f"`structure` must be a float array, got dtype {structure.dtype}")
    out = _spatial(structure, k, bool(flip))
    # the value map is linear per pixel, so it commutes with moving the pixels
    h, v = out[..., 1].copy(), out[..., 2].copy()
    if flip:
        h = -h
    for _ in range(k):
        h, v = v, -h
    out[..., 1], out[..., 2] = h, v
    return out
