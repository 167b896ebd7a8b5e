"""Painting a synthetic dataset: one image per structure, resumable and shardable."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from nudiff_diffusion import (
    check_sampler_settings,
    claimed_samples_folder,
    initial_noise,
    names_digest,
    sampling_record,
    shard_indices,
    step_noise_generators,
    tensor_to_images,
)
from nudiff_postproc import (
    outline_overlay,
    picture_grid,
    read_image,
    read_instance_map,
    write_image,
    write_instance_map,
)
from nudiff_postproc._folders import list_files, read_structure
from nudiff_postproc._io import INSTANCE_MAP_SUFFIXES, atomic_path

from ._data import cond_foreground, condition_to_structures, cut_patches, encode_condition
from ._model import PRESETS, HistoPreset
from ._paint import check_guidance, paint_images

__all__ = ["sample_histology", "read_conditions"]

HISTO_NOISE_STREAM = 1  # structures sample from stream 0: never the same noise as their images


def _preset_of(runtime) -> HistoPreset:  # type: ignore[no-untyped-def]
    name = getattr(runtime, "config", {}).get("diffusion", {}).get("histo_preset")
    if name in PRESETS:
        return PRESETS[name]
    matches = [p for p in PRESETS.values() if p.image_size == runtime.image_size]
    if not matches:
        raise ValueError(f"no histology preset has image size {runtime.image_size}")
    return matches[0]


def read_conditions(structures_dir: str | os.PathLike[str], preset: HistoPreset) -> dict[str, np.ndarray]:
    """The instance maps to paint, by name, each (s, s) int32 at the model's size.

    ``structures_dir`` is either the output of ``nudiff-structure sample`` (``structures/``
    with 3-channel ``.npy`` files, checked, and ``instance_maps/`` of the same names) or a
    dataset folder of real instance maps: maps of the model's size are taken whole, larger
    ones are cut into the preset's patches and downscaled (names ``TILE_rRRRRR_cCCCCC``).
    """
    folder = Path(structures_dir)
    size, g = preset.image_size, preset.geometry
    maps = list_files(folder / "instance_maps", INSTANCE_MAP_SUFFIXES, "instance map")
    out: dict[str, np.ndarray] = {}
    if (folder / "structures").is_dir():
        structures = list_files(folder / "structures", (".npy",), "structure")
        missing = sorted(set(structures) - set(maps))
        if missing:
            raise ValueError(f"'{folder}': structures without an instance map in instance_maps/, e.g. {missing[:3]}")
        for name, path in structures.items():
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            if arr.ndim != 3 or arr.shape[-1] != 3:
                raise ValueError(f"'{path}' has shape {arr.shape}; a structure is (H, W, 3) [fg, h, v]")
            read_structure(path)  # dtype and range checks
            inst = read_instance_map(maps[name])
            if inst.shape != (size, size) or arr.shape[:2] != (size, size):
                raise ValueError(
                    f"'{path}' is {arr.shape[:2]} and its instance map {inst.shape}; this model paints {size} x {size}"
                )
            out[name] = inst.astype(np.int32)
        return out
    for name, path in maps.items():
        patch_names, _, patch_maps = cut_patches(name, read_instance_map(path), g, path=path)
        out.update(zip(patch_names, patch_maps, strict=True))
    return out


def _check_painted_for(
    out: Path, done: list[str], conditions: dict[str, np.ndarray], structures_dir: str | os.PathLike[str]
) -> None:
    """Refuse to continue a folder whose finished images were painted for other instance
    maps than ``structures_dir`` holds now under their names (the folder keeps the map each
    image was painted for): the folders may move, but a pair is never left beside images
    painted for changed structures."""
    for name in done:
        if not np.array_equal(read_instance_map(out / "instance_maps" / f"{name}.png"), conditions[name]):
            raise ValueError(
                f"'{out / 'images' / name}.png' was painted for another instance map than the one "
                f"'{structures_dir}' now holds under {name!r}: the structures changed since this folder was "
                "started; paint them into another --out"
            )


def sample_histology(
    runtime,  # type: ignore[no-untyped-def]  # HistoDenoiser-like
    structures_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    guidance: float = 2.0,
    sampler: str = "dpmpp2m",
    steps: int = 20,
    batch: int = 8,
    seed: int = 0,
    num: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> dict:
    """Paint an image for every structure of ``structures_dir`` into a synthetic dataset.

    Layout (DESIGN.md): ``images/NAME.png``, ``instance_maps/NAME.png`` (the structure
    folder's map), ``structures/NAME.npy`` (float32 HWC ``[fg, h, v]``: the condition the
    model saw, encoded from the instance map so that image and label agree), ``manifest.json``
    and ``preview.png`` (images with the instance outlines). Rank ``r`` of ``k`` paints the
    names at sorted positions ``i % k == r``; each image starts from its own noise (seed,
    position) and is written last, so a rerun skips finished names and a killed run resumes
    without loss or duplicates. The folder remembers the model (its weights' digest), the
    sampling settings and the structures' names it was started with (``.nudiff-run.json``),
    and the instance map each finished image was painted for: a rerun with other settings,
    other structures (added ones would take finished images' noise) or structures that
    changed under a finished name is refused, naming the flag or the file, rather than
    mixing two runs' images. The folders may move between runs.
    """
    shard_indices(0, rank, world_size)  # checks the shard before any work
    if batch < 1:
        raise ValueError(f"`batch` must be >= 1, got {batch}")
    check_guidance(guidance)
    check_sampler_settings(sampler, steps, 1.0)
    if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 1):
        raise ValueError(f"`num` (--num) must be an integer >= 1 or None (every structure), got {num!r}")
    preset = _preset_of(runtime)
    foreground = cond_foreground(getattr(runtime, "config", {}).get("diffusion", {}))  # as the model was trained
    conditions = read_conditions(structures_dir, preset)
    names = sorted(conditions)[:num] if num is not None else sorted(conditions)
    if hasattr(runtime, "check_sampling_batch"):  # an exported graph's limit, before any folder is made
        runtime.check_sampling_batch(min(batch, max(1, len(names))), guided=True)
    if Path(out_dir).resolve() == Path(structures_dir).resolve():
        raise ValueError(
            f"`--out` '{out_dir}' is the --structures folder: painting there would overwrite its structures; "
            "give another --out"
        )
    settings = sampling_record(
        runtime,
        sampler=sampler,
        steps=steps,
        seed=seed,
        guidance=guidance,
        # each image's noise is keyed by its name's position among all the structures' names:
        # structures added to or removed from the folder would move it (not the folder's path)
        structure_names=names_digest(sorted(conditions), "structures"),
    )
    with claimed_samples_folder(out_dir, settings, flags={"structure_names": "the --structures"}) as out:
        for sub in ("images", "instance_maps", "structures"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        mine = shard_indices(len(names), rank, world_size)
        todo = [i for i in mine if not (out / "images" / f"{names[i]}.png").is_file()]
        waiting = set(todo)
        _check_painted_for(out, [names[i] for i in mine if i not in waiting], conditions, structures_dir)
        shape = (runtime.in_channels, runtime.image_size, runtime.image_size)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="images", unit="image")
        t0 = time.perf_counter()
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            maps = [conditions[names[i]] for i in chunk]
            cond = encode_condition(maps, preset.geometry.min_size, foreground)
            x_T = initial_noise(seed, chunk, shape, stream=HISTO_NOISE_STREAM)
            painted = paint_images(
                runtime,
                cond,
                guidance=guidance,
                sampler=sampler,
                steps=steps,
                x_T=x_T,
                generator=step_noise_generators(seed, chunk, stream=HISTO_NOISE_STREAM),
            )
            images, structures = tensor_to_images(painted), condition_to_structures(cond, foreground)
            for i, image, inst, s in zip(chunk, images, maps, structures, strict=True):
                name = names[i]
                write_instance_map(out / "instance_maps" / f"{name}.png", inst)
                with atomic_path(out / "structures" / f"{name}.npy") as tmp, open(tmp, "wb") as fh:
                    np.save(fh, s.astype(np.float32))
                write_image(out / "images" / f"{name}.png", image)  # last: marks the name done
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        manifest = {
            "runtime": getattr(runtime, "config", {}),
            "structures": str(structures_dir),
            "guidance": guidance,
            "sampler": sampler,
            "steps": steps,
            "seed": seed,
            "num": len(names),
            "rank": rank,
            "world_size": world_size,
            "drawn_now": len(todo),
            "this_rank": len(mine),
            "seconds": round(seconds, 3),
            "seconds_per_image": round(seconds / len(todo), 4) if todo else None,
        }
        with atomic_path(out / ("manifest.json" if rank == 0 else f"manifest-rank{rank}.json")) as tmp:
            Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n")
        if rank == 0 and mine:  # its first 8 pairs, from the files: the same after a resume
            shown = [
                (
                    read_image(out / "images" / f"{names[i]}.png"),
                    read_instance_map(out / "instance_maps" / f"{names[i]}.png"),
                )
                for i in mine[:8]
            ]
            write_image(out / "preview.png", picture_grid([[im, outline_overlay(im, m)] for im, m in shown], columns=4))
    return manifest
