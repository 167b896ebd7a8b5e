"""Where PyTorch runs: ``--device`` resolution, the PyTorch runtime's options (precision,
torch.compile, CUDA graphs) and their errors. The CUDA paths run in the ``gpu`` tests
(tests/test_gpu.py); here, everything a CPU machine can check."""

from __future__ import annotations

import argparse
import copy
import importlib.util

import pytest
import torch
from nudiff_diffusion import (
    EngineUnavailableError,
    TorchDenoiser,
    TrainConfig,
    UNet,
    UNetConfig,
    add_sampling_arguments,
    add_train_arguments,
    load_denoiser,
    resolve_device,
    runtime_options_from_args,
    save_model,
    train_config_from_args,
    warn_if_emulated_precision,
)
from nudiff_diffusion.testing import perturbed_copy

TINY = UNetConfig.preset("tiny-64", image_size=16)


def _no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_the_cpu_without_cuda(monkeypatch):
    _no_cuda(monkeypatch)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_and_cuda_name_the_current_gpu(monkeypatch):
    # what a CUDA machine sees (under torchrun, setup_distributed sets the current device
    # to LOCAL_RANK): "auto" and a bare "cuda" both become an indexed device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"'cuda:2'.*2 CUDA device"):
        resolve_device("cuda:2")


def test_cuda_without_a_gpu_says_what_to_do(monkeypatch):
    _no_cuda(monkeypatch)
    with pytest.raises(ValueError, match=r"'cuda'.*sees none.*--device cpu"):
        resolve_device("cuda")


@pytest.mark.parametrize("bad", ["tpu", "gpu0", "mps", ""])
def test_unknown_devices_are_refused(bad):
    with pytest.raises(ValueError, match=r"`device` must be 'auto', 'cpu', 'cuda' or 'cuda:N', got"):
        resolve_device(bad)


def test_cuda_graphs_need_a_cuda_model():
    with pytest.raises(ValueError, match=r"`cuda_graphs` needs the model on a CUDA device, got device cpu"):
        TorchDenoiser(UNet(TINY), cuda_graphs=True)


def _perturbed(model: UNet) -> UNet:
    """Random weights everywhere (the output layer starts at zero, which hides differences)."""
    return perturbed_copy(model).eval()


def test_precision_runs_autocast_and_returns_float32():
    torch.manual_seed(0)
    model = _perturbed(UNet(TINY))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    fp32 = TorchDenoiser(model).eps(x, t)
    bf16 = TorchDenoiser(model, dtype=torch.bfloat16).eps(x, t)
    assert fp32.dtype == bf16.dtype == torch.float32
    diff = (fp32 - bf16).abs().max().item()
    assert 0 < diff < 0.1  # bf16 changes the numbers, a little
    with pytest.raises(ValueError, match="`dtype` must be one of"):
        TorchDenoiser(model, dtype=torch.float64)


def test_channels_last_runtime_gives_the_same_eps_and_leaves_other_models_alone(tmp_path):
    torch.manual_seed(0)
    model = perturbed_copy(UNet(TINY), std=0.05)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([5, 500, 900])
    plain = TorchDenoiser(model)
    assert model.input_conv.weight.is_contiguous()  # the default keeps the caller's layout
    reference = plain.eps(x, t)
    save_model(tmp_path / "ckpt", model)
    loaded = load_denoiser(tmp_path / "ckpt")  # the loader owns its model: channels-last on the CPU
    weight = loaded.model.input_conv.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    out = loaded.eps(x, t)
    assert x.is_contiguous() and out.shape == reference.shape
    assert (out - reference).abs().max() <= 1e-5
    assert (TorchDenoiser(model, channels_last=True).eps(x, t) - reference).abs().max() <= 1e-5


def test_load_denoiser_options(tmp_path):
    save_model(tmp_path / "ckpt", UNet(TINY))
    runtime = load_denoiser(tmp_path / "ckpt", precision="bf16")
    assert runtime.autocast_dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"`precision` must be one of \['bf16', 'fp16', 'fp32'\], got 'fp8'"):
        load_denoiser(tmp_path / "ckpt", precision="fp8")
    graph = tmp_path / "model.onnx"  # refused before the file is even read
    for options, named in (({"precision": "fp16"}, "precision"), ({"compile": True}, "compile")):
        with pytest.raises(ValueError, match=rf"{named} cannot be used with the exported graph .*model.onnx"):
            load_denoiser(graph, **options)
    with pytest.raises(ValueError, match=r"cuda_graphs cannot be used with the exported graph '.*model.onnx'"):
        load_denoiser(graph, cuda_graphs=True)
    with pytest.raises(ValueError, match=r"precision cannot be used with the exported graph '.*m.plan'"):
        load_denoiser(tmp_path / "m.plan", precision="bf16")
    if importlib.util.find_spec("tensorrt") is None:  # TensorRT takes CUDA graphs: past the check, to the engine
        with pytest.raises(EngineUnavailableError, match="needs TensorRT"):
            load_denoiser(tmp_path / "m.plan", cuda_graphs=True)


def test_cli_flags_reach_the_configs(monkeypatch):
    _no_cuda(monkeypatch)
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    config = train_config_from_args(parser.parse_args(["--weight-decay", "0.01", "--device", "cpu"]))
    assert (config.weight_decay, config.device) == (0.01, "cpu")
    assert train_config_from_args(parser.parse_args([])).device == "auto"
    with pytest.raises(ValueError, match="sees none"):  # checked before any work
        train_config_from_args(parser.parse_args(["--device", "cuda"]))
    with pytest.raises(ValueError, match="`weight_decay` must be a finite number >= 0, got -1.0"):
        TrainConfig(weight_decay=-1.0)
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser, batch=4, what="samples")
    args = parser.parse_args(["--out", "o", "--precision", "bf16", "--compile"])
    assert runtime_options_from_args(args) == {
        "device": torch.device("cpu"),
        "precision": "bf16",
        "compile": True,
        "cuda_graphs": False,
    }


def _cpu_bf16(monkeypatch: pytest.MonkeyPatch, capability: str, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


def test_bf16_on_a_cpu_without_bf16_instructions_warns(monkeypatch, recwarn):
    cpu = torch.device("cpu")
    _cpu_bf16(monkeypatch, "AVX2", False, False)
    with pytest.warns(RuntimeWarning, match="no AVX-512 BF16 or AMX.*use --precision fp32"):
        assert warn_if_emulated_precision(cpu, "bf16")
    _no_cuda(monkeypatch)
    with pytest.warns(RuntimeWarning, match="emulated"):
        runtime_options_from_args(_sampling_args("--precision", "bf16"))
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    with pytest.warns(RuntimeWarning, match="emulated"):
        train_config_from_args(parser.parse_args(["--precision", "bf16", "--device", "cpu"]))
    recwarn.clear()
    # no warning: float32, a GPU, an exported engine, or a CPU with the instructions
    assert not warn_if_emulated_precision(cpu, "fp32")
    assert not warn_if_emulated_precision(torch.device("cuda"), "bf16")
    runtime_options_from_args(_sampling_args("--engine", "m.onnx", "--precision", "bf16"))
    for capability, avx512_bf16, amx in (("AVX512", True, False), ("AVX512", False, True), ("DEFAULT", False, False)):
        _cpu_bf16(monkeypatch, capability, avx512_bf16, amx)
        assert not warn_if_emulated_precision(cpu, "bf16")
    assert [str(w.message) for w in recwarn] == []


def _sampling_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser, batch=4, what="samples")
    return parser.parse_args(["--out", "o", "--device", "cpu", *argv])


@pytest.mark.slow
def test_torch_compile_matches_eager_on_the_cpu():
    # about a minute to compile on a 2-core CPU: run with --runslow (on a GPU: tests/test_gpu.py)
    torch.manual_seed(0)
    model = _perturbed(UNet(UNetConfig.preset("tiny-64", image_size=16, num_res_blocks=1)))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 500])
    eager = TorchDenoiser(model).eps(x, t)
    compiled = TorchDenoiser(copy.deepcopy(model), compile=True).eps(x, t)
    assert (compiled - eager).abs().max().item() < 1e-4
    # what load_denoiser(..., compile=True) runs on the CPU
    compiled_nhwc = TorchDenoiser(copy.deepcopy(model), compile=True, channels_last=True).eps(x, t)
    assert (compiled_nhwc - eager).abs().max().item() < 1e-4
