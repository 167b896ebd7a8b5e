"""nudiff-histo: the SPADE-conditioned histology model of nudiff (data, training, guided
sampling, evaluation)."""

from ._data import (
    COND_FOREGROUNDS,
    build_pairs,
    cond_foreground,
    condition_to_structures,
    encode_condition,
    paired_batch,
    pairs_to_rows,
)
from ._evaluate import evaluate_histology, stain_statistics
from ._export import OnnxModulatedDenoiser, export_histo_onnx, spade_layers
from ._model import (
    PRESETS,
    SPADE_LAYERS,
    HistoDenoiser,
    HistoPreset,
    ModulationCache,
    SpadeNorm,
    build_histo_unet,
    load_histo_denoiser,
    load_histo_model,
)
from ._paint import paint_images
from ._sample import sample_histology
from ._seg_tiles import seg_tile_grid, write_seg_tiles
from ._train import preview_grid, train_histo_model

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "HistoDenoiser",
    "HistoPreset",
    "OnnxModulatedDenoiser",
    "export_histo_onnx",
    "spade_layers",
    "ModulationCache",
    "SpadeNorm",
    "build_histo_unet",
    "build_pairs",
    "encode_condition",
    "condition_to_structures",
    "cond_foreground",
    "COND_FOREGROUNDS",
    "SPADE_LAYERS",
    "load_histo_denoiser",
    "load_histo_model",
    "paint_images",
    "sample_histology",
    "evaluate_histology",
    "stain_statistics",
    "paired_batch",
    "pairs_to_rows",
    "preview_grid",
    "train_histo_model",
    "seg_tile_grid",
    "write_seg_tiles",
]
