"""Training data of HoVer-Net: dataset folders, input windows, augmentation, real/synthetic mixing.

A dataset folder is the DESIGN.md layout (``images/NAME.png|tif`` + ``instance_maps/NAME.*``);
real tiles, patches cut from them, and synthetic pairs all use it. Each epoch covers
every image with input windows whose centres (the output regions) tile it: "valid"
windows inside the image on a randomly shifted grid (the default for real tiles, at least
one input window wide), or HoVer-Net's "mirror" patches, which reach beyond the image into
its mirror image so that the outputs cover all of it (the default for synthetic tiles, at
least one output region wide). Augmentation: HoVer-Net's affine transform (scale, shear, rotation,
translation; nearest-neighbour, the tile mirrored beyond its border) and the 8 dihedral
transforms applied to the image and the instance map *before* the targets are made (so the
h/v targets transform equivariantly by construction), then HED stain jitter and
HoVer-Net's input changes (one of blur, median blur or noise; hue, saturation, brightness
and contrast in a random order).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nudiff_postproc import compact_labels, read_instance_map, transform_image, transform_instance_map
from nudiff_postproc._folders import dataset_pairs
from nudiff_postproc._folders import read_name_list as _read_name_list
from nudiff_postproc._io import read_image
from scipy import ndimage as ndi

from ._losses import targets

__all__ = [
    "Tiles",
    "load_tiles",
    "read_name_list",
    "Augment",
    "affine_source",
    "window_origins",
    "cut_window",
    "MixedBatches",
    "check_synthetic_ratio",
]


@dataclass(frozen=True)
class Tiles:
    """Images and instance maps of a dataset folder, in memory."""

    folder: Path
    names: list[str]
    images: list[np.ndarray]  # (H, W, 3) uint8
    maps: list[np.ndarray]  # (H, W) int32

    def __len__(self) -> int:
        return len(self.names)


def read_name_list(path: str | os.PathLike[str]) -> list[str]:
    """Names, one per line (``nudiff_postproc``'s reader: blank lines skipped, no comment
    syntax), e.g. ``nudiff-postproc subset``'s output."""
    return _read_name_list(path, "subset list")


def read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """An RGB image as (H, W, 3) uint8, PNG, TIFF or JPEG alike. Grayscale images and
    translucent alpha channels are refused by name (a model of H&E colour must not be fed
    silently converted images); a fully opaque alpha channel (CoNSeP's PNGs) is dropped."""
    return read_image(path, strict=True)


def load_tiles(
    folder: str | os.PathLike[str],
    *,
    names: list[str] | None = None,
    min_size: int = 1,
    what: str = "--real",
    size_reason: str = "the model's input window",
) -> Tiles:
    """Read a dataset folder (optionally only ``names``), checking every pair.

    Raises ``ValueError`` naming the folder or file when an image lacks its map, the
    two differ in size, an image is not RGB, a listed name is missing, or an image is
    smaller than ``min_size`` (what ``size_reason`` says needs that size, for the message).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder not found: '{folder}'")
    pairs = dataset_pairs(folder)
    if names is not None:
        by_name = {p[0]: p for p in pairs}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ValueError(f"{what} '{folder}' has no image for {len(missing)} listed name(s), e.g. {missing[:3]}")
        pairs = [by_name[n] for n in dict.fromkeys(names)]
    images, maps = [], []
    for _, image_path, map_path in pairs:
        image, inst = read_rgb(image_path), read_instance_map(map_path)
        if image.shape[:2] != inst.shape:
            raise ValueError(f"'{image_path}' is {image.shape[:2]} but its instance map '{map_path}' is {inst.shape}")
        if min(inst.shape) < min_size:
            hint = (
                " (a tiny-64 or small-128 histology model paints at a downscaled resolution: "
                "`nudiff-histo seg-tiles` upsamples its pairs to the tiles' and lays them side by side)"
                if what == "--synthetic"
                else ""
            )
            raise ValueError(
                f"'{image_path}' is {inst.shape[0]}x{inst.shape[1]}; {size_reason} needs {min_size}x{min_size}{hint}"
            )
        images.append(image)
        if int(inst.max(initial=0)) > np.iinfo(np.int32).max:  # ids past int32 would wrap and merge nuclei
            inst = compact_labels(inst)[0]
        maps.append(inst.astype(np.int32, copy=False))
    return Tiles(folder, [p[0] for p in pairs], images, maps)


#: how training windows are cut from a tile (HoVer-Net's ``extract_patches.py`` offers both)
WINDOWS = ("mirror", "valid")


def smallest_tile(windows: str, input_size: int, output_size: int) -> int:
    """The shortest tile side that has a window: one output region (``"mirror"``, the
    input mirrored beyond the tile) or one input window (``"valid"``)."""
    return output_size if windows == "mirror" else input_size


def window_origins(
    shape: tuple[int, int],
    input_size: int,
    output_size: int,
    rng: np.random.Generator | None = None,
    *,
    windows: str = "valid",
) -> np.ndarray:
    """Top-left corners of input windows whose output regions cover an image of ``shape``
    at stride ``output_size``, the last one flush with the border.

    ``windows="valid"``: input windows inside the image, so a band of width
    ``(input_size - output_size) // 2`` along the border is never an output (a 256 px
    tile: one window, its centre 164 px supervised, 41% of the tile). ``"mirror"``
    (HoVer-Net's default extraction, which the Nudiff paper's ``extract_patches.py`` also
    uses): the output regions cover the whole image and the input windows reach that band's
    width beyond it, into the image mirrored at its border (origins may be negative;
    :func:`cut_window` mirrors); a 256 px tile gives 2 x 2 fast-mode windows. With
    ``rng``, the grid is shifted by a random offset, plus a window flush with the start.
    Returns (K, 2) int.
    """
    if windows not in WINDOWS:
        raise ValueError(f"`windows` must be one of {WINDOWS}, got {windows!r}")
    margin = (input_size - output_size) // 2 if windows == "mirror" else 0
    least = smallest_tile(windows, input_size, output_size)
    if min(shape) < least:  # an output region would reach beyond the image
        raise ValueError(f"an image of {tuple(shape)} px has no {windows} window: its sides must be >= {least}")
    axes = []
    for length in shape:
        span = length + 2 * margin - input_size
        count = math.ceil(span / output_size) + 1 if span > 0 else 1
        starts = np.minimum(np.arange(count) * output_size, span)
        if rng is not None and span > 0:  # shifted grid, plus a window flush with the start
            starts = np.concatenate([[0], np.clip(starts + rng.integers(0, output_size), 0, span)])
        axes.append(np.unique(starts) - margin)
    rows, cols = np.meshgrid(*axes, indexing="ij")
    return np.stack([rows.ravel(), cols.ravel()], axis=1)


def _jitter_stains(x: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Scale each HED stain by ``1 + N(0, sigma)`` and shift it by ``N(0, sigma)`` times its
    mean magnitude, in scikit-image's optical density and stain matrices (``rgb2hed``).

    The stains are not clipped at 0 as ``rgb2hed`` clips them (6% of a Kumar crop's pixels
    have a negative one), so no jitter gives back the image: ``hed2rgb(rgb2hed(x))`` moved
    3.5% of such pixels by 5 or more levels, a colour shift the test images never had.
    ``x``: (H, W, 3) float32 in [0, 1]; returns a new array of the same.
    """
    from skimage.color import hed_from_rgb, rgb_from_hed

    log_floor = np.log(1e-6)  # scikit-image's: optical density 1 at a channel of 1e-6
    od = np.log(np.maximum(x, 1e-6)) / log_floor
    stains = od @ hed_from_rgb
    scale = 1.0 + rng.normal(0.0, sigma, 3)
    shift = rng.normal(0.0, sigma, 3) * np.abs(stains).reshape(-1, 3).mean(axis=0)
    od = od + (stains * (scale - 1.0) + shift) @ rgb_from_hed
    return np.clip(np.exp(od * log_floor), 0.0, 1.0).astype(np.float32)


def _mirror(index: np.ndarray, length: int) -> np.ndarray:
    """Indices reflected into ``0 .. length - 1`` about the first and last pixel (numpy's
    ``"reflect"`` padding, OpenCV's BORDER_REFLECT_101), for any distance outside."""
    if length == 1:
        return np.zeros_like(index)
    period = 2 * (length - 1)
    index = np.abs(index) % period
    return np.where(index >= length, period - index, index)


def affine_source(
    shape: tuple[int, int], origin: tuple[int, int], size: int, matrix: np.ndarray, shift: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Where each pixel of an affinely transformed input window comes from.

    The window of side ``size`` at ``origin`` is transformed about its centre: the
    output pixel at offset ``d`` (row, column) from the centre shows the image at
    ``centre + shift + matrix @ d``, rounded to the nearest pixel (nearest-neighbour, as
    HoVer-Net's ``order=0``, so instance ids stay ids) and mirrored into the image where it
    falls outside (reflect-101, HoVer-Net's mirror padding). ``matrix`` is the inverse of
    the transform's linear part, ``shift`` moves the window's centre in the image, both in
    (row, column).

    Returns
    -------
    rows, cols : (size, size) ndarray of intp
        Source pixel of each window pixel.
    """
    half = (size - 1) / 2.0
    offsets = np.arange(size) - half
    d_row, d_col = np.meshgrid(offsets, offsets, indexing="ij")
    src_row = origin[0] + half + shift[0] + matrix[0, 0] * d_row + matrix[0, 1] * d_col
    src_col = origin[1] + half + shift[1] + matrix[1, 0] * d_row + matrix[1, 1] * d_col
    rows = _mirror(np.floor(src_row + 0.5).astype(np.intp), shape[0])
    cols = _mirror(np.floor(src_col + 0.5).astype(np.intp), shape[1])
    return rows, cols


#: OpenCV's tabulated Gaussian kernels for sigma 0 (``getGaussianKernel``'s small sizes)
_CV_GAUSSIAN = {
    1: np.array([1.0]),
    3: np.array([0.25, 0.5, 0.25]),
    5: np.array([0.0625, 0.25, 0.375, 0.25, 0.0625]),
}


def _blur_median_or_noise(x: np.ndarray, rng: np.random.Generator, noise_sd: float) -> np.ndarray:
    """One of HoVer-Net's three (``iaa.OneOf``): an OpenCV Gaussian blur with sigma 0 and a
    kernel of 1, 3 or 5 px per axis, a median blur of 1, 3 or 5 px (both replicating the
    border), or Gaussian noise of a standard deviation uniform in ``[0, noise_sd]``, per
    channel half the time. ``x``: (H, W, 3) float32 in [0, 1]."""
    choice = int(rng.integers(3))
    if choice == 0:
        for axis, k in zip((0, 1), 2 * rng.integers(0, 3, 2) + 1, strict=True):
            if k > 1:
                x = ndi.correlate1d(x, _CV_GAUSSIAN[int(k)], axis=axis, mode="nearest")
        return x
    if choice == 1:
        k = int(2 * rng.integers(0, 3) + 1)
        return ndi.median_filter(x, size=(k, k, 1), mode="nearest") if k > 1 else x
    sd = rng.uniform(0.0, noise_sd)
    channels = 3 if rng.random() < 0.5 else 1
    return x + rng.normal(0.0, sd, (*x.shape[:2], channels)).astype(np.float32)


def _shift_hue(x: np.ndarray, turn: float) -> np.ndarray:
    """Rotate every pixel's hue by ``turn`` (a fraction of the colour circle) in 8-bit HSV,
    as HoVer-Net does in OpenCV's (Pillow's conversion: hue in 256 steps, so the turn is
    rounded to 1/256; 7x faster than scikit-image's float conversion, 2.6 against 18 ms for a
    256 px window). ``x``: (H, W, 3) float32 in [0, 1]; returns the same."""
    from PIL import Image

    rgb = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    hsv = np.array(Image.fromarray(rgb).convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(turn * 256)) % 256
    channels = [Image.fromarray(np.ascontiguousarray(hsv[..., c])) for c in range(3)]
    return np.asarray(Image.merge("HSV", channels).convert("RGB"), np.float32) / np.float32(255.0)


@dataclass(frozen=True)
class Augment:
    """Augmentation settings, with HoVer-Net's ranges (``train_loader.py``).

    Geometric: an affine transform about the window's centre (each axis scaled by ``1 +-
    scale``, sheared by up to ``shear`` degrees, rotated by up to ``rotate`` degrees, moved by
    up to ``translate`` of the window; nearest-neighbour, the image mirrored beyond its
    border; 0 turns a part off), then the 8 dihedral transforms. Photometric: nudiff's HED
    stain jitter, then HoVer-Net's input changes: one of a Gaussian blur, a median blur or
    Gaussian noise (``blur_noise``), then hue, saturation, brightness and contrast shifts in
    a random order. HoVer-Net's contrast step returns its input unchanged (``augs.py``'s
    ``add_to_contrast`` clips the input, not its result); here it scales each channel about
    its mean, as that code intends.
    """

    scale: float = 0.2  # each axis scaled by a factor uniform in 1 +- scale
    shear: float = 5.0  # degrees, uniform in +-shear
    rotate: float = 179.0  # degrees, uniform in +-rotate
    translate: float = 0.01  # share of the window, uniform in +-translate per axis
    dihedral: bool = True
    hed_sigma: float = 0.05  # stain: each HED channel scaled by 1 + N(0, s) and shifted by N(0, s)
    blur_noise: bool = True  # one of Gaussian blur, median blur or noise (sd up to 0.05 of the range)
    hue: float = 8.0  # OpenCV's 8-bit hue units (2 degrees each), uniform in +-hue
    saturation: float = 0.2  # mixed with the grey value: factor uniform in 1 +- saturation
    brightness: float = 26 / 255  # added to [0, 1] values, uniform in +-b
    contrast: float = 0.25  # each channel scaled about its mean, uniform in 1 +- c

    @property
    def affine(self) -> bool:
        return any(v > 0 for v in (self.scale, self.shear, self.rotate, self.translate))

    def draw_affine(self, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A random transform of a ``size`` px window: the inverse of its linear part and
        the move of its centre, in (row, column), as :func:`affine_source` takes them."""
        from skimage.transform import AffineTransform

        scale = 1.0 + rng.uniform(-self.scale, self.scale, 2)
        shear = np.deg2rad(rng.uniform(-self.shear, self.shear))
        rotation = np.deg2rad(rng.uniform(-self.rotate, self.rotate))
        shift = rng.uniform(-self.translate, self.translate, 2) * size
        forward = AffineTransform(scale=scale, rotation=rotation, shear=shear).params[:2, :2]  # (x, y)
        swap = np.array([[0.0, 1.0], [1.0, 0.0]])  # (x, y) <-> (row, column)
        return swap @ np.linalg.inv(forward) @ swap, shift

    def __call__(self, image: np.ndarray, inst: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The dihedral and photometric part (the affine part needs the whole tile: see
        :func:`cut_window`)."""
        if self.dihedral:
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            image = transform_image(image, rot90=k, flip=flip)
            inst = transform_instance_map(inst, rot90=k, flip=flip)
        x = image.astype(np.float32) / 255.0
        if self.hed_sigma > 0:
            x = _jitter_stains(x, rng, self.hed_sigma)
        if self.blur_noise:
            x = _blur_median_or_noise(x, rng, 0.05)
        for step in rng.permutation(4):  # HoVer-Net's Sequential(random_order=True)
            x = np.clip(x, 0.0, 1.0)  # each of its steps clips to the image's range
            if step == 0 and self.hue > 0:
                x = _shift_hue(x, rng.uniform(-self.hue, self.hue) / 180.0)
            elif step == 1 and self.saturation > 0:
                grey = x @ np.array([0.299, 0.587, 0.114], np.float32)  # OpenCV's RGB2GRAY
                value = np.float32(1.0 + rng.uniform(-self.saturation, self.saturation))
                x = x * value + (grey * (1 - value))[..., None]
            elif step == 2 and self.brightness > 0:
                x = x + np.float32(rng.uniform(-self.brightness, self.brightness))
            elif step == 3 and self.contrast > 0:
                value = np.float32(1.0 + rng.uniform(-self.contrast, self.contrast))
                mean = x.mean(axis=(0, 1), keepdims=True)
                x = (x - mean) * value + mean
        return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8), inst


def cut_window(
    tiles: Tiles,
    index: int,
    origin: tuple[int, int],
    input_size: int,
    output_size: int,
    augment: Augment | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training sample: the (S, S, 3) uint8 input, the (s, s) NP target and the
    (s, s, 2) HV target."""
    r, c = int(origin[0]), int(origin[1])
    if augment is not None and augment.affine:  # drawn first, from the same generator
        rows, cols = affine_source(tiles.maps[index].shape, (r, c), input_size, *augment.draw_affine(input_size, rng))
        image, inst = tiles.images[index][rows, cols], tiles.maps[index][rows, cols]
    else:
        height, width = tiles.maps[index].shape
        if 0 <= r and r + input_size <= height and 0 <= c and c + input_size <= width:  # views, no copy
            image = tiles.images[index][r : r + input_size, c : c + input_size]
            inst = tiles.maps[index][r : r + input_size, c : c + input_size]
        else:  # mirrored where the window reaches beyond the tile (reflect-101, as HoVer-Net pads)
            rows, cols = _mirror(np.arange(r, r + input_size), height), _mirror(np.arange(c, c + input_size), width)
            image, inst = tiles.images[index][np.ix_(rows, cols)], tiles.maps[index][np.ix_(rows, cols)]
    if augment is not None:
        image, inst = augment(image, inst, rng)
    np_target, hv_target = targets(inst, output_size)
    return np.ascontiguousarray(image), np_target, hv_target


def check_synthetic_ratio(ratio: float | str, batch: int, name: str = "`--synthetic-ratio`") -> None:
    """Refuse a share of synthetic windows per batch that :class:`MixedBatches` cannot
    keep: ``"pool"``, or a number in [0, 1) that leaves a batch of ``batch`` at least one
    real window and, when above 0, at least one synthetic one. ``name`` names the setting
    in the message (a flag, or the pipeline's config key)."""
    if ratio == "pool":
        return
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"{name} must be in [0, 1) or 'pool', got {ratio!r}")
    synthetic = round(batch * float(ratio))
    if synthetic == 0 and float(ratio) > 0:
        raise ValueError(f"{name} {ratio} of a batch of {batch} is no synthetic window; raise either")
    if synthetic >= batch:
        raise ValueError(
            f"{name} {ratio} of a batch of {batch} leaves no real window (it rounds to {synthetic} synthetic); "
            "lower it or raise the batch"
        )


class MixedBatches:
    """Batches of windows from real and (optionally) synthetic tiles.

    ``ratio``: the share of each batch taken from the synthetic tiles (a float in
    [0, 1)), or ``"pool"`` to shuffle real and synthetic windows together (the paper's
    setting). An epoch is one pass over the real windows (with ``"pool"``: over all).
    ``windows`` and ``synthetic_windows``: how the real and the synthetic tiles are cut
    (:func:`window_origins`): ``"valid"``, windows inside the tile on a grid shifted at
    random each epoch; ``"mirror"``, HoVer-Net's patches, the same in every epoch (a 256 px
    tile: 4 fast-mode windows).
    """

    def __init__(
        self,
        real: Tiles,
        synthetic: Tiles | None,
        *,
        ratio: float | str,
        batch: int,
        input_size: int,
        output_size: int,
        augment: Augment | None,
        windows: str = "valid",
        synthetic_windows: str = "mirror",
    ) -> None:
        for name, value in (("windows", windows), ("synthetic_windows", synthetic_windows)):
            if value not in WINDOWS:
                raise ValueError(f"`{name}` must be one of {WINDOWS}, got {value!r}")
        if batch < 1:
            raise ValueError(f"`batch` must be >= 1, got {batch}")
        if synthetic is not None:
            check_synthetic_ratio(ratio, batch)
        self.real, self.synthetic, self.ratio = real, synthetic, ratio
        self.batch, self.input_size, self.output_size, self.augment = batch, input_size, output_size, augment
        self.windows, self.synthetic_windows = windows, synthetic_windows

    def _windows(self, tiles: Tiles, mode: str, rng: np.random.Generator) -> list[tuple[Tiles, int, np.ndarray]]:
        out = []
        for i, inst in enumerate(tiles.maps):
            # mirror: the reference's patches, the same every epoch (as its extract_patches writes
            # them once; the augmentation varies them); valid: a grid shifted at random each epoch
            shift = rng if mode == "valid" else None
            origins = window_origins(inst.shape, self.input_size, self.output_size, shift, windows=mode)
            out.extend((tiles, i, o) for o in origins)
        return [out[j] for j in rng.permutation(len(out))]

    def epoch(self, rng: np.random.Generator) -> list[list[tuple[Tiles, int, np.ndarray]]]:
        """The windows of one epoch, grouped into batches (the last one may be short)."""
        real = self._windows(self.real, self.windows, rng)
        if self.synthetic is None or self.ratio == 0:
            flat = real
        elif self.ratio == "pool":
            both = real + self._windows(self.synthetic, self.synthetic_windows, rng)
            flat = [both[j] for j in rng.permutation(len(both))]
        else:
            n_syn = round(self.batch * float(self.ratio))
            n_real = self.batch - n_syn
            synthetic: list[tuple[Tiles, int, np.ndarray]] = []
            batches = []
            for start in range(0, len(real), n_real):
                while len(synthetic) < n_syn:
                    synthetic.extend(self._windows(self.synthetic, self.synthetic_windows, rng))
                batches.append(real[start : start + n_real] + synthetic[:n_syn])
                synthetic = synthetic[n_syn:]
            return batches
        return [flat[i : i + self.batch] for i in range(0, len(flat), self.batch)]

    def materialise(
        self, windows: list[tuple[Tiles, int, np.ndarray]], rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stack a batch: images (B, S, S, 3) uint8, NP (B, s, s), HV (B, s, s, 2) float32."""
        samples = [cut_window(t, i, o, self.input_size, self.output_size, self.augment, rng) for t, i, o in windows]
        return tuple(np.stack(parts) for parts in zip(*samples, strict=True))  # type: ignore[return-value]
