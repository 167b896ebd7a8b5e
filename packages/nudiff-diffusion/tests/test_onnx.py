"""ONNX export and the ONNX Runtime runtime."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from nudiff_diffusion import (
    PARITY_TOLERANCE,
    EngineUnavailableError,
    NoiseSchedule,
    OnnxDenoiser,
    TorchDenoiser,
    UNet,
    UNetConfig,
    export_graph,
    export_onnx,
    load_denoiser,
    sample,
    save_model,
    weights_digest,
)
from nudiff_diffusion.testing import perturbed_copy


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = perturbed_copy(UNet(UNetConfig.preset("tiny-64", image_size=32))).train()
    root = tmp_path_factory.mktemp("onnx")
    config = export_onnx(model, root / "graph" / "model.onnx", batch_max=8, settings={"kind": "structure"})
    assert all(m.training for m in model.modules())  # exported in eval mode; the caller's model keeps its own
    assert config["weights_sha256"] == weights_digest(model.state_dict())  # the identity of the weights
    return root, model.eval(), config


def test_export_matches_pytorch(exported):
    root, model, config = exported
    assert config["max_abs_diff"] <= 1e-4 and config["batch_max"] == 8 and config["inputs"] == ["x", "t"]
    assert json.loads((root / "graph" / "config.json").read_text())["graph"] == "model.onnx"
    runtime = load_denoiser(root / "graph" / "model.onnx")
    assert isinstance(runtime, OnnxDenoiser) and runtime.image_size == 32 and runtime.in_channels == 3
    x, t = torch.randn(5, 3, 32, 32), torch.randint(1000, (5,))
    with torch.no_grad():
        assert (runtime.eps(x, t) - model(x, t)).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="`x` must be \\(N, 3, 32, 32\\) for this model, got \\(5, 3, 16, 16\\)"):
        runtime.eps(torch.randn(5, 3, 16, 16), t)  # named as PyTorch's runtime does, not by ONNX Runtime


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
    assert runtime.eps(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.int64)).shape == (8, 6, 32, 32)
    for n in (9, 16):
        with pytest.raises(ValueError, match=f"at most 8, got {n}; use a smaller --batch or export again"):
            runtime.eps(torch.randn(n, 3, 32, 32), torch.zeros(n, dtype=torch.int64))


def test_float16_graph_stays_within_its_bar_and_says_so(exported, tmp_path):
    _, model, _ = exported
    config = export_onnx(model.train(), tmp_path / "model.onnx", batch_max=4, precision="float16")
    assert all(m.training for m in model.modules())  # the caller's model keeps its mode
    model.eval()
    assert config["precision"] == "float16" and 0 < config["max_abs_diff"] <= PARITY_TOLERANCE["float16"]
    graph = onnx.load(str(tmp_path / "model.onnx"))
    types = {onnx.TensorProto.FLOAT16: 0, onnx.TensorProto.FLOAT: 0}
    for init in graph.graph.initializer:
        types[init.data_type] = types.get(init.data_type, 0) + 1
    assert types[onnx.TensorProto.FLOAT16] > types[onnx.TensorProto.FLOAT]  # the weights are float16
    x, t = torch.randn(2, 3, 32, 32), torch.randint(1000, (2,))
    out = load_denoiser(tmp_path / "model.onnx").eps(x, t)
    with torch.no_grad():
        assert out.dtype == torch.float32 and (out - model(x, t)).abs().max() <= PARITY_TOLERANCE["float16"]


def test_guided_graphs_need_a_conditional_model(exported, tmp_path):
    _, model, _ = exported
    with pytest.raises(ValueError, match="a guided graph needs a conditional model"):
        export_onnx(model, tmp_path / "model.onnx", layout="guided")
    assert not (tmp_path / "model.onnx").exists()


def test_a_plan_without_tensorrt_says_what_to_install(tmp_path):
    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are here")
    with pytest.raises(EngineUnavailableError, match=r"pip install nudiff-diffusion\[trt\]|needs a CUDA GPU"):
        load_denoiser(tmp_path / "model.plan")


def test_a_tensorrt_engine_pads_a_batch_below_its_profile_and_drops_the_padding():
    # the engine run itself needs TensorRT and a GPU; the padding around it runs here
    from nudiff_diffusion._tensorrt import TensorRTDenoiser

    runtime = TensorRTDenoiser.__new__(TensorRTDenoiser)
    runtime.batch_min, runtime.path = 4, Path("model.plan")
    runtime.config = {"unet": {"image_size": 8, "in_channels": 3}, "cond_channels": 1}
    seen = []

    def engine(x, t, cond, scale):  # row-wise, as a UNet is
        seen.append((x.shape[0], t.shape[0], cond.shape[0]))
        return x * 2 + t[:, None, None, None] + cond.mean(dim=(1, 2, 3), keepdim=True)

    runtime._run_engine = engine
    g = torch.Generator().manual_seed(0)
    x, t, cond = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([5, 7]), torch.rand(2, 1, 8, 8, generator=g)
    out = runtime._run(x, t, cond, None)
    assert seen == [(4, 4, 4)] and out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(out, engine(x, t, cond, None))
    runtime._run(torch.randn(5, 3, 8, 8), torch.arange(5), torch.rand(5, 1, 8, 8), None)
    assert seen[-1] == (5, 5, 5)  # a batch the profile takes runs as it is
    # bad inputs are named with the caller's shapes, not the padded ones
    with pytest.raises(ValueError, match=r"`t` must be 2 integer timesteps .*got \(1,\)"):
        runtime._run(x, t[:1], cond, None)
    with pytest.raises(ValueError, match=r"`t` must be 2 integer timesteps .*got \(\)"):
        runtime._run(x, t[0], cond, None)
    with pytest.raises(ValueError, match=r"`cond` must be .* one row per image of `x` \(2\), got \(3, 1, 8, 8\)"):
        runtime._run(x, t, torch.rand(3, 1, 8, 8), None)
    with pytest.raises(ValueError, match="is a conditional graph: give `cond`"):
        runtime._run(x, t, None, None)
    assert len(seen) == 3  # none of them reached the engine (3: the two runs and the direct call above)


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


def test_a_corrupt_or_incomplete_config_is_named(exported, tmp_path):
    root, _, _ = exported
    (tmp_path / "model.onnx").write_bytes((root / "graph" / "model.onnx").read_bytes())
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json' is not valid JSON"):
        load_denoiser(tmp_path / "model.onnx")
    config = json.loads((root / "graph" / "config.json").read_text())
    del config["batch_max"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json' has no positive integer 'batch_max' \(got None\); export"):
        load_denoiser(tmp_path / "model.onnx")


def test_sampling_batches_are_checked_before_any_work(exported):
    root, _, _ = exported
    runtime = load_denoiser(root / "graph" / "model.onnx")
    runtime.check_sampling_batch(8)
    runtime.check_sampling_batch(4, guided=True)
    with pytest.raises(ValueError, match=r"at most 8, got 9; use a smaller --batch"):
        runtime.check_sampling_batch(9)
    with pytest.raises(ValueError, match=r"at most 8, got 10: guidance runs both halves of a batch of 5 .* at most 4"):
        runtime.check_sampling_batch(5, guided=True)


def test_a_cpu_device_keeps_onnx_runtime_on_the_cpu(exported):
    root, _, _ = exported
    runtime = load_denoiser(root / "graph" / "model.onnx", device="cpu")
    assert runtime.session.get_providers() == ["CPUExecutionProvider"]


def test_a_failed_export_leaves_no_file_and_no_new_folder(tmp_path):
    conv = torch.nn.Conv2d(3, 3, 1)

    def feeds(n):
        return {"x": torch.randn(n, 3, 8, 8)}

    target = tmp_path / "new" / "deeper" / "model.onnx"
    for opset in (17, onnx.defs.onnx_opset_version() + 1):
        with pytest.raises(ValueError, match=rf"`opset` \(--opset\) must be an integer in \[18, \d+\], got {opset}"):
            export_graph(conv, target, feeds(2), batched=["x"], batch_max=4, feeds=feeds, opset=opset)
    with pytest.raises(RuntimeError, match=r"ONNX graph for '.*model\.onnx' differs from PyTorch"):
        export_graph(conv, target, feeds(2), batched=["x"], batch_max=4, feeds=feeds, tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []  # neither the graph nor the folders made for it


def test_an_all_zero_model_warns_that_parity_proves_nothing(tmp_path):
    conv = torch.nn.Conv2d(3, 3, 1)
    torch.nn.init.zeros_(conv.weight)
    torch.nn.init.zeros_(conv.bias)

    def feeds(n):
        return {"x": torch.randn(n, 3, 8, 8)}

    with pytest.warns(UserWarning, match="answers 0 for every parity input"):
        export_graph(conv, tmp_path / "zero.onnx", feeds(2), batched=["x"], batch_max=4, feeds=feeds)
    assert (tmp_path / "zero.onnx").is_file()


def test_onnx_runtime_takes_the_thread_count_the_process_was_given(exported):
    """ONNX Runtime ignores OMP_NUM_THREADS; the session takes PyTorch's count, which follows it
    (the pipeline gives each of its parallel stages one thread that way)."""
    root, _, _ = exported
    code = (
        "import sys, torch; from nudiff_diffusion import load_denoiser; "
        "r = load_denoiser(sys.argv[1]); "
        "print(r.session.get_session_options().intra_op_num_threads, torch.get_num_threads())"
    )
    for threads in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        done = subprocess.run(
            [sys.executable, "-c", code, str(root / "graph" / "model.onnx")],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert done.stdout.split() == [threads, threads], done.stdout + done.stderr


def test_check_opset_takes_numpy_integers_and_names_the_range():
    import numpy as np
    from nudiff_diffusion import MIN_OPSET, check_opset

    assert check_opset(np.int64(MIN_OPSET)) == MIN_OPSET and type(check_opset(np.int64(MIN_OPSET))) is int
    newest = onnx.defs.onnx_opset_version()
    for bad in (MIN_OPSET - 1, newest + 1, True, 18.0, "18"):
        with pytest.raises(ValueError, match=rf"must be an integer in \[{MIN_OPSET}, {newest}\], got"):
            check_opset(bad)
