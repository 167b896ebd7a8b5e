"""Pictures of structures: a grid of (structure as colour, instance map as outlines)."""

from __future__ import annotations

import numpy as np

__all__ = ["structure_grid"]


def _structure_rgb(s: np.ndarray) -> np.ndarray:
    """``[fg, h, v]`` as colour: h in red, v in green, foreground in blue, background black."""
    fg = np.clip(s[..., 0], 0, 1)
    rgb = np.stack([(s[..., 1] + 1) / 2, (s[..., 2] + 1) / 2, np.full_like(fg, 0.6)], axis=-1) * fg[..., None]
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def _instances_rgb(inst: np.ndarray) -> np.ndarray:
    from skimage.color import label2rgb
    from skimage.segmentation import find_boundaries

    rgb = (label2rgb(inst, bg_label=0) * 255).astype(np.uint8)
    rgb[find_boundaries(inst, mode="inner")] = 255
    return rgb


def structure_grid(structures: np.ndarray, instance_maps: np.ndarray, columns: int = 4) -> np.ndarray:
    """A picture of (N, H, W, 3) structures beside their (N, H, W) instance maps.

    Each cell shows the structure (h red, v green, nuclei blue) and, to its right, the
    instance map in colours with white outlines; cells are separated by white lines.

    Returns
    -------
    (rows * (H + 2), columns * (2 W + 4), 3) ndarray of uint8
    """
    n, h, w, _ = structures.shape
    rows = -(-n // columns)
    grid = np.full((rows * (h + 2), columns * (2 * w + 4), 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        y, x = r * (h + 2), c * (2 * w + 4)
        grid[y : y + h, x : x + w] = _structure_rgb(structures[i])
        grid[y : y + h, x + w + 1 : x + 2 * w + 1] = _instances_rgb(instance_maps[i])
    return grid
