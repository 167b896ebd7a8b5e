"""The nudiff-postproc CLI, run in-process and as the installed script."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from nudiff_postproc import (
    encode_structure,
    evaluate,
    instances_from_structure,
    read_instance_map,
    synthetic_instance_map,
    write_image,
    write_instance_map,
)
from nudiff_postproc._runs import RUN_STAMP
from nudiff_postproc.cli import main


def _structures(folder, n=3):
    folder.mkdir()
    maps = {}
    for i in range(n):
        inst = synthetic_instance_map((64, 64), n_nuclei=12, seed=i)
        np.save(folder / f"s{i}.npy", encode_structure(inst))
        maps[f"s{i}"] = inst
    return maps


def _evaluate(folder, csv_name: str) -> int:
    """``nudiff-postproc evaluate`` on ``folder``/true and ``folder``/pred."""
    args = ["--quiet", "evaluate", "--true", str(folder / "true"), "--pred", str(folder / "pred")]
    return main([*args, "--out", str(folder / csv_name)])


def test_instances_then_evaluate(tmp_path, capsys):
    maps = _structures(tmp_path / "structures")
    assert main(["--quiet", "instances", str(tmp_path / "structures"), str(tmp_path / "pred")]) == 0
    for name, inst in maps.items():
        out = read_instance_map(tmp_path / "pred" / f"{name}.png")
        np.testing.assert_array_equal(out, instances_from_structure(encode_structure(inst)))
        write_instance_map(tmp_path / "true" / f"{name}.png", inst)
    assert _evaluate(tmp_path, "stats.csv") == 0
    rows = list(csv.reader(open(tmp_path / "stats.csv")))
    assert rows[0] == ["name", "dice", "aji", "aji_plus", "dq", "sq", "pq"]
    assert [r[0] for r in rows[1:]] == ["s0", "s1", "s2", "mean"]
    expected = np.mean([evaluate(maps[n], read_instance_map(tmp_path / "pred" / f"{n}.png"))["aji"] for n in maps])
    assert float(rows[-1][2]) == pytest.approx(expected, abs=1e-6)
    assert "mean" in capsys.readouterr().out


def test_instances_resumes_and_skips_finished_maps(tmp_path, capsys):
    _structures(tmp_path / "structures")
    out = tmp_path / "pred"
    assert main(["--quiet", "instances", str(tmp_path / "structures"), str(out)]) == 0
    (out / "s1.png").unlink()
    before = (out / "s0.png").stat().st_mtime_ns
    assert main(["--quiet", "instances", str(tmp_path / "structures"), str(out)]) == 0
    assert "skipping 2" in capsys.readouterr().err
    assert (out / "s1.png").is_file() and (out / "s0.png").stat().st_mtime_ns == before


def test_instances_refuses_to_mix_maps_made_another_way(tmp_path, capsys):
    _structures(tmp_path / "structures")
    for path in (tmp_path / "structures").iterdir():  # probability 0.8 on the nuclei: thresholds matter
        s = np.load(path)
        s[..., 0] *= 0.8
        np.save(path, s)
    out = tmp_path / "pred"
    args = ["--quiet", "instances", str(tmp_path / "structures"), str(out)]
    assert main(args) == 0
    (out / "s1.png").unlink()
    assert main([*args, "--threshold", "0.6"]) == 2
    assert "was started with --threshold 0.5, this resume gives 0.6" in capsys.readouterr().err
    assert not (out / "s1.png").exists()  # nothing made the other way
    assert main([*args, "--threshold", "nan"]) == 2  # checked before anything is read or written
    assert "`threshold` must be a probability in [0, 1], got nan" in capsys.readouterr().err
    assert main([*args, "--format", ".tif"]) == 2  # two formats side by side: two maps per name
    assert "was started with --format '.png', this resume gives '.tif'" in capsys.readouterr().err
    assert main([*args, "--threshold", "0.6", "--format", ".tif", "--overwrite"]) == 0
    assert sorted(p.suffix for p in out.iterdir() if p.name != RUN_STAMP) == [".tif"] * 3  # no .png left
    assert main([*args, "--threshold", "0.6", "--overwrite"]) == 0  # every map redone: the new settings hold
    assert sorted(p.suffix for p in out.iterdir() if p.name != RUN_STAMP) == [".png"] * 3
    assert main([*args, "--threshold", "0.6"]) == 0
    assert json.loads((out / RUN_STAMP).read_text())["threshold"] == 0.6
    assert "--overwrite to redo them all" in _refusal(args, "0.7", capsys)
    # an --overwrite that fails (or is killed) at once removes the old maps first: its resume
    # cannot keep maps made with the old threshold beside the new ones
    np.save(tmp_path / "structures" / "a_bad.npy", np.full((64, 64, 3), np.nan, np.float32))  # sorts first
    assert main([*args, "--threshold", "0.9", "--overwrite", "--batch", "1"]) == 2
    capsys.readouterr()
    (tmp_path / "structures" / "a_bad.npy").unlink()
    assert main([*args, "--threshold", "0.9"]) == 0
    for name in ("s0", "s1", "s2"):
        expected = instances_from_structure(np.load(tmp_path / "structures" / f"{name}.npy"), threshold=0.9)
        assert expected.max() == 0  # nothing reaches 0.9: a map made at 0.5 or 0.6 would hold nuclei
        np.testing.assert_array_equal(read_instance_map(out / f"{name}.png"), expected)


def _refusal(args, threshold, capsys):
    assert main([*args, "--threshold", threshold]) == 2
    return capsys.readouterr().err


def test_png_structures_in_the_paper_code_convention(tmp_path):
    inst = synthetic_instance_map((64, 64), n_nuclei=12, seed=9)
    s = encode_structure(inst)
    img = np.round(np.dstack([s[..., 0], (s[..., 1:] + 1) / 2]) * 255).astype(np.uint8)
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in" / "a.png", img)
    assert main(["--quiet", "instances", str(tmp_path / "in"), str(tmp_path / "out"), "--format", ".tif"]) == 0
    expected = instances_from_structure(encode_structure(inst))
    assert evaluate(expected, read_instance_map(tmp_path / "out" / "a.tif"))["aji"] > 0.95  # 8-bit quantised


def test_bad_input_exits_nonzero_and_leaves_no_partial_output(tmp_path, capsys):
    folder = tmp_path / "structures"
    _structures(folder, n=1)
    np.save(folder / "bad.npy", np.full((64, 64, 3), np.nan, np.float32))
    out = tmp_path / "pred"
    assert main(["--quiet", "instances", str(folder), str(out), "--batch", "1"]) == 2
    err = capsys.readouterr().err
    assert "bad.npy" in err and "NaN" in err
    # 'bad' sorts first: no map written, so no folder either (not even the settings' record)
    assert not out.exists()
    # nor does the failed try bind the next one to its settings
    (folder / "bad.npy").unlink()
    assert main(["--quiet", "instances", str(folder), str(out), "--threshold", "0.6"]) == 0
    assert json.loads((out / RUN_STAMP).read_text())["threshold"] == 0.6
    assert main(["--quiet", "evaluate", "--true", str(tmp_path / "nope"), "--pred", str(out)]) == 2
    assert "true instance map folder not found" in capsys.readouterr().err


def test_evaluate_reports_missing_predictions(tmp_path, capsys):
    for name in ("a", "b"):
        write_instance_map(tmp_path / "true" / f"{name}.png", synthetic_instance_map((32, 32), n_nuclei=3, seed=1))
    write_instance_map(tmp_path / "pred" / "a.png", synthetic_instance_map((32, 32), n_nuclei=3, seed=1))
    assert _evaluate(tmp_path, "s.csv") == 2
    assert "lacks predictions for 1" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()


def test_evaluate_means_as_compute_stats_one_sided_misses_count_zero(tmp_path, capsys):
    inst = synthetic_instance_map((32, 32), n_nuclei=3, seed=1)
    empty = np.zeros_like(inst)
    # a: perfect; b: nothing predicted; c: false nuclei on an empty tile; d: nothing in either
    for name, true, pred in (("a", inst, inst), ("b", inst, empty), ("c", empty, inst), ("d", empty, empty)):
        write_instance_map(tmp_path / "true" / f"{name}.png", true)
        write_instance_map(tmp_path / "pred" / f"{name}.png", pred)
    assert _evaluate(tmp_path, "s.csv") == 0
    rows = {r[0]: r[1:] for r in csv.reader(open(tmp_path / "s.csv"))}
    assert rows["b"] == rows["c"] == ["0.000000"] * 6 and rows["d"] == ["nan"] * 6
    assert float(rows["mean"][1]) == pytest.approx(1 / 3, abs=1e-6)  # AJI: (1 + 0 + 0) / 3
    assert "1 image(s) with no nuclei in either map are NaN and left out of the mean" in capsys.readouterr().out


def test_xml2inst_and_patches_on_kumar(kumar, tmp_path):
    name = "TCGA-21-5784-01Z-00-DX1"
    assert (
        main(
            [
                "--quiet",
                "xml2inst",
                str(kumar / "annotations_xml" / f"{name}.xml"),
                "--out",
                str(tmp_path / "maps"),
                "--images",
                str(kumar / "images"),
            ]
        )
        == 0
    )
    got = read_instance_map(tmp_path / "maps" / f"{name}.png")
    assert got.shape == (1000, 1000) and got.max() == 398
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    shutil.copy(kumar / "images" / f"{name}.tif", data / "images")
    shutil.copytree(tmp_path / "maps", data / "instance_maps")
    assert main(["--quiet", "patches", "--data", str(data), "--out", str(tmp_path / "patches")]) == 0
    rows = list(csv.reader(open(tmp_path / "patches" / "patches.csv")))
    assert len(rows) == 1 + 49 and rows[-1][2:4] == ["744", "744"]
    assert len(list((tmp_path / "patches" / "images").glob("*.png"))) == 49


def _dataset(folder, shapes):
    """A dataset folder with one synthetic pair per (image shape, map shape)."""
    for i, (image_shape, map_shape) in enumerate(shapes):
        write_image(folder / "images" / f"t{i}.png", np.zeros((*image_shape, 3), np.uint8))
        write_instance_map(
            folder / "instance_maps" / f"t{i}.png", synthetic_instance_map(map_shape, n_nuclei=6, seed=i)
        )
    return folder


def test_patches_leave_no_partial_dataset_and_keep_a_finished_one(tmp_path, capsys):
    out = tmp_path / "patches"
    args = ["--quiet", "patches", "--out", str(out), "--size", "32", "--stride", "32"]
    broken = _dataset(tmp_path / "broken", [((64, 64), (64, 64)), ((64, 64), (32, 64))])  # 2nd pair mismatched
    assert main([*args, "--data", str(broken)]) == 2
    assert "t1.png" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # neither the output nor its staging
    good = _dataset(tmp_path / "good", [((64, 64), (64, 64))])
    assert main([*args, "--data", str(good)]) == 0
    assert len(list((out / "images").iterdir())) == 4 and (out / "patches.csv").is_file()
    assert main([*args, "--data", str(good), "--size", "16", "--stride", "16"]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert len(list((out / "images").iterdir())) == 4  # untouched
    assert main([*args, "--data", str(good), "--size", "16", "--stride", "16", "--overwrite"]) == 0
    assert len(list((out / "images").iterdir())) == 16  # replaced, not merged with the 32 px patches
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "good", "patches"]


def test_patches_never_delete_their_data_and_keep_large_ids(tmp_path, capsys):
    data = _dataset(tmp_path / "data", [((64, 64), (64, 64))])
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    # --out is --data, holds it, or is (or lies inside) its images/ or instance_maps/
    for out in (data, tmp_path, data / "instance_maps", data / "images" / "p"):
        args = ["patches", "--data", str(data), "--out", str(out), "--size", "32", "--overwrite", "--quiet"]
        assert main(args) == 2
        assert f"--out '{out}' is, holds or lies inside the --data folder" in capsys.readouterr().err
        assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    args = ["patches", "--data", str(data), "--out", str(data / "patches"), "--size", "32", "--stride", "32"]
    assert main(args) == 0  # a patches folder inside the dataset folder is fine
    shutil.rmtree(data / "patches")
    grey = _dataset(tmp_path / "grey", [((64, 64), (64, 64))])
    import imageio.v3 as iio

    iio.imwrite(grey / "images" / "t0.png", np.zeros((64, 64), np.uint8))  # a grayscale tile
    assert main(["patches", "--data", str(grey), "--out", str(tmp_path / "gp"), "--quiet"]) == 2
    assert "t0.png" in capsys.readouterr().err and not (tmp_path / "gp").exists()
    big = tmp_path / "big"
    inst = np.zeros((16, 16), np.int64)
    inst[:, :8], inst[:, 8:] = 100_000, 7  # ids past PNG's 65,535; every pixel a nucleus
    write_image(big / "images" / "t.png", np.zeros((16, 16, 3), np.uint8))
    write_instance_map(big / "instance_maps" / "t.npy", inst)
    out = tmp_path / "big-patches"
    assert main(["patches", "--data", str(big), "--out", str(out), "--size", "8", "--stride", "8", "--quiet"]) == 0
    maps = sorted(p.name for p in (out / "instance_maps").iterdir())
    assert maps == [f"t_r{r:05d}_c{c:05d}.tif" for r in (0, 8) for c in (0, 8)]
    np.testing.assert_array_equal(read_instance_map(out / "instance_maps" / maps[0]), inst[:8, :8])  # ids kept
    rows = list(csv.reader(open(out / "patches.csv")))
    assert [row[4] for row in rows[1:]] == ["1", "1", "1", "1"]  # one nucleus each, no background
    small = _dataset(tmp_path / "small", [((40, 40), (40, 40))])
    assert main(["patches", "--data", str(small), "--out", str(tmp_path / "p2"), "--size", "48", "--stride", "48"]) == 2
    err = capsys.readouterr().err
    assert f"'{small / 'images' / 't0.png'}': patch size (48, 48) does not fit" in err and "--size 48" in err


_TRIANGLE = (
    '<Regions><Region Id="1"><Vertices><Vertex X="2" Y="2"/><Vertex X="8" Y="2"/><Vertex X="8" Y="6"/>'
    "</Vertices></Region></Regions>"
)


def _xml_folder(folder, names):
    """``folder/NAME.xml`` for each name: one triangular region each."""
    folder.mkdir()
    for name in names:
        (folder / f"{name}.xml").write_text(_TRIANGLE)


def test_xml2inst_writes_all_maps_or_none_and_keeps_existing_ones(tmp_path, capsys):
    _xml_folder(tmp_path / "xml", ("a", "c"))
    (tmp_path / "xml" / "b.xml").write_text("<Regions><Region>")  # broken
    out = tmp_path / "maps"
    args = ["xml2inst", str(tmp_path / "xml"), "--out", str(out), "--shape", "10,10", "--quiet"]
    assert main(args) == 2
    assert "b.xml' is not valid XML" in capsys.readouterr().err
    assert not out.exists() or not list(out.iterdir())  # not a.png: all or nothing
    (tmp_path / "xml" / "b.xml").write_text(_TRIANGLE)
    write_instance_map(out / "c.png", np.ones((10, 10), np.int32))
    assert main(args) == 2
    assert f"'{out / 'c.png'}' exists (1 map(s) of these names do); pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["c.png"] and read_instance_map(out / "c.png").all()
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png"]
    assert read_instance_map(out / "c.png").sum() < 100
    (out / "c.png").rename(out / "c.tif")  # a map of the same name in another format
    (out / "a.png").unlink()
    (out / "b.png").unlink()
    assert main(args) == 2
    assert f"'{out / 'c.tif'}' exists (1 map(s) of these names do)" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png"]  # one map per name
    with pytest.raises(SystemExit):
        main(["xml2inst", str(tmp_path / "xml"), "--out", str(out), "--shape", "0,10"])
    assert "--shape must be two positive sizes H,W" in capsys.readouterr().err


def test_an_out_file_that_is_a_folder_is_refused_before_any_work(tmp_path, capsys):
    write_instance_map(tmp_path / "maps" / "a.png", synthetic_instance_map((32, 32), n_nuclei=4, seed=0))
    args = ["evaluate", "--true", str(tmp_path / "maps"), "--pred", str(tmp_path / "maps"), "--out", str(tmp_path)]
    assert main(args) == 2
    assert f"nudiff-postproc evaluate: error: --out '{tmp_path}' is a folder" in capsys.readouterr().err
    assert main(args, prog="nudiff-seg") == 2
    assert capsys.readouterr().err.startswith("nudiff-seg evaluate: error: --out")


def test_xml2inst_checks_every_image_before_writing(tmp_path, capsys):
    _xml_folder(tmp_path / "xml", ("a", "b"))
    write_image(tmp_path / "images" / "a.png", np.zeros((10, 10, 3), np.uint8))  # none for b
    args = ["--quiet", "xml2inst", str(tmp_path / "xml"), "--out", str(tmp_path / "maps")]
    assert main([*args, "--images", str(tmp_path / "images")]) == 2
    assert "b.xml" in capsys.readouterr().err and not (tmp_path / "maps").exists()


def test_unreadable_inputs_and_unwritable_outputs_exit_2(tmp_path, capsys):
    inst = synthetic_instance_map((40, 40), n_nuclei=8, seed=0)
    write_instance_map(tmp_path / "true" / "a.png", inst)
    whole = write_instance_map(tmp_path / "a.mat", inst).read_bytes()
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "a.mat").write_bytes(whole[:100])  # truncated
    assert _evaluate(tmp_path, "s.csv") == 2
    assert "a.mat' could not be read as a MATLAB .mat file" in capsys.readouterr().err
    (tmp_path / "pred" / "a.mat").write_bytes(whole)
    (tmp_path / "taken").mkdir()
    assert _evaluate(tmp_path, "taken") == 2  # --out names a folder
    assert "taken" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mat", "pred", "taken", "true"]


def test_installed_script_runs():
    exe = shutil.which("nudiff-postproc", path=str(__import__("pathlib").Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the nudiff-postproc script is not installed in this environment (pip install -e)")
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    assert "instances" in done.stdout and "evaluate" in done.stdout and "xml2inst" in done.stdout
