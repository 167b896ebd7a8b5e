"""The ADM UNet, its config and checkpoint directories."""

from __future__ import annotations

import json

import pytest
import torch
from nudiff_diffusion import GroupNorm32, UNet, UNetConfig, load_model, save_model, timestep_embedding
from nudiff_diffusion.testing import perturbed_copy
from torch import nn

TINY = UNetConfig.preset("tiny-64", image_size=32)


def _randomised(model: nn.Module) -> nn.Module:
    """Give the zero-initialised output layers non-zero weights, so outputs tell apart."""
    return perturbed_copy(model)


def test_output_shape_and_zero_initialised_output():
    model = UNet(TINY)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0, 999])
    y = model(x, t)
    assert y.shape == (2, 6, 32, 32)  # learn_sigma doubles the channels
    assert y.abs().max() == 0  # guided-diffusion zero-initialises the output convolution
    assert UNet(UNetConfig.preset("tiny-64", learn_sigma=False, image_size=32))(x, t).shape == (2, 3, 32, 32)


def test_timestep_changes_the_output():
    model = _randomised(UNet(TINY)).eval()
    x = torch.randn(1, 3, 32, 32)
    assert not torch.allclose(model(x, torch.tensor([1])), model(x, torch.tensor([500])))


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0, 7]), 8)
    torch.testing.assert_close(e[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))
    assert e.shape == (2, 8) and timestep_embedding(torch.tensor([3]), 9).shape == (1, 9)


def test_paper_preset_has_guided_diffusions_size():
    cfg = UNetConfig.preset("paper-256")
    assert (cfg.model_channels, cfg.channel_mult, cfg.attention_resolutions) == (256, (1, 1, 2, 2, 4, 4), (32, 16, 8))
    with torch.device("meta"):
        n = sum(p.numel() for p in UNet(cfg).parameters())
    assert 550e6 < n < 556e6  # the 256 x 256 unconditional ADM model has ~553 M parameters


def test_norm_layers_are_pluggable_and_see_the_condition():
    seen = []

    class RecordingNorm(GroupNorm32):
        def forward(self, x, cond=None):
            seen.append(None if cond is None else tuple(cond.shape))
            return super().forward(x, cond)

    model = UNet(TINY, norm_factory=RecordingNorm)
    cond = torch.zeros(1, 3, 32, 32)
    model(torch.randn(1, 3, 32, 32), torch.tensor([3]), cond)
    assert len(seen) > 10 and set(seen) == {(1, 3, 32, 32)}


def test_groupnorm_and_attention_in_float32_under_autocast():
    model = _randomised(UNet(TINY))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(2, 3, 32, 32), torch.tensor([5, 6]))
    assert torch.isfinite(y).all()
    norm = GroupNorm32(32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(torch.randn(1, 32, 4, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_config_round_trip_and_unknown_keys():
    assert UNetConfig.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY
    with pytest.raises(ValueError, match=r"unknown UNetConfig keys \['colour'\]"):
        UNetConfig.from_dict({**TINY.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        UNetConfig.preset("huge")
    with pytest.raises(ValueError, match="multiple of 32"):
        UNetConfig(model_channels=48)


def test_checkpoint_round_trip(tmp_path):
    model = _randomised(UNet(TINY)).eval()
    save_model(tmp_path / "run", model, diffusion={"schedule": "linear", "steps": 1000})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "model.safetensors"]
    back = load_model(tmp_path / "run")
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([42])
    torch.testing.assert_close(back(x, t), model(x, t), rtol=0, atol=0)


def test_bad_checkpoints_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_model(tmp_path / "nothing")
    run = save_model(tmp_path / "run", UNet(TINY))
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model.safetensors' could not be read.*truncated"):
        load_model(run)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        load_model(run)
    (run / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json' is not valid JSON"):
        load_model(run)
    other = save_model(tmp_path / "other", UNet(TINY))
    config = json.loads((other / "config.json").read_text())
    config["unet"]["model_channels"] = 64
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not fit the config"):
        load_model(other)


def test_bad_inputs_are_named():
    model = UNet(TINY)
    with pytest.raises(ValueError, match=r"expects x of shape \(N, 3, H, W\), got \(1, 4, 32, 32\)"):
        model(torch.zeros(1, 4, 32, 32), torch.tensor([1]))
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.zeros(1, 3, 36, 36), torch.tensor([1]))
