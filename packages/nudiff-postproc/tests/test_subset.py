"""select_subset / patch_features and the subset CLI."""

from __future__ import annotations

import numpy as np
import pytest
from nudiff_postproc import (
    extract_patches,
    nuclei_share,
    patch_features,
    read_image,
    read_instance_map,
    select_subset,
    synthetic_instance_map,
    write_image,
    write_instance_map,
)
from nudiff_postproc.cli import main


def _synthetic_patches(n: int = 40) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        inst = synthetic_instance_map((64, 64), n_nuclei=int(rng.integers(2, 30)), seed=i)
        image = np.full((64, 64, 3), rng.integers(120, 250, 3), np.uint8)
        image[inst > 0] = (90, 40, 140)
        out.append((image, inst))
    return out


def _counts(patches) -> np.ndarray:
    return np.array([len(np.unique(m)) - 1 for _, m in patches])


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_subset_holds_the_requested_fraction(fraction):
    patches = _synthetic_patches()
    counts = _counts(patches)
    idx = select_subset(patches, fraction, seed=1)
    held = counts[idx].sum() / counts.sum()
    assert fraction <= held <= fraction + counts.max() / counts.sum()
    np.testing.assert_array_equal(idx, select_subset(patches, fraction, seed=1))  # deterministic
    assert np.all(np.diff(idx) > 0)


def test_full_fraction_and_errors():
    patches = _synthetic_patches(5)
    np.testing.assert_array_equal(select_subset(patches, 1.0), np.arange(5))
    with pytest.raises(ValueError, match="fraction"):
        select_subset(patches, 0.0)
    empty = [(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.int32))]
    with pytest.raises(ValueError, match="no nuclei"):
        select_subset(empty, 0.5)
    with pytest.raises(ValueError, match="same height and width"):
        patch_features(np.zeros((8, 9, 3), np.uint8), np.zeros((8, 8), np.int32))
    features = np.ones((5, 3))
    features[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"`features` must be finite; rows \[3\] \(1 of 5\) hold NaN or inf"):
        select_subset(patches, 0.5, features=features)


def test_bad_cluster_counts_and_fractions_are_named_and_duplicates_stay_quiet(recwarn):
    patches = _synthetic_patches(6)
    for bad in (0, -1, 7, 2.5, True):
        with pytest.raises(ValueError, match=r"`n_clusters` must be None or an integer in \[1, 6\]"):
            select_subset(patches, 0.5, n_clusters=bad)
    for bad in ("0.5", None, True):
        with pytest.raises(ValueError, match=r"`fraction` \(--fraction\) must be a number in \(0, 1\]"):
            select_subset(patches, bad)
    same = [patches[0]] * 6  # identical patches: k-means leaves clusters empty
    chosen = select_subset(same, 0.5, n_clusters=3)
    assert 3 <= len(chosen) <= 4
    assert not [w for w in recwarn if "cluster" in str(w.message) or "divide" in str(w.message)]


def test_kumar_subsets_are_representative(kumar):
    names = (kumar / "splits" / "kumar_train.txt").read_text().split()
    patches, tiles = [], []
    for name in names:
        image, inst = (
            read_image(kumar / "images" / f"{name}.tif"),
            read_instance_map(kumar / "instance_maps" / f"{name}.png"),
        )
        image_patches, _ = extract_patches(image, 256, 128)
        map_patches, _ = extract_patches(inst, 256, 128)
        patches += list(zip(image_patches, map_patches, strict=True))
        tiles += [name] * len(image_patches)
    counts = _counts(patches)
    idx = select_subset(patches, 0.1, seed=0)
    held = counts[idx].sum() / counts.sum()
    assert 0.1 <= held <= 0.1 + counts.max() / counts.sum()
    assert len({tiles[i] for i in idx}) >= 12  # the 10% subset spans the organs, not one tile

    def distinct(chosen) -> int:  # the (tile, id) pairs the patches hold, counted here on their own
        return len({(tiles[i], int(v)) for i in chosen for v in np.unique(patches[i][1]) if v})

    every = distinct(range(len(patches)))
    assert every == 9794  # the nuclei of the 16 training tiles
    assert distinct(idx) / every > 0.3  # counted per patch, "10%" held 31% of the labels
    by_tile = select_subset(patches, 0.1, seed=0, sources=tiles)
    assert 0.1 <= distinct(by_tile) / every <= 0.1 + counts.max() / every
    assert nuclei_share(patches, by_tile, tiles) == (distinct(by_tile), every)
    assert len(by_tile) < len(idx) / 3 and len({tiles[i] for i in by_tile}) >= 8


def test_subset_cli(tmp_path, capsys):
    for i, (image, inst) in enumerate(_synthetic_patches(12)):
        write_image(tmp_path / "data" / "images" / f"p{i:02d}.png", image)
        write_instance_map(tmp_path / "data" / "instance_maps" / f"p{i:02d}.png", inst)
    out = tmp_path / "subset.txt"
    assert main(["--quiet", "subset", "--data", str(tmp_path / "data"), "--fraction", "0.3", "--out", str(out)]) == 0
    chosen = out.read_text().split()
    assert chosen and all(name.startswith("p") for name in chosen)
    assert "asked 30.0%" in capsys.readouterr().out
    assert main(["--quiet", "subset", "--data", str(tmp_path / "nope"), "--fraction", "0.3", "--out", str(out)]) == 2
    # patches cut by `patches` (patches.csv names their tiles): nuclei counted once per tile
    tile = tmp_path / "tile"
    write_image(tile / "images" / "t.png", np.full((96, 96, 3), 200, np.uint8))
    write_instance_map(tile / "instance_maps" / "t.png", synthetic_instance_map((96, 96), n_nuclei=40, seed=3))
    cut = ["--quiet", "patches", "--data", str(tile), "--out", str(tmp_path / "cut"), "--size", "32", "--stride", "16"]
    assert main(cut) == 0
    capsys.readouterr()
    assert main(["--quiet", "subset", "--data", str(tmp_path / "cut"), "--fraction", "0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    total = len(np.unique(read_instance_map(tile / "instance_maps" / "t.png"))) - 1
    assert f" of {total} distinct nuclei of the tiles (patches.csv) (" in printed, printed
    (tmp_path / "cut" / "patches.csv").write_text("name,tile\n")  # not the columns `patches` writes
    assert main(["--quiet", "subset", "--data", str(tmp_path / "cut"), "--fraction", "0.5", "--out", str(out)]) == 2
    assert "patches.csv' has the columns ['name', 'tile']; expected 'patch' and 'source'" in capsys.readouterr().err
    # .npy maps with ids far beyond their count: counted, not allocated (bincount wanted 8 TiB)
    for i, (image, inst) in enumerate(_synthetic_patches(4)):
        write_image(tmp_path / "big" / "images" / f"b{i}.png", image)
        write_instance_map(
            tmp_path / "big" / "instance_maps" / f"b{i}.npy", np.where(inst > 0, inst.astype(np.int64) + 2**40, 0)
        )
    capsys.readouterr()
    assert main(["--quiet", "subset", "--data", str(tmp_path / "big"), "--fraction", "0.5", "--out", str(out)]) == 0
    total = sum(len(np.unique(inst)) - 1 for _, inst in _synthetic_patches(4))
    assert f" of {total} nuclei counted per patch (no patches.csv) (" in capsys.readouterr().out
    # a features file that is not an .npz archive, and --quiet after the command's name
    np.save(tmp_path / "f.npy", np.zeros((4, 3)))
    args = ["subset", "--data", str(tmp_path / "big"), "--fraction", "0.5", "--out", str(out), "--quiet"]
    assert main([*args, "--features", str(tmp_path / "f.npy")]) == 2
    err = capsys.readouterr().err
    assert f"'{tmp_path / 'f.npy'}' is not a features file with 'names' and 'features' arrays" in err
    assert "not an .npz archive" in err
