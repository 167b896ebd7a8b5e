"""Numbers the samplers, schedules, configs and checkpoints refuse (named, with the value
got), and the edge cases they get right: one-step sampling, guidance at scale 1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from nudiff_diffusion import (
    NoiseSchedule,
    UNet,
    UNetConfig,
    gaussian_eps_fn,
    guided,
    initial_noise,
    load_model,
    read_graph_config,
    sample,
    sampling_timesteps,
    save_model,
    shard_indices,
)

SCHEDULE = NoiseSchedule.linear(1000)


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpmpp2m"])
def test_one_step_goes_from_noise_to_the_data_mean(method):
    """One step starts at the last step (pure noise) and predicts x0: for Gaussian data the
    posterior mean, ~0.5 here; starting at step 0 instead returned the noise itself."""
    assert sampling_timesteps(SCHEDULE, 1, "uniform").tolist() == [999]
    x = sample(
        gaussian_eps_fn(SCHEDULE, 0.5, 0.1),
        shape=(256, 1, 4, 4),
        schedule=SCHEDULE,
        method=method,
        steps=1,
        generator=torch.Generator().manual_seed(0),
    )
    assert abs(float(x.mean()) - 0.5) < 0.02 and float(x.std()) < 0.1


def test_sampler_arguments_are_named():
    eps = gaussian_eps_fn(SCHEDULE, 0.0, 1.0)
    common = {"shape": (2, 1, 4, 4), "schedule": SCHEDULE, "steps": 2}
    for kwargs, message in (
        ({"method": "ddim", "eta": float("nan")}, "`eta` must be a number in \\[0, 1\\]"),
        ({"method": "ddim", "eta": -1.0}, "`eta` must be a number in \\[0, 1\\]"),
        ({"method": "dpmpp2m", "eta": 0.7}, "`eta` applies to the ddim sampler only"),
        ({"method": "ddim", "steps": True}, "`steps` \\(--steps\\) must be an integer"),
        ({"method": "ddim", "clip": -1.0}, "`clip` \\(--clip\\) must be finite > 0"),
        ({"method": "ddim", "x_T": torch.full((2, 1, 4, 4), float("nan"))}, "`x_T` holds 32 NaN or inf"),
    ):
        with pytest.raises(ValueError, match=message):
            sample(eps, **{**common, **kwargs})


def test_schedules_refuse_a_beta_of_one_and_bad_arguments():
    with pytest.raises(ValueError, match="`betas` must lie in \\(0, 1\\), got 1.0"):
        NoiseSchedule(np.linspace(1e-4, 1.0, 100))
    for kwargs, message in (
        ({"max_beta": 2.0}, "`max_beta` must be in \\(0, 1\\)"),
        ({"num_timesteps": True}, "`num_timesteps` must be an integer >= 2"),
        ({"num_timesteps": 10.5}, "`num_timesteps` must be an integer >= 2"),
    ):
        with pytest.raises(ValueError, match=message):
            NoiseSchedule.cosine(**kwargs)
    assert NoiseSchedule.linear(np.int64(1000)).num_timesteps == 1000


def test_guidance_scale_is_checked_and_one_is_exactly_the_conditional_model():
    def eps_fn(x, t, cond):
        return x * 3.7 + cond * 1e3

    x, t = torch.randn(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64)
    cond = torch.randn(2, 3, 4, 4)
    assert torch.equal(guided(eps_fn, cond, torch.zeros_like(cond), 1.0)(x, t), eps_fn(x, t, cond))
    for bad in (float("inf"), float("nan"), True, -1.0):
        with pytest.raises(ValueError, match="guidance `scale` must be a finite number >= 0"):
            guided(eps_fn, cond, torch.zeros_like(cond), bad)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"image_size": 0}, "`image_size` must be a positive integer, got 0"),
        ({"num_res_blocks": -1}, "`num_res_blocks` must be a positive integer"),
        ({"image_size": "64"}, "`image_size` must be a positive integer, got '64'"),
        ({"attention_resolutions": "16"}, "`attention_resolutions` must be a list of positive integers"),
        ({"channel_mult": ()}, "`channel_mult` must name at least one level"),
        ({"attention_resolutions": (7,)}, "attention_resolutions \\[7\\] match no feature-map size"),
        ({"dropout": float("nan")}, "`dropout` must be in \\[0, 1\\)"),
        ({"learn_sigma": "no"}, "`learn_sigma` must be true or false"),
        ({"num_head_channels": -1, "num_heads": 5}, "num_heads 5 must divide every width"),
    ],
)
def test_unet_configs_name_what_is_wrong(override, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig.preset("tiny-64", **override)


def test_a_checkpoint_whose_weights_are_not_its_configs_is_refused(tmp_path):
    model = UNet(UNetConfig.preset("tiny-64", image_size=16))
    save_model(tmp_path / "a", model)
    other = UNet(UNetConfig.preset("tiny-64", image_size=16))
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    save_model(tmp_path / "b", other)
    # a save killed between its two files: new weights beside the old config
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="is not the weights .* was written with .* a save was interrupted"):
        load_model(tmp_path / "a")
    assert load_model(tmp_path / "b") is not None
    with pytest.raises(TypeError):  # a config that cannot be written changes no file
        save_model(tmp_path / "b", model, diffusion={"bad": object()})
    torch.testing.assert_close(next(load_model(tmp_path / "b").parameters()), next(other.parameters()))


def test_graph_configs_must_describe_a_unet_or_a_hovernet(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"graph")
    config = {"format": "nudiff-diffusion/onnx", "graph": "model.onnx", "batch_max": 4}
    for entry, message in (
        ({}, "describes neither a UNet"),
        ({"unet": {"in_channels": 3}}, "'unet' must give positive integers image_size and in_channels"),
        ({"unet": {"image_size": 64, "in_channels": 3}, "batch_max": True}, "no positive integer 'batch_max'"),
    ):
        (tmp_path / "config.json").write_text(json.dumps({**config, **entry}))
        with pytest.raises(ValueError, match=message):
            read_graph_config(tmp_path / "model.onnx")


def test_shards_and_noise_check_their_arguments():
    assert shard_indices(5, 1, 2) == [1, 3]
    for args, message in (
        ((-5, 0, 1), "`num` \\(--num\\) must be >= 0"),
        ((5, True, 2), "`rank` \\(--rank\\) must be an integer"),
        ((5, 0, 0), "`world_size` \\(--world-size\\) must be >= 1"),
        ((5, 2, 2), "`rank` \\(--rank\\) must be in \\[0, world_size=2\\)"),
    ):
        with pytest.raises(ValueError, match=message):
            shard_indices(*args)
    with pytest.raises(ValueError, match="`indices` is empty"):
        initial_noise(0, [], (1, 4, 4))


def test_output_records_compare_numpy_scalars_as_numbers_and_identify_models(tmp_path):
    from nudiff_diffusion import TorchDenoiser, claim_output_folder, runtime_weights_digest, weights_digest

    claim_output_folder(tmp_path / "out", {"steps": np.int64(20), "clip": np.float32(1.0)})
    claim_output_folder(tmp_path / "out", {"steps": 20, "clip": 1.0})  # the same settings
    model = UNet(UNetConfig.preset("tiny-64", image_size=16))
    # a runtime without a recorded digest (built in memory) is identified by its weights
    assert runtime_weights_digest(TorchDenoiser(model)) == weights_digest(model.state_dict())


def test_samples_folders_record_the_precision_a_runtime_computes_in():
    from types import SimpleNamespace

    from nudiff_diffusion import TorchDenoiser
    from nudiff_diffusion._resume import runtime_precision

    model = UNet(UNetConfig.preset("tiny-64", image_size=16))
    assert runtime_precision(TorchDenoiser(model)) == "float32"
    assert runtime_precision(TorchDenoiser(model, dtype=torch.bfloat16)) == "bfloat16"
    # a graph or an engine: what its config.json records (a float16 export shares the weights' digest)
    assert runtime_precision(SimpleNamespace(config={"precision": "float16", "weights_sha256": "x"})) == "float16"
    assert runtime_precision(SimpleNamespace(config={})) == "float32"


def test_respacing_and_load_device_arguments_are_named(tmp_path):
    from nudiff_diffusion import space_timesteps

    steps = space_timesteps(1000, "ddim30")
    assert len(steps) == 30 and steps[1] == 34  # the smallest stride giving 30 steps, as documented
    with pytest.raises(ValueError, match="not a bool"):
        space_timesteps(1000, True)
    save_model(tmp_path / "run", UNet(UNetConfig.preset("tiny-64", image_size=16)))
    with pytest.raises(ValueError, match="`device` must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        load_model(tmp_path / "run", device="gpu")


def test_every_runtime_names_bad_eps_inputs_the_same_way():
    from nudiff_diffusion import TorchDenoiser

    runtime = TorchDenoiser(UNet(UNetConfig.preset("tiny-64", image_size=16)))
    x, t = torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.int64)
    assert runtime.eps(x.double(), t).dtype == torch.float32  # float64 in: float32 out, as documented
    for args, error, message in (
        (
            (torch.randn(2, 3, 8, 8), t),
            ValueError,
            "`x` must be \\(N, 3, 16, 16\\) for this model, got \\(2, 3, 8, 8\\)",
        ),
        ((x.long(), t), TypeError, "`x` must be floating point"),
        ((x, torch.zeros(3, dtype=torch.int64)), ValueError, "`t` must be 2 integer timesteps"),
        ((x, torch.zeros(2)), ValueError, "`t` must be 2 integer timesteps"),
    ):
        with pytest.raises(error, match=message):
            runtime.eps(*args)
