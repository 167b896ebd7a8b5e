"""nudiff-structure: the nuclei-structure model of nudiff (data, training, sampling, evaluation)."""

from nudiff_postproc import structure_grid

from ._data import PRESETS, StructurePreset, build_structures, dihedral_augment, from_model_output, to_model_input
from ._evaluate import evaluate_structures, hv_skill
from ._sample import sample_structures, structure_name
from ._train import draw_structures, train_structure_model

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "StructurePreset",
    "build_structures",
    "dihedral_augment",
    "draw_structures",
    "evaluate_structures",
    "hv_skill",
    "sample_structures",
    "structure_grid",
    "structure_name",
    "train_structure_model",
    "from_model_output",
    "to_model_input",
]
