"""Pictures for people: structures as colour, instance maps as colours or outlines, grids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["structure_rgb", "instances_rgb", "outline_overlay", "picture_grid", "structure_grid"]


def structure_rgb(structure: np.ndarray) -> np.ndarray:
    """An (H, W, 3) structure ``[fg, h, v]`` as (H, W, 3) uint8 colour: h in red, v in
    green, foreground in blue, background black."""
    fg = np.clip(structure[..., 0], 0, 1)
    rgb = np.stack([(structure[..., 1] + 1) / 2, (structure[..., 2] + 1) / 2, np.full_like(fg, 0.6)], axis=-1)
    return (np.clip(rgb * fg[..., None], 0, 1) * 255).astype(np.uint8)


def instances_rgb(inst: np.ndarray) -> np.ndarray:
    """An (H, W) instance map in colours with white outlines, (H, W, 3) uint8."""
    from skimage.color import label2rgb
    from skimage.segmentation import find_boundaries

    rgb = (label2rgb(inst, bg_label=0) * 255).astype(np.uint8)
    rgb[find_boundaries(inst, mode="inner")] = 255
    return rgb


def outline_overlay(image: np.ndarray, inst: np.ndarray, colour: tuple[int, int, int] = (0, 255, 0)) -> np.ndarray:
    """A copy of an (H, W, 3) uint8 image with the outlines of an (H, W) instance map drawn
    in ``colour`` (the inner boundary pixels of each nucleus)."""
    from skimage.segmentation import find_boundaries

    if image.shape[:2] != inst.shape:
        raise ValueError(f"image {image.shape[:2]} and instance map {inst.shape} differ in size")
    out = image.copy()
    out[find_boundaries(inst, mode="inner")] = colour
    return out


def picture_grid(rows: Sequence[Sequence[np.ndarray]], columns: int = 4) -> np.ndarray:
    """Lay out cells, each a sequence of (H, W, 3) uint8 panels shown side by side, in a grid
    of ``columns`` cells per row, separated by white lines.

    Returns
    -------
    (R * (H + 2), columns * (k * (W + 1) + 3), 3) uint8, for k panels per cell
    """
    if not rows:
        raise ValueError("no cells to draw")
    k = len(rows[0])
    h, w = rows[0][0].shape[:2]
    cell_w = k * (w + 1) + 3
    n_rows = -(-len(rows) // columns)
    grid = np.full((n_rows * (h + 2), min(columns, len(rows)) * cell_w, 3), 255, np.uint8)
    for i, panels in enumerate(rows):
        r, c = divmod(i, columns)
        y, x = r * (h + 2), c * cell_w
        for j, panel in enumerate(panels):
            grid[y : y + h, x + j * (w + 1) : x + j * (w + 1) + w] = panel
    return grid


def structure_grid(structures: np.ndarray, instance_maps: np.ndarray, columns: int = 4) -> np.ndarray:
    """A picture of (N, H, W, 3) structures beside their (N, H, W) instance maps: each cell
    the structure (h red, v green, nuclei blue), then the instance map in colours with
    white outlines. Returns uint8 RGB (see :func:`picture_grid`)."""
    cells = [(structure_rgb(s), instances_rgb(m)) for s, m in zip(structures, instance_maps, strict=True)]
    return picture_grid(cells, columns)
