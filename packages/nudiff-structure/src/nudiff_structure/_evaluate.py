"""Judging sampled structures against real ones."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from nudiff_diffusion import evaluation_preset
from nudiff_postproc import (
    hv_maps,
    instances_from_structures,
    morphology_distance,
    morphology_stats,
    read_instance_map,
)
from nudiff_postproc._folders import STRUCTURE_SUFFIXES, list_files, read_structure
from nudiff_postproc._runs import recorded_settings

from ._data import PRESETS, build_structures

__all__ = ["evaluate_structures", "hv_skill"]


def hv_skill(structures: np.ndarray, maps: np.ndarray, *, min_size: int) -> float:
    """How much the h/v channels of ``structures`` say about the nuclei of ``maps``:
    ``1 - sum |given - own| / sum |own|`` over the nuclei's pixels, pooled, where ``own``
    are the maps' own distance maps (``hv_maps``, ``centre="nearest"``, ``min_size`` as
    the structures were encoded). 1: the maps' own; 0: maps that say nothing (zeros, the
    reference a skill score needs); negative: maps that contradict their nuclei (-1 for
    the wrong sign). NaN when the maps hold no nucleus with distance maps.

    Parameters
    ----------
    structures : (N, H, W, 3) ndarray of float
        ``[fg, h, v]``.
    maps : (N, H, W) ndarray of int
        Their instance maps.
    """
    structures, maps = np.asarray(structures), np.asarray(maps)
    if structures.ndim != 4 or structures.shape[-1] != 3 or maps.shape != structures.shape[:3]:
        raise ValueError(
            f"`structures` must be (N, H, W, 3) and `maps` (N, H, W) of the same N, H, W; got "
            f"{structures.shape} and {maps.shape}"
        )
    own = np.stack([hv_maps(m, min_size=min_size, centre="nearest") for m in maps])
    inside = maps > 0
    reference = float(np.abs(own[inside]).sum(dtype=np.float64))
    if reference == 0:
        return float("nan")
    error = float(np.abs(structures[..., 1:][inside].astype(np.float64) - own[inside]).sum())
    return 1.0 - error / reference


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
        instances, per nucleus; about 0.76 for h/v maps that say nothing: read it with the
        next one), ``self_consistency_skill`` (:func:`hv_skill`: 0 for h/v maps that say
        nothing, 1 for the maps' own), ``samples``.
    """
    if isinstance(max_real, bool) or not isinstance(max_real, (int, np.integer)) or max_real < 1:
        raise ValueError(f"`max_real` must be an integer >= 1 (real patches to compare with), got {max_real!r}")
    files = list_files(Path(samples_dir) / "structures", STRUCTURE_SUFFIXES, "sampled structure")
    map_dir = Path(samples_dir) / "instance_maps"
    structures, maps = [], []
    for name, path in files.items():
        structure, inst = read_structure(path), read_instance_map(map_dir / f"{name}.png")
        first = structures[0] if structures else structure
        square = (first.shape[0],) * 2 + (3,)
        if structure.shape != square or inst.shape != structure.shape[:2]:
            raise ValueError(
                f"'{path}' is {structure.shape} and its instance map {inst.shape}; every sample of "
                f"'{samples_dir}' must be a square {square} with a map of {square[:2]}"
            )
        structures.append(structure)
        maps.append(inst)
    structures, maps = np.stack(structures), np.stack(maps)
    size = structures.shape[1]
    preset = evaluation_preset(PRESETS, preset, size, kind="structure", samples=samples_dir)
    scale = PRESETS[preset].downscale
    made_at = (recorded_settings(samples_dir) or {}).get("postprocess_scale")
    if made_at is not None and made_at != scale:
        raise ValueError(
            f"'{samples_dir}': its instance maps were post-processed at {made_at} x the structures' size, the "
            f"{preset!r} real structures are at {scale} x (the preset's downscale): their nuclei would not "
            f"compare; sample again from a checkpoint or graph that records the {preset!r} preset"
        )
    real, _ = build_structures(real_dir, preset)
    rng = np.random.default_rng(seed)
    real = real[rng.choice(len(real), size=min(len(real), max_real), replace=False)]
    real_stats = morphology_stats(instances_from_structures(real, scale=scale))
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
    result["self_consistency_skill"] = hv_skill(structures, maps, min_size=p.min_size)
    result["samples"] = len(structures)
    return result
