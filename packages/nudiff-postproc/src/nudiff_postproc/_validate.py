"""Input validation shared by the public functions (one place for every message)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_instance_map", "as_prediction", "as_image", "check_finite"]


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"array of shape {value.shape} and dtype {value.dtype}"
    return f"{type(value).__name__}"


def as_instance_map(value: Any, name: str = "inst", *, ndim: int = 2) -> np.ndarray:
    """Check that ``value`` is an integer instance map and return it as an ndarray.

    Parameters
    ----------
    value : array_like
        Candidate instance map, ``ndim`` dimensions, integer or bool dtype, no negative ids.
    name : str
        Argument name used in error messages.
    ndim : int
        Required number of dimensions (2 for one map, 3 for a stack).

    Returns
    -------
    ndarray
        The same data (no copy when ``value`` already is an ndarray).

    Raises
    ------
    TypeError
        If the dtype is not integer or bool.
    ValueError
        If the number of dimensions is wrong, the map is empty, or an id is negative or
        beyond the int64 range (a uint64 map).
    """
    if not isinstance(value, np.ndarray):
        if isinstance(value, (list, tuple)):
            value = np.asarray(value)
        else:
            raise TypeError(f"`{name}` must be a numpy array of integer ids, got {_describe(value)}")
    shape_txt = "(H, W)" if ndim == 2 else "(N, H, W)"
    if value.ndim != ndim:
        raise ValueError(f"`{name}` must be a {ndim}-D instance map {shape_txt}, got {_describe(value)}")
    if value.dtype == bool:
        value = value.astype(np.int32)
    if not np.issubdtype(value.dtype, np.integer):
        raise TypeError(
            f"`{name}` must hold integer instance ids (0 = background), got dtype {value.dtype}; "
            "convert a float map with `.astype(np.int32)` only if its values are whole numbers"
        )
    if value.size == 0:
        raise ValueError(f"`{name}` is empty ({_describe(value)}); expected a non-empty map")
    if np.issubdtype(value.dtype, np.signedinteger) and value.min() < 0:
        raise ValueError(f"`{name}` has negative instance id {int(value.min())}; ids must be >= 0 (0 = background)")
    if value.dtype == np.uint64 and value.max() > np.iinfo(np.int64).max:
        raise ValueError(
            f"`{name}` has instance id {int(value.max())}; ids must be at most {np.iinfo(np.int64).max} (int64)"
        )
    return value


def as_prediction(
    value: Any, name: str = "pred", *, ndim: int = 3, channels: int = 3, check_values: bool = True
) -> np.ndarray:
    """Check a float map with ``channels`` channels last (e.g. ``[probability, h, v]``).

    Parameters
    ----------
    value : array_like
        ``(H, W, C)`` (``ndim=3``) or ``(N, H, W, C)`` (``ndim=4``) float array, all finite.
    name : str
        Argument name used in error messages.
    ndim, channels : int
        Required number of dimensions and size of the last axis.
    check_values : bool
        Check that every value is finite and widen float16 to float32. A batch may leave
        both to :func:`check_finite` per item, where the work runs in parallel.

    Returns
    -------
    ndarray
        The input as an ndarray (float16 is widened to float32; nothing else is copied).
    """
    if not isinstance(value, np.ndarray):
        raise TypeError(f"`{name}` must be a numpy array, got {_describe(value)}")
    shape_txt = f"(H, W, {channels})" if ndim == 3 else f"(N, H, W, {channels})"
    if value.ndim != ndim or value.shape[-1] != channels:
        raise ValueError(f"`{name}` must have shape {shape_txt}, got {_describe(value)}")
    if value.size == 0:
        raise ValueError(f"`{name}` is empty ({_describe(value)})")
    if not np.issubdtype(value.dtype, np.floating):
        raise TypeError(
            f"`{name}` must be a float array (probability in [0, 1], h and v in [-1, 1]), got dtype {value.dtype}"
        )
    return check_finite(value, name) if check_values else value


def check_finite(value: np.ndarray, name: str) -> np.ndarray:
    """Raise a ValueError naming ``name`` if ``value`` holds NaN or inf; widen float16."""
    if value.dtype == np.float16:
        value = value.astype(np.float32)
    # a float64 sum is finite exactly when every element is (NaN and inf propagate, and
    # float32 data cannot overflow it); the elementwise test runs only to count them
    if not np.isfinite(value.sum(dtype=np.float64)) and not np.isfinite(value).all():
        bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
        raise ValueError(f"`{name}` contains {bad} NaN or infinite values; expected finite numbers")
    return value


def as_image(value: Any, name: str = "image") -> np.ndarray:
    """Check an image: ``(H, W)`` or ``(H, W, C)`` array of any numeric dtype."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"`{name}` must be a numpy array, got {_describe(value)}")
    if value.ndim not in (2, 3) or value.size == 0:
        raise ValueError(f"`{name}` must be a non-empty (H, W) or (H, W, C) array, got {_describe(value)}")
    return value
