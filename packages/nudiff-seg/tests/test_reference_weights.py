"""HoVer-Net's own weights files: released trained models and the pre-activation ImageNet
ResNet-50 the reference trains from, in the reference's module names."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from nudiff_postproc import write_image
from nudiff_seg import (
    HoVerNet,
    HoVerNetConfig,
    build_hovernet,
    load_encoder_from_torchvision,
    load_encoder_weights,
    load_hovernet,
    load_reference_hovernet,
    predict_structure,
    resnet50,
)
from nudiff_seg._reference_weights import nudiff_key
from nudiff_seg.cli import main


def _reference_name(key: str) -> str:
    """The reference's name of one of nudiff-seg's parameters, transcribed from
    vqdang/hover_net's net_utils.py: residual units name their batch norms ``preact/bn``,
    ``conv1/bn``, ``conv2/bn``; dense units ``preact_bna/bn`` and ``conv1/bn``."""
    dense = ".dense.units." in key
    for ours, theirs in (
        ("preact_bn", "preact_bna/bn" if dense else "preact/bn"),
        ("conv1_bn", "conv1/bn"),
        ("conv2_bn", "conv2/bn"),
    ):
        key = key.replace(f".{ours}.", f".{theirs}.")
    return key


def _reference_file(model: HoVerNet, path, *, types: int | None = None, encoder_only: bool = False, wrap=True):
    """``model``'s weights as the reference's conversion script saved them: its names,
    no BatchNorm step counters, the unpooling matrix, ``{"desc": ...}``; ``types`` adds a
    type branch, ``encoder_only`` keeps the ResNet-50 (ImageNet-ResNet50-Preact_pytorch.tar)."""
    state = {
        _reference_name(k): v.clone()
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
        and (not encoder_only or k.split(".")[0] in ("conv0", "d0", "d1", "d2", "d3"))
    }
    if types:
        for k, v in model.state_dict().items():
            if k.startswith("decoder.np.") and not k.endswith("num_batches_tracked"):
                v = torch.randn(types, *v.shape[1:]) if k.startswith("decoder.np.u0.conv.") else v.clone()
                state[_reference_name(k).replace("decoder.np.", "decoder.tp.")] = v
    state["upsample2x.unpool_mat"] = torch.ones(2, 2)
    torch.save({"desc": state} if wrap else state, path)
    return state


def _randomised(config: HoVerNetConfig, seed: int) -> HoVerNet:
    torch.manual_seed(seed)
    model = HoVerNet(config)
    with torch.no_grad():  # every tensor distinct from a fresh model's
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor) * 0.05 + (1.0 if tensor.ndim == 1 else 0.0))
    return model.eval()


def test_the_transcription_gives_names_read_in_the_reference_source():
    names = {_reference_name(k) for k in build_hovernet("hovernet-original").state_dict()}
    # literal keys of vqdang/hover_net's HoVerNet (net_desc.py, net_utils.py)
    for key in (
        "conv0./.weight",
        "conv0.bn.running_var",
        "d0.units.0.conv1/bn.weight",
        "d0.units.1.preact/bn.bias",
        "d3.units.2.conv2/bn.running_mean",
        "d2.shortcut.weight",
        "d1.blk_bna.bn.weight",
        "conv_bot.weight",
        "decoder.np.u3.conva.weight",
        "decoder.hv.u3.dense.units.7.preact_bna/bn.running_var",
        "decoder.np.u2.dense.units.3.conv1/bn.weight",
        "decoder.np.u2.dense.blk_bna.bn.bias",
        "decoder.hv.u1.conva.weight",
        "decoder.hv.u0.bn.weight",
        "decoder.hv.u0.conv.bias",
    ):
        assert key in names
        assert _reference_name(nudiff_key(key)) == key


@pytest.mark.parametrize(
    ("config", "types"),
    [(HoVerNetConfig("fast", 8, (1, 2, 1, 1)), 6), (HoVerNetConfig("original", 8, (2, 1, 1, 1)), None)],
)
def test_a_reference_checkpoint_imports_with_every_tensor_and_the_same_outputs(tmp_path, config, types):
    source = _randomised(config, 0)
    state = _reference_file(source, tmp_path / "ref.tar", types=types)
    # DataParallel's prefix on every key, as some checkpoints have it
    torch.save({"desc": {"module." + k: v for k, v in state.items()}}, tmp_path / "parallel.tar")
    for name in ("ref.tar", "parallel.tar"):
        model, record = load_reference_hovernet(tmp_path / name)
        assert model.config == config and not model.training
        assert record["left_out"] == ([f"decoder.tp (the type branch, {types} classes)"] if types else [])
        assert record["file"] == name and len(record["sha256"]) == 64
        ours, theirs = model.state_dict(), source.state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.endswith("num_batches_tracked"))
        x = torch.rand(2, 3, config.input_size, config.input_size)
        with torch.no_grad():
            got, want = model(x), source(x)
        for branch in ("np", "hv"):
            assert torch.equal(got[branch], want[branch])


def test_the_released_kumar_model_layout_imports(tmp_path):
    # full size, original mode, no type branch: hovernet_original_kumar_notype_tf2pytorch.tar
    source = build_hovernet("hovernet-original")
    state = _reference_file(source, tmp_path / "hovernet_original_kumar_notype_tf2pytorch.tar")
    # 103 batch norms (4 tensors each, no step counters), 114 convolutions, 2 output biases,
    # the unpooling matrix
    assert len(state) == 103 * 4 + 114 + 2 + 1
    model, record = load_reference_hovernet(tmp_path / "hovernet_original_kumar_notype_tf2pytorch.tar")
    assert model.config == HoVerNetConfig("original", 1, (3, 4, 6, 3)) and record["left_out"] == []
    ours = model.state_dict()
    assert all(torch.equal(ours[nudiff_key(k)], v) for k, v in state.items() if k != "upsample2x.unpool_mat")


def test_bad_reference_files_are_refused_by_name(tmp_path):
    config = HoVerNetConfig("original", 8, (1, 1, 1, 1))
    state = _reference_file(_randomised(config, 1), tmp_path / "ok.tar")
    with pytest.raises(FileNotFoundError, match="weights file not found: '.*missing.tar'"):
        load_reference_hovernet(tmp_path / "missing.tar")
    (tmp_path / "text.tar").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="'.*text.tar' could not be read as a weights file"):
        load_reference_hovernet(tmp_path / "text.tar")
    no_hv = {k: v for k, v in state.items() if not k.startswith("decoder.hv.")}
    torch.save({"desc": no_hv}, tmp_path / "no_hv.tar")
    with pytest.raises(ValueError, match="no 'decoder.hv.u0.conv.weight'"):
        load_reference_hovernet(tmp_path / "no_hv.tar")
    less = dict(state)
    del less["d0.units.0.conv1/bn.running_var"]
    torch.save({"desc": less}, tmp_path / "less.tar")
    with pytest.raises(
        ValueError, match=r"'.*less.tar' does not fit .* 1 missing \['d0.units.0.conv1_bn.running_var'\]"
    ):
        load_reference_hovernet(tmp_path / "less.tar")
    wider = dict(state, **{"conv_bot.weight": torch.zeros(64, 256, 1, 1)})
    torch.save({"desc": wider}, tmp_path / "wider.tar")
    with pytest.raises(
        ValueError, match=r"1 of the wrong shape \['conv_bot.weight \(64, 256, 1, 1\) != \(128, 256, 1, 1\)"
    ):
        load_reference_hovernet(tmp_path / "wider.tar")
    torch.save({"desc": {**state, "upsample2x.unpool_mat": torch.eye(2)}}, tmp_path / "unpool.tar")
    with pytest.raises(ValueError, match="not the reference's 2x2 matrix of ones"):
        load_reference_hovernet(tmp_path / "unpool.tar")
    torch.save({"desc": {**state, "epoch": 3}}, tmp_path / "mixed.tar")
    with pytest.raises(ValueError, match=r"holds entries that are not tensors: \['epoch'\]"):
        load_reference_hovernet(tmp_path / "mixed.tar")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_file_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"desc": _RunsCode(marker)}, tmp_path / "evil.tar")  # loading it calls open(marker, "w")
    with pytest.raises(
        ValueError, match="'.*evil.tar' could not be read .* objects that loading would have to run.*io.open"
    ):
        load_reference_hovernet(tmp_path / "evil.tar")
    assert not marker.exists()
    torch.load(tmp_path / "evil.tar", weights_only=False)  # what an unsafe reader would do
    assert marker.exists()


def test_encoder_weights_from_the_reference_preact_resnet50(tmp_path):
    source = _randomised(HoVerNetConfig("fast", 1), 2)
    _reference_file(source, tmp_path / "ImageNet-ResNet50-Preact_pytorch.tar", encoder_only=True)
    torch.manual_seed(3)
    model = build_hovernet("hovernet-fast")
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    load_encoder_weights(model, tmp_path / "ImageNet-ResNet50-Preact_pytorch.tar")
    ours, theirs = model.state_dict(), source.state_dict()
    encoder = [k for k in ours if k.split(".")[0] in ("conv0", "d0", "d1", "d2", "d3") and "num_batches" not in k]
    # 49 batch norms x 4, 53 convolutions: a pre-activation ResNet-50 without its classifier
    assert len(encoder) == 49 * 4 + 53 and all(torch.equal(ours[k], theirs[k]) for k in encoder)
    rest = [k for k in ours if k.split(".")[0] not in ("conv0", "d0", "d1", "d2", "d3")]
    assert all(torch.equal(ours[k], fresh[k]) for k in rest)  # the decoders are not touched
    with pytest.raises(ValueError, match=r"does not fit this model's encoder \(fast, width 1/8\).*wrong shape"):
        load_encoder_weights(build_hovernet("light"), tmp_path / "ImageNet-ResNet50-Preact_pytorch.tar")
    # a torchvision ResNet-50 goes its own way; anything else is named
    torch.manual_seed(4)
    torch.save(resnet50().state_dict(), tmp_path / "resnet50.pth")
    dispatched = load_encoder_weights(build_hovernet("hovernet-fast"), tmp_path / "resnet50.pth").state_dict()
    direct = load_encoder_from_torchvision(build_hovernet("hovernet-fast"), tmp_path / "resnet50.pth").state_dict()
    assert torch.equal(dispatched["d2.units.3.conv2.weight"], direct["d2.units.3.conv2.weight"])
    assert all(torch.equal(dispatched[k], direct[k]) for k in encoder)
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="neither HoVer-Net's encoder .* nor a torchvision ResNet-50"):
        load_encoder_weights(build_hovernet("hovernet-fast"), tmp_path / "other.pth")


def test_import_hovernet_cli_makes_a_run_directory_that_predicts(tmp_path, capsys, monkeypatch):
    config = HoVerNetConfig("fast", 8, (1, 1, 1, 1))
    source = _randomised(config, 4)
    _reference_file(source, tmp_path / "ref.tar", types=5)
    out = tmp_path / "runs" / "imported"
    assert main(["import-hovernet", "--weights", str(tmp_path / "ref.tar"), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "fast mode, 256 px in, 164 px out" in said and "left out decoder.tp (the type branch, 5 classes)" in said
    saved = json.loads((out / "config.json").read_text())
    assert saved["imported"]["file"] == "ref.tar" and saved["hovernet"]["width_divisor"] == 8
    model = load_hovernet(out)
    image = np.random.default_rng(0).integers(0, 256, (200, 180, 3), dtype=np.uint8)
    np.testing.assert_array_equal(predict_structure(model, image), predict_structure(source, image))
    # its weights file starts another training's encoder (the tiny preset is this config)
    tiny = load_encoder_weights(build_hovernet("tiny"), out / "model.safetensors").state_dict()
    assert all(torch.equal(tiny[k], v) for k, v in model.state_dict().items() if k.startswith(("conv0.", "d3.")))
    write_image(tmp_path / "images" / "a.png", image)
    args = ["--quiet", "predict", "--checkpoint", str(out), "--images", str(tmp_path / "images")]
    assert main([*args, "--out", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / "instance_maps" / "a.png").is_file()
    # an existing --out is not overwritten; a bad file leaves no folder behind
    before = (out / "model.safetensors").read_bytes()
    assert main(["import-hovernet", "--weights", str(tmp_path / "ref.tar"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "model.safetensors").read_bytes() == before
    (tmp_path / "plain").mkdir()
    assert out.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777  # not owner-only
    # a failure while writing leaves neither --out nor the staging folder
    import nudiff_seg._hovernet

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(nudiff_seg._hovernet, "save_hovernet", fail)
    assert main(["import-hovernet", "--weights", str(tmp_path / "ref.tar"), "--out", str(tmp_path / "new")]) == 2
    assert "disk full" in capsys.readouterr().err
    monkeypatch.undo()
    (tmp_path / "bad.tar").write_bytes(b"\0" * 100)
    assert main(["import-hovernet", "--weights", str(tmp_path / "bad.tar"), "--out", str(tmp_path / "new")]) == 2
    assert "error: --weights: '" in (err := capsys.readouterr().err) and "bad.tar' could not be read" in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".new", "new"))) == []
