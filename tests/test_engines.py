"""tools/export_onnx.py on real runs of both model kinds (every layout), sampling through the
graphs with the packages' CLIs (`--engine model.onnx`), and tools/export_trt.py / `.plan`
engines up to where TensorRT is needed (the rest is marked gpu)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from nudiff_diffusion import EngineUnavailableError, load_denoiser
from nudiff_histo import HistoDenoiser, load_histo_denoiser, load_histo_model
from nudiff_histo.cli import main as histo_main
from nudiff_postproc import read_image, synthetic_instance_map, write_image, write_instance_map
from nudiff_structure.cli import main as structure_main

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _export_tool():
    return _tool("export_onnx")


HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


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
    assert export([str(root / "h"), "-o", str(root / "h_guided" / "model.onnx"), "--batch-max", "4", "--guided"]) == 0
    cached = ["--batch-max", "8", "--cached-modulation"]
    assert export([str(root / "h"), "-o", str(root / "h_cached" / "model.onnx"), *cached]) == 0
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
    assert "at most 8, got 16: guidance runs both halves" in capsys.readouterr().err
    assert not (runs / "y").exists()  # refused before any folder is made


def test_every_export_prints_its_parity_and_passes_the_checker(runs):
    for folder, graphs in {
        "s_onnx": ["model.onnx"],
        "h_guided": ["model.onnx"],
        "h_cached": ["model.onnx", "model.modulation.onnx"],
    }.items():
        config = json.loads((runs / folder / "config.json").read_text())
        assert config["max_abs_diff"] <= 1e-4 and config["precision"] == "float32"
        for graph in graphs:
            onnx.checker.check_model(str(runs / folder / graph))
    guided = json.loads((runs / "h_guided" / "config.json").read_text())
    assert guided["layout"] == "guided" and guided["inputs"] == ["x", "t", "cond", "guidance_scale"]
    cached = json.loads((runs / "h_cached" / "config.json").read_text())
    assert cached["layout"] == "modulated" and cached["modulation_graph"] == "model.modulation.onnx"


def test_export_flags_are_checked(runs, capsys):
    export = _export_tool()
    out = str(runs / "never" / "model.onnx")
    assert export([str(runs / "s"), "-o", out, "--guided"]) == 2
    assert "--guided is for histology models" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: the two layouts exclude each other
        export([str(runs / "h"), "-o", out, "--guided", "--cached-modulation"])
    with pytest.raises(SystemExit):  # refused before the export's 30 s, not after
        export([str(runs / "s"), "-o", out, "--opset", "17"])
    assert "the dynamo exporter needs opset 18 or newer" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # beyond what onnx knows: failed after the export's work
        export([str(runs / "s"), "-o", out, "--opset", "99"])
    assert re.search(r"must be an integer in \[18, \d+\], got 99: .* knows opsets up to", capsys.readouterr().err)
    (runs / "a-file").write_text("")
    assert export([str(runs / "s"), "-o", str(runs / "a-file" / "model.onnx")]) == 2  # no traceback
    assert "a-file" in capsys.readouterr().err
    assert not (runs / "never").exists()


def test_cached_modulation_runtime_computes_the_modulation_once_and_matches_pytorch(runs):
    runtime = load_histo_denoiser(runs / "h_cached" / "model.onnx")
    torch_rt = HistoDenoiser(load_histo_model(runs / "h"))
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(4, 3, 64, 64, generator=g), torch.randint(1000, (4,), generator=g)
    cond = torch.rand(4, 3, 64, 64, generator=g) * 2 - 1
    prepared = runtime.prepare(cond)
    calls = []
    runtime.modulation_session.run = (lambda run: lambda *a: calls.append(1) or run(*a))(runtime.modulation_session.run)
    expected = torch_rt.eps(x, t, torch_rt.prepare(cond))
    for _ in range(2):
        assert (runtime.eps(x, t, prepared) - expected).abs().max() <= 1e-4
    assert not calls  # the steps reuse the prepared modulations
    null = torch.zeros_like(cond)
    mixed = runtime.guided(cond[:2], null[:2], 2.0)(x[:2], t[:2])
    assert (mixed - torch_rt.guided(cond[:2], null[:2], 2.0)(x[:2], t[:2])).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="4 structures for a batch of 2"):
        runtime.eps(x[:2], t[:2], prepared)


@pytest.mark.parametrize("engine", ["h_guided", "h_cached"])
def test_histology_sampling_through_guided_and_cached_graphs_matches_pytorch(runs, engine):
    args = ["--quiet", "sample", "--structures", str(runs / "data"), "--num", "3", "--sampler", "ddim", "--steps", "3"]
    if not (runs / "htorch").exists():
        assert histo_main([*args, "--checkpoint", str(runs / "h"), "--out", str(runs / "htorch")]) == 0
    assert (
        histo_main(
            [*args, "--batch", "2", "--engine", str(runs / engine / "model.onnx"), "--out", str(runs / engine / "o")]
        )
        == 0
    )
    paths = sorted((runs / "htorch" / "images").iterdir())
    assert len(paths) == 3
    for path in paths:
        a, b = read_image(path).astype(int), read_image(runs / engine / "o" / "images" / path.name).astype(int)
        assert np.abs(a - b).max() <= 1
    manifest = json.loads((runs / engine / "o" / "manifest.json").read_text())
    assert manifest["runtime"]["layout"] == ("guided" if engine == "h_guided" else "modulated")


def test_a_graph_for_batch_n_refuses_n_plus_one(runs, capsys):
    s_args = ["--quiet", "sample", "--num", "9", "--engine", str(runs / "s_onnx" / "model.onnx")]
    assert structure_main([*s_args, "--batch", "9", "--out", str(runs / "s9")]) == 2
    assert "exported for batches of at most 8, got 9" in capsys.readouterr().err
    h_args = ["--quiet", "sample", "--structures", str(runs / "data"), "--num", "5", "--out", str(runs / "h5")]
    assert histo_main([*h_args, "--engine", str(runs / "h_guided" / "model.onnx"), "--batch", "5"]) == 2
    assert "at most 4, got 5" in capsys.readouterr().err  # a guided graph counts images
    assert histo_main([*h_args, "--engine", str(runs / "h_cached" / "model.onnx"), "--batch", "5"]) == 2
    assert "at most 8, got 10" in capsys.readouterr().err  # guidance doubles the batch
    assert not (runs / "s9").exists() and not (runs / "h5").exists()  # refused before any folder is made


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT and a GPU are here")
def test_a_plan_without_tensorrt_gives_the_install_message(runs, capsys):
    plan = runs / "trt" / "model.plan"
    with pytest.raises(EngineUnavailableError, match=r"pip install nudiff-diffusion\[trt\]"):
        load_denoiser(plan)
    h_args = ["--quiet", "sample", "--structures", str(runs / "data"), "--out", str(runs / "hp")]
    assert histo_main([*h_args, "--engine", str(plan)]) == 2
    assert "needs TensorRT, which is not installed here" in capsys.readouterr().err
    assert not (runs / "hp").exists()


def test_export_trt_checks_its_arguments_before_tensorrt(runs, capsys):
    build = _tool("export_trt")
    onnx_path = str(runs / "s_onnx" / "model.onnx")
    cases = {
        ("-o", str(runs / "t1" / "model.trt")): "must end in .plan or .engine",
        ("-o", str(runs / "t1" / "model.plan"), "--min-batch", "4", "--opt-batch", "2"): "1 <= min <= opt <= max",
        ("-o", str(runs / "t1" / "model.plan"), "--max-batch", "9"): "exceeds the 8",
        ("-o", str(runs / "s_onnx" / "model.plan")): "belongs to another graph",
        ("-o", str(runs / "a-file" / "model.plan")): "a-file' is a file, not a folder",
        ("-o", str(runs / "t1" / "model.plan"), "--timing-cache", str(runs)): "--timing-cache '",
        ("-o", str(runs / "t1" / "model.plan"), "--workspace", "inf"): "(--workspace) must be a number of GiB",
        ("-o", str(runs / "t1" / "model.plan"), "--workspace", "nan"): "got nan",
        ("-o", str(runs / "t1" / "model.plan"), "--workspace", "0"): "got 0.0",
    }
    (runs / "a-file").write_text("")
    for extra, message in cases.items():
        assert build([onnx_path, *extra]) == 2
        assert message in capsys.readouterr().err
    assert build([str(runs / "h_cached" / "model.onnx"), "-o", str(runs / "t1" / "m.plan")]) == 2
    assert "'modulated' export (two graphs)" in capsys.readouterr().err
    assert build([str(runs / "none.onnx"), "-o", str(runs / "t1" / "m.plan")]) == 2
    assert "ONNX graph not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build([onnx_path, "-o", str(runs / "t1" / "m.plan"), "--fp16", "--bf16"])
    assert not (runs / "t1").exists() and not (runs / "s_onnx" / "model.plan").exists()


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT and a GPU are here")
def test_export_trt_without_tensorrt_says_what_to_install_and_writes_nothing(runs, capsys):
    out = runs / "trt_none" / "model.plan"
    assert _tool("export_trt")([str(runs / "s_onnx" / "model.onnx"), "-o", str(out), "--fp16"]) == 3
    err = capsys.readouterr().err
    assert "needs TensorRT" in err or "needs a CUDA GPU" in err
    assert "pip install nudiff-diffusion[trt]" in err or "NVIDIA GPUs" in err
    assert not (runs / "trt_none").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TENSORRT, reason="needs TensorRT and a CUDA GPU")
def test_tensorrt_engines_build_check_and_sample(runs):
    build = _tool("export_trt")
    # a float16 graph builds strongly typed (TensorRT 11's only way to float16)
    assert _export_tool()([str(runs / "s"), "-o", str(runs / "s_onnx16" / "model.onnx"), "--fp16"]) == 0
    cases = (("s_trt", "s_onnx", []), ("h_trt", "h_guided", ["--fp16"]), ("s_trt16", "s_onnx16", ["--fp16"]))
    for name, graph, extra in cases:
        out = runs / name / "model.plan"
        assert build([str(runs / graph / "model.onnx"), "-o", str(out), "--opt-batch", "2", *extra]) == 0
        config = json.loads((runs / name / "config.json").read_text())
        assert config["format"] == "nudiff-diffusion/tensorrt" and config["graph"] == "model.plan"
    args = ["--quiet", "sample", "--structures", str(runs / "data"), "--num", "2", "--sampler", "ddim", "--steps", "3"]
    assert (
        histo_main([*args, "--batch", "2", "--engine", str(runs / "h_trt" / "model.plan"), "--out", str(runs / "htrt")])
        == 0
    )
    shutil.rmtree(runs / "htrt")


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TENSORRT, reason="needs TensorRT and a CUDA GPU")
def test_tensorrt_cuda_graphs_replay_the_engine(runs):
    build = _tool("export_trt")
    plan = runs / "s_trt_graphs" / "model.plan"
    assert build([str(runs / "s_onnx" / "model.onnx"), "-o", str(plan), "--opt-batch", "2"]) == 0
    plain, graphed = load_denoiser(plan, device="cuda"), load_denoiser(plan, device="cuda", cuda_graphs=True)
    g = torch.Generator().manual_seed(0)
    for n in (2, 2, 1):  # new inputs, then a new batch size (a new capture)
        x = torch.randn(n, plain.in_channels, plain.image_size, plain.image_size, generator=g).cuda()
        t = torch.randint(1000, (n,), generator=g).cuda()
        assert (graphed.eps(x, t) - plain.eps(x, t)).abs().max().item() < 1e-5


def test_export_paths_are_checked_before_the_export(runs, tmp_path, capsys):
    export = _export_tool()
    (tmp_path / "taken.onnx").mkdir()
    (tmp_path / "afile").write_text("x")
    for output, message in (
        (tmp_path / "taken.onnx", "-o '.*taken.onnx' is a folder; expected the path of the file to write"),
        (tmp_path / "afile" / "model.onnx", "'.*afile' is a file, not a folder"),
    ):
        assert export([str(runs / "s"), "-o", str(output)]) == 2
        assert re.search(message, capsys.readouterr().err)


def test_a_graph_beside_another_exports_config_is_refused_when_loaded(runs, tmp_path):
    from nudiff_diffusion import load_denoiser

    mixed = tmp_path / "mixed"
    shutil.copytree(runs / "h_onnx", mixed)
    shutil.copy(runs / "s_onnx" / "model.onnx", mixed / "model.onnx")  # a structure graph, a histology config
    with pytest.raises(ValueError, match="does not fit its config .* the graph takes \\['t', 'x'\\]"):
        load_denoiser(mixed / "model.onnx")
    resized = tmp_path / "resized"
    shutil.copytree(runs / "s_onnx", resized)
    config = json.loads((resized / "config.json").read_text())
    config["unet"]["image_size"] *= 2
    (resized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not fit its config"):
        load_denoiser(resized / "model.onnx")
    assert load_denoiser(runs / "s_onnx" / "model.onnx").image_size == config["unet"]["image_size"] // 2
