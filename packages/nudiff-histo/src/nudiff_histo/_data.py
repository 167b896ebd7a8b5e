"""Paired data (H&E patch, instance map) for the histology model: patches cut once and
cached; structures encoded on the fly after a dihedral transform of the pair."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from nudiff_diffusion import images_to_tensor, structures_to_tensor, tensor_to_structures
from nudiff_postproc import (
    DIHEDRAL,
    PatchGeometry,
    compact_labels,
    downscale_image,
    downscale_instance_map,
    encode_structure,
    extract_patches,
    transform_image,
    transform_instance_map,
)
from nudiff_postproc._folders import dataset_pairs, read_pair
from nudiff_postproc._io import atomic_path, read_npz_cache
from nudiff_postproc._validate import as_instance_map

from ._model import PRESETS, HistoPreset

__all__ = [
    "build_pairs",
    "cut_patches",
    "pairs_to_rows",
    "paired_batch",
    "encode_condition",
    "condition_to_structures",
    "cond_foreground",
    "COND_FOREGROUNDS",
]

#: How a condition's foreground channel is encoded. "binary", the paper's code (its
#: ``sem[inst > 0] = 1``): the all-zeros null condition of guidance is then an
#: all-background structure, a value every real condition holds off the nuclei. "signed"
#: (``2 fg - 1``, as the structure model's samples): nudiff's models before 2026-12-03,
#: whose null condition was a token no real structure holds.
COND_FOREGROUNDS = ("binary", "signed")


def cond_foreground(settings: dict) -> str:
    """The foreground encoding a histology model was trained with, from its ``diffusion``
    settings (a checkpoint's or an exported graph's ``config.json``): "signed" when none is
    recorded (models before 2026-12-03)."""
    value = settings.get("cond_foreground", "signed")
    if value not in COND_FOREGROUNDS:
        raise ValueError(f"diffusion.cond_foreground must be one of {COND_FOREGROUNDS}, got {value!r}")
    return value


def _preset(preset: str | HistoPreset) -> HistoPreset:
    if isinstance(preset, HistoPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown histology preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


def _cache_dir(data_dir: Path) -> Path:
    if os.access(data_dir, os.W_OK):
        return data_dir / ".nudiff-cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nudiff" / "pairs"


def build_pairs(
    pairs_dir: str | os.PathLike[str], preset: str | HistoPreset
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Patches of every (image, instance map) pair of a dataset folder, at the preset's size.

    Parameters
    ----------
    pairs_dir : path
        A dataset folder: ``images/NAME.png|tif`` and ``instance_maps/NAME.png|tif|mat``.
    preset : str or HistoPreset
        Patch size, stride and downscale factor (``nudiff_postproc.PATCH_GEOMETRY``).

    Returns
    -------
    images : (N, s, s, 3) uint8
        Block-mean downscaled RGB patches.
    instance_maps : (N, s, s) int32
        Nearest-downscaled instance maps, ids compacted to 1..n per patch.
    names : list of str
        ``TILE_rRRRRR_cCCCCC`` (origin in the full-size tile), as the structure model's.

    Tiles equal to the patch size after downscaling (already patches) are taken whole. The
    result is cached in ``pairs_dir/.nudiff-cache`` (or the user's cache directory when the
    folder is read-only), keyed by the files' names, sizes and times and the geometry.
    """
    p = _preset(preset)
    g = p.geometry
    folder = Path(pairs_dir)
    pairs = dataset_pairs(folder)
    stat = [
        (n, str(i.stat().st_size), i.stat().st_mtime_ns, m.stat().st_size, m.stat().st_mtime_ns) for n, i, m in pairs
    ]
    key = hashlib.sha256(json.dumps([stat, asdict(g), "pairs-v2"]).encode()).hexdigest()[:16]
    cache_file = _cache_dir(folder) / f"pairs-{key}.npz"
    cached = read_npz_cache(cache_file, ("images", "instance_maps", "names"))
    if cached is not None:
        return cached["images"], cached["instance_maps"], [str(n) for n in cached["names"]]
    images, maps, names = [], [], []
    for name, image_path, map_path in pairs:
        image, inst = read_pair(image_path, map_path, strict=True)  # a model of stain colour: no grey tiles
        patch_names, patch_images, patch_maps = cut_patches(name, inst, g, image=image, path=image_path)
        names += patch_names
        images += patch_images
        maps += patch_maps
    out_images, out_maps = np.stack(images), np.stack(maps)
    with atomic_path(cache_file) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, images=out_images, instance_maps=out_maps, names=np.array(names))
    return out_images, out_maps, names


def cut_patches(
    name: str,
    inst: np.ndarray,
    geometry: PatchGeometry,
    *,
    image: np.ndarray | None = None,
    path: str | os.PathLike[str] | None = None,
) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """A tile (instance map, optionally its image) as model-sized patches.

    A map already of the model's size is taken whole (name unchanged); a larger one is cut
    into the geometry's patches (names ``NAME_rRRRRR_cCCCCC``), downscaled (maps by nearest
    neighbour, images by block means). Ids are compacted to 1..n per patch.

    Returns
    -------
    names : list of str
    images : list of (s, s, 3) uint8 (empty without ``image``)
    instance_maps : list of (s, s) int32
    """
    g = geometry
    if inst.shape == (g.image_size, g.image_size):
        return [name], [] if image is None else [image], [compact_labels(inst)[0].astype(np.int32)]
    if min(inst.shape) < g.patch_size:
        raise ValueError(
            f"'{path or name}' is {inst.shape}; the preset takes {g.patch_size} px patches of tiles "
            f"(or exactly {g.image_size} px patches)"
        )
    map_patches, origins = extract_patches(inst, g.patch_size, g.stride)
    names = [f"{name}_r{r:05d}_c{c:05d}" for r, c in origins]
    maps = [compact_labels(downscale_instance_map(m, g.downscale))[0].astype(np.int32) for m in map_patches]
    images = (
        []
        if image is None
        else [downscale_image(p, g.downscale) for p in extract_patches(image, g.patch_size, g.stride)[0]]
    )
    return names, images, maps


def pairs_to_rows(images: np.ndarray, instance_maps: np.ndarray) -> torch.Tensor:
    """(N, s, s, 3) uint8 images and (N, s, s) instance maps -> (N, 4, s, s) float32 rows:
    the image in [-1, 1] and the instance ids (exact in float32 below 2^24), the training
    data that :func:`paired_batch` turns into (image, structure) batches."""
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"`images` must be (N, s, s, 3) uint8, got {getattr(images, 'shape', type(images).__name__)}")
    instance_maps = as_instance_map(instance_maps, "instance_maps", ndim=3)  # integers >= 0
    if instance_maps.shape != images.shape[:3]:
        raise ValueError(f"{images.shape[:3]} images but {instance_maps.shape} instance maps")
    if instance_maps.max(initial=0) >= 2**24:
        raise ValueError("instance ids must be below 2^24 (compact them first)")
    ids = torch.from_numpy(instance_maps.astype(np.float32))[:, None]
    return torch.cat([images_to_tensor(images), ids], dim=1)


def encode_condition(
    instance_maps: np.ndarray | list[np.ndarray], min_size: int, foreground: str = "binary"
) -> torch.Tensor:
    """Structures of (N, s, s) instance maps as the model's condition (N, 3, s, s) float32:
    the foreground in {0, 1} (``foreground="binary"``, the paper's) or {-1, 1} ("signed", see
    :data:`COND_FOREGROUNDS`), h and v in [-1, 1] (``centre="nearest"``, the exactly
    equivariant convention, as the structure model's; ``min_size``: the preset's
    ``geometry.min_size``)."""
    if foreground not in COND_FOREGROUNDS:
        raise ValueError(f"`foreground` must be one of {COND_FOREGROUNDS}, got {foreground!r}")
    structures = np.stack([encode_structure(m, min_size=min_size, centre="nearest") for m in instance_maps])
    if foreground == "signed":
        return structures_to_tensor(structures)
    return torch.from_numpy(structures).permute(0, 3, 1, 2).contiguous()


def condition_to_structures(cond: torch.Tensor, foreground: str = "binary") -> np.ndarray:
    """The inverse of :func:`encode_condition`: (N, 3, s, s) -> (N, s, s, 3) float32
    structures ``[fg in {0, 1}, h, v]``."""
    if foreground not in COND_FOREGROUNDS:
        raise ValueError(f"`foreground` must be one of {COND_FOREGROUNDS}, got {foreground!r}")
    if foreground == "signed":
        return tensor_to_structures(cond)
    if cond.ndim != 4 or cond.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) conditions, got {tuple(cond.shape)}")
    return cond.detach().float().permute(0, 2, 3, 1).cpu().numpy().copy()


def paired_batch(min_size: int, foreground: str = "binary"):  # type: ignore[no-untyped-def]
    """The trainer's ``batch_fn``: rows (B, 4, s, s) -> (images (B, 3, s, s), structures
    (B, 3, s, s)), each pair under the same random dihedral transform and its structure
    encoded from the transformed instance map (so image and structure move together;
    ``foreground`` as in :func:`encode_condition`)."""

    def batch_fn(rows: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        choice = torch.randint(len(DIHEDRAL), (rows.shape[0],), generator=generator).tolist()
        images, maps = [], []
        for row, c in zip(rows.numpy(), choice, strict=True):
            rot90, flip = DIHEDRAL[c]
            images.append(transform_image(np.ascontiguousarray(row[:3].transpose(1, 2, 0)), rot90=rot90, flip=flip))
            maps.append(transform_instance_map(row[3].astype(np.int32), rot90=rot90, flip=flip))
        x0 = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        return x0, encode_condition(maps, min_size, foreground)

    return batch_fn
