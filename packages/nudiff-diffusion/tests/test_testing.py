"""nudiff_diffusion.testing.perturbed_copy: the random weights every engine comparison starts from."""

from __future__ import annotations

import pytest
import torch
from nudiff_diffusion import UNet, UNetConfig
from nudiff_diffusion.testing import perturbed_copy

TINY = UNetConfig.preset("tiny-64", image_size=32)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_the_copy_answers_non_zero_and_the_model_is_left_alone():
    torch.manual_seed(0)
    model = UNet(TINY).train()
    before = _flat(model).clone()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    assert model.eval()(x, t).abs().max() == 0  # the zero-initialised output layer
    model.train()
    copy = perturbed_copy(model)
    assert torch.equal(_flat(model), before) and model.training and copy.training
    assert copy.eval()(x, t).abs().max() > 0.01
    noise = _flat(copy) - before
    assert noise.std().item() == pytest.approx(0.02, rel=0.02)  # ~80,000 parameters
    assert abs(noise.mean().item()) < 1e-3


def test_same_seed_same_weights_whatever_the_global_random_state():
    model = UNet(TINY)
    torch.manual_seed(1)
    first = _flat(perturbed_copy(model, seed=3))
    torch.manual_seed(2)
    torch.randn(100)
    assert torch.equal(_flat(perturbed_copy(model, seed=3)), first)
    assert not torch.equal(_flat(perturbed_copy(model, seed=4)), first)
    assert torch.equal(_flat(perturbed_copy(model, std=0.0)), _flat(model))
    doubled = _flat(perturbed_copy(model, seed=3, std=0.04)) - _flat(model)
    torch.testing.assert_close(doubled, 2 * (first - _flat(model)), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "unet"}, TypeError, r"`model` must be a torch.nn.Module, got str"),
        ({"std": -0.1}, ValueError, r"`std` must be a finite number >= 0, got -0.1"),
        ({"std": float("nan")}, ValueError, r"`std` must be a finite number >= 0, got nan"),
        ({"seed": 1.5}, TypeError, r"`seed` must be an int, got 1.5"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    arguments = {"model": UNet(TINY), **kwargs}
    model = arguments.pop("model")
    with pytest.raises(error, match=match):
        perturbed_copy(model, **arguments)
