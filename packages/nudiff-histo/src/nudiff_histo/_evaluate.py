"""Judging painted images: stain statistics against real H&E, and the alignment of the
haematoxylin with the nuclei of the label."""

from __future__ import annotations

import os

import numpy as np
from nudiff_diffusion import evaluation_preset
from nudiff_postproc import read_image, read_instance_map
from nudiff_postproc._folders import dataset_pairs
from scipy.stats import wasserstein_distance

from ._data import build_pairs
from ._model import PRESETS

__all__ = ["stain_statistics", "evaluate_histology"]

_BINS = np.linspace(0.0, 0.3, 61)  # optical density bins of the histograms (rgb2hed units)


def stain_statistics(images: np.ndarray, instance_maps: np.ndarray) -> dict[str, np.ndarray]:
    """Haematoxylin and eosin optical densities (``skimage.color.rgb2hed``) of image patches.

    Parameters
    ----------
    images : (N, H, W, 3) uint8
    instance_maps : (N, H, W) int

    Returns
    -------
    dict
        ``h_mean``, ``e_mean``: (N,) per-image means; ``h_pixels``, ``e_pixels``: (N*H*W,)
        every pixel's density; ``h_inside``, ``h_outside``: (2,) sums and counts of H inside
        and outside the nuclei of the instance maps.
    """
    from skimage.color import rgb2hed

    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"`images` must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    if instance_maps.shape != images.shape[:3]:
        raise ValueError(f"images {images.shape[:3]} and instance maps {instance_maps.shape} differ")
    hed = rgb2hed(images)  # (N, H, W, 3) float64: H, E, DAB
    h, e = hed[..., 0], hed[..., 1]
    fg = instance_maps > 0
    return {
        "h_mean": h.mean(axis=(1, 2)),
        "e_mean": e.mean(axis=(1, 2)),
        "h_pixels": h.ravel(),
        "e_pixels": e.ravel(),
        "h_inside": np.array([h[fg].sum(), fg.sum()]),
        "h_outside": np.array([h[~fg].sum(), (~fg).sum()]),
    }


def _alignment(stats: dict[str, np.ndarray]) -> float:
    inside, outside = stats["h_inside"], stats["h_outside"]
    if inside[1] == 0 or outside[1] == 0 or outside[0] <= 0:
        return float("nan")
    return float((inside[0] / inside[1]) / (outside[0] / outside[1]))


def evaluate_histology(
    samples_dir: str | os.PathLike[str],
    real_dir: str | os.PathLike[str],
    *,
    preset: str | None = None,
    max_real: int = 1024,
    seed: int = 0,
) -> dict:
    """Stain distance and alignment of a synthetic dataset against real pairs.

    Parameters
    ----------
    samples_dir : path
        A dataset folder of patches (the output of ``nudiff-histo sample``).
    real_dir : path
        A dataset folder of real pairs, cut into patches of the samples' size by ``preset``
        (default: the preset whose image size matches).
    max_real : int
        At most this many real patches (drawn with ``seed``).

    Returns
    -------
    dict
        ``h_wasserstein`` / ``e_wasserstein``: W1 distance between the pixel densities of
        haematoxylin / eosin, synthetic vs real; ``h_mean_wasserstein`` /
        ``e_mean_wasserstein``: the same between per-image means; ``alignment`` and
        ``real_alignment``: mean H density inside the nuclei over that outside (pooled over
        the set; about 1 for a model that ignores its condition); ``h_mean``, ``e_mean``
        and their ``real_`` counterparts; ``samples``, ``real_patches``; ``histograms``:
        the H and E histograms (bin edges and densities) of both sets.
    """
    if isinstance(max_real, bool) or not isinstance(max_real, (int, np.integer)) or max_real < 1:
        raise ValueError(f"`max_real` must be an integer >= 1 (real patches to compare with), got {max_real!r}")
    pairs = dataset_pairs(samples_dir)
    images = [read_image(i) for _, i, _ in pairs]
    maps = [read_instance_map(m) for _, _, m in pairs]
    size = images[0].shape[0]
    for (_, image_path, map_path), image, inst in zip(pairs, images, maps, strict=True):
        for path, shape in ((image_path, image.shape[:2]), (map_path, inst.shape)):
            if shape != (size, size):
                raise ValueError(
                    f"'{path}' is {shape[0]} x {shape[1]} px; the samples of '{samples_dir}' must all be square "
                    f"patches of one size ({size} x {size}, as '{pairs[0][1]}')"
                )
    preset = evaluation_preset(PRESETS, preset, size, kind="histology", samples=samples_dir)
    real_images, real_maps, _ = build_pairs(real_dir, preset)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(real_images), size=min(len(real_images), max_real), replace=False))
    syn = stain_statistics(np.stack(images), np.stack(maps))
    real = stain_statistics(real_images[pick], real_maps[pick])
    sub = np.random.default_rng(seed)

    def pixels(stats: dict[str, np.ndarray], key: str) -> np.ndarray:  # at most 1e6 pixels for W1
        values = stats[key]
        return values if len(values) <= 1_000_000 else sub.choice(values, 1_000_000, replace=False)

    result: dict = {}
    for stain in ("h", "e"):
        result[f"{stain}_wasserstein"] = float(
            wasserstein_distance(pixels(syn, f"{stain}_pixels"), pixels(real, f"{stain}_pixels"))
        )
        result[f"{stain}_mean_wasserstein"] = float(wasserstein_distance(syn[f"{stain}_mean"], real[f"{stain}_mean"]))
        result[f"{stain}_mean"] = float(syn[f"{stain}_mean"].mean())
        result[f"real_{stain}_mean"] = float(real[f"{stain}_mean"].mean())
    result["alignment"] = _alignment(syn)
    result["real_alignment"] = _alignment(real)
    result["samples"] = len(images)
    result["real_patches"] = int(len(pick))
    result["histograms"] = {
        "bin_edges": _BINS.tolist(),
        **{
            f"{who}_{stain}": np.histogram(np.clip(s[f"{stain}_pixels"], _BINS[0], _BINS[-1]), _BINS, density=True)[
                0
            ].tolist()
            for who, s in (("synthetic", syn), ("real", real))
            for stain in ("h", "e")
        },
    }
    return result
