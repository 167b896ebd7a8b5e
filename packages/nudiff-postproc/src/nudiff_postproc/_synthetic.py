"""Procedurally generated nuclei layouts and H&E-like tiles: the bundled example data set
(no licensed data needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

__all__ = ["synthetic_instance_map", "synthetic_he_image", "write_synthetic_dataset"]

# Optical densities of one unit of stain per RGB channel (Ruifrok and Johnston's
# haematoxylin and eosin vectors, as scikit-image's ``rgb_from_hed``).
_H_VECTOR = np.array([0.65, 0.70, 0.29])
_E_VECTOR = np.array([0.07, 0.99, 0.11])


def synthetic_instance_map(shape: tuple[int, int] = (256, 256), *, n_nuclei: int = 60, seed: int = 0) -> np.ndarray:
    """Nuclei as random ellipses, some touching, numbered 1..N.

    Ellipses with semi-axes of 4-11 pixels and random orientation are dropped at random
    centres; a later ellipse covers an earlier one where they overlap, which makes
    touching nuclei with straight shared borders, as in annotated H&E tiles. Pieces that
    end up under 20 pixels are removed.

    Parameters
    ----------
    shape : (int, int)
        ``(H, W)`` of the map.
    n_nuclei : int
        Ellipses drawn (the result can hold a few fewer).
    seed : int
        Seed of ``numpy.random.default_rng``: the same seed gives the same map.

    Returns
    -------
    (H, W) ndarray of int32
    """
    from skimage.draw import ellipse

    if len(shape) != 2 or min(shape) < 16:
        raise ValueError(f"`shape` must be (H, W) with both at least 16, got {shape!r}")
    if n_nuclei < 0:
        raise ValueError(f"`n_nuclei` must be >= 0, got {n_nuclei}")
    rng = np.random.default_rng(seed)
    inst = np.zeros(shape, np.int32)
    for label in range(1, n_nuclei + 1):
        r, c = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        a, b = rng.uniform(6, 11), rng.uniform(4, 8)
        rr, cc = ellipse(r, c, a, b, shape=shape, rotation=rng.uniform(-np.pi, np.pi))
        inst[rr, cc] = label
    ids, counts = np.unique(inst, return_counts=True)
    keep = ids[(ids != 0) & (counts >= 20)]
    lut = np.zeros(n_nuclei + 1, np.int32)
    lut[keep] = np.arange(1, keep.size + 1, dtype=np.int32)
    return lut[inst]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    noise = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return noise / max(float(noise.std()), 1e-12)


def synthetic_he_image(inst: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Paint an H&E-like RGB tile for an instance map.

    Stain densities are composed in optical-density space and turned into RGB with
    Beer-Lambert's law (``I = 255 * 10^-(OD)``), as colour deconvolution assumes:

    * eosin everywhere: a pink stroma with fibre-like texture (anisotropic smoothed
      noise) and paler gaps;
    * haematoxylin in each nucleus: a per-nucleus density (some nuclei darker than
      others), granular chromatin (fine noise), a denser rim and soft edges (a blur of
      about one pixel, as optics give);
    * a little haematoxylin in the stroma, and pixel noise.

    Parameters
    ----------
    inst : (H, W) ndarray of int
        Instance map, 0 = background.
    seed : int
        Seed of the textures: the same map and seed give the same image.

    Returns
    -------
    (H, W, 3) ndarray of uint8
        The RGB image.
    """
    if not isinstance(inst, np.ndarray) or inst.ndim != 2 or not np.issubdtype(inst.dtype, np.integer):
        got = f"shape {getattr(inst, 'shape', None)}, dtype {getattr(inst, 'dtype', type(inst).__name__)}"
        raise ValueError(f"`inst` must be an (H, W) integer instance map, got {got}")
    if inst.size and inst.min() < 0:
        raise ValueError(f"`inst` must have non-negative ids, got minimum {inst.min()}")
    rng = np.random.default_rng(seed)
    shape = inst.shape
    fibres = ndi.gaussian_filter(rng.standard_normal(shape), (1.0, 6.0), mode="wrap")
    fibres = ndi.rotate(fibres, rng.uniform(0, 180), reshape=False, mode="wrap")
    fibres /= max(float(fibres.std()), 1e-12)
    eosin = 0.22 + 0.06 * fibres + 0.05 * _smooth_noise(rng, shape, 24.0)
    eosin = np.where(_smooth_noise(rng, shape, 10.0) > 1.3, 0.06, eosin)  # pale gaps (lumen, fat)
    haem = 0.05 + 0.02 * _smooth_noise(rng, shape, 3.0)

    fg = inst > 0
    if fg.any():
        n = int(inst.max())
        density = np.concatenate([[0.0], rng.uniform(0.55, 1.0, n)])  # per-nucleus darkness
        chromatin = 1.0 + 0.25 * _smooth_noise(rng, shape, 0.8)
        rim = fg & ~ndi.binary_erosion(fg, iterations=1, border_value=1)
        rim |= ndi.morphological_gradient(inst, size=3) > 0  # borders between touching nuclei
        nucleus = density[inst] * chromatin * fg + 0.25 * rim * fg
        haem = haem + ndi.gaussian_filter(nucleus, 0.9)
        eosin = eosin * (1.0 - 0.6 * ndi.gaussian_filter(fg.astype(float), 0.9))
    od = haem[..., None] * _H_VECTOR + np.clip(eosin, 0.0, None)[..., None] * _E_VECTOR
    rgb = 255.0 * np.power(10.0, -od) + rng.normal(0.0, 3.0, shape + (3,))
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def write_synthetic_dataset(
    out_dir: str | os.PathLike[str],
    n_tiles: int,
    *,
    size: int = 512,
    nuclei_per_tile: int | None = None,
    seed: int = 0,
) -> list[str]:
    """Write a procedurally generated dataset folder: ``images/NAME.png`` (RGB) and
    ``instance_maps/NAME.png`` (uint16), the layout every nudiff command reads.

    Parameters
    ----------
    out_dir : path
        The folder to create (files already there with the same names are replaced).
    n_tiles : int
        Number of tiles, named ``synthetic_000`` upwards.
    size : int
        Tile side in pixels (at least 64).
    nuclei_per_tile : int, optional
        Ellipses drawn per tile (default: one per 700 pixels, about the density of a
        Kumar tile).
    seed : int
        Tile ``i`` uses the seed ``seed + i`` for its layout and its texture.

    Returns
    -------
    list of str
        The names written.
    """
    from ._io import write_image, write_instance_map

    if not isinstance(n_tiles, (int, np.integer)) or n_tiles < 1:
        raise ValueError(f"`n_tiles` must be a positive integer, got {n_tiles!r}")
    if not isinstance(size, (int, np.integer)) or size < 64:
        raise ValueError(f"`size` must be an integer >= 64, got {size!r}")
    count = nuclei_per_tile if nuclei_per_tile is not None else max(1, size * size // 700)
    out = Path(out_dir)
    names = []
    for i in range(int(n_tiles)):
        name = f"synthetic_{i:03d}"
        inst = synthetic_instance_map((size, size), n_nuclei=count, seed=seed + i)
        write_instance_map(out / "instance_maps" / f"{name}.png", inst)
        write_image(out / "images" / f"{name}.png", synthetic_he_image(inst, seed=seed + i))
        names.append(name)
    return names
