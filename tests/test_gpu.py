"""What only a CUDA GPU can check: the PyTorch runtime's CUDA graphs and torch.compile
against eager, sampling on the GPU from the CPU run's noise, mixed-precision training
steps and the CLIs with ``--device cuda``. Marked ``gpu`` (``pytest -m gpu``); skipped
without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nudiff_diffusion import (
    NoiseSchedule,
    TorchDenoiser,
    TrainConfig,
    UNet,
    UNetConfig,
    load_model,
    sample,
    train,
)
from nudiff_diffusion.testing import perturbed_copy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

CUDA = torch.device("cuda")
TINY = UNetConfig.preset("tiny-64", image_size=32)


def _perturbed(model: UNet) -> UNet:
    return perturbed_copy(model).eval()


def _inputs(n: int, size: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g).to(CUDA), torch.randint(1000, (n,), generator=g).to(CUDA)


def test_cuda_graphs_replay_what_eager_computes():
    model = _perturbed(UNet(TINY)).to(CUDA)
    eager, graphed = TorchDenoiser(model), TorchDenoiser(model, cuda_graphs=True)
    for n, seed in ((4, 1), (4, 2), (4, 3), (2, 4)):  # new inputs each call, then a new batch size
        x, t = _inputs(n, seed=seed)
        assert (graphed.eps(x, t) - eager.eps(x, t)).abs().max().item() < 1e-5


def test_cuda_graphs_with_the_prepared_modulations():
    from nudiff_histo import HistoDenoiser, build_histo_unet

    model = _perturbed(build_histo_unet("tiny-64", image_size=32)).to(CUDA)
    cond = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    null = torch.zeros_like(cond)
    eager = HistoDenoiser(model).guided(cond, null, 2.0)
    graphed = HistoDenoiser(model, cuda_graphs=True).guided(cond, null, 2.0)
    for seed in (1, 2, 3):
        x, t = _inputs(3, seed=seed)
        assert (graphed(x, t) - eager(x, t)).abs().max().item() < 1e-5


def test_torch_compile_matches_eager():
    model = _perturbed(UNet(TINY)).to(CUDA)
    x, t = _inputs(4)
    compiled = TorchDenoiser(model, compile=True).eps(x, t)
    assert (compiled - TorchDenoiser(model).eps(x, t)).abs().max().item() < 1e-3  # TF32 / fused kernels


def test_sampling_on_the_gpu_starts_from_the_cpu_runs_noise():
    model = _perturbed(UNet(TINY))
    common = dict(shape=(2, 3, 32, 32), schedule=NoiseSchedule.linear(1000), method="ddpm", steps=5, clip=1.0)
    on_cpu = sample(TorchDenoiser(model).eps, generator=torch.Generator().manual_seed(3), **common)
    gpu_model = TorchDenoiser(model.to(CUDA))
    on_gpu = sample(gpu_model.eps, generator=torch.Generator().manual_seed(3), device=gpu_model.device, **common)
    assert on_gpu.device.type == "cuda"
    assert (on_gpu.cpu() - on_cpu).abs().max().item() < 1e-2  # the same noise; only kernels differ


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_steps_on_the_gpu(tmp_path, precision):
    torch.manual_seed(0)
    data = torch.rand(16, 3, 32, 32) * 2 - 1  # stays on the CPU; batches move
    config = TrainConfig(steps=6, batch_size=4, save_every=3, log_every=1, precision=precision, device="cuda")
    ema = train(UNet(TINY), data, NoiseSchedule.linear(1000), tmp_path, config, progress=False)
    assert next(ema.parameters()).device.type == "cuda"
    losses = np.loadtxt(tmp_path / "log.csv", delimiter=",", skiprows=1)[:, 1]
    assert np.isfinite(losses).all(), losses
    assert next(load_model(tmp_path).parameters()).device.type == "cpu"  # checkpoints load anywhere
    resumed = train(UNet(TINY), data, NoiseSchedule.linear(1000), tmp_path, config, resume=True, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), resumed.state_dict().values(), strict=True))


def test_structure_cli_on_the_gpu(tmp_path):
    from nudiff_postproc import synthetic_instance_map, write_image, write_instance_map
    from nudiff_structure.cli import main

    for i in range(2):
        inst = synthetic_instance_map((256, 256), seed=i)
        write_instance_map(tmp_path / "data" / "instance_maps" / f"t{i}.png", inst)
        write_image(tmp_path / "data" / "images" / f"t{i}.png", np.zeros((256, 256, 3), np.uint8))
    run = str(tmp_path / "run")
    train = ["--quiet", "train", "--data", str(tmp_path / "data"), "--out", run, "--steps", "4", "--batch", "2"]
    assert main([*train, "--save-every", "2", "--device", "cuda", "--precision", "bf16"]) == 0
    draw = ["--quiet", "sample", "--checkpoint", run, "--num", "4", "--batch", "4", "--steps", "5"]
    assert main([*draw, "--out", str(tmp_path / "eager"), "--device", "cuda"]) == 0
    assert main([*draw, "--out", str(tmp_path / "graphs"), "--device", "cuda", "--cuda-graphs"]) == 0
    names = sorted(p.name for p in (tmp_path / "eager" / "structures").iterdir())
    assert len(names) == 4
    for name in names:
        a = np.load(tmp_path / "eager" / "structures" / name)
        b = np.load(tmp_path / "graphs" / "structures" / name)
        assert np.abs(a - b).max() < 1e-4
