"""The trainer: it learns, it resumes exactly, it runs under torchrun with DDP."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from nudiff_diffusion import NoiseSchedule, TrainConfig, UNet, UNetConfig, latest_checkpoint, load_model, train

CFG = UNetConfig.preset("tiny-64", image_size=16, in_channels=1)
SCHEDULE = NoiseSchedule.linear(1000)


def _data() -> torch.Tensor:
    # a toy dataset with structure: discs at random positions, in [-1, 1]
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    centres = torch.rand(64, 2, generator=g) * 10 + 3
    d2 = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    return (torch.where(d2 < 9, 1.0, -1.0))[:, None]


def _model() -> UNet:
    torch.manual_seed(0)
    return UNet(CFG)


def test_loss_goes_down(tmp_path):
    train(
        _model(),
        _data(),
        SCHEDULE,
        tmp_path,
        TrainConfig(steps=150, batch_size=8, lr=5e-4, log_every=25, save_every=150),
        progress=False,
    )
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    first, last = float(rows[0]["loss"]), float(rows[-1]["loss"])
    assert last < 0.7 * first, rows
    assert load_model(tmp_path).config == CFG  # the run directory is a checkpoint


def test_resume_is_exact(tmp_path):
    config = TrainConfig(steps=20, batch_size=4, save_every=10, ema_rate=0.9, log_every=5)
    whole = train(_model(), _data(), SCHEDULE, tmp_path / "whole", config, progress=False)
    half = dataclass_replace(config, steps=10)
    train(_model(), _data(), SCHEDULE, tmp_path / "split", half, progress=False)
    resumed = train(_model(), _data(), SCHEDULE, tmp_path / "split", config, resume=True, progress=False)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    raw_a = torch.load(latest_checkpoint(tmp_path / "whole") / "train_state.pt", weights_only=True)["model"]
    raw_b = torch.load(latest_checkpoint(tmp_path / "split") / "train_state.pt", weights_only=True)["model"]
    assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)
    steps = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert steps == ["step_0000010", "step_0000020"]


def test_a_resume_after_a_kill_logs_every_step_once(tmp_path):
    """A kill after log rows 15 and 20 but before checkpoint 20 is written: the resume
    redoes steps 11-20 and logs them once, with the losses of the uninterrupted run."""
    config = TrainConfig(steps=20, batch_size=4, save_every=10, log_every=5)
    train(_model(), _data(), SCHEDULE, tmp_path / "whole", config, progress=False)
    train(_model(), _data(), SCHEDULE, tmp_path / "split", config, progress=False)
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step_0000020")
    train(_model(), _data(), SCHEDULE, tmp_path / "split", config, resume=True, progress=False)
    logs = {run: list(csv.DictReader(open(tmp_path / run / "log.csv"))) for run in ("whole", "split")}
    assert [r["step"] for r in logs["split"]] == ["5", "10", "15", "20"]
    assert [r["loss"] for r in logs["split"]] == [r["loss"] for r in logs["whole"]]


def test_a_resume_redoes_the_run_folders_copies_and_clears_a_kills_leftovers(tmp_path):
    """Killed after the last checkpoint was renamed into place but before the run folder got
    its copies (the model of step 10 there, config.json half-written): the resume trains
    nothing more but publishes step 20, and removes the temporary files the kill left."""
    config = TrainConfig(steps=20, batch_size=4, save_every=10)
    train(_model(), _data(), SCHEDULE, tmp_path, config, progress=False)
    ckpts = tmp_path / "checkpoints"
    shutil.copyfile(ckpts / "step_0000010" / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{")
    leftovers = [tmp_path / ".model.4242.0123456789ab.part.safetensors", tmp_path / ".log.4242.abcdef012345.part.csv"]
    for path in leftovers:
        path.write_bytes(b"half")
    (ckpts / ".step_0000030.part").mkdir()
    train(_model(), _data(), SCHEDULE, tmp_path, config, resume=True, progress=False)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / name).read_bytes() == (ckpts / "step_0000020" / name).read_bytes()
    assert not any(p.exists() for p in leftovers) and not (ckpts / ".step_0000030.part").exists()
    load_model(tmp_path)  # loads: weights and config agree


def test_a_fresh_start_over_a_run_killed_before_its_first_checkpoint_logs_each_step_once(tmp_path):
    config = TrainConfig(steps=10, batch_size=4, save_every=10, log_every=5)
    train(_model(), _data(), SCHEDULE, tmp_path, config, progress=False)
    shutil.rmtree(tmp_path / "checkpoints")  # killed after the log row of step 5, before any checkpoint
    train(_model(), _data(), SCHEDULE, tmp_path, config, progress=False)  # no --resume: nothing to resume
    assert [r["step"] for r in csv.DictReader(open(tmp_path / "log.csv"))] == ["5", "10"]


def test_a_run_saved_before_the_optimiser_settings_resumes_only_as_adamw_at_a_constant_rate(tmp_path):
    config = TrainConfig(steps=2, batch_size=4, save_every=2)
    train(_model(), _data(), SCHEDULE, tmp_path, config, progress=False)
    path = latest_checkpoint(tmp_path) / "config.json"
    saved = json.loads(path.read_text())
    for key in ("optimizer", "lr_cycle", "lr_warmup"):  # as a checkpoint of 2026-12-03 holds it
        del saved["train"][key]
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="was started with --optimizer 'adamw', this resume gives 'adam'"):
        train(_model(), _data(), SCHEDULE, tmp_path, dataclass_replace(config, steps=4, optimizer="adam"), resume=True)
    with pytest.raises(ValueError, match="was started with --lr-cycle 0, this resume gives 100"):
        train(_model(), _data(), SCHEDULE, tmp_path, dataclass_replace(config, steps=4, lr_cycle=100), resume=True)
    train(_model(), _data(), SCHEDULE, tmp_path, dataclass_replace(config, steps=4), resume=True, progress=False)


def test_a_resume_with_other_settings_or_a_broken_state_is_refused(tmp_path):
    config = TrainConfig(steps=4, batch_size=4, save_every=2)
    train(_model(), _data(), SCHEDULE, tmp_path, config, progress=False, diffusion={"schedule": "linear"})
    for changes, message in (
        ({"lr": 2e-4}, "was started with --lr 0.0001, this resume gives 0.0002"),
        ({"batch_size": 8}, "was started with --batch 4, this resume gives 8"),
        ({"precision": "bf16"}, "was started with --precision 'fp32', this resume gives 'bf16'"),
        ({"grad_clip": 0.0}, "was started with --grad-clip 1.0, this resume gives 0.0"),
    ):
        with pytest.raises(ValueError, match=message):
            train(_model(), _data(), SCHEDULE, tmp_path, dataclass_replace(config, **changes), resume=True)
    with pytest.raises(ValueError, match="was started with --schedule 'linear', this resume gives 'cosine'"):
        train(_model(), _data(), SCHEDULE, tmp_path, config, resume=True, diffusion={"schedule": "cosine"})
    # more steps, other save/log cadence: a resume may change these
    more = dataclass_replace(config, steps=6, save_every=3, log_every=1)
    train(_model(), _data(), SCHEDULE, tmp_path, more, resume=True, progress=False, diffusion={"schedule": "linear"})
    state = latest_checkpoint(tmp_path) / "train_state.pt"
    assert state.parent.name == "step_0000006"
    for content in (b"", state.read_bytes()[:100]):
        state.write_bytes(content)
        with pytest.raises(ValueError, match="train_state.pt' is not a usable training state"):
            train(_model(), _data(), SCHEDULE, tmp_path, more, resume=True, diffusion={"schedule": "linear"})
    other = UNet(UNetConfig.preset("tiny-64", image_size=16, in_channels=1, model_channels=64))
    shutil.rmtree(state.parent)  # back to step 4: its weights do not fit another architecture
    with pytest.raises(ValueError, match="step_0000004/train_state.pt' is not a usable training state \\(RuntimeError"):
        train(other, _data(), SCHEDULE, tmp_path, more, resume=True, diffusion={"schedule": "linear"})


def dataclass_replace(config: TrainConfig, **changes) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_stays_finite(tmp_path, precision):
    config = TrainConfig(steps=5, batch_size=4, precision=precision, microbatch=2)
    ema = train(_model(), _data(), SCHEDULE, tmp_path, config, progress=False)
    assert all(torch.isfinite(p).all() for p in ema.parameters())


def test_a_skipped_fp16_step_leaves_the_ema_alone(tmp_path):
    # the second batch holds NaN: the fp16 GradScaler skips that step (weights unchanged),
    # and the EMA must not move either (it would move 2/11 of the way to the weights)
    calls = []

    def nan_on_second_call(batch, generator):
        calls.append(1)
        return batch * float("nan") if len(calls) == 2 else batch

    config = TrainConfig(steps=1, batch_size=2, precision="fp16", ema_rate=0.9999)
    one = train(_model(), _data(), SCHEDULE, tmp_path / "one", config, augment=nan_on_second_call, progress=False)
    calls.clear()
    two_config = dataclass_replace(config, steps=2)
    model = _model()
    two = train(model, _data(), SCHEDULE, tmp_path / "two", two_config, augment=nan_on_second_call, progress=False)
    assert len(calls) == 2
    for a, b in zip(one.state_dict().values(), two.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(two.parameters(), model.parameters(), strict=True))


def test_fp16_training_stops_when_every_step_is_skipped(tmp_path, monkeypatch):
    # the GradScaler halves its scale on each skipped step (from 2^16: ~166 of them to reach
    # 0; here it starts at 2^-140); at 0, "0 >= 0" read as a step taken and the EMA moved
    import functools

    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**-140))
    config = TrainConfig(steps=40, batch_size=2, precision="fp16")
    with pytest.raises(FloatingPointError, match=r"the fp16 loss scale fell to 0 at step \d+: "):
        train(_model(), _data(), SCHEDULE, tmp_path, config, augment=lambda b, g: b * float("nan"), progress=False)


def test_ema_warmup_forgets_the_random_init(tmp_path):
    start = _model()
    init = [p.detach().clone() for p in start.parameters()]
    ema = train(start, _data(), SCHEDULE, tmp_path, TrainConfig(steps=1, batch_size=2, ema_rate=0.9999), progress=False)
    # step 0: rate min(0.9999, 1 / 10) = 0.1, so the EMA is 0.1 init + 0.9 trained
    for p_ema, p0, p1 in zip(ema.parameters(), init, start.parameters(), strict=True):
        torch.testing.assert_close(p_ema, 0.1 * p0 + 0.9 * p1.detach())


def test_bad_settings():
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    for name, value in (("lr", float("inf")), ("lr", 0.0), ("lr", float("nan")), ("weight_decay", float("nan"))):
        with pytest.raises(ValueError, match=f"`{name}` must be .*, got {value}"):
            TrainConfig(**{name: value})
    with pytest.raises(ValueError, match="`grad_clip` must be None or 0 .*, got -1.0"):
        TrainConfig(grad_clip=-1.0)
    assert TrainConfig(grad_clip=0.0).grad_clip == 0.0  # 0: no clipping
    with pytest.raises(ValueError, match=r"`data` must be \(M, 1, H, W\)"):
        train(_model(), torch.zeros(4, 3, 16, 16), SCHEDULE, "unused", TrainConfig(steps=1), progress=False)


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_ddp_on_two_cpu_processes_keeps_ranks_identical(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(
        textwrap.dedent(f"""
        import torch, torch.distributed as dist
        from nudiff_diffusion import NoiseSchedule, TrainConfig, UNet, UNetConfig, setup_distributed, train
        assert setup_distributed("cpu")[1] == 2
        torch.manual_seed(0)
        model = UNet(UNetConfig.preset("tiny-64", image_size=16, in_channels=1))
        data = torch.rand(32, 1, 16, 16) * 2 - 1
        config = TrainConfig(steps=3, batch_size=2, device="cpu")
        train(model, data, NoiseSchedule.linear(1000), r"{tmp_path / "run"}", config, progress=False)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        if dist.get_rank() == 0:
            same = all(torch.equal(gathered[0], g) for g in gathered)
            torch.manual_seed(0)  # the initial weights, to show that training moved them
            start = UNet(UNetConfig.preset("tiny-64", image_size=16, in_channels=1))
            changed = not torch.equal(gathered[0], torch.cat([p.detach().flatten() for p in start.parameters()]))
            open(r"{tmp_path / "result.txt"}", "w").write(f"{{same}} {{changed}}")
        dist.barrier()  # let rank 0 finish before the group is torn down
        dist.destroy_process_group()
        # skip the interpreter's teardown: gloo's threads, destroyed there, intermittently
        # abort the process ("terminate called without an active exception", about 1 run in
        # 7 here) after all the work above is done and checked
        import os, sys
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(0)
    """)
    )
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", str(port), str(script)],
        env=env,
        capture_output=True,
        timeout=300,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "result.txt").read_text() == "True True"
    assert (tmp_path / "run" / "model.safetensors").is_file()


class _RecordingNorm(torch.nn.Module):
    """GroupNorm that records, per call, which samples' conditions are all zeros."""

    seen: list[torch.Tensor] = []

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = torch.nn.GroupNorm(32, channels)

    def forward(self, x, cond):
        _RecordingNorm.seen.append(cond.flatten(1).abs().sum(1) == 0)
        return self.norm(x) + cond.mean() * 0  # the condition reaches the graph


def _conditional_rows() -> torch.Tensor:
    data = _data()
    return torch.cat([data, torch.ones_like(data)], dim=1)  # channel 1: a never-zero condition


def _split(rows: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return rows[:, :1], rows[:, 1:]


@pytest.mark.parametrize("drop, expected", [(0.0, 0.0), (1.0, 1.0), (0.5, 0.5)])
def test_conditions_are_dropped_to_zeros_at_the_asked_rate(tmp_path, drop, expected):
    torch.manual_seed(0)
    model = UNet(CFG, norm_factory=_RecordingNorm)
    _RecordingNorm.seen = []
    config = TrainConfig(steps=40, batch_size=8, save_every=40, cond_drop_prob=drop)
    train(model, _conditional_rows(), SCHEDULE, tmp_path, config, batch_fn=_split, progress=False)
    n_norms = sum(isinstance(m, _RecordingNorm) for m in model.modules())
    per_step = [_RecordingNorm.seen[i] for i in range(0, 40 * n_norms, n_norms)]  # first norm of each step
    share = torch.cat(per_step).float().mean().item()
    assert share == pytest.approx(expected, abs=0.1)  # 320 draws: the standard error of 0.5 is 0.03


def test_conditional_training_resumes_exactly(tmp_path):
    def run(out, steps, resume):
        torch.manual_seed(0)
        config = TrainConfig(steps=steps, batch_size=4, save_every=3, cond_drop_prob=0.3)
        return train(
            UNet(CFG, norm_factory=_RecordingNorm),
            _conditional_rows(),
            SCHEDULE,
            out,
            config,
            batch_fn=_split,
            resume=resume,
            progress=False,
        )

    whole = run(tmp_path / "whole", 6, False)
    run(tmp_path / "parts", 3, False)
    resumed = run(tmp_path / "parts", 6, True)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_resume_reruns_the_callback_of_its_checkpoint_and_a_fresh_run_needs_resume(tmp_path):
    """A kill between checkpoint 2 and its callback (a preview, a metrics row) would lose
    that output for good: the resume calls back for step 2 first."""
    config = TrainConfig(steps=4, batch_size=2, save_every=2)
    calls = []

    def resume() -> None:
        train(
            _model(),
            _data(),
            SCHEDULE,
            tmp_path,
            config,
            resume=True,
            progress=False,
            callback=lambda s, m: calls.append(s),
        )

    train(_model(), _data(), SCHEDULE, tmp_path, dataclass_replace(config, steps=2), progress=False)
    resume()
    assert calls == [2, 4]
    resume()  # a kill between the last checkpoint and its callback: the resume of the finished run makes it up
    assert calls == [2, 4, 4]
    with pytest.raises(FileExistsError, match="already holds a training run \\(checkpoints up to step_0000004\\)"):
        train(_model(), _data(), SCHEDULE, tmp_path, config, progress=False)


def test_an_output_folder_remembers_its_settings(tmp_path):
    from nudiff_diffusion import RUN_STAMP, claim_output_folder

    settings = {"sampler": "ddim", "steps": 3, "clip": None, "scale": (1, 2)}
    assert claim_output_folder(tmp_path / "out", settings) == tmp_path / "out"
    assert json.loads((tmp_path / "out" / RUN_STAMP).read_text())["scale"] == [1, 2]
    claim_output_folder(tmp_path / "out", dict(settings))  # the same settings: a resume
    with pytest.raises(ValueError, match="was started with --steps 3, this resume gives 4"):
        claim_output_folder(tmp_path / "out", {**settings, "steps": 4})
    claim_output_folder(tmp_path / "out", {**settings, "steps": 4}, may_change=("steps",))
    with pytest.raises(ValueError, match="was started with the sampler 'ddim'"):
        claim_output_folder(tmp_path / "out", {**settings, "sampler": "ddpm"}, flags={"sampler": "the sampler"})


def test_any_seed_trains_and_seeds_torch_accepts_keep_their_streams(tmp_path):
    from nudiff_diffusion import seeded_generator

    big = torch.randn(3, generator=seeded_generator(2**64 + 5))  # hashed, not wrapped onto seed 5
    assert not torch.equal(big, torch.randn(3, generator=seeded_generator(5)))
    g = seeded_generator(123456789)  # within 64 bits: the plain torch seed, as before
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=torch.Generator().manual_seed(123456789)))
    # a large seed mixed with the step (here 2e22) overflowed torch's 64-bit seed
    train(_model(), _data(), SCHEDULE, tmp_path, TrainConfig(steps=1, batch_size=2, seed=2_000_000), progress=False)


def test_the_train_flags_make_the_config():
    import argparse

    from nudiff_diffusion import add_train_arguments, train_config_from_args

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    default = train_config_from_args(parser.parse_args(["--device", "cpu"]))
    assert (default.grad_clip, default.weight_decay, default.batch_size) == (1.0, 0.05, 4)
    unclipped = train_config_from_args(parser.parse_args(["--device", "cpu", "--grad-clip", "0", "--batch", "2"]))
    assert (unclipped.grad_clip, unclipped.batch_size) == (0.0, 2)
    paper = ["--optimizer", "adam", "--weight-decay", "0.01", "--lr-cycle", "10000", "--lr-warmup", "2000"]
    histo = train_config_from_args(parser.parse_args(["--device", "cpu", *paper]))
    assert (histo.optimizer, histo.weight_decay, histo.lr_cycle, histo.lr_warmup) == ("adam", 0.01, 10000, 2000)


def test_the_learning_rate_rises_then_falls_in_each_cycle():
    from nudiff_diffusion import learning_rate

    assert learning_rate(TrainConfig(lr=1e-4), 12345) == 1e-4
    cycle = TrainConfig(lr=1e-4, lr_cycle=10000, lr_warmup=2000)
    for step, want in ((0, 0.0), (1000, 0.5e-4), (2000, 1e-4), (6000, 0.5e-4), (10000, 0.0), (21000, 0.5e-4)):
        assert learning_rate(cycle, step) == pytest.approx(want, abs=1e-15), step
    assert 0 < learning_rate(cycle, 9999) < 1e-10
    with pytest.raises(ValueError, match="lr_warmup < lr_cycle"):
        TrainConfig(lr_cycle=100, lr_warmup=100)
    with pytest.raises(ValueError, match=r"`optimizer` must be one of \('adamw', 'adam'\), got 'sgd'"):
        TrainConfig(optimizer="sgd")


def test_a_cycle_starts_at_rate_zero_and_resumes_exactly(tmp_path):
    """Step 0 of a cycle trains at rate 0 (the weights stay as they were, Adam or not); the
    rate is a function of the step, so 2 + 2 resumed steps are the 4 steps of one run."""
    cycle = TrainConfig(
        steps=1, batch_size=4, save_every=1, optimizer="adam", weight_decay=0.01, lr_cycle=4, lr_warmup=2
    )
    model = _model()
    first = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, _data(), SCHEDULE, tmp_path / "one", cycle, progress=False)
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())
    whole = dataclass_replace(cycle, steps=4, save_every=2)
    train(_model(), _data(), SCHEDULE, tmp_path / "whole", whole, progress=False)
    train(_model(), _data(), SCHEDULE, tmp_path / "split", dataclass_replace(whole, steps=2), progress=False)
    train(_model(), _data(), SCHEDULE, tmp_path / "split", whole, resume=True, progress=False)
    a = torch.load(latest_checkpoint(tmp_path / "whole") / "train_state.pt", weights_only=True)["model"]
    b = torch.load(latest_checkpoint(tmp_path / "split") / "train_state.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(first[k], a[k]) for k in a)  # steps 1-3 trained
