"""``build_engine``'s choices of network and precision flags, for TensorRT 10 and 11.

TensorRT cannot be installed in this project's workplace, so these tests run the builder
against a stand-in module with the shape of the ``tensorrt`` API it calls (builder, ONNX
parser, network, builder config), recording what the builder asks for. They check nudiff's
decisions (strongly or weakly typed network, which flags, which layers pinned to float32,
what is refused), not TensorRT: the build itself is the stand-in's refusal, which
``build_engine`` must report. The real build is ``tests/test_engines.py``'s gpu test.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from nudiff_diffusion import EngineUnavailableError, UNet, UNetConfig, build_engine, check_engine_args, export_onnx
from nudiff_diffusion.testing import perturbed_copy


class _Layer:
    def __init__(self, kind: str) -> None:
        self.type, self.num_outputs, self.precision, self.output_types = kind, 1, None, {}

    def set_output_type(self, index: int, dtype: str) -> None:
        self.output_types[index] = dtype


class _Input:
    name, shape = "x", (-1, 3, 32, 32)


class _Network:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.layers = [_Layer("CONVOLUTION"), _Layer("NORMALIZATION"), _Layer("SOFTMAX")]
        self.num_layers, self.num_inputs = len(self.layers), 1

    def get_layer(self, i: int) -> _Layer:
        return self.layers[i]

    def get_input(self, i: int) -> _Input:
        return _Input()


class _Profile:
    def __init__(self) -> None:
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi) -> None:
        self.shapes[name] = (lo, opt, hi)


class _BuilderConfig:
    def __init__(self) -> None:
        self.flags, self.profiles = [], []

    def set_memory_pool_limit(self, pool, size) -> None:
        self.workspace = size

    def set_flag(self, flag) -> None:
        self.flags.append(flag)

    def add_optimization_profile(self, profile) -> None:
        self.profiles.append(profile)


def _tensorrt(version: str, *, weak_flags: bool) -> types.ModuleType:
    """A stand-in ``tensorrt``: TensorRT 10 (weakly typed precision flags) or 11 (none;
    STRONGLY_TYPED kept and ignored). Its builder records the network and config and
    builds nothing (``build_serialized_network`` returns None, as TensorRT does on failure)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.float32 = "float32"
    flags = ["TF32"] + (["FP16", "BF16", "OBEY_PRECISION_CONSTRAINTS"] if weak_flags else [])
    trt.BuilderFlag = types.SimpleNamespace(**{f: f for f in flags})
    # TensorRT 10: EXPLICIT_BATCH (ignored) = 0, STRONGLY_TYPED = 1; TensorRT 11: STRONGLY_TYPED = 0
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1 if weak_flags else 0)
    trt.LayerType = types.SimpleNamespace(NORMALIZATION="NORMALIZATION", SOFTMAX="SOFTMAX", REDUCE="REDUCE")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.built = []

    class Logger:
        WARNING = 2

        def __init__(self, level) -> None:
            pass

    class Builder:
        def __init__(self, logger) -> None:
            pass

        def create_network(self, flags: int) -> _Network:
            return _Network(flags)

        def create_builder_config(self) -> _BuilderConfig:
            return _BuilderConfig()

        def create_optimization_profile(self) -> _Profile:
            return _Profile()

        def build_serialized_network(self, network, config):
            trt.built.append((network, config))
            return None

    class OnnxParser:
        def __init__(self, network, logger) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            return True

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    return trt


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    torch.manual_seed(0)
    model = perturbed_copy(UNet(UNetConfig.preset("tiny-64", image_size=32))).eval()
    root = tmp_path_factory.mktemp("trt")
    for precision in ("float32", "float16"):
        export_onnx(model, root / precision / "model.onnx", batch_max=4, precision=precision)
    return root


def _build(graphs, monkeypatch, trt, graph: str, precision: str):
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    plan = graphs.parent / f"{graphs.name}-engine" / "model.plan"
    with pytest.raises(RuntimeError, match="TensorRT failed to build an engine from"):
        build_engine(graphs / graph / "model.onnx", plan, precision=precision, opt_batch=2)
    assert not plan.parent.exists() or not any(plan.parent.iterdir())  # nothing written
    ((network, config),) = trt.built
    return network, config


@pytest.mark.parametrize("version", ["10.13.0", "11.0.0"])
def test_a_float32_graph_builds_float32_without_flags_on_either_version(graphs, monkeypatch, version):
    trt = _tensorrt(version, weak_flags=version.startswith("10"))
    network, config = _build(graphs, monkeypatch, trt, "float32", "float32")
    assert network.flags == 0 and config.flags == []
    assert all(layer.precision is None for layer in network.layers)
    assert config.profiles[0].shapes == {"x": ((1, 3, 32, 32), (2, 3, 32, 32), (4, 3, 32, 32))}


def test_fp16_of_a_float32_graph_on_tensorrt_10_pins_normalisation_and_softmax(graphs, monkeypatch):
    network, config = _build(graphs, monkeypatch, _tensorrt("10.13.0", weak_flags=True), "float32", "float16")
    assert network.flags == 0 and config.flags == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
    pinned = {layer.type: (layer.precision, layer.output_types) for layer in network.layers}
    assert pinned == {
        "CONVOLUTION": (None, {}),
        "NORMALIZATION": ("float32", {0: "float32"}),
        "SOFTMAX": ("float32", {0: "float32"}),
    }


@pytest.mark.parametrize("version", ["10.13.0", "11.0.0"])
def test_a_float16_graph_builds_strongly_typed_without_precision_flags(graphs, monkeypatch, version):
    trt = _tensorrt(version, weak_flags=version.startswith("10"))
    network, config = _build(graphs, monkeypatch, trt, "float16", "float16")
    assert network.flags == 1 << (1 if version.startswith("10") else 0)  # 1 << STRONGLY_TYPED
    assert config.flags == [] and all(layer.precision is None and not layer.output_types for layer in network.layers)


@pytest.mark.parametrize(
    ("precision", "hint"), [("float16", "export_onnx.py .* --fp16"), ("bfloat16", "float32 engine")]
)
def test_tensorrt_11_refuses_weakly_typed_reduced_precision_and_says_what_to_do(graphs, monkeypatch, precision, hint):
    monkeypatch.setitem(sys.modules, "tensorrt", _tensorrt("11.0.0", weak_flags=False))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(EngineUnavailableError, match=f"TensorRT 11.0.0 has no weakly typed {precision} .*{hint}"):
        build_engine(graphs / "float32" / "model.onnx", graphs / "t11" / "model.plan", precision=precision)
    assert not (graphs / "t11").exists()


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_a_float16_graph_builds_only_a_float16_engine(graphs, precision):
    with pytest.raises(
        ValueError, match=f"is a float16 graph, which builds strongly typed .*pass --fp16; for a {precision}"
    ):
        check_engine_args(graphs / "float16" / "model.onnx", graphs / "x" / "model.plan", precision=precision)
