"""Synthetic pairs at a segmentation network's scale: upsampled to the tiles' resolution and
laid side by side into tiles as large as its input window."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from nudiff_postproc import (
    PATCH_GEOMETRY,
    compact_labels,
    read_image,
    read_instance_map,
    upsample,
    upsample_instance_map,
    write_image,
    write_instance_map,
)
from nudiff_postproc._folders import dataset_pairs
from nudiff_postproc._io import lies_within, replace_folder

__all__ = ["write_seg_tiles", "seg_tile_grid"]


def seg_tile_grid(preset: str, window: int) -> int:
    """Pairs side by side (per axis) in one tile: enough for a ``window`` px input window
    at the tiles' resolution (a pair covers ``patch_size`` px there)."""
    if preset not in PATCH_GEOMETRY:
        raise ValueError(f"unknown histology preset {preset!r}; choose one of {sorted(PATCH_GEOMETRY)}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"`window` (--window) must be a positive integer, got {window!r}")
    return -(-window // PATCH_GEOMETRY[preset].patch_size)


def _check_out(samples: Path, out: Path) -> None:
    """Refuse an ``out`` whose replacement would delete the samples or another folder."""
    if lies_within(out, samples) or lies_within(samples, out):
        raise ValueError(
            f"--out '{out}' is, holds or lies inside --samples '{samples}' (replacing it would delete the samples); "
            "give another output folder"
        )
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_seg_tiles(out))):
        raise ValueError(
            f"--out '{out}' already exists and is not a seg-tiles output (no manifest.json of one); "
            "give a new folder, or remove it"
        )


def _is_seg_tiles(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and {"tiles", "grid", "tile_size"} <= manifest.keys()


def write_seg_tiles(
    samples: str | os.PathLike[str], out: str | os.PathLike[str], *, preset: str, grid: int
) -> dict[str, object]:
    """Turn a folder of synthetic pairs (``nudiff-histo sample``) into a dataset folder for
    segmentation training.

    Each image is upsampled by the preset's downscale factor (bilinear) to the tiles'
    resolution, and the instance map it was painted for with it
    (:func:`nudiff_postproc.upsample_instance_map`: smooth outlines on the image's pixel
    grid, every nucleus kept, the map's own downscale gives it back). Until 2026-12-04 the
    map was made again by post-processing the sample's structure upsampled; that structure
    is the condition re-encoded from the map, whose sharp h/v maps the watershed reads
    differently: on the demo's 32 pairs 30 maps changed, nuclei painted in the image were
    lost or split, 15.5% of the painted nuclei's pixels labelled background. ``grid`` x
    ``grid`` pairs, in name order, are laid side by side into one tile (ids kept apart),
    and a remainder that cannot fill a tile is left out. The folder is built beside ``out`` and renamed into
    place: an earlier seg-tiles output there is replaced; any other existing folder, and an
    ``out`` that is, holds or lies inside ``samples``, is refused (``ValueError``).

    Parameters
    ----------
    samples : path
        ``images/NAME.png`` and ``instance_maps/NAME.png`` (the map each image was painted for).
    out : path
        The dataset folder to write: ``images/mosaic_KKKK.png``,
        ``instance_maps/mosaic_KKKK.png`` and ``manifest.json``.
    preset : str
        The histology preset the pairs were painted with (its patch geometry).
    grid : int
        Pairs per axis in one tile (:func:`seg_tile_grid`).

    Returns
    -------
    dict
        The manifest written.
    """
    if preset not in PATCH_GEOMETRY:
        raise ValueError(f"unknown histology preset {preset!r}; choose one of {sorted(PATCH_GEOMETRY)}")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"`grid` must be a positive integer, got {grid!r}")
    geometry = PATCH_GEOMETRY[preset]
    side = geometry.image_size * geometry.downscale
    src, out = Path(samples), Path(out)
    _check_out(src, out)
    pairs = {name: (image, inst) for name, image, inst in dataset_pairs(src)}
    names = sorted(pairs)
    groups = [names[i : i + grid * grid] for i in range(0, len(names) - grid * grid + 1, grid * grid)]
    if not groups:
        raise ValueError(
            f"'{src}' holds {len(names)} synthetic pair(s); a segmentation tile needs {grid * grid} ({grid}x{grid})"
        )
    tmp = out.with_name(f"{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for k, group in enumerate(groups):
            image = np.zeros((grid * side, grid * side, 3), np.uint8)
            inst = np.zeros((grid * side, grid * side), np.int32)
            for j, name in enumerate(group):
                image_path, map_path = pairs[name]
                painted, painted_for = read_image(image_path), read_instance_map(map_path)
                for path, shape in ((image_path, painted.shape[:2]), (map_path, painted_for.shape)):
                    if shape != (geometry.image_size, geometry.image_size):
                        raise ValueError(
                            f"'{path}' is {shape[0]}x{shape[1]}; the {preset} preset paints "
                            f"{geometry.image_size}x{geometry.image_size}"
                        )
                r, c = divmod(j, grid)
                # numbered 1..N first: ids beyond int32 (a .npy or .tif map) must not wrap
                cell = upsample_instance_map(compact_labels(painted_for)[0], geometry.downscale)
                cell = np.where(cell > 0, cell + inst.max(), 0)
                rows, cols = slice(r * side, (r + 1) * side), slice(c * side, (c + 1) * side)
                inst[rows, cols] = cell
                image[rows, cols] = upsample(painted, geometry.downscale)
            write_image(tmp / "images" / f"mosaic_{k:04d}.png", image)
            write_instance_map(tmp / "instance_maps" / f"mosaic_{k:04d}.png", inst)
        manifest = {
            "source": str(src),
            "pairs_used": len(groups) * grid * grid,
            "tiles": len(groups),
            "grid": grid,
            "upsampled": geometry.downscale,
            "tile_size": grid * side,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        replace_folder(tmp, out)  # a kill never leaves a half-deleted ``out``
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
