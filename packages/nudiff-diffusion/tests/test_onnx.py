"""ONNX export and the ONNX Runtime runtime."""

from __future__ import annotations

import json

import pytest
import torch
from nudiff_diffusion import (
    NoiseSchedule,
    OnnxDenoiser,
    TorchDenoiser,
    UNet,
    UNetConfig,
    export_onnx,
    load_denoiser,
    sample,
    save_model,
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = UNet(UNetConfig.preset("tiny-64", image_size=32)).eval()
    with torch.no_grad():  # the zero-initialised output layers would hide every difference
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    root = tmp_path_factory.mktemp("onnx")
    config = export_onnx(model, root / "graph" / "model.onnx", batch_max=8, settings={"kind": "structure"})
    return root, model, config


def test_export_matches_pytorch(exported):
    root, model, config = exported
    assert config["max_abs_diff"] <= 1e-4 and config["batch_max"] == 8 and config["inputs"] == ["x", "t"]
    assert json.loads((root / "graph" / "config.json").read_text())["graph"] == "model.onnx"
    runtime = load_denoiser(root / "graph" / "model.onnx")
    assert isinstance(runtime, OnnxDenoiser) and runtime.image_size == 32 and runtime.in_channels == 3
    x, t = torch.randn(5, 3, 32, 32), torch.randint(1000, (5,))
    with torch.no_grad():
        assert (runtime.eps(x, t) - model(x, t)).abs().max() <= 1e-4


def test_samples_through_onnx_match_pytorch(exported):
    root, model, _ = exported
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    outs = [
        sample(
            r.eps,
            shape=(4, 3, 32, 32),
            schedule=NoiseSchedule.linear(1000),
            method="dpmpp2m",
            steps=10,
            x_T=noise,
            clip=1.0,
        )
        for r in (TorchDenoiser(model), load_denoiser(root / "graph" / "model.onnx"))
    ]
    assert (outs[0] - outs[1]).abs().max() <= 2e-3


def test_larger_batches_than_exported_are_refused(exported):
    root, _, _ = exported
    runtime = load_denoiser(root / "graph" / "model.onnx")
    with pytest.raises(ValueError, match="at most 8, got 16"):
        runtime.eps(torch.randn(16, 3, 32, 32), torch.zeros(16, dtype=torch.int64))


def test_export_never_overwrites_a_checkpoint_config(tmp_path):
    model = UNet(UNetConfig.preset("tiny-64", image_size=32))
    save_model(tmp_path, model)
    with pytest.raises(ValueError, match="belongs to another checkpoint"):
        export_onnx(model, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_missing_config_is_named(exported, tmp_path):
    root, _, _ = exported
    (tmp_path / "lone.onnx").write_bytes((root / "graph" / "model.onnx").read_bytes())
    with pytest.raises(FileNotFoundError, match="no config.json beside it"):
        load_denoiser(tmp_path / "lone.onnx")


def test_a_corrupt_graph_is_named(exported, tmp_path):
    root, _, _ = exported
    data = (root / "graph" / "model.onnx").read_bytes()
    (tmp_path / "model.onnx").write_bytes(data[: len(data) // 3])
    (tmp_path / "config.json").write_text((root / "graph" / "config.json").read_text())
    with pytest.raises(ValueError, match="model.onnx' could not be loaded as an ONNX graph"):
        load_denoiser(tmp_path / "model.onnx")
