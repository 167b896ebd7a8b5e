"""nudiff-postproc: nuclei structures, watershed, metrics and label I/O.

numpy, scipy and scikit-image only. Parity with HoVer-Net and the Nudiff paper's code
is tested on fixtures made with those implementations.
"""

from ._io import (
    read_image,
    read_instance_map,
    read_monuseg_xml,
    to_geojson,
    write_image,
    write_instance_map,
)
from ._labels import compact_labels
from ._metrics import METRIC_KEYS, OverlapTable, evaluate, mean_metrics, overlap_table
from ._morphology import MORPHOLOGY_FEATURES, morphology_distance, morphology_stats
from ._patches import (
    PATCH_GEOMETRY,
    PatchGeometry,
    downscale_image,
    downscale_instance_map,
    extract_patches,
    patch_origins,
    stitch,
    upsample,
    upsample_instance_map,
)
from ._process import describe_cpu, retain_freed_memory, usable_cores
from ._render import instances_rgb, outline_overlay, picture_grid, structure_grid, structure_rgb
from ._structure import (
    DIHEDRAL,
    encode_structure,
    hv_maps,
    transform_image,
    transform_instance_map,
    transform_structure,
)
from ._subset import nuclei_share, patch_features, select_subset
from ._synthetic import synthetic_he_image, synthetic_instance_map, write_synthetic_dataset
from ._watershed import instances_from_structure, instances_from_structures

__version__ = "0.1.0"

__all__ = [
    "retain_freed_memory",
    "DIHEDRAL",
    "METRIC_KEYS",
    "MORPHOLOGY_FEATURES",
    "OverlapTable",
    "PATCH_GEOMETRY",
    "PatchGeometry",
    "compact_labels",
    "describe_cpu",
    "downscale_image",
    "downscale_instance_map",
    "encode_structure",
    "evaluate",
    "mean_metrics",
    "extract_patches",
    "hv_maps",
    "instances_rgb",
    "outline_overlay",
    "picture_grid",
    "instances_from_structure",
    "instances_from_structures",
    "morphology_distance",
    "morphology_stats",
    "overlap_table",
    "patch_features",
    "patch_origins",
    "read_image",
    "read_instance_map",
    "read_monuseg_xml",
    "select_subset",
    "nuclei_share",
    "stitch",
    "upsample",
    "upsample_instance_map",
    "usable_cores",
    "structure_grid",
    "structure_rgb",
    "synthetic_instance_map",
    "synthetic_he_image",
    "write_synthetic_dataset",
    "to_geojson",
    "transform_image",
    "transform_instance_map",
    "transform_structure",
    "write_image",
    "write_instance_map",
]
