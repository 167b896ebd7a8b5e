"""nudiff-structure: the nuclei-structure model of nudiff (data side so far)."""

from ._data import PRESETS, StructurePreset, build_structures, dihedral_augment, from_model_output, to_model_input

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "StructurePreset",
    "build_structures",
    "dihedral_augment",
    "from_model_output",
    "to_model_input",
]
