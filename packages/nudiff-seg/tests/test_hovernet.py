"""HoVer-Net: shapes of both modes, presets, torchvision encoder weights, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from nudiff_seg import PRESETS, HoVerNetConfig, build_hovernet, load_hovernet, resnet50, save_hovernet
from nudiff_seg._hovernet import HoVerNet, load_encoder_from_torchvision


@pytest.mark.parametrize(("mode", "size_in", "size_out"), [("fast", 256, 164), ("original", 270, 80)])
def test_modes_map_the_reference_window_sizes(mode, size_in, size_out):
    # reduced widths and depths keep the test fast; the crops and strides are the same
    model = HoVerNet(HoVerNetConfig(mode, 8, (1, 1, 1, 1))).eval()
    assert (model.config.input_size, model.config.output_size) == (size_in, size_out)
    with torch.no_grad():
        out = model(torch.rand(2, 3, size_in, size_in))
    assert set(out) == {"np", "hv"}
    assert out["np"].shape == out["hv"].shape == (2, 2, size_out, size_out)
    with pytest.raises(ValueError, match=rf"takes \(N, 3, {size_in}, {size_in}\) images, got \(1, 3, 128, 128\)"):
        model(torch.rand(1, 3, 128, 128))


def test_preset_sizes():
    counts = {name: sum(p.numel() for p in build_hovernet(name).parameters()) for name in ("hovernet-fast", "light")}
    # HoVer-Net's NP + HV branches with a ResNet-50 encoder: 33.6 M parameters (3 branches: 37.6 M)
    assert counts == {"hovernet-fast": 33_625_412, "light": 534_060}
    assert PRESETS["hovernet-original"].mode == "original"
    with pytest.raises(ValueError, match="unknown preset 'big'"):
        build_hovernet("big")


def test_torchvision_resnet50_weights_initialise_the_encoder(tmp_path):
    torch.manual_seed(0)
    tv = resnet50()
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.weight.uniform_(0.5, 1.5)
    torch.save(tv.state_dict(), tmp_path / "resnet50.pth")
    model = load_encoder_from_torchvision(build_hovernet("hovernet-fast"), tmp_path / "resnet50.pth")
    src, dst = tv.state_dict(), model.state_dict()
    assert torch.equal(dst["conv0./.weight"], src["conv1.weight"])
    assert torch.equal(dst["d2.units.3.conv2.weight"], src["layer3.3.conv2.weight"])
    assert torch.equal(dst["d1.shortcut.weight"], src["layer2.0.downsample.0.weight"])
    assert torch.equal(dst["d0.units.1.conv1_bn.running_mean"], src["layer1.1.bn1.running_mean"])
    # bn3 of a unit normalises the channels the next unit's pre-activation sees
    assert torch.equal(dst["d3.units.2.preact_bn.weight"], src["layer4.1.bn3.weight"])
    assert torch.equal(dst["d3.blk_bna.bn.weight"], src["layer4.2.bn3.weight"])
    with pytest.raises(ValueError, match="fit only the full-width presets"):
        load_encoder_from_torchvision(build_hovernet("light"), tmp_path / "resnet50.pth")


def test_checkpoint_round_trip_and_bad_files(tmp_path):
    torch.manual_seed(1)
    model = build_hovernet("tiny").eval()
    save_hovernet(tmp_path / "run", model, extra={"note": 1})
    loaded = load_hovernet(tmp_path / "run")
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(model(x)["hv"], loaded(x)["hv"])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["format"] == "nudiff-seg/hovernet" and config["hovernet"]["blocks"] == [1, 1, 1, 1]
    (tmp_path / "run" / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="model.safetensors' could not be read as safetensors"):
        load_hovernet(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_hovernet(tmp_path / "nowhere")
    for text, message in (("{", "is not valid JSON"), ("[1]", "holds a JSON list"), ('{"format": 1}', "has format 1")):
        (tmp_path / "run" / "config.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            load_hovernet(tmp_path / "run")


def test_save_hovernet_with_an_unwritable_config_changes_no_file(tmp_path):
    torch.manual_seed(1)
    model = build_hovernet("tiny").eval()
    save_hovernet(tmp_path / "run", model)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    other = build_hovernet("tiny").eval()
    with pytest.raises(TypeError):  # not JSON: refused before the weights are replaced
        save_hovernet(tmp_path / "run", other, extra={"note": object()})
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    with pytest.raises(TypeError):
        save_hovernet(tmp_path / "new", other, extra={"note": object()})
    assert not (tmp_path / "new").exists()
    load_hovernet(tmp_path / "run")  # still a matching pair


def test_phase_one_freezes_what_hovernet_freezes():
    """HoVer-Net's net_desc.py runs conv0 and d0 outside its set_grad_enabled(not freeze)
    and d0 freezes only its units: the stem, d0's projection shortcut and closing BN-ReLU
    train in phase 1, as do the bottleneck and the decoders; the optimizer holds exactly
    the parameters that get gradients."""
    from nudiff_seg._train import _optimizer

    torch.manual_seed(0)
    model = build_hovernet("tiny").train()
    x = torch.rand(1, 3, model.config.input_size, model.config.input_size)
    out = model(x, freeze_encoder=True)
    (out["np"].sum() + out["hv"].sum()).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    trained = {"conv0", "d0.shortcut", "d0.blk_bna", "conv_bot", "decoder"}
    for name, _ in model.named_parameters():
        assert (name in with_grad) == name.startswith(tuple(trained)), name
    assert any(n.startswith("d0.shortcut") for n in with_grad)  # the tiny preset has the projection
    optimized = {id(p) for group in _optimizer(model, 1, 1e-3).param_groups for p in group["params"]}
    assert optimized == {id(p) for name, p in model.named_parameters() if name in with_grad}
    assert len(_optimizer(model, 2, 1e-3).param_groups[0]["params"]) == len(list(model.parameters()))
