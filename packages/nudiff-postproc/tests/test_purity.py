"""No public function modifies its arguments."""

from __future__ import annotations

import nudiff_postproc as npp
import numpy as np


def _frozen(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.flags.writeable = False  # any in-place write now raises


def test_public_functions_leave_their_inputs_alone(tmp_path):
    inst = npp.synthetic_instance_map((96, 96), n_nuclei=30, seed=5)
    other = npp.synthetic_instance_map((96, 96), n_nuclei=30, seed=6)
    structure = npp.encode_structure(inst)
    preds = np.stack([structure, npp.encode_structure(other)])
    image = np.zeros((96, 96, 3), np.uint8)
    copies = [a.copy() for a in (inst, other, structure, preds, image)]
    _frozen(inst, other, structure, preds, image)

    npp.hv_maps(inst)
    npp.encode_structure(inst)
    npp.transform_structure(structure, rot90=1, flip=True)
    npp.transform_instance_map(inst, rot90=2, flip=True)
    npp.transform_image(image, rot90=3)
    npp.instances_from_structure(structure, orientations=8)
    npp.instances_from_structures(preds, workers=2)
    npp.evaluate(inst, other)
    npp.overlap_table(inst, other)
    npp.extract_patches(image, 32, 32)
    patches, origins = npp.extract_patches(inst, 32, 16)
    _frozen(patches, origins)
    npp.stitch(patches, origins, inst.shape)
    npp.morphology_stats(inst, structure)
    npp.morphology_distance(inst, other)
    npp.to_geojson(inst)
    npp.write_instance_map(tmp_path / "a.png", inst)
    npp.write_image(tmp_path / "a.png", image)
    npp.compact_labels(inst)
    compact = np.arange(12, dtype=np.int32).reshape(3, 4)  # already 1..N int32
    assert not np.shares_memory(npp.compact_labels(compact)[0], compact)  # a new array, never the argument

    for before, after in zip(copies, (inst, other, structure, preds, image), strict=True):
        np.testing.assert_array_equal(before, after)
