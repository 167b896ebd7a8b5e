"""Dataset folders (DESIGN.md layout) and structure files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._io import IMAGE_SUFFIXES, INSTANCE_MAP_SUFFIXES, _check_readable, _load, read_image, read_instance_map
from ._validate import as_prediction

__all__ = ["list_files", "dataset_pairs", "read_pair", "read_structure", "read_name_list"]

STRUCTURE_SUFFIXES = (".npy", ".png")


def list_files(folder: str | os.PathLike[str], suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    """Files of ``folder`` with one of ``suffixes``, by stem (sorted). Errors name the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder not found: '{folder}'")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes and not path.name.startswith("."):
            if path.stem in files:
                raise ValueError(
                    f"'{folder}' holds two {what} files named '{path.stem}': {files[path.stem].name}, {path.name}"
                )
            files[path.stem] = path
    if not files:
        raise ValueError(f"'{folder}' holds no {what} files (expected {', '.join(suffixes)})")
    return files


def read_name_list(path: str | os.PathLike[str], what: str = "name list") -> list[str]:
    """Names, one per line, as ``nudiff-postproc subset`` writes them and split files list
    tiles: surrounding whitespace is stripped and blank lines are skipped; every other line
    is a name, whatever it holds (file names may hold spaces and ``#``: there is no comment
    syntax).

    Raises
    ------
    FileNotFoundError
        ``path`` is not a file (``what`` names it).
    ValueError
        ``path`` is not UTF-8 text, or names nothing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: '{path}'")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"'{path}' is not UTF-8 text ({exc}); expected one name per line") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"'{path}' names nothing; expected one name per line")
    return names


def dataset_pairs(folder: str | os.PathLike[str]) -> list[tuple[str, Path, Path]]:
    """``(name, image, instance_map)`` of a dataset folder: ``images/NAME.*`` and
    ``instance_maps/NAME.*`` with the same stem. Every image needs its map."""
    folder = Path(folder)
    images = list_files(folder / "images", IMAGE_SUFFIXES, "image")
    maps = list_files(folder / "instance_maps", INSTANCE_MAP_SUFFIXES, "instance map")
    missing = sorted(set(images) - set(maps))
    if missing:
        raise ValueError(
            f"'{folder}': {len(missing)} image(s) have no instance map in instance_maps/, e.g. {missing[:3]}"
        )
    return [(name, images[name], maps[name]) for name in images]


def read_pair(
    image_path: str | os.PathLike[str], map_path: str | os.PathLike[str], *, strict: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image and its instance map, checked to have the same height and width;
    ``strict`` as in :func:`read_image` (for models of stain colour)."""
    image, inst = read_image(image_path, strict=strict), read_instance_map(map_path)
    if image.shape[:2] != inst.shape:
        raise ValueError(f"'{image_path}' is {image.shape[:2]} but its instance map '{map_path}' is {inst.shape}")
    return image, inst


def read_structure(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a structure file as ``(H, W, 3)`` float32 ``[probability, h, v]``.

    ``.npy``: a float array, used as is. ``.png``: an RGB picture in the Nudiff code's
    convention, channel 0 = probability * 255, channels 1 and 2 = (h + 1) / 2 * 255.
    """
    path = Path(path)
    suffix = _check_readable(path, STRUCTURE_SUFFIXES, "structure")
    if suffix == ".npy":
        arr = _load(path, lambda: np.load(path, allow_pickle=False), "a .npy structure")
        if isinstance(arr, np.ndarray) and arr.dtype.kind in "iu":
            raise TypeError(f"'{path}' holds integers (dtype {arr.dtype}); a .npy structure is float [prob, h, v]")
        arr = as_prediction(arr, f"structure '{path}'")
        return arr.astype(np.float32, copy=False)
    import imageio.v3 as iio

    img = np.asarray(_load(path, lambda: iio.imread(path, plugin="pillow"), "a PNG structure"))
    if img.ndim != 3 or img.shape[-1] < 3 or img.dtype != np.uint8:
        raise ValueError(f"'{path}' has shape {img.shape} and dtype {img.dtype}; a PNG structure is 8-bit RGB")
    out = img[..., :3].astype(np.float32) / 255.0
    out[..., 1:] = out[..., 1:] * 2.0 - 1.0
    return out
