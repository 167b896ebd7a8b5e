"""Training the structure model: the nudiff-diffusion trainer on encoded structures, with
periodic sample grids and the morphology distance of samples to the training structures."""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
from nudiff_diffusion import NoiseSchedule, TrainConfig, UNet, UNetConfig, names_digest, sample, train
from nudiff_postproc import (
    instances_from_structures,
    morphology_distance,
    morphology_stats,
    structure_grid,
    write_image,
)
from nudiff_postproc._io import atomic_path

from ._data import PRESETS, build_structures, dihedral_augment, from_model_output, to_model_input

__all__ = ["train_structure_model", "draw_structures"]


def draw_structures(
    model: UNet, num: int, *, sampler: str = "dpmpp2m", steps: int = 20, seed: int = 0, scale: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``num`` structures from ``model`` (x0 clipped to [-1, 1], the data range, as
    guided-diffusion's ``clip_denoised``) and post-process them (at ``scale`` times their
    size: the preset's downscale factor, see ``nudiff_postproc.instances_from_structure``).

    Returns
    -------
    structures : (num, H, W, 3) float32, ``[probability, h, v]``
    instance_maps : (num, H, W) int32
    """
    size, channels = model.config.image_size, model.config.in_channels
    with torch.no_grad():
        x = sample(
            lambda x, t: model(x, t),
            shape=(num, channels, size, size),
            schedule=NoiseSchedule.linear(1000),
            method=sampler,
            steps=steps,
            clip=1.0,
            generator=torch.Generator().manual_seed(seed),
            device=next(model.parameters()).device,
        )
    structures = from_model_output(x)
    return structures, instances_from_structures(structures, scale=scale)


def train_structure_model(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    preset: str,
    config: TrainConfig,
    *,
    subset: str | os.PathLike[str] | None = None,
    resume: bool = False,
    preview_samples: int = 16,
    progress: bool = True,
) -> UNet:
    """Train a structure model on a dataset folder's instance maps.

    The paper's settings for ``paper-256``: hybrid loss with learned sigma, linear 1000-step
    schedule, AdamW lr 1e-4, weight decay 0.05, batch 4 (``TrainConfig`` defaults but the
    step count). Every checkpoint (``config.save_every`` steps) writes
    ``previews/step_NNNNNNN.png`` (sampled structures and their instance maps) and a row of
    ``morphology.csv``: the morphology distance of ``preview_samples`` samples (DPM-Solver++,
    20 steps) to the training structures, so that checkpoints can be picked by number.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown structure preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    structures, names = build_structures(data_dir, preset, subset=subset)
    data = to_model_input(structures)
    rng = np.random.default_rng(config.seed)
    reference = structures[rng.choice(len(structures), size=min(len(structures), 256), replace=False)]
    real_stats = morphology_stats(instances_from_structures(reference, scale=p.downscale))
    out = Path(out_dir)
    torch.manual_seed(config.seed)
    model = UNet(UNetConfig.preset(p.unet, image_size=p.image_size, in_channels=3))

    def preview(step: int, ema: UNet) -> None:
        s, inst = draw_structures(ema, preview_samples, seed=config.seed, scale=p.downscale)
        write_image(out / "previews" / f"step_{step:07d}.png", structure_grid(s, inst))
        distance = morphology_distance(real_stats, morphology_stats(inst, s, centre="nearest", min_size=p.min_size))
        path = out / "morphology.csv"
        rows = [["step", *distance]]
        if path.exists():
            with open(path, newline="") as fh:
                rows = list(csv.reader(fh))
        rows = [r for r in rows if r and r[0] != str(step)]  # a resume redoes its checkpoint's row
        rows.append([str(step), *(f"{v:.4f}" for v in distance.values())])
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            csv.writer(fh).writerows(rows)

    return train(
        model,
        data,
        NoiseSchedule.linear(1000),
        out,
        config,
        resume=resume,
        augment=dihedral_augment,
        callback=preview,
        progress=progress,
        diffusion={
            "kind": "structure",
            "schedule": "linear",
            "num_timesteps": 1000,
            "structure_preset": preset,
            "preset": dataclasses.asdict(p),
            "data": str(data_dir),
            "patches": names_digest(names, "patches"),  # what a resume must train on, wherever the folder moves
        },
    )
