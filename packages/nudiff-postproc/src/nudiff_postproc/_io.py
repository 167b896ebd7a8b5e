"""Instance-map I/O: PNG/TIFF/NPY/HoVer-Net .mat, MoNuSeg XML, GeoJSON for QuPath."""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ._labels import compact_checked
from ._validate import as_instance_map

__all__ = [
    "read_instance_map",
    "write_instance_map",
    "read_image",
    "write_image",
    "read_monuseg_xml",
    "to_geojson",
    "atomic_path",
    "replace_folder",
    "check_output_outside",
    "remove_stale_parts",
    "INSTANCE_MAP_SUFFIXES",
    "IMAGE_SUFFIXES",
]

INSTANCE_MAP_SUFFIXES = (".png", ".tif", ".tiff", ".mat", ".npy")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
_PNG_MAX = 65535
#: (suffixes, largest id, the format's name, what to write instead) for write_instance_map
_ID_LIMITS = (
    ((".png",), _PNG_MAX, "a 16-bit PNG", "a .tif"),
    ((".tif", ".tiff"), int(np.iinfo(np.uint32).max), "a 32-bit TIFF", "a .npy"),
    ((".mat",), int(np.iinfo(np.int32).max), "HoVer-Net's int32 .mat layout", "a .npy"),
)


def read_npz_cache(path: str | os.PathLike[str], keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The arrays ``keys`` of a cache file written with ``np.savez``, or None when the file
    is absent or unreadable (truncated, corrupt, missing a key): the caller then rebuilds
    it, and its atomic write replaces the broken one."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); rename it to ``path`` when
    the block succeeds, delete it when it fails. Readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh hidden name that the writer creates itself, so that the file gets the usual
    # permissions (mkstemp would make it private to the owner)
    tmp_path = path.parent / f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:12]}.part{path.suffix}"
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


#: the names :func:`atomic_path` gives its temporary files (``.STEM.PID.HEX12.partSUFFIX``)
_PART_NAME = re.compile(r"^\..+\.\d+\.[0-9a-f]{12}\.part(\.[^.]+)?$")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes (64 hex digits), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lies_within(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both resolved: links followed)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def replace_folder(staging: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Put the finished folder ``staging`` at ``target``, replacing whatever is there, so
    that no reader and no kill ever finds a half-deleted ``target``: the old one is renamed
    aside (``.NAME.old.PID``), the new one renamed in, then the old one deleted. A kill
    between the two renames leaves no ``target`` (the old one aside, which the next call
    removes), never a mix of the two."""
    staging, target = Path(staging), Path(target)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.old.*"):
        shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()
    aside = None
    if target.exists() or target.is_symlink():
        aside = target.with_name(f".{target.name}.old.{os.getpid()}")
        os.replace(target, aside)
    os.replace(staging, target)
    if aside is not None:
        shutil.rmtree(aside) if aside.is_dir() and not aside.is_symlink() else aside.unlink()


def remove_stale_parts(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that :func:`atomic_path` left in ``folder`` (not its
    subfolders) when a writer was killed (SIGKILL) between creating and renaming them.
    Only for a folder that one process writes at a time (a training's run folder): another
    writer's file in progress would be deleted too. Returns the files deleted."""
    removed = (
        [p for p in Path(folder).iterdir() if p.is_file() and _PART_NAME.match(p.name)] if Path(folder).is_dir() else []
    )
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def check_output_outside(out: str | os.PathLike[str], inputs: dict[str, str | os.PathLike[str] | None]) -> None:
    """Refuse an output folder that is one of the input folders or lies inside one (a
    training's checkpoints and logs written among its data), naming both flags.
    ``inputs``: flag -> folder (None: not given)."""
    for flag, folder in inputs.items():
        if folder is not None and lies_within(out, folder):
            raise ValueError(f"--out '{out}' is or lies inside {flag} '{folder}'; give an output folder outside it")


def check_output_file(path: str | os.PathLike[str] | None, flag: str = "--out") -> None:
    """Refuse an output file path that is an existing folder, or lies under a file, before
    the work whose result it would hold (``os.replace`` onto a folder fails only at the end,
    naming a temporary file). None (no file asked for) passes."""
    if path is None:
        return
    if Path(path).is_dir():
        raise ValueError(f"{flag} '{path}' is a folder; expected the path of the file to write")
    for parent in Path(path).parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{flag} '{path}': '{parent}' is a file, not a folder")


def _check_readable(path: Path, suffixes: tuple[str, ...], what: str) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: '{path}'")
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise ValueError(f"'{path}': unsupported {what} format '{suffix}'; expected one of {', '.join(suffixes)}")
    if path.stat().st_size == 0:
        raise ValueError(f"'{path}' is an empty file; expected a {what}")
    return suffix


def _load(path: Path, loader: Callable[[], Any], what: str) -> Any:
    """``loader()``, with any error of a corrupt file (the decoders raise many kinds:
    scipy's .mat reader an IndexError or MatReadError on a truncated file) turned into a
    ValueError that names the file."""
    try:
        return loader()
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - every decoder failure is "this file is not readable"
        raise ValueError(f"'{path}' could not be read as {what} ({type(exc).__name__}: {exc})") from exc


def _read_tiff(path: Path) -> np.ndarray:
    """tifffile, or Pillow for compressions tifffile needs ``imagecodecs`` for (LZW, as in
    the MoNuSeg tiles): Pillow decodes them without another dependency."""
    import tifffile

    try:
        return tifffile.imread(path)
    except ValueError as exc:
        if "imagecodecs" not in str(exc):
            raise
        import imageio.v3 as iio

        return iio.imread(path, plugin="pillow")


#: Pillow modes whose channels are not red, green and blue (a CMYK JPEG's fourth channel is
#: its black ink, not alpha): read through Pillow's conversion to RGB
_OTHER_COLOUR_MODES = ("CMYK", "YCbCr")
#: TIFF photometric interpretations read through Pillow's conversion to RGB (tifffile
#: returns their raw channels, or a palette's indices)
_PILLOW_TIFFS = ("PALETTE", "SEPARATED", "YCBCR")


def _read_with_pillow(path: Path, mode_for: dict[str, str]) -> np.ndarray:
    """The file's pixels through imageio's Pillow plugin, converted to ``mode_for[mode]``
    when Pillow opens it in one of those modes (its header alone is read to see which)."""
    import imageio.v3 as iio
    from PIL import Image

    with Image.open(path) as image:
        mode = image.mode
    return iio.imread(path, plugin="pillow", mode=mode_for.get(mode))


def _read_colour_image(path: Path, tiff: bool) -> np.ndarray:
    """An image's pixels as RGB(A) or grey, through Pillow's colour conversion for ink
    (CMYK) and YCbCr, and for palette TIFFs (tifffile returns their indices; Pillow's PNG
    reader expands palettes itself)."""
    if tiff:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            photometric = tif.pages[0].photometric
        if photometric in (tifffile.PHOTOMETRIC.CIELAB, tifffile.PHOTOMETRIC.ICCLAB, tifffile.PHOTOMETRIC.ITULAB):
            raise ValueError(f"a {photometric.name} TIFF: its channels are L*a*b*, not RGB; convert it to RGB first")
        if photometric not in tuple(tifffile.PHOTOMETRIC[name] for name in _PILLOW_TIFFS):
            return _read_tiff(path)
        import imageio.v3 as iio

        return iio.imread(path, plugin="pillow", mode="RGB")
    return _read_with_pillow(path, dict.fromkeys(_OTHER_COLOUR_MODES, "RGB"))


def _read_png_map(path: Path) -> np.ndarray:
    """A PNG's pixels as stored: the indices of a palette PNG (label tools such as labelme
    write instance ids as palette indices; Pillow would otherwise expand them to colours)."""
    return _read_with_pillow(path, {"P": "P"})


def read_instance_map(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an instance map.

    Parameters
    ----------
    path : str or PathLike
        ``.png`` (8- or 16-bit grey, or a palette PNG: its indices are the ids),
        ``.tif``/``.tiff``, ``.npy``, or a HoVer-Net ``.mat`` with an ``inst_map`` array.

    Returns
    -------
    (H, W) ndarray of int32 (int64 when ids exceed the int32 range)

    Raises
    ------
    FileNotFoundError, ValueError, TypeError
        Missing, empty, corrupt or non-integer files, with the path in the message.
    """
    path = Path(path)
    suffix = _check_readable(path, INSTANCE_MAP_SUFFIXES, "instance map")
    if suffix == ".png":
        arr = _load(path, lambda: _read_png_map(path), "a PNG instance map")
    elif suffix in (".tif", ".tiff"):
        arr = _load(path, lambda: _read_tiff(path), "a TIFF instance map")
    elif suffix == ".npy":
        arr = _load(path, lambda: np.load(path, allow_pickle=False), "a .npy instance map")
    else:
        from scipy.io import loadmat

        mat = _load(path, lambda: loadmat(path), "a MATLAB .mat file")
        if "inst_map" not in mat:
            keys = sorted(k for k in mat if not k.startswith("__"))
            raise ValueError(f"'{path}' has no 'inst_map' array (HoVer-Net layout); it holds {keys}")
        arr = mat["inst_map"]
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        raise ValueError(
            f"'{path}' is a colour image of shape {arr.shape}; expected a single-channel map of "
            "integer instance ids (0 = background)"
        )
    whole = suffix in (".mat", ".npy") and np.issubdtype(arr.dtype, np.floating) and arr.size
    if whole and np.all(np.mod(arr, 1) == 0):
        # HoVer-Net's .mat files often hold whole numbers as double, and its compute_stats.py
        # reads .npy maps of any dtype (astype int32)
        if np.abs(arr).max() >= 2.0**63:
            raise ValueError(f"'{path}' holds the id {np.abs(arr).max():g}; instance ids must fit int64")
        arr = arr.astype(np.int64)
    arr = as_instance_map(arr, f"instance map '{path}'")
    if int(arr.max()) <= np.iinfo(np.int32).max:
        return arr.astype(np.int32, copy=False)
    return arr.astype(np.int64, copy=False)


def write_instance_map(path: str | os.PathLike[str], inst: np.ndarray) -> Path:
    """Write an instance map atomically.

    Parameters
    ----------
    path : str or PathLike
        ``.png`` (uint16; ids up to 65,535), ``.tif``/``.tiff`` (uint16 or uint32,
        zlib-compressed; ids up to 4,294,967,295), ``.npy`` (int32 or int64: any id), or
        ``.mat`` (HoVer-Net layout: ``inst_map``, ``inst_uid``, ``inst_centroid`` as x, y;
        int32, ids up to 2,147,483,647).
    inst : (H, W) ndarray of int
        Instance map, 0 = background. Not modified.

    Returns
    -------
    Path
        The written path.

    Raises
    ------
    ValueError
        An unknown suffix, or an id the format cannot hold (ids are never wrapped).
    """
    path = Path(path)
    inst = as_instance_map(inst, "inst")
    suffix = path.suffix.lower()
    if suffix not in INSTANCE_MAP_SUFFIXES:
        raise ValueError(f"'{path}': cannot write instance maps as '{suffix}'; use {', '.join(INSTANCE_MAP_SUFFIXES)}")
    max_id = int(inst.max())
    for suffixes, limit, what, instead in _ID_LIMITS:
        if suffix in suffixes and max_id > limit:
            raise ValueError(
                f"'{path}': the largest id is {max_id}, more than {what} holds ({limit}); write {instead} instead "
                "(or renumber the ids with compact_labels)"
            )
    with atomic_path(path) as tmp:
        if suffix == ".png":
            import imageio.v3 as iio

            iio.imwrite(tmp, inst.astype(np.uint16), plugin="pillow", extension=".png")
        elif suffix in (".tif", ".tiff"):
            import tifffile

            dtype = np.uint16 if max_id <= _PNG_MAX else np.uint32
            tifffile.imwrite(tmp, inst.astype(dtype), compression="zlib")
        elif suffix == ".npy":
            with open(tmp, "wb") as fh:
                np.save(fh, inst.astype(np.int32 if max_id <= np.iinfo(np.int32).max else np.int64))
        else:
            from scipy.io import savemat

            ids = np.unique(inst)
            ids = ids[ids != 0]
            centroids = np.zeros((ids.size, 2))
            if ids.size:
                from ._labels import compact_checked, instance_stats

                compact, _ = compact_checked(inst)
                s = instance_stats(compact, ids.size)
                centroids = np.stack([s.col_sum[1:] / s.area[1:], s.row_sum[1:] / s.area[1:]], axis=1)
            savemat(
                tmp,
                {
                    "inst_map": inst.astype(np.int32),
                    "inst_uid": ids.reshape(-1, 1).astype(np.int32),
                    "inst_centroid": centroids,
                },
                do_compression=True,
            )
    return path


def read_image(path: str | os.PathLike[str], *, strict: bool = False) -> np.ndarray:
    """Read an RGB image (PNG, TIFF or JPEG) as ``(H, W, 3)`` uint8.

    An alpha channel is dropped (as ``cv2.imread`` does in HoVer-Net; CoNSeP's PNGs carry
    one) and a grayscale image is repeated into three channels. CMYK and YCbCr images and palette
    images are converted to their RGB colours; CIELab TIFFs are refused, naming the file. With ``strict=True``, for
    models of stain colour, a grayscale image and an alpha channel that is not fully opaque
    (whose colours would be ambiguous) are refused with a ``ValueError`` naming the file.
    """
    path = Path(path)
    suffix = _check_readable(path, IMAGE_SUFFIXES, "image")
    tiff = suffix in (".tif", ".tiff")
    arr = np.asarray(_load(path, lambda: _read_colour_image(path, tiff), "a TIFF image" if tiff else "an image"))
    if arr.ndim == 2 and strict:
        raise ValueError(f"'{path}' is a grayscale image of shape {arr.shape}; expected RGB (H, W, 3)")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"'{path}' has shape {arr.shape}; expected an RGB image (H, W, 3)")
    if arr.dtype != np.uint8:
        raise TypeError(f"'{path}' has dtype {arr.dtype}; expected 8-bit RGB (uint8)")
    if strict and arr.shape[-1] == 4 and (arr[..., 3] != 255).any():
        translucent = int(np.count_nonzero(arr[..., 3] != 255))
        raise ValueError(
            f"'{path}' has an alpha channel that is not opaque at {translucent} pixel(s); "
            "expected RGB (H, W, 3) or fully opaque RGBA"
        )
    return np.ascontiguousarray(arr[..., :3])


def write_image(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write an ``(H, W, 3)`` uint8 RGB image as PNG or TIFF, atomically."""
    path = Path(path)
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        got = f"shape {getattr(image, 'shape', None)}, dtype {getattr(image, 'dtype', type(image).__name__)}"
        raise ValueError(f"`image` must be an (H, W, 3) uint8 RGB array, got {got}")
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(tmp, image, photometric="rgb")
        elif suffix == ".png":
            import imageio.v3 as iio

            iio.imwrite(tmp, image, plugin="pillow", extension=".png")
        else:
            raise ValueError(f"'{path}': cannot write images as '{suffix}'; use .png or .tif")
    return path


#: A pixel centre exactly on a polygon's left or top edge is outside, on its right or bottom
#: edge inside (the fill of the 13 MoNuSeg XML files that matches their instance maps: mean
#: AJI 0.995 against them, 0.981 with both edges inside; an integer square of side s fills
#: s x s pixels): the polygon is moved this far right and down before an inclusive fill.
_EDGE_NUDGE = 1e-9


def _region_pixels(xy: np.ndarray, shape: tuple[int, int], *, ellipse: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the pixels a region covers: an ellipse (two vertices: the
    corners of its box) or a polygon, vertices 1-based."""
    from skimage.draw import ellipse as fill_ellipse
    from skimage.draw import polygon

    rows, cols = xy[:, 1] - 1 + _EDGE_NUDGE, xy[:, 0] - 1 + _EDGE_NUDGE
    if ellipse:
        (r0, r1), (c0, c1) = sorted(rows), sorted(cols)
        if r1 - r0 <= 0 or c1 - c0 <= 0:
            return np.zeros(0, np.intp), np.zeros(0, np.intp)
        return fill_ellipse((r0 + r1) / 2, (c0 + c1) / 2, (r1 - r0) / 2, (c1 - c0) / 2, shape=shape)
    return polygon(rows, cols, shape=shape)


def read_monuseg_xml(path: str | os.PathLike[str], shape: tuple[int, int]) -> np.ndarray:
    """Rasterise an Aperio ImageScope XML annotation (MoNuSeg) into an instance map.

    Every ``<Region>`` is one nucleus, numbered in file order from 1. Vertex coordinates
    in these files are 1-based, so the polygon ``(X - 1, Y - 1)`` is filled: the pixels
    whose centres lie inside it, a centre on a left or top edge counting as outside and
    one on a right or bottom edge as inside (an axis-aligned integer square of side s
    covers s x s pixels). Where outlines overlap, the earlier region keeps the pixels.
    Both rules are those of the instance maps distributed with MoNuSeg: against the 13
    XML files of the Kumar training set, mean AJI 0.995 (0.962 with the later region
    winning and both edges inside). An ellipse region (``Type="2"``: two vertices, the
    corners of its box) is filled as the ellipse in that box; negative regions
    (``NegativeROA="1"``: areas cut out of an annotation, not nuclei) and regions with
    fewer than 3 vertices are skipped (a file with no other region, or with a non-finite
    vertex, raises ValueError).

    Parameters
    ----------
    path : str or PathLike
        The ``.xml`` file.
    shape : (int, int)
        ``(H, W)`` of the tile (1000 x 1000 for MoNuSeg).

    Returns
    -------
    (H, W) ndarray of int32
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"XML annotation file not found: '{path}'")
    if (
        not isinstance(shape, (tuple, list))
        or len(shape) != 2
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise ValueError(f"`shape` must be (H, W) with positive integers, got {shape!r}")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"'{path}' is not valid XML ({exc})") from exc
    regions = list(root.iter("Region"))
    if not regions:
        raise ValueError(f"'{path}' has no <Region> elements; expected Aperio ImageScope annotations")
    inst = np.zeros(tuple(int(s) for s in shape), np.int32)
    label = 0
    for region in regions:
        try:
            xy = np.array([[float(v.attrib["X"]), float(v.attrib["Y"])] for v in region.iter("Vertex")])
        except (KeyError, ValueError) as exc:
            raise ValueError(
                f"'{path}': region {region.attrib.get('Id', '?')} has a malformed <Vertex> ({exc})"
            ) from exc
        if len(xy) and not np.isfinite(xy).all():
            bad = xy[~np.isfinite(xy).all(axis=1)][0]
            raise ValueError(
                f"'{path}': region {region.attrib.get('Id', '?')} has a vertex at X={bad[0]}, Y={bad[1]}; "
                "expected finite pixel coordinates"
            )
        ellipse = region.attrib.get("Type") == "2" and len(xy) == 2
        if region.attrib.get("NegativeROA", "0") not in ("0", "") or (len(xy) < 3 and not ellipse):
            continue
        rr, cc = _region_pixels(xy, inst.shape, ellipse=ellipse)
        label += 1
        free = inst[rr, cc] == 0  # the earlier region keeps what it covers
        inst[rr[free], cc[free]] = label
    if label == 0:
        raise ValueError(
            f"'{path}': none of its {len(regions)} <Region> elements is a nucleus outline (a positive region with "
            "3 or more vertices, or an ellipse)"
        )
    return compact_checked(inst)[0]  # 1..N in file order, without regions left no pixel


def _ring_area(contour: np.ndarray) -> float:
    """Signed area of a closed (row, col) contour (shoelace formula)."""
    y, x = contour[:, 0], contour[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _ring(contour: np.ndarray, r0: int, c0: int) -> list[list[float]]:
    """A GeoJSON ring from a contour of a crop padded by one pixel whose corner is (r0, c0):
    padded (row, col) -> image pixel centres -> QuPath corner coordinates, closed."""
    xy = np.stack([contour[:, 1] - 1 + c0 + 0.5, contour[:, 0] - 1 + r0 + 0.5], axis=1)
    ring = [[round(float(x), 2), round(float(y), 2)] for x, y in xy]
    if ring[0] != ring[-1]:
        ring.append(ring[0])
    return ring


def to_geojson(inst: np.ndarray, *, object_type: str = "detection", name: str | None = None) -> dict[str, Any]:
    """Nucleus outlines as a GeoJSON ``FeatureCollection`` that QuPath imports.

    Each nucleus becomes a ``Feature`` whose geometry is a ``Polygon`` (a
    ``MultiPolygon`` when the nucleus has several 4-connected parts; pixels touching only
    at a corner are separate parts), with an inner ring for each hole, in QuPath's pixel
    coordinates (x to the right, y down, pixel corners at integers). The rings are
    ``skimage.measure.find_contours`` at level 0.5: they pass half-way between the pixel
    centres inside and outside the nucleus, so they cut the pixels' corners (a one-pixel
    nucleus is a diamond of area 0.5, a 4 x 4 square an outline of area 15.5; the pixels
    whose centres lie inside the polygon are exactly the nucleus). Properties hold
    ``objectType`` (QuPath 0.4 and later) and ``object_type`` (the key QuPath 0.3 reads)
    and the instance id under ``measurements``, as the mapping QuPath 0.4 and later read
    (QuPath 0.3 reads only its older list of name/value pairs, and loads the outlines
    without the id). A ``cell`` also carries the outline as its
    ``nucleusGeometry`` (beside ``properties``, where QuPath writes and reads it): the map
    holds nuclei, so each cell is its nucleus, as QuPath's own cell detection makes them
    with no cell expansion; without it QuPath would load cells with no nucleus.

    Parameters
    ----------
    inst : (H, W) ndarray of int
        Instance map. Not modified.
    object_type : {"detection", "annotation", "cell"}
        QuPath's kind of object for every nucleus.
    name : str, optional
        ``properties.name`` of every feature.

    Returns
    -------
    dict
        JSON-serialisable ``FeatureCollection``.
    """
    from scipy import ndimage as ndi
    from skimage.measure import find_contours

    inst = as_instance_map(inst, "inst")
    if object_type not in ("detection", "annotation", "cell"):
        raise ValueError(f"`object_type` must be 'detection', 'annotation' or 'cell', got {object_type!r}")
    features = []
    # numbered 1..N (ids kept in ``ids``): one pass finds every box, whatever the ids (a
    # scan of the map per nucleus for large ids made 1,862 nuclei with ids above
    # 5,000,000 take 4.0 s instead of 0.5 s)
    compact, ids = compact_checked(inst)
    slices = ndi.find_objects(compact)
    for label, inst_id in enumerate(ids.tolist(), start=1):
        sl = slices[label - 1]
        r0, c0 = sl[0].start, sl[1].start
        crop = compact[sl] == label
        # find_contours (fully_connected="low") traces 4-connected foreground: label parts
        # the same way, or two blocks touching at a corner would give one part, two rings
        parts, n_parts = ndi.label(crop)
        polygons = []
        for part in range(1, n_parts + 1):
            padded = np.pad(parts == part, 1).astype(np.float32)
            # the outer ring encloses the largest area; every other ring bounds a hole
            contours = sorted(find_contours(padded, 0.5), key=lambda c: -abs(_ring_area(c)))
            polygons.append([_ring(c, r0, c0) for c in contours])
        geometry = (
            {"type": "Polygon", "coordinates": polygons[0]}
            if len(polygons) == 1
            else {"type": "MultiPolygon", "coordinates": polygons}
        )
        # objectType: QuPath 0.4 and later; object_type: QuPath 0.3
        props: dict[str, Any] = {
            "objectType": object_type,
            "object_type": object_type,
            "measurements": {"instance_id": int(inst_id)},
        }
        if name is not None:
            props["name"] = name
        feature: dict[str, Any] = {"type": "Feature", "geometry": geometry}
        if object_type == "cell":
            feature["nucleusGeometry"] = geometry
        feature["properties"] = props
        features.append(feature)
    return {"type": "FeatureCollection", "features": features}
