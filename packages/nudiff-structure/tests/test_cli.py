"""The nudiff-structure CLI: train -> sample -> evaluate, resumable and sharded sampling."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from nudiff_diffusion import RUN_STAMP, load_model, save_model
from nudiff_postproc import synthetic_instance_map, write_image, write_instance_map
from nudiff_structure.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("structure")
    for i in range(2):
        write_instance_map(
            root / "data" / "instance_maps" / f"t{i}.png", synthetic_instance_map((256, 256), n_nuclei=60, seed=i) * 1
        )
        write_image(root / "data" / "images" / f"t{i}.png", np.zeros((256, 256, 3), np.uint8))
    args = [
        "--quiet",
        "train",
        "--data",
        str(root / "data"),
        "--out",
        str(root / "run"),
        "--preset",
        "tiny-64",
        "--steps",
        "4",
        "--batch",
        "2",
        "--save-every",
        "2",
    ]
    assert main(args) == 0
    return root


def _sample(root, out, *extra):
    return main(
        [
            "--quiet",
            "sample",
            "--checkpoint",
            str(root / "run"),
            "--num",
            "6",
            "--batch",
            "4",
            "--sampler",
            "ddim",
            "--steps",
            "3",
            "--out",
            str(out),
            *extra,
        ]
    )


def test_train_writes_a_loadable_run_with_previews(run):
    assert (run / "run" / "model.safetensors").is_file() and (run / "run" / "config.json").is_file()
    assert sorted(p.name for p in (run / "run" / "previews").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    rows = (run / "run" / "morphology.csv").read_text().splitlines()
    assert rows[0].startswith("step,area") and len(rows) == 3
    config = json.loads((run / "run" / "config.json").read_text())
    assert config["diffusion"]["structure_preset"] == "tiny-64"


def test_sample_then_evaluate(run, capsys):
    out = run / "samples"
    assert _sample(run, out) == 0
    names = sorted(p.stem for p in (out / "structures").iterdir())
    assert names == [f"s0_{i:06d}" for i in range(6)]
    s = np.load(out / "structures" / "s0_000000.npy")
    assert s.shape == (64, 64, 3) and s.dtype == np.float32 and 0 <= s[..., 0].min() and s[..., 0].max() <= 1
    assert len(list((out / "instance_maps").iterdir())) == 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampler"] == "ddim" and manifest["steps"] == 3 and manifest["drawn_now"] == 6
    assert manifest["postprocess_scale"] == 2  # tiny-64 structures are 2x downscaled: watershed at full size
    from nudiff_postproc import instances_from_structure, read_instance_map

    np.testing.assert_array_equal(
        read_instance_map(out / "instance_maps" / "s0_000000.png"), instances_from_structure(s, scale=2)
    )
    assert main(["evaluate", "--samples", str(out), "--real", str(run / "data")]) == 0
    result = json.loads((out / "evaluation.json").read_text())
    assert {"morphology_distance", "nuclei_per_patch", "self_consistency", "self_consistency_skill"} <= set(result)
    assert "morphology_distance" in capsys.readouterr().out
    # real structures of another size would compare nuclei of another scale
    assert main(["evaluate", "--samples", str(out), "--real", str(run / "data"), "--preset", "small-128"]) == 2
    assert "--preset small-128 makes 128 px structure patches, but the samples" in capsys.readouterr().err


def test_hv_skill_is_1_for_the_maps_own_0_for_zeros_and_minus_1_for_the_wrong_sign():
    from nudiff_postproc import encode_structure
    from nudiff_structure import hv_skill

    maps = np.stack([synthetic_instance_map((64, 64), n_nuclei=12, seed=s) for s in range(3)])
    own = np.stack([encode_structure(m, min_size=8, centre="nearest") for m in maps])
    for factor, want in ((1.0, 1.0), (0.0, 0.0), (-1.0, -1.0), (0.5, 0.5)):
        given = own.copy()
        given[..., 1:] *= factor
        assert hv_skill(given, maps, min_size=8) == pytest.approx(want, abs=1e-6), factor
    assert np.isnan(hv_skill(own, np.zeros_like(maps), min_size=8))
    with pytest.raises(
        ValueError,
        match=r"`structures` must be \(N, H, W, 3\) and `maps` \(N, H, W\).*got \(2, 8, 8, 3\) and \(2, 8, 9\)",
    ):
        hv_skill(np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 9), np.int32), min_size=8)


def test_evaluate_refuses_samples_post_processed_at_another_scale_or_not_square(run, tmp_path, capsys):
    out = tmp_path / "samples"
    assert _sample(run, out) == 0
    stamp = json.loads((out / RUN_STAMP).read_text())
    stamp["postprocess_scale"] = 1  # maps made at the structures' own size: 4.75 against 8.7 nuclei per patch
    (out / RUN_STAMP).write_text(json.dumps(stamp))
    assert main(["evaluate", "--samples", str(out), "--real", str(run / "data")]) == 2
    assert "post-processed at 1 x the structures' size, the 'tiny-64' real structures are at 2 x" in (
        capsys.readouterr().err
    )
    (out / RUN_STAMP).unlink()
    np.save(out / "structures" / "s0_000000.npy", np.zeros((64, 48, 3), np.float32))
    assert main(["evaluate", "--samples", str(out), "--real", str(run / "data")]) == 2
    assert "s0_000000.npy' is (64, 48, 3) and its instance map (64, 64); every sample of" in capsys.readouterr().err
    # a non-square sample with its own map: compared as 64 px patches before
    write_instance_map(out / "instance_maps" / "s0_000000.png", np.zeros((64, 48), np.int32))
    assert main(["evaluate", "--samples", str(out), "--real", str(run / "data")]) == 2
    assert (
        "s0_000000.npy' is (64, 48, 3) and its instance map (64, 48); every sample of"
        in (err := capsys.readouterr().err)
        and "must be a square (64, 64, 3)" in err
    )


def test_a_killed_sampling_run_resumes_without_loss_or_duplicates(run):
    out = run / "resume"
    assert _sample(run, out) == 0
    first = {p.name: np.load(p) for p in (out / "structures").iterdir()}
    # a kill: two samples lost, one half-written temporary left behind
    (out / "structures" / "s0_000004.npy").unlink()
    (out / "instance_maps" / "s0_000002.png").unlink()
    (out / "structures" / ".s0_000005.123.abc.part.npy").write_bytes(b"partial")
    assert _sample(run, out) == 0
    again = {p.name: np.load(p) for p in (out / "structures").iterdir() if not p.name.startswith(".")}
    assert sorted(again) == sorted(first)  # nothing lost, nothing extra
    for name, value in first.items():
        # the same structure; batched kernels round differently for other batch sizes (~1e-7)
        np.testing.assert_allclose(again[name], value, atol=1e-5)
    assert len(list((out / "instance_maps").glob("*.png"))) == 6
    assert json.loads((out / "manifest.json").read_text())["drawn_now"] == 2
    # killed before the preview was written: a rerun with nothing left to draw writes it, from the files
    preview = (out / "preview.png").read_bytes()
    (out / "preview.png").unlink()
    assert _sample(run, out) == 0 and json.loads((out / "manifest.json").read_text())["drawn_now"] == 0
    assert (out / "preview.png").read_bytes() == preview


def test_two_shards_make_the_single_run(run):
    single, sharded = run / "single", run / "sharded"
    assert _sample(run, single) == 0
    for rank in (0, 1):
        assert _sample(run, sharded, "--rank", str(rank), "--world-size", "2") == 0
    names = sorted(p.name for p in (single / "structures").iterdir())
    assert sorted(p.name for p in (sharded / "structures").iterdir()) == names
    for name in names:
        np.testing.assert_allclose(
            np.load(single / "structures" / name), np.load(sharded / "structures" / name), atol=1e-5
        )


def test_bad_inputs(run, tmp_path, capsys):
    (tmp_path / "empty" / "instance_maps").mkdir(parents=True)
    assert (
        main(["--quiet", "train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r"), "--steps", "1"]) == 2
    )
    assert "holds no instance map files" in capsys.readouterr().err
    inside = str(run / "data" / "run")  # checkpoints and logs among the data: refused before any work
    assert main(["--quiet", "train", "--data", str(run / "data"), "--out", inside, "--steps", "1"]) == 2
    assert "is or lies inside --data" in capsys.readouterr().err and not (run / "data" / "run").exists()
    assert (
        main(["--quiet", "sample", "--checkpoint", str(run / "data"), "--num", "1", "--out", str(tmp_path / "s")]) == 2
    )
    assert "has no config.json" in capsys.readouterr().err
    assert main(["--quiet", "sample", "--num", "1", "--out", str(tmp_path / "s")]) == 2
    assert main(["--quiet", "sample", "--engine", "model.onnx", "--num", "1", "--out", str(tmp_path / "s")]) == 2
    assert "ONNX graph not found: 'model.onnx'" in capsys.readouterr().err
    assert main(["--quiet", "sample", "--engine", "model.plan", "--num", "1", "--out", str(tmp_path / "s")]) == 2
    assert "needs TensorRT, which is not installed here" in capsys.readouterr().err


def test_device_and_precision_flags(run, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    assert _sample(run, tmp_path / "s", "--device", "cuda") == 2
    assert "asks for a CUDA GPU, but this PyTorch" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # refused before any output
    train = ["--quiet", "train", "--data", str(run / "data"), "--out", str(tmp_path / "r"), "--steps", "1"]
    assert main([*train, "--device", "cuda:0"]) == 2
    assert "asks for a CUDA GPU" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert _sample(run, tmp_path / "s", "--cuda-graphs") == 2
    assert "`cuda_graphs` needs the model on a CUDA device, got device cpu" in capsys.readouterr().err
    engine = [
        "--quiet",
        "sample",
        "--engine",
        "m.onnx",
        "--num",
        "1",
        "--out",
        str(tmp_path / "s"),
        "--precision",
        "bf16",
    ]
    assert main(engine) == 2
    assert "precision cannot be used with the exported graph 'm.onnx'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    # bf16 autocast on the CPU: the same structures up to bf16's rounding
    assert _sample(run, tmp_path / "fp32", "--device", "cpu") == 0
    assert _sample(run, tmp_path / "bf16", "--precision", "bf16") == 0
    names = sorted(p.name for p in (tmp_path / "fp32" / "structures").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "bf16" / "structures").iterdir()) and len(names) == 6
    diff = max(
        np.abs(np.load(tmp_path / "fp32" / "structures" / n) - np.load(tmp_path / "bf16" / "structures" / n)).max()
        for n in names
    )
    assert 0 < diff < 0.5, diff


def _sample_args(checkpoint, out, **flags):
    flags = {"num": "6", "batch": "4", "sampler": "ddim", "steps": "3", **flags}
    return ["--quiet", "sample", "--checkpoint", str(checkpoint), "--out", str(out)] + [
        arg for key, value in flags.items() for arg in (f"--{key}", value)
    ]


def test_a_rerun_with_other_settings_is_refused_not_mixed(run, tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(_sample_args(run / "run", out)) == 0
    before = sorted(p.name for p in (out / "structures").iterdir())
    for flags, message in (
        ({"sampler": "dpmpp2m"}, "was started with --sampler 'ddim', this resume gives 'dpmpp2m'"),
        ({"steps": "4"}, "was started with --steps 3, this resume gives 4"),
        ({"clip": "0"}, "was started with --clip 1.0, this resume gives None"),
        ({"seed": "1"}, "was started with --seed 0, this resume gives 1"),
        ({"precision": "bf16"}, "was started with the precision (--precision, or the graph's) 'float32', this re"),
    ):
        assert main(_sample_args(run / "run", out, num="8", **flags)) == 2
        assert message in capsys.readouterr().err
        assert sorted(p.name for p in (out / "structures").iterdir()) == before  # nothing added
    other = tmp_path / "other-run"  # the same architecture and settings, other weights
    shutil.copytree(run / "run", other)
    model = load_model(other)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_model(other, model, diffusion=json.loads((other / "config.json").read_text())["diffusion"])
    assert main(_sample_args(other, out, num="8")) == 2
    assert "was started with the model (the weights' sha256) of --checkpoint / --engine" in capsys.readouterr().err
    assert main(_sample_args(run / "run", out, num="8", batch="2")) == 0  # more samples, another batch: fine
    assert len(list((out / "structures").iterdir())) == 8


def test_ddpm_samples_do_not_depend_on_batches_or_ranks(run, tmp_path, capsys):
    """DDPM draws step noise; per sample, so a resume with another --batch, a kill in the
    middle of a batch or another number of ranks gives the samples of one uninterrupted run."""
    whole, cut, ranks = tmp_path / "whole", tmp_path / "cut", tmp_path / "ranks"
    assert main(_sample_args(run / "run", whole, num="5", sampler="ddpm", batch="5")) == 0
    assert main(_sample_args(run / "run", cut, num="3", sampler="ddpm", batch="2")) == 0
    assert main(_sample_args(run / "run", cut, num="5", sampler="ddpm", batch="3")) == 0
    for rank in ("0", "1"):
        assert (
            main([*_sample_args(run / "run", ranks, num="5", sampler="ddpm"), "--rank", rank, "--world-size", "2"]) == 0
        )
    names = sorted(p.name for p in (whole / "structures").iterdir())
    assert len(names) == 5
    for name in names:
        want = np.load(whole / "structures" / name)
        for other in (cut, ranks):
            np.testing.assert_allclose(np.load(other / "structures" / name), want, rtol=0, atol=1e-5)
    # a folder sampled by the earlier code (step noise per batch: no `step_noise` recorded)
    stamp = cut / RUN_STAMP
    record = json.loads(stamp.read_text())
    assert record["step_noise"] == "per sample"
    del record["step_noise"]
    stamp.write_text(json.dumps(record))
    assert main(_sample_args(run / "run", cut, num="6", sampler="ddpm")) == 2
    err = capsys.readouterr().err
    assert "was made by an older version that recorded no ddpm step-noise scheme (this one uses 'per sample')" in err
    assert "start a new run with another --out" in err and len(list((cut / "structures").iterdir())) == 5


def test_a_few_step_dpmpp2m_folder_of_the_earlier_solver_is_not_resumed(run, tmp_path, capsys):
    """Since 2026-12-04 a dpmpp2m run of under 10 updates takes its last in first order: a
    folder drawn before (no `final_update` recorded) would mix the two solvers."""
    out = tmp_path / "few"
    assert main(_sample_args(run / "run", out, num="3", sampler="dpmpp2m", steps="4")) == 0
    stamp = out / RUN_STAMP
    record = json.loads(stamp.read_text())
    assert record["final_update"] == "first order"
    del record["final_update"]
    stamp.write_text(json.dumps(record))
    assert main(_sample_args(run / "run", out, num="4", sampler="dpmpp2m", steps="4")) == 2
    assert "recorded no dpmpp2m final update (this one uses 'first order')" in capsys.readouterr().err
    many = tmp_path / "many"  # 10 updates and more: the solver did not change, nothing recorded
    assert main(_sample_args(run / "run", many, num="1", sampler="dpmpp2m", steps="11")) == 0
    assert "final_update" not in json.loads((many / RUN_STAMP).read_text())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0"], "`steps` (--steps) must be an integer in [1, 1000], got 0"),
        (["--clip", "nan"], "`clip` (--clip) must be finite > 0"),
        (["--clip", "-1"], "`clip` (--clip) must be finite > 0"),
    ],
)
def test_bad_sampling_settings_are_named_before_any_folder_is_made(run, tmp_path, capsys, extra, message):
    out = tmp_path / "samples"
    assert _sample(run, out, *extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_training_again_into_a_run_needs_resume(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run / "run", copy)
    args = ["--quiet", "train", "--data", str(run / "data"), "--out", str(copy), "--preset", "tiny-64"]
    assert main([*args, "--steps", "2", "--batch", "2"]) == 2
    assert "already holds a training run (checkpoints up to step_0000004); pass --resume" in capsys.readouterr().err
    subset = tmp_path / "subset.txt"
    subset.write_text("t0_r00000_c00000\n")
    common = [*args, "--steps", "6", "--batch", "2", "--save-every", "2", "--resume"]
    assert main([*common, "--subset", str(subset)]) == 2
    err = capsys.readouterr().err
    assert "was started with the patches of the data (--data / --pairs, --subset) '" in err
    assert "this resume gives '1 patches, names sha256" in err


def test_a_batchs_step_noise_never_repeats_a_samples_starting_noise(run, tmp_path, monkeypatch):
    """DDPM's step noise came from the generator of the batch's first sample, so its first
    step drew exactly that sample's x_T again; now each sample draws it from a stream of
    its own."""
    from nudiff_structure import _sample

    seen = []

    def fake_sample(eps_fn, *, x_T, generator, **kwargs):
        seen.append((x_T, torch.stack([torch.randn(x_T.shape[1:], generator=g) for g in generator])))
        return x_T.clamp(-1, 1)

    monkeypatch.setattr(_sample, "sample", fake_sample)
    assert main(_sample_args(run / "run", tmp_path / "s", num="4", batch="2", sampler="ddpm")) == 0
    assert len(seen) == 2
    for x_T, step_noise in seen:
        for row in step_noise:
            assert not any(torch.equal(row, start) for start in x_T)
        assert abs(float(torch.corrcoef(torch.stack([x_T.ravel(), step_noise.ravel()]))[0, 1])) < 0.2


def test_a_first_try_that_fails_before_its_first_sample_leaves_nothing(run, tmp_path, monkeypatch):
    import nudiff_structure._sample as sampling

    def out_of_memory(*args, **kwargs):
        raise MemoryError("the first batch did not fit")

    out = tmp_path / "samples"
    monkeypatch.setattr(sampling, "sample", out_of_memory)
    with pytest.raises(MemoryError):
        _sample(run, out)
    assert not out.exists()  # no record of the settings binds the next try
    monkeypatch.undo()
    assert _sample(run, out, "--steps", "2") == 0  # other settings: accepted
    assert json.loads((out / RUN_STAMP).read_text())["steps"] == 2


def test_sigterm_before_the_first_sample_leaves_nothing(run, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "samples"
    command = [sys.executable, "-m", "nudiff_structure.cli", "--quiet", "sample", "--checkpoint", str(run / "run")]
    command += ["--num", "4", "--batch", "4", "--sampler", "ddim", "--steps", "1000", "--out", str(out)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / RUN_STAMP).is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # inside the first batch's 1000 steps
    proc.send_signal(signal.SIGTERM)  # as a scheduler or the pipeline stops a command
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "nudiff-structure sample: interrupted" in err and "Traceback" not in err
    assert not out.exists()  # cleaned up as after Ctrl-C: the next try may use other settings
