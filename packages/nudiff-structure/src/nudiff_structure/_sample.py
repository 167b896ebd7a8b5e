"""Drawing a synthetic structure dataset: resumable, shardable over ranks."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from nudiff_diffusion import (
    NoiseSchedule,
    check_sampler_settings,
    claimed_samples_folder,
    initial_noise,
    sample,
    sampling_record,
    shard_indices,
    step_noise_generators,
)
from nudiff_postproc import (
    instances_from_structures,
    read_instance_map,
    structure_grid,
    write_image,
    write_instance_map,
)
from nudiff_postproc._io import atomic_path

from ._data import from_model_output

__all__ = ["sample_structures", "structure_name"]


def structure_name(seed: int, index: int) -> str:
    """The file stem of sample ``index`` of a run with ``seed``."""
    return f"s{seed}_{index:06d}"


def sample_structures(
    runtime,  # type: ignore[no-untyped-def]  # anything with eps(x, t) and image_size / in_channels
    out_dir: str | os.PathLike[str],
    num: int,
    *,
    batch: int = 16,
    sampler: str = "dpmpp2m",
    steps: int = 20,
    seed: int = 0,
    clip: float | None = 1.0,
    scale: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> dict:
    """Write ``num`` sampled structures and their instance maps into ``out_dir``.

    Layout: ``structures/NAME.npy`` (float32 HWC, probability in [0, 1], h/v in [-1, 1]),
    ``instance_maps/NAME.png`` (one-orientation watershed), ``preview.png`` (rank 0) and
    ``manifest.json`` (rank 0; ``manifest-rankR.json`` on other ranks). Names come from the
    seed and the index, and rank ``r`` of ``k`` takes the indices ``i`` with ``i % k == r``:
    a rerun skips what exists, so a killed run resumes without losing or duplicating
    anything, and shards need no coordination. The folder remembers the model (its weights'
    digest) and the sampling settings it was started with (``.nudiff-run.json``): a rerun
    with others is refused, naming the flag, rather than mixing two runs' samples. Each
    sample starts from its own noise, so a deterministic sampler (``ddim``, ``dpmpp2m``)
    gives the same structure for an index whatever the batch size or the number of ranks (up
    to float rounding: batched kernels round differently for other batch sizes, by about
    1e-7); ``ddpm`` draws each step's noise per batch, so with it the batch size and the
    number of ranks are settings a rerun must keep. ``clip`` bounds the predicted x0 (the
    structures live in [-1, 1]; without it an imperfect model's samples drift far outside).
    ``scale``: post-process at this many times the structures' size (default: the
    checkpoint preset's downscale factor, so that HoVer-Net's pixel-sized filters see
    nuclei of the size they were made for; see ``nudiff_postproc.instances_from_structure``).
    """
    if scale is None:
        scale = int(getattr(runtime, "config", {}).get("diffusion", {}).get("preset", {}).get("downscale", 1))
    mine = shard_indices(num, rank, world_size)
    if num < 1 or batch < 1:
        raise ValueError(f"`num` and `batch` must be >= 1, got {num} and {batch}")
    check_sampler_settings(sampler, steps, clip)
    if hasattr(runtime, "check_sampling_batch"):  # an exported graph's limit, before any folder is made
        runtime.check_sampling_batch(min(batch, max(1, len(mine))))
    settings = sampling_record(
        runtime,
        sampler=sampler,
        steps=steps,
        seed=seed,
        clip=clip,
        postprocess_scale=scale,
    )
    with claimed_samples_folder(out_dir, settings) as out:  # a rerun must not mix settings
        (out / "structures").mkdir(parents=True, exist_ok=True)
        (out / "instance_maps").mkdir(parents=True, exist_ok=True)
        todo = [
            i
            for i in mine
            if not (
                (out / "structures" / f"{structure_name(seed, i)}.npy").is_file()
                and (out / "instance_maps" / f"{structure_name(seed, i)}.png").is_file()
            )
        ]
        shape = (runtime.in_channels, runtime.image_size, runtime.image_size)
        schedule = NoiseSchedule.linear(1000)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="structures", unit="sample")
        t0 = time.perf_counter()
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            x_T = initial_noise(seed, chunk, shape)
            x = sample(
                runtime.eps,
                shape=tuple(x_T.shape),
                schedule=schedule,
                method=sampler,
                steps=steps,
                clip=clip,
                x_T=x_T,
                generator=step_noise_generators(seed, chunk),
                device=getattr(runtime, "device", None),  # a GPU runtime: the sampler runs there too
            )
            structures = from_model_output(x)
            maps = instances_from_structures(structures, scale=scale)
            for i, s, inst in zip(chunk, structures, maps, strict=True):
                name = structure_name(seed, i)
                with atomic_path(out / "structures" / f"{name}.npy") as tmp, open(tmp, "wb") as fh:
                    np.save(fh, s.astype(np.float32))
                write_instance_map(out / "instance_maps" / f"{name}.png", inst)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        manifest = {
            "runtime": getattr(runtime, "config", {}),
            "sampler": sampler,
            "steps": steps,
            "clip": clip,
            "postprocess_scale": scale,
            "seed": seed,
            "num": num,
            "rank": rank,
            "world_size": world_size,
            "drawn_now": len(todo),
            "this_rank": len(mine),
            "seconds": round(seconds, 3),
            "seconds_per_structure": round(seconds / len(todo), 4) if todo else None,
        }
        manifest_name = "manifest.json" if rank == 0 else f"manifest-rank{rank}.json"
        with atomic_path(out / manifest_name) as tmp:
            Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n")
        if rank == 0 and mine:  # its first 8 samples, from the files: the same after a resume
            shown = [structure_name(seed, i) for i in mine[:8]]
            structures = np.stack([np.load(out / "structures" / f"{name}.npy") for name in shown])
            maps = np.stack([read_instance_map(out / "instance_maps" / f"{name}.png") for name in shown])
            write_image(out / "preview.png", structure_grid(structures, maps))
    return manifest
