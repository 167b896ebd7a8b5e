"""Sliding-window patches with the last row and column flush to the border, and stitching."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "PatchGeometry",
    "PATCH_GEOMETRY",
    "patch_origins",
    "extract_patches",
    "stitch",
    "downscale_instance_map",
    "downscale_image",
    "upsample",
    "upsample_instance_map",
]


@dataclass(frozen=True)
class PatchGeometry:
    """How a preset cuts tiles: patches of ``patch_size`` every ``stride`` pixels, then
    downscaled by ``downscale`` (instance maps by nearest neighbour before any encoding,
    images by block means); ``image_size`` is the size the models see."""

    patch_size: int
    stride: int
    downscale: int

    @property
    def image_size(self) -> int:
        return self.patch_size // self.downscale

    @property
    def min_size(self) -> int:
        """HoVer-Net's minimum nucleus area for distance maps (30 px), in downscaled pixels."""
        return max(1, round(30 / self.downscale**2))


#: The patch geometry of each model preset, shared by the structure and histology models.
PATCH_GEOMETRY: dict[str, PatchGeometry] = {
    "tiny-64": PatchGeometry(patch_size=128, stride=64, downscale=2),
    "small-128": PatchGeometry(patch_size=256, stride=128, downscale=2),
    "paper-256": PatchGeometry(patch_size=256, stride=128, downscale=1),  # the paper's
}


def _check_factor(factor: int, shape: tuple[int, ...], name: str) -> None:
    if not isinstance(factor, (int, np.integer)) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"`factor` must be a positive integer, got {factor!r}")
    if shape[0] % factor or shape[1] % factor:
        raise ValueError(f"{name} of shape {tuple(shape)} is not divisible by the downscale factor {factor}")


def downscale_instance_map(inst: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour downscale of an (H, W) instance map: the centre pixel of each
    ``factor`` x ``factor`` block, so ids stay ids (distance maps are then computed at the
    new size, never resized). Returns a new (H / factor, W / factor) array, same dtype."""
    _check_factor(factor, inst.shape, "instance map")
    return np.ascontiguousarray(inst[factor // 2 :: factor, factor // 2 :: factor]).copy()


def downscale_image(image: np.ndarray, factor: int) -> np.ndarray:
    """Block-mean downscale of an (H, W, C) uint8 image (area averaging, rounded).

    Returns (H / factor, W / factor, C) uint8."""
    if image.ndim != 3:
        raise ValueError(f"`image` must be (H, W, C), got shape {image.shape}")
    _check_factor(factor, image.shape, "image")
    if factor == 1:
        return image.copy()
    h, w, c = image.shape
    blocks = image.reshape(h // factor, factor, w // factor, factor, c).astype(np.float32)
    return np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)


def upsample(array: np.ndarray, factor: int) -> np.ndarray:
    """Bilinear upsample of an (H, W) or (H, W, C) array ``factor`` times, pixel areas
    aligned (as torch's ``interpolate(..., align_corners=False)``; the border repeats).

    The way back up from ``downscale_image`` and the structure's path to full scale in
    ``instances_from_structure(..., scale=k)``. uint8 input gives uint8 output (rounded);
    any other dtype gives float32.

    Returns
    -------
    (H * factor, W * factor[, C]) ndarray
    """
    from scipy.ndimage import zoom

    if not isinstance(array, np.ndarray) or array.ndim not in (2, 3):
        raise ValueError(f"`array` must be (H, W) or (H, W, C), got shape {getattr(array, 'shape', None)}")
    if not isinstance(factor, (int, np.integer)) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"`factor` must be a positive integer, got {factor!r}")
    zooms = (factor, factor) + (1,) * (array.ndim - 2)
    up = zoom(array.astype(np.float32, copy=False), zooms, order=1, mode="nearest", grid_mode=True)
    if array.dtype == np.uint8:
        return np.clip(np.rint(up), 0, 255).astype(np.uint8)
    return up


def upsample_instance_map(inst: np.ndarray, factor: int) -> np.ndarray:
    """An (H, W) instance map ``factor`` times larger, outlines smooth: each new pixel
    takes the id (background 0 included) whose indicator, upsampled as :func:`upsample`
    upsamples an image, is largest there (the lower id on ties). So the map lies on the same
    pixel grid as the image upsampled with it, ``downscale_instance_map`` of the result
    gives ``inst`` back exactly (at the pixel it keeps, the indicator of the block's own
    source pixel is at least 9/16), and ids are kept.

    Parameters
    ----------
    inst : (H, W) ndarray of int
        Instance map, 0 = background. Not modified.
    factor : int
        Positive integer.

    Returns
    -------
    (H * factor, W * factor) ndarray, ``inst``'s dtype
    """
    from scipy import ndimage as ndi

    from ._labels import compact_checked
    from ._validate import as_instance_map

    inst = as_instance_map(inst, "inst")
    h, w = inst.shape
    best = upsample((inst == 0).astype(np.float32), factor)  # checks `factor`; the background competes as an id
    out = np.zeros(best.shape, inst.dtype)
    compact, ids = compact_checked(inst)
    # each nucleus within its box grown by the one pixel bilinear interpolation reaches
    # into: there the upsampled indicator equals that of the whole map (0 beyond it)
    for label, (rows, cols) in enumerate(ndi.find_objects(compact), start=1):
        r0, r1, c0, c1 = max(rows.start - 1, 0), min(rows.stop + 1, h), max(cols.start - 1, 0), min(cols.stop + 1, w)
        up = upsample((compact[r0:r1, c0:c1] == label).astype(np.float32), factor)
        box = (slice(r0 * factor, r1 * factor), slice(c0 * factor, c1 * factor))
        wins = up > best[box]  # strictly: a tie keeps the lower id, seen first
        best[box][wins] = up[wins]
        out[box][wins] = ids[label - 1]
    return out


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        pair: tuple = (value, value)
    elif isinstance(value, (tuple, list, np.ndarray)):
        pair = tuple(value)
    else:
        pair = ()
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"`{name}` must be a positive integer or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def _starts(length: int, size: int, stride: int) -> np.ndarray:
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)  # the last window sits flush with the border
    return np.array(starts, dtype=np.int64)


def patch_origins(shape: tuple[int, ...], size: int | tuple[int, int], stride: int | tuple[int, int]) -> np.ndarray:
    """Top-left corners of the windows :func:`extract_patches` takes, row-major.

    Returns
    -------
    (N, 2) ndarray of int64
        ``(row, col)`` of each window.
    """
    sh, sw = _pair(size, "size")
    th, tw = _pair(stride, "stride")
    if th > sh or tw > sw:
        raise ValueError(
            f"`stride` {(th, tw)} is larger than `size` {(sh, sw)}: the windows would leave pixels between them "
            "uncovered; use a stride of at most the size"
        )
    if len(shape) < 2 or shape[0] < sh or shape[1] < sw:
        raise ValueError(f"patch size {(sh, sw)} does not fit in an array of shape {tuple(shape)}")
    rows, cols = _starts(shape[0], sh, th), _starts(shape[1], sw, tw)
    return np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(-1, 2)


def extract_patches(
    array: np.ndarray, size: int | tuple[int, int], stride: int | tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Cut an array into overlapping windows, as the Nudiff paper's code does.

    Windows start every ``stride`` pixels; where the last one would not reach the border,
    one more is added flush with it, so every pixel is covered and no padding is needed.

    Parameters
    ----------
    array : (H, W) or (H, W, C) ndarray
        Image, instance map or structure. Not modified.
    size : int or (int, int)
        Window height and width.
    stride : int or (int, int)
        Step between window origins, at most ``size`` (a larger step would leave gaps).

    Returns
    -------
    patches : (N, h, w[, C]) ndarray
        Copies of the windows, same dtype as ``array``.
    origins : (N, 2) ndarray of int64
        ``(row, col)`` of each window's top-left corner.

    Examples
    --------
    >>> patches, origins = extract_patches(np.zeros((1000, 1000)), 256, 128)
    >>> patches.shape, origins[:, 0].max()
    ((49, 256, 256), np.int64(744))
    """
    if not isinstance(array, np.ndarray) or array.ndim not in (2, 3):
        raise ValueError(
            f"`array` must be an (H, W) or (H, W, C) ndarray, got {getattr(array, 'shape', type(array).__name__)}"
        )
    origins = patch_origins(array.shape, size, stride)
    sh, sw = _pair(size, "size")
    patches = np.stack([array[r : r + sh, c : c + sw] for r, c in origins])
    return patches, origins


def stitch(
    patches: np.ndarray,
    origins: np.ndarray,
    shape: tuple[int, int],
    *,
    mode: Literal["centre", "mean"] = "centre",
) -> np.ndarray:
    """Put patches back together.

    Parameters
    ----------
    patches : (N, h, w[, C]) ndarray
    origins : (N, 2) ndarray of int
        Top-left corners, as returned by :func:`extract_patches`.
    shape : (int, int)
        ``(H, W)`` of the output.
    mode : {"centre", "mean"}
        ``"centre"``: each pixel comes from the patch in which it lies farthest from the
        patch border (the usual choice for network outputs and label maps; any dtype).
        ``"mean"``: overlapping values are averaged (float output).

    Returns
    -------
    (H, W[, C]) ndarray
        Pixels covered by no patch are 0.
    """
    patches = np.asarray(patches)
    origins = np.asarray(origins)
    if patches.ndim not in (3, 4):
        raise ValueError(f"`patches` must be (N, h, w) or (N, h, w, C), got shape {patches.shape}")
    if origins.shape != (patches.shape[0], 2):
        raise ValueError(f"`origins` must have shape ({patches.shape[0]}, 2), got {origins.shape}")
    if not np.issubdtype(origins.dtype, np.integer):
        raise TypeError(f"`origins` must hold integer pixel positions, got dtype {origins.dtype}")
    if isinstance(shape, (int, np.integer)) or not isinstance(shape, (tuple, list)):
        raise ValueError(f"`shape` must be the output's (H, W), two positive integers, got {shape!r}")
    h, w = _pair(shape, "shape")
    ph, pw = patches.shape[1:3]
    if (origins < 0).any() or (origins[:, 0] + ph > h).any() or (origins[:, 1] + pw > w).any():
        raise ValueError(f"`origins` place {ph}x{pw} patches outside an output of shape {(h, w)}")
    if mode not in ("centre", "mean"):
        raise ValueError(f"`mode` must be 'centre' or 'mean', got {mode!r}")
    extra = patches.shape[3:]
    if mode == "mean":
        total = np.zeros((h, w) + extra, np.float64)
        count = np.zeros((h, w), np.float64)
        for patch, (r, c) in zip(patches, origins, strict=True):
            total[r : r + ph, c : c + pw] += patch
            count[r : r + ph, c : c + pw] += 1
        covered = count > 0
        count = count.reshape(count.shape + (1,) * len(extra))
        return np.where(covered.reshape(count.shape), total / np.maximum(count, 1), 0.0)
    # distance of each patch pixel to the nearest patch border
    rr = np.minimum(np.arange(ph), np.arange(ph)[::-1])
    cc = np.minimum(np.arange(pw), np.arange(pw)[::-1])
    depth = np.minimum(rr[:, None], cc[None, :])
    best = np.full((h, w), -1, np.int64)
    out = np.zeros((h, w) + extra, patches.dtype)
    for patch, (r, c) in zip(patches, origins, strict=True):
        region = best[r : r + ph, c : c + pw]
        better = depth > region
        region[better] = depth[better]
        out[r : r + ph, c : c + pw][better] = patch[better]
    return out
