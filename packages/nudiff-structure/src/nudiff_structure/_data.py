"""Structure datasets: instance maps -> patches -> encoded structures, cached; equivariant
augmentation; conversion to and from the model's tensors."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from nudiff_diffusion import structures_to_tensor, tensor_to_structures
from nudiff_postproc import (
    DIHEDRAL,
    PATCH_GEOMETRY,
    PatchGeometry,
    downscale_instance_map,
    encode_structure,
    extract_patches,
    read_instance_map,
    transform_structure,
)
from nudiff_postproc._folders import list_files, read_name_list
from nudiff_postproc._io import INSTANCE_MAP_SUFFIXES, atomic_path, read_npz_cache

__all__ = [
    "StructurePreset",
    "PRESETS",
    "build_structures",
    "to_model_input",
    "from_model_output",
    "dihedral_augment",
]


@dataclass(frozen=True)
class StructurePreset(PatchGeometry):
    """Patch geometry of a preset (``nudiff_postproc.PATCH_GEOMETRY``: patches of
    ``patch_size`` every ``stride`` pixels, instance maps downscaled by ``downscale`` before
    encoding) and ``unet``, the nudiff-diffusion UNet preset of the matching image size."""

    unet: str = ""


PRESETS: dict[str, StructurePreset] = {
    name: StructurePreset(**asdict(g), unet=name) for name, g in PATCH_GEOMETRY.items()
}


def _preset(preset: str | StructurePreset) -> StructurePreset:
    if isinstance(preset, StructurePreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown structure preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


def build_structures(
    data_dir: str | os.PathLike[str],
    preset: str | StructurePreset,
    *,
    subset: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Encoded structures of every patch of a dataset folder's instance maps.

    Parameters
    ----------
    data_dir : path
        A dataset folder (its ``instance_maps/``; images are not needed here).
    preset : str or StructurePreset
        Patch size, stride and downscale factor.
    subset : path, optional
        A text file of patch names (one per line, as ``nudiff-postproc subset`` writes);
        only those patches are kept. Names not found raise an error.
    cache_dir : path, optional
        Where to keep the encoded structures (default ``data_dir/.nudiff-cache``, or
        ``~/.cache/nudiff/structures`` when ``data_dir`` is read-only); the cache key covers
        the files' names, sizes and times and the preset.

    Returns
    -------
    structures : (N, h, w, 3) ndarray of float32
        ``[foreground, h, v]`` with ``centre="nearest"`` (exactly equivariant); nuclei of at
        most 30 full-resolution pixels (30 / downscale^2 after downscaling) keep h = v = 0.
    names : list of str
        ``TILE_rRRRRR_cCCCCC`` of each patch (origin in the full-size tile).
    """
    p = _preset(preset)
    files = list_files(Path(data_dir) / "instance_maps", INSTANCE_MAP_SUFFIXES, "instance map")
    stat = [(name, path.stat().st_size, path.stat().st_mtime_ns) for name, path in files.items()]
    key = hashlib.sha256(json.dumps([stat, asdict(p), "v2"]).encode()).hexdigest()[:16]
    if cache_dir is not None:
        cache = Path(cache_dir)
    elif os.access(data_dir, os.W_OK):
        cache = Path(data_dir) / ".nudiff-cache"
    else:  # read-only data (a shared folder): the user's cache directory
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nudiff" / "structures"
    cache_file = cache / f"structures-{key}.npz"
    cached = read_npz_cache(cache_file, ("structures", "names"))
    if cached is not None:
        structures, names = cached["structures"], [str(n) for n in cached["names"]]
    else:
        chunks, names = [], []
        for tile, path in files.items():
            inst = read_instance_map(path)
            if min(inst.shape) < p.patch_size:
                raise ValueError(f"'{path}' is {inst.shape}, smaller than the {p.patch_size} px patches of the preset")
            patches, origins = extract_patches(inst, p.patch_size, p.stride)
            chunks += [
                encode_structure(downscale_instance_map(m, p.downscale), min_size=p.min_size, centre="nearest")
                for m in patches
            ]
            names += [f"{tile}_r{r:05d}_c{c:05d}" for r, c in origins]
        structures = np.stack(chunks)
        with atomic_path(cache_file) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, structures=structures, names=np.array(names))
    if subset is not None:
        wanted = read_name_list(subset, "subset list")
        index = {n: i for i, n in enumerate(names)}
        missing = [n for n in wanted if n not in index]
        if missing:
            raise ValueError(
                f"subset '{subset}' names {len(missing)} patches that '{data_dir}' does not have with "
                f"this preset, e.g. {missing[:3]}"
            )
        keep = sorted(index[n] for n in wanted)
        structures, names = structures[keep], [names[i] for i in keep]
    return structures, names


#: structures (N, H, W, 3) -> model tensors (N, 3, H, W) in [-1, 1] (nudiff-diffusion's conversion)
to_model_input = structures_to_tensor
#: model samples (N, 3, H, W) -> structures (N, H, W, 3) ``[probability, h, v]``
from_model_output = tensor_to_structures


def dihedral_augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random one of the 8 dihedral transforms per sample, applied equivariantly.

    Parameters
    ----------
    batch : (N, 3, H, W) float tensor
        Structures in the model's layout (square patches).
    generator : torch.Generator
        Source of the choices (the trainer passes its per-step generator).
    """
    choice = torch.randint(len(DIHEDRAL), (batch.shape[0],), generator=generator).tolist()
    hwc = batch.permute(0, 2, 3, 1).cpu().numpy()
    moved = [
        transform_structure(s, rot90=DIHEDRAL[c][0], flip=DIHEDRAL[c][1]) for s, c in zip(hwc, choice, strict=True)
    ]
    return torch.from_numpy(np.stack(moved)).permute(0, 3, 1, 2).to(batch.device, batch.dtype).contiguous()
