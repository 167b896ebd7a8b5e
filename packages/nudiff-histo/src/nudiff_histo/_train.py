"""Training the histology model: the nudiff-diffusion trainer on (image, structure) pairs,
the condition dropped to zeros with ``cond_drop_prob`` for classifier-free guidance."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from nudiff_diffusion import (
    NoiseSchedule,
    TrainConfig,
    UNet,
    latest_checkpoint,
    names_digest,
    read_config,
    tensor_to_images,
    train,
)
from nudiff_postproc import outline_overlay, picture_grid, structure_rgb, write_image

from ._data import (
    COND_FOREGROUNDS,
    build_pairs,
    cond_foreground,
    condition_to_structures,
    encode_condition,
    paired_batch,
    pairs_to_rows,
)
from ._model import PRESETS, HistoDenoiser, build_histo_unet, histo_settings, load_histo_model, read_histo_settings
from ._paint import paint_images

__all__ = ["train_histo_model", "preview_grid"]


def preview_grid(
    structures: np.ndarray, painted: torch.Tensor, real: np.ndarray | None, maps: np.ndarray, columns: int = 2
) -> np.ndarray:
    """A grid of cells (structure, painted image with the instance outlines, real image).

    ``structures``: (N, s, s, 3) ``[fg, h, v]`` (``condition_to_structures``); ``painted``:
    (N, 3, s, s) model images; ``real``: (N, s, s, 3) uint8 or None; ``maps``: (N, s, s)
    instance maps. Returns uint8 RGB."""
    s_rgb = [structure_rgb(s) for s in structures]
    images = tensor_to_images(painted)
    cells = []
    for i in range(len(images)):
        cell = [s_rgb[i], outline_overlay(images[i], maps[i])]
        if real is not None:
            cell.append(real[i])
        cells.append(cell)
    return picture_grid(cells, columns)


def train_histo_model(
    pairs_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    preset: str,
    config: TrainConfig,
    *,
    init: str | os.PathLike[str] | None = None,
    resume: bool = False,
    holdout: int = 4,
    progress: bool = True,
    model_overrides: dict | None = None,
    spade_layers: str | None = None,
    foreground: str | None = None,
) -> UNet:
    """Train (or fine-tune) a histology model on a dataset folder of (image, instance map) pairs.

    Parameters
    ----------
    pairs_dir : path
        Dataset folder (``images/``, ``instance_maps/``), cut into the preset's patches.
    out_dir : path
        Run directory (checkpoints, ``log.csv``, ``previews/step_NNNNNNN.png``).
    preset : str
        ``tiny-64``, ``small-128`` or ``paper-256``.
    config : TrainConfig
        ``cond_drop_prob`` is the share of conditions replaced by zeros (0.2 in the paper's
        fine-tuning phase, 0 in its pre-training).
    init : path, optional
        A histology checkpoint to start from (the paper's second phase: fine-tune a
        pre-trained model with dropping and lr 2e-5). Ignored when resuming a run that has
        checkpoints.
    holdout : int
        Pairs kept out of training (chosen with ``config.seed``) and painted at every
        checkpoint for the preview grid (structure, sample with guidance 2, real image).
    model_overrides : dict, optional
        UNet flags to change (small models for tests).
    spade_layers : {"decoder", "all"}, optional
        Where a new model's SPADE layers sit (default "decoder", the paper's; see
        :func:`build_histo_unet`). A fine-tuned (``init``) or resumed model keeps its own;
        giving another is refused.
    foreground : {"binary", "signed"}, optional
        How a new model's conditions encode the foreground (default "binary", the paper's; see
        ``COND_FOREGROUNDS``); likewise kept by a fine-tuned or resumed model.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown histology preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    if init is not None:  # before the pairs are read
        init_preset = read_histo_settings(init).get("histo_preset")
        if init_preset != preset:
            raise ValueError(f"--init '{init}' is a {init_preset!r} histology model, not {preset!r}")
    images, maps, names = build_pairs(pairs_dir, p)
    if len(images) <= holdout:
        raise ValueError(f"'{pairs_dir}' gives {len(images)} patches; need more than the {holdout} held back")
    rng = np.random.default_rng(config.seed)
    held = np.sort(rng.choice(len(images), size=holdout, replace=False)) if holdout else np.zeros(0, int)
    keep = np.setdiff1d(np.arange(len(images)), held)
    rows = pairs_to_rows(images[keep], maps[keep])
    torch.manual_seed(config.seed)
    out = Path(out_dir)
    ckpt = latest_checkpoint(out) if resume else None
    asked = foreground
    if init is not None:
        model = load_histo_model(init).train()  # with its SPADE placement
        foreground = cond_foreground(read_histo_settings(init))  # and its conditions' encoding
        placed, where = histo_settings(preset, model)["spade_layers"], f"--init '{init}'"
    elif ckpt is not None:  # a resumed run keeps its own (both changed on 2026-12-03)
        saved = read_config(ckpt).get("diffusion", {})
        placed, where = saved.get("spade_layers", "all"), f"the run in '{out}'"
        model = build_histo_unet(preset, **{"spade_layers": placed, **(model_overrides or {})})
        foreground = cond_foreground(saved)
    else:
        placed, where = spade_layers or "decoder", ""
        model = build_histo_unet(preset, **{"spade_layers": placed, **(model_overrides or {})})
        foreground = asked or "binary"
        if foreground not in COND_FOREGROUNDS:
            raise ValueError(f"--cond-foreground must be one of {COND_FOREGROUNDS}, got {foreground!r}")
    if spade_layers is not None and spade_layers != placed:
        raise ValueError(f"--spade-layers {spade_layers}: {where} has its SPADE layers at {placed!r}; leave it out")
    if asked is not None and asked != foreground:
        raise ValueError(f"--cond-foreground {asked}: {where} encodes its conditions' foreground as {foreground}")
    held_cond = encode_condition(maps[held], p.geometry.min_size, foreground) if holdout else None

    def preview(step: int, ema: UNet) -> None:
        if held_cond is None:
            return
        gen = torch.Generator().manual_seed(config.seed)
        painted = paint_images(HistoDenoiser(ema), held_cond, guidance=2.0, generator=gen)
        ema.train(False)
        grid = preview_grid(condition_to_structures(held_cond, foreground), painted, images[held], maps[held])
        write_image(out / "previews" / f"step_{step:07d}.png", grid)

    settings = histo_settings(preset, model, foreground)
    settings.update(
        data=str(pairs_dir),
        cond_drop_prob=config.cond_drop_prob,
        init=None if init is None else str(init),
        holdout=[names[i] for i in held],
        patches=names_digest(names, "patches"),  # what a resume must train on, wherever the folder moves
    )
    return train(
        model,
        rows,
        NoiseSchedule.linear(1000),
        out,
        config,
        resume=resume,
        batch_fn=paired_batch(p.geometry.min_size, foreground),
        callback=preview,
        progress=progress,
        diffusion=settings,
    )
