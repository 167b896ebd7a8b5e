"""Structure datasets, model-tensor conversion and equivariant augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nudiff_postproc import (
    DIHEDRAL,
    encode_structure,
    instances_from_structures,
    synthetic_instance_map,
    transform_instance_map,
    transform_structure,
    write_image,
    write_instance_map,
)
from nudiff_structure import PRESETS, build_structures, dihedral_augment, from_model_output, to_model_input


@pytest.fixture
def folder(tmp_path):
    for i in range(3):
        inst = synthetic_instance_map((256, 256), n_nuclei=80, seed=i)
        write_instance_map(tmp_path / "instance_maps" / f"tile{i}.png", inst)
        write_image(tmp_path / "images" / f"tile{i}.png", np.zeros((256, 256, 3), np.uint8))
    return tmp_path


def test_build_structures_paper_and_tiny_presets(folder):
    s, names = build_structures(folder, "paper-256")
    assert s.shape == (3, 256, 256, 3) and s.dtype == np.float32 and names[0] == "tile0_r00000_c00000"
    tiny, tiny_names = build_structures(folder, "tiny-64")
    assert tiny.shape == (3 * 9, 64, 64, 3) and len(tiny_names) == 27  # 128 px patches, stride 64, 2x down
    assert set(np.unique(tiny[..., 0])) <= {0.0, 1.0} and np.abs(tiny[..., 1:]).max() <= 1.0
    assert tiny_names[1] == "tile0_r00000_c00064"


def test_downscale_acts_on_the_instance_map(folder):
    tiny, _ = build_structures(folder, "tiny-64")
    from nudiff_postproc import read_instance_map

    inst = read_instance_map(folder / "instance_maps" / "tile0.png")[:128, :128]
    np.testing.assert_array_equal(tiny[0], encode_structure(inst[1::2, 1::2], min_size=8, centre="nearest"))


def test_cache_is_reused_and_invalidated(folder):
    a, _ = build_structures(folder, "tiny-64")
    caches = list((folder / ".nudiff-cache").glob("structures-*.npz"))
    assert len(caches) == 1
    b, _ = build_structures(folder, "tiny-64")
    np.testing.assert_array_equal(a, b)
    write_instance_map(folder / "instance_maps" / "tile0.png", synthetic_instance_map((256, 256), n_nuclei=5, seed=9))
    c, _ = build_structures(folder, "tiny-64")
    assert not np.array_equal(a, c)  # a changed file gives a new cache entry


def test_read_only_data_caches_in_the_user_cache(folder, tmp_path, monkeypatch):
    import nudiff_structure._data as data_module

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "usercache"))
    monkeypatch.setattr(data_module.os, "access", lambda path, mode: False)  # a read-only data folder
    build_structures(folder, "tiny-64")
    assert list((tmp_path / "usercache" / "nudiff" / "structures").glob("structures-*.npz"))
    assert not (folder / ".nudiff-cache").exists()


def test_subset_lists_select_patches(folder, tmp_path):
    _, names = build_structures(folder, "tiny-64")
    (tmp_path / "list.txt").write_text(f"{names[5]}\n{names[2]}\n")
    s, kept = build_structures(folder, "tiny-64", subset=tmp_path / "list.txt")
    assert kept == [names[2], names[5]] and len(s) == 2
    (tmp_path / "bad.txt").write_text("nope_r00000_c00000\n")
    with pytest.raises(ValueError, match="names 1 patches that .* does not have"):
        build_structures(folder, "tiny-64", subset=tmp_path / "bad.txt")


def test_model_tensors_round_trip():
    s = encode_structure(synthetic_instance_map((32, 32), n_nuclei=6, seed=1))[None]
    x = to_model_input(s)
    assert x.shape == (1, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    np.testing.assert_allclose(from_model_output(x), s, atol=1e-6)
    np.testing.assert_array_equal(instances_from_structures(from_model_output(x))[0] > 0, s[0, ..., 0] > 0)


def test_augmentation_applies_one_of_the_eight_transforms():
    s = encode_structure(synthetic_instance_map((64, 64), n_nuclei=12, seed=4), centre="nearest")
    out = dihedral_augment(to_model_input(np.stack([s] * 16)), torch.Generator().manual_seed(0))
    candidates = [to_model_input(transform_structure(s, rot90=k, flip=f)[None])[0] for k, f in DIHEDRAL]
    seen = set()
    for sample in out:
        hits = [i for i, c in enumerate(candidates) if torch.equal(sample, c)]
        assert len(hits) >= 1
        seen.update(hits)
    assert len(seen) >= 5  # 16 draws of 8 transforms


def test_augmented_structures_are_encodings_of_transformed_maps():
    # rectangles of odd sides: integer centres of mass, so equivariance is exact everywhere
    inst = np.zeros((48, 48), np.int32)
    inst[3:12, 5:20] = 1
    inst[20:45, 30:37] = 2
    inst[25:32, 2:27] = 3
    batch = to_model_input(np.stack([encode_structure(inst, centre="nearest")] * 24))
    out = dihedral_augment(batch, torch.Generator().manual_seed(1))
    truths = [
        to_model_input(encode_structure(transform_instance_map(inst, rot90=k, flip=f), centre="nearest")[None])[0]
        for k, f in DIHEDRAL
    ]
    for sample in out:
        assert any(torch.allclose(sample, t, atol=1e-6) for t in truths)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="instance map folder not found"):
        build_structures(tmp_path, "tiny-64")
    (tmp_path / "instance_maps").mkdir()
    with pytest.raises(ValueError, match="holds no instance map files"):
        build_structures(tmp_path, "tiny-64")
    np.save(tmp_path / "instance_maps" / "f.npy", np.full((256, 256), 0.5, np.float32))  # not whole numbers
    with pytest.raises(TypeError, match="f.npy"):
        build_structures(tmp_path, "tiny-64")
    with pytest.raises(ValueError, match="unknown structure preset 'huge'"):
        build_structures(tmp_path, "huge")
    assert PRESETS["tiny-64"].image_size == 64
