"""tools/export_onnx.py on real runs of both model kinds, and sampling through the graphs
with the packages' CLIs (`--engine model.onnx`)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from nudiff_histo.cli import main as histo_main
from nudiff_postproc import read_image, synthetic_instance_map, write_image, write_instance_map
from nudiff_structure.cli import main as structure_main

ROOT = Path(__file__).resolve().parents[1]


def _export_tool():
    spec = importlib.util.spec_from_file_location("export_onnx", ROOT / "tools" / "export_onnx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    rng = np.random.default_rng(0)
    for i in range(2):
        inst = synthetic_instance_map((192, 192), n_nuclei=18, seed=i)
        write_instance_map(root / "data" / "instance_maps" / f"t{i}.png", inst)
        write_image(root / "data" / "images" / f"t{i}.png", rng.integers(0, 256, (192, 192, 3), dtype=np.uint8))
    common = ["--steps", "2", "--batch", "2", "--save-every", "2"]
    assert structure_main(["--quiet", "train", "--data", str(root / "data"), "--out", str(root / "s"), *common]) == 0
    assert histo_main(["--quiet", "train", "--pairs", str(root / "data"), "--out", str(root / "h"), *common]) == 0
    export = _export_tool()
    assert export([str(root / "s"), "-o", str(root / "s_onnx" / "model.onnx"), "--batch-max", "8"]) == 0
    assert export([str(root / "h"), "-o", str(root / "h_onnx" / "model.onnx"), "--batch-max", "8"]) == 0
    return root


def test_structure_sampling_through_onnx_matches_pytorch(runs, capsys):
    args = ["--quiet", "sample", "--num", "4", "--batch", "4", "--sampler", "ddim", "--steps", "4"]
    assert structure_main([*args, "--checkpoint", str(runs / "s"), "--out", str(runs / "torch")]) == 0
    assert structure_main([*args, "--engine", str(runs / "s_onnx" / "model.onnx"), "--out", str(runs / "ort")]) == 0
    for name in ("s0_000000", "s0_000003"):
        a, b = (np.load(runs / d / "structures" / f"{name}.npy") for d in ("torch", "ort"))
        assert np.abs(a - b).max() <= 2e-3
    manifest = json.loads((runs / "ort" / "manifest.json").read_text())
    assert manifest["runtime"]["format"] == "nudiff-diffusion/onnx"


def test_histology_sampling_through_onnx_matches_pytorch(runs):
    args = ["--quiet", "sample", "--structures", str(runs / "data"), "--num", "3", "--sampler", "ddim", "--steps", "3"]
    assert histo_main([*args, "--checkpoint", str(runs / "h"), "--out", str(runs / "htorch")]) == 0
    assert histo_main([*args, "--engine", str(runs / "h_onnx" / "model.onnx"), "--out", str(runs / "hort")]) == 0
    for path in sorted((runs / "htorch" / "images").iterdir()):
        a, b = read_image(path).astype(int), read_image(runs / "hort" / "images" / path.name).astype(int)
        assert np.abs(a - b).max() <= 1  # 2e-3 in [-1, 1] is a quarter of a grey level


def test_engines_of_the_other_kind_and_too_large_batches_are_refused(runs, capsys):
    args = ["--quiet", "sample", "--num", "2", "--out", str(runs / "x")]
    assert structure_main([*args, "--engine", str(runs / "h_onnx" / "model.onnx")]) == 2
    assert "holds a 'histo' model" in capsys.readouterr().err
    h_args = ["--quiet", "sample", "--structures", str(runs / "data"), "--out", str(runs / "y")]
    assert histo_main([*h_args, "--engine", str(runs / "s_onnx" / "model.onnx")]) == 2
    assert "not of a histology model" in capsys.readouterr().err
    assert histo_main([*h_args, "--engine", str(runs / "h_onnx" / "model.onnx"), "--batch", "8"]) == 2
    assert "at most 8, got 16" in capsys.readouterr().err  # guidance doubles the batch
    assert not list((runs / "y" / "images").glob("*.png"))
