"""Judging sampled structures against real ones."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from nudiff_diffusion import evaluation_preset
from nudiff_postproc import instances_from_structures, morphology_distance, morphology_stats, read_instance_map
from nudiff_postproc._folders import list_files, read_structure

from ._data import PRESETS, build_structures

__all__ = ["evaluate_structures"]


def evaluate_structures(
    samples_dir: str | os.PathLike[str],
    real_dir: str | os.PathLike[str],
    *,
    preset: str | None = None,
    max_real: int = 1024,
    seed: int = 0,
) -> dict[str, float]:
    """Morphology distance, nuclei per patch and self-consistency of sampled structures.

    Parameters
    ----------
    samples_dir : path
        The output of :func:`sample_structures` (``structures/``, ``instance_maps/``).
    real_dir : path
        A dataset folder of real instance maps, encoded with ``preset`` (default: the preset
        whose image size is the samples' size).
    max_real : int
        At most this many real patches (drawn with ``seed``) are compared.

    Returns
    -------
    dict
        ``morphology_distance`` (mean scaled W1, see nudiff-postproc), one ``distance_*`` per
        feature, ``nuclei_per_patch`` and ``real_nuclei_per_patch``, ``self_consistency``
        (mean agreement in [0, 1] of the sampled h/v maps with the maps of their own
        instances: low for samples whose distance maps contradict their nuclei), ``samples``.
    """
    files = list_files(Path(samples_dir) / "structures", (".npy",), "sampled structure")
    map_dir = Path(samples_dir) / "instance_maps"
    structures, maps = [], []
    for name, path in files.items():
        structure, inst = read_structure(path), read_instance_map(map_dir / f"{name}.png")
        first = structures[0] if structures else structure
        if structure.shape != first.shape or inst.shape != structure.shape[:2]:
            raise ValueError(
                f"'{path}' is {structure.shape} and its instance map {inst.shape}; every sample of "
                f"'{samples_dir}' must be {first.shape} with a map of {first.shape[:2]}"
            )
        structures.append(structure)
        maps.append(inst)
    structures, maps = np.stack(structures), np.stack(maps)
    size = structures.shape[1]
    preset = evaluation_preset(PRESETS, preset, size, kind="structure", samples=samples_dir)
    real, _ = build_structures(real_dir, preset)
    rng = np.random.default_rng(seed)
    real = real[rng.choice(len(real), size=min(len(real), max_real), replace=False)]
    real_stats = morphology_stats(instances_from_structures(real, scale=PRESETS[preset].downscale))
    p = PRESETS[preset]
    # the structures carry h = v = 0 on nuclei under HoVer-Net's 30 px (in full-size pixels)
    sample_stats = morphology_stats(maps, structures, centre="nearest", min_size=p.min_size)
    distance = morphology_distance(sample_stats, real_stats)
    result = {"morphology_distance": distance.pop("mean")}
    result.update({f"distance_{k}": v for k, v in distance.items()})
    result["nuclei_per_patch"] = float(sample_stats["nuclei_per_patch"].mean())
    result["real_nuclei_per_patch"] = float(real_stats["nuclei_per_patch"].mean())
    consistency = sample_stats["hv_consistency"]
    result["self_consistency"] = float(np.nanmean(consistency)) if consistency.size else float("nan")
    result["samples"] = len(structures)
    return result
