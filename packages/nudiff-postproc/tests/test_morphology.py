"""morphology_stats / morphology_distance."""

from __future__ import annotations

import numpy as np
import pytest
from nudiff_postproc import (
    encode_structure,
    extract_patches,
    morphology_distance,
    morphology_stats,
    read_instance_map,
    synthetic_instance_map,
)
from skimage.transform import rescale


def test_stats_of_a_known_disc():
    yy, xx = np.mgrid[:41, :41]
    inst = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 100).astype(np.int32)
    s = morphology_stats(inst, encode_structure(inst))
    assert s["area"][0] == inst.sum()
    assert s["eccentricity"][0] < 0.05 and s["solidity"][0] > 0.9  # skimage hulls pixel corners
    assert s["perimeter"][0] == pytest.approx(2 * np.pi * 10, rel=0.08)
    assert s["hv_consistency"][0] > 0.99  # the structure of the map itself
    np.testing.assert_array_equal(s["nuclei_per_patch"], [1])


def test_any_ids_give_the_stats_of_their_compact_numbering():
    inst = synthetic_instance_map((64, 64), n_nuclei=10, seed=1)
    structure = encode_structure(inst)
    sparse = np.where(inst > 0, inst.astype(np.int64) * 2**36 + 5, 0)  # tables sized by the largest id: ~1 TB
    got, expected = morphology_stats(sparse, structure), morphology_stats(inst, structure)
    assert got.keys() == expected.keys()
    for key, values in expected.items():
        np.testing.assert_array_equal(got[key], values)


def test_consistency_compares_small_nuclei_with_the_encoding_convention():
    inst = np.zeros((40, 40), np.int32)
    inst[5:9, 5:9] = 1  # 16 px: HoVer-Net's min_size=30 leaves it without distance maps
    inst[20:32, 20:32] = 2
    structure = encode_structure(inst, min_size=30)
    assert np.all(structure[5:9, 5:9, 1:] == 0)
    matched = morphology_stats(inst, structure, min_size=30)["hv_consistency"]
    np.testing.assert_allclose(matched, [1.0, 1.0])
    mismatched = morphology_stats(inst, structure, min_size=0)["hv_consistency"]
    assert mismatched[0] < 0.9 and mismatched[1] == 1.0  # the old bias: a good sample scored low


def test_distance_is_zero_for_identical_sets_and_large_for_scaled_nuclei():
    maps = np.stack([synthetic_instance_map((128, 128), n_nuclei=30, seed=s) for s in range(8)])
    assert morphology_distance(maps, maps)["mean"] == 0.0
    big = np.stack(
        [rescale(m, 2, order=0, preserve_range=True, anti_aliasing=False).astype(np.int32)[:128, :128] for m in maps]
    )
    d = morphology_distance(maps, big)
    assert d["area"] > 1.0 and d["mean"] > 0.4


def test_real_vs_real_halves_of_kumar_score_well_under_one(kumar):
    names = [p.strip() for p in (kumar / "splits" / "kumar_train.txt").read_text().split()]
    maps = [read_instance_map(kumar / "instance_maps" / f"{n}.png") for n in names]
    halves = []
    for part in (maps[::2], maps[1::2]):
        patches = np.concatenate([extract_patches(m, 256, 256)[0] for m in part])
        halves.append(morphology_stats(patches))
    d = morphology_distance(*halves)
    assert d["mean"] < 0.3, d
    assert "hv_consistency" not in d


def test_a_set_without_nuclei_is_infinitely_far():
    maps = np.stack([synthetic_instance_map((64, 64), n_nuclei=10, seed=s) for s in range(3)])
    d = morphology_distance(maps, np.zeros_like(maps))
    assert d["area"] == np.inf and d["mean"] == np.inf and np.isfinite(d["nuclei_per_patch"])
    assert morphology_distance(np.zeros_like(maps), np.zeros_like(maps))["area"] == 0.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="structure"):
        morphology_stats(np.ones((8, 8), np.int32), np.zeros((8, 9, 3), np.float32))
    with pytest.raises(ValueError, match="lacks the keys"):
        morphology_distance({"area": [1.0]}, np.ones((8, 8), np.int32))
    with pytest.raises(TypeError, match="`b` must hold integer instance ids"):
        morphology_distance(np.ones((8, 8), np.int32), np.ones((8, 8), np.float32))
    with pytest.raises(ValueError, match="`a` has negative"):
        morphology_distance(-np.ones((8, 8), np.int32), np.ones((8, 8), np.int32))
    stats = morphology_stats(synthetic_instance_map((64, 64), n_nuclei=10, seed=0))
    n = stats["area"].size
    with pytest.raises(ValueError, match=rf"`a\['area'\]` holds {n} NaN or infinite value\(s\)"):
        morphology_distance({**stats, "area": np.full(n, np.nan)}, stats)  # scored inf: "no nuclei"
    with pytest.raises(ValueError, match=rf"`b`: the per-nucleus arrays \(area {n - 1}, .*nuclei_per_patch\) = {n}"):
        morphology_distance(stats, {**stats, "area": stats["area"][:-1]})


def test_lists_and_single_maps_with_their_structure_are_taken():
    inst = synthetic_instance_map((64, 64), n_nuclei=10, seed=1)
    structure = encode_structure(inst)
    want = morphology_stats(inst[None], structure[None])
    for got in (
        morphology_stats(inst.tolist()),
        morphology_stats(inst, structure.tolist()),
        morphology_stats(inst, structure[None]),  # one map, its structure as a stack of one
    ):
        for key in ("area", "perimeter", "eccentricity", "solidity", "nuclei_per_patch"):
            np.testing.assert_array_equal(got[key], want[key])
    assert np.array_equal(morphology_stats(inst, structure[None])["hv_consistency"], want["hv_consistency"])
