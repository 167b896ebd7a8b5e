"""Tiled HoVer-Net inference over images of any size, and its outputs.

An image is reflect-padded by the model's margin ``(input - output) / 2`` (plus up to one
output window at the bottom/right), cut into input windows whose output regions tile it
without overlap (HoVer-Net's own tiling: step = output size), predicted in batches,
stitched, and cropped back. The stitched ``[probability, h, v]`` map goes through
:func:`nudiff_postproc.instances_from_structure`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from nudiff_diffusion import evaluating
from nudiff_postproc import (
    evaluate,
    instances_from_structure,
    mean_metrics,
    outline_overlay,
    to_geojson,
    write_image,
    write_instance_map,
)
from nudiff_postproc._io import atomic_path

from ._hovernet import HoVerNet
from ._onnx import OnnxHoVerNet

__all__ = ["predict_structure", "predict_instances", "write_prediction", "prediction_paths", "score_pairs"]


@torch.no_grad()
def predict_structure(model: HoVerNet | OnnxHoVerNet, image: np.ndarray, *, batch: int = 8) -> np.ndarray:
    """HoVer-Net's prediction for a whole image.

    Parameters
    ----------
    model : HoVerNet or OnnxHoVerNet
        A PyTorch model (used in eval mode, restored afterwards) or an ONNX Runtime engine.
    image : (H, W, 3) ndarray of uint8
        RGB image of any size. Not modified.
    batch : int
        Windows per forward pass.

    Returns
    -------
    (H, W, 3) ndarray of float32
        ``[nuclear-pixel probability, h, v]``.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        got = f"shape {getattr(image, 'shape', None)}, dtype {getattr(image, 'dtype', None)}"
        raise ValueError(f"`image` must be an (H, W, 3) uint8 RGB array, got {got}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"`image` is empty: shape {image.shape}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"`batch` must be an integer >= 1, got {batch!r}")
    if not isinstance(model, (HoVerNet, OnnxHoVerNet)):
        raise TypeError(f"`model` must be a HoVerNet or an OnnxHoVerNet (load_engine), got {type(model).__name__}")
    big, small = model.config.input_size, model.config.output_size
    margin = (big - small) // 2
    h, w = image.shape[:2]
    rows, cols = math.ceil(h / small), math.ceil(w / small)
    pad = ((margin, rows * small - h + margin), (margin, cols * small - w + margin), (0, 0))
    padded = np.pad(image, pad, mode="reflect")
    origins = [(i * small, j * small) for i in range(rows) for j in range(cols)]
    canvas = np.empty((rows * small, cols * small, 3), np.float32)
    is_torch = isinstance(model, torch.nn.Module)
    device = next(model.parameters()).device if is_torch else torch.device("cpu")
    with evaluating(model) if is_torch else contextlib.nullcontext():
        for start in range(0, len(origins), batch):
            chunk = origins[start : start + batch]
            x = np.stack([padded[r : r + big, c : c + big] for r, c in chunk])
            x = torch.from_numpy(x).to(device).permute(0, 3, 1, 2).float().div_(255.0)
            out = model(x)
            prob = out["np"].float().softmax(dim=1)[:, 1:]
            pred = torch.cat([prob, out["hv"].float()], dim=1).permute(0, 2, 3, 1).cpu().numpy()
            for (r, c), p in zip(chunk, pred, strict=True):
                canvas[r : r + small, c : c + small] = p
    return canvas[:h, :w].copy()


def predict_instances(
    model: HoVerNet | OnnxHoVerNet, image: np.ndarray, *, batch: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """``(instance map (H, W) int32, structure (H, W, 3) float32)`` of an image."""
    structure = predict_structure(model, image, batch=batch)
    return instances_from_structure(structure), structure


def prediction_paths(out: str | os.PathLike[str], name: str, map_format: str = ".png") -> dict[str, Path]:
    """Where ``nudiff-seg predict`` writes the outputs of image ``name``."""
    out = Path(out)
    return {
        "instance_map": out / "instance_maps" / f"{name}{map_format}",
        "mat": out / "mat" / f"{name}.mat",
        "geojson": out / "geojson" / f"{name}.geojson",
        "overlay": out / "overlays" / f"{name}.png",
    }


def write_prediction(out: str | os.PathLike[str], name: str, image: np.ndarray, inst: np.ndarray) -> dict[str, Path]:
    """Write one image's instance map (PNG, or TIFF past 65,535 nuclei), HoVer-Net
    ``.mat`` (``inst_map``, ``inst_uid``, ``inst_centroid``), QuPath GeoJSON and an
    outline overlay PNG, each atomically; returns the paths."""
    import json

    from nudiff_postproc._validate import as_instance_map

    # every check before the first file: a bad call leaves nothing behind
    inst = as_instance_map(inst, "inst")
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        got = f"shape {getattr(image, 'shape', None)}, dtype {getattr(image, 'dtype', type(image).__name__)}"
        raise ValueError(f"`image` must be an (H, W, 3) uint8 RGB array, got {got}")
    if image.shape[:2] != inst.shape:
        raise ValueError(f"`image` is {image.shape[:2]} but `inst` is {inst.shape}; they must be the same size")
    if not isinstance(name, str) or not name or Path(name).name != name or name.startswith("."):
        raise ValueError(f"`name` must be a plain file stem (no folders, not hidden), got {name!r}")
    fmt = ".png" if int(inst.max(initial=0)) <= 65535 else ".tif"
    paths = prediction_paths(out, name, fmt)
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    write_instance_map(paths["mat"], inst)
    with atomic_path(paths["geojson"]) as tmp:
        tmp.write_text(json.dumps(to_geojson(inst)))  # unnamed detections, as QuPath's own
    write_image(paths["overlay"], outline_overlay(image, inst))
    write_instance_map(paths["instance_map"], inst)  # last: its presence marks the image done
    return paths


def score_pairs(
    model: HoVerNet | OnnxHoVerNet,
    pairs: Iterable[tuple[str, np.ndarray, np.ndarray]],
    *,
    batch: int = 8,
    progress: str | None = None,
) -> tuple[list[tuple[str, dict[str, float]]], dict[str, float]]:
    """Predict every ``(name, image, true instance map)`` and score it with
    :func:`nudiff_postproc.evaluate` as HoVer-Net's ``compute_stats.py`` does (an image
    where only one of the maps has nuclei scores 0); returns the per-image rows and
    :func:`nudiff_postproc.mean_metrics` of them (images with no nuclei in either map
    left out). ``progress``: a progress bar with this description (on stderr)."""
    if progress is not None:
        from tqdm.auto import tqdm

        pairs = tqdm(pairs, desc=progress, unit="image")
    rows = []
    for name, image, true in pairs:
        inst, _ = predict_instances(model, image, batch=batch)
        rows.append((name, evaluate(true, inst, one_empty="zero")))
    return rows, mean_metrics(r for _, r in rows)
