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
from nudiff_postproc import (
    DIHEDRAL,
    encode_structure,
    extract_patches,
    read_instance_map,
    transform_structure,
)
from nudiff_postproc._folders import list_files
from nudiff_postproc._io import INSTANCE_MAP_SUFFIXES, atomic_path

__all__ = [
    "StructurePreset",
    "PRESETS",
    "build_structures",
    "to_model_input",
    "from_model_output",
    "dihedral_augment",
]


@dataclass(frozen=True)
class StructurePreset:
    """Patch geometry of a preset: patches of ``patch_size`` every ``stride`` pixels,
    instance maps downscaled by ``downscale`` before encoding; ``unet`` names the
    nudiff-diffusion UNet preset of the matching image size."""

    patch_size: int
    stride: int
    downscale: int
    unet: str

    @property
    def image_size(self) -> int:
        return self.patch_size // self.downscale


PRESETS: dict[str, StructurePreset] = {
    "tiny-64": StructurePreset(patch_size=128, stride=64, downscale=2, unet="tiny-64"),
    "small-128": StructurePreset(patch_size=256, stride=128, downscale=2, unet="small-128"),
    "paper-256": StructurePreset(patch_size=256, stride=128, downscale=1, unet="paper-256"),
}


def _preset(preset: str | StructurePreset) -> StructurePreset:
    if isinstance(preset, StructurePreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown structure preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


def _downscale(inst: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour downscale of an instance map (the centre pixel of each block):
    ids stay ids, and the distance maps are then computed at the new size."""
    if factor == 1:
        return inst
    return np.ascontiguousarray(inst[factor // 2 :: factor, factor // 2 :: factor])


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
    if cache_file.is_file():
        with np.load(cache_file, allow_pickle=False) as data:
            structures, names = data["structures"], [str(n) for n in data["names"]]
    else:
        chunks, names = [], []
        for tile, path in files.items():
            inst = read_instance_map(path)
            if min(inst.shape) < p.patch_size:
                raise ValueError(f"'{path}' is {inst.shape}, smaller than the {p.patch_size} px patches of the preset")
            patches, origins = extract_patches(inst, p.patch_size, p.stride)
            # HoVer-Net leaves nuclei of <= 30 px without distance maps; keep that area in
            # full-resolution pixels when the maps are downscaled
            min_size = max(1, round(30 / p.downscale**2))
            chunks += [
                encode_structure(_downscale(m, p.downscale), min_size=min_size, centre="nearest") for m in patches
            ]
            names += [f"{tile}_r{r:05d}_c{c:05d}" for r, c in origins]
        structures = np.stack(chunks)
        with atomic_path(cache_file) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, structures=structures, names=np.array(names))
    if subset is not None:
        wanted = [line.strip() for line in Path(subset).read_text().splitlines() if line.strip()]
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


def to_model_input(structures: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) structures ``[fg in {0, 1} or [0, 1], h, v]`` -> (N, 3, H, W) float32 in [-1, 1]."""
    if not isinstance(structures, np.ndarray) or structures.ndim != 4 or structures.shape[-1] != 3:
        raise ValueError(f"`structures` must be (N, H, W, 3), got {getattr(structures, 'shape', type(structures))}")
    x = torch.from_numpy(np.ascontiguousarray(structures, dtype=np.float32)).permute(0, 3, 1, 2).clone()
    x[:, 0] = x[:, 0] * 2 - 1
    return x


def from_model_output(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) model samples in [-1, 1] -> (N, H, W, 3) float32 ``[probability in
    [0, 1], h, v]`` (clipped to the valid ranges), the input of
    ``nudiff_postproc.instances_from_structures``."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) samples, got {tuple(x.shape)}")
    out = x.detach().float().clamp(-1, 1).permute(0, 2, 3, 1).cpu().numpy().copy()
    out[..., 0] = (out[..., 0] + 1) / 2
    return out


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
