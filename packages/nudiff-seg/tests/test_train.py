"""``nudiff-seg train``: what a resume accepts, and the runs it refuses to start or save."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from nudiff_postproc import synthetic_instance_map, write_image, write_instance_map
from nudiff_seg import Augment
from nudiff_seg.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two 300x300 pairs: a few tiny-preset batches of 2 per epoch."""
    root = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(0)
    for i in range(2):
        inst = synthetic_instance_map((300, 300), n_nuclei=40, seed=i)
        image = np.where(inst[..., None] > 0, 90, 220).astype(np.uint8) + rng.integers(0, 30, (300, 300, 3), np.uint8)
        write_image(root / "real" / "images" / f"t{i}.png", image)
        write_instance_map(root / "real" / "instance_maps" / f"t{i}.png", inst)
    (root / "one.txt").write_text("t0\n")
    return root


def _train(data, out, *extra):
    return main(
        ["--quiet", "train", "--real", str(data / "real"), "--preset", "tiny", "--batch", "2", "--out", str(out)]
        + ["--device", "cpu", *extra]
    )


def test_a_resume_with_other_settings_is_refused_by_flag(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(data, out, "--max-batches", "1") == 0
    state = (out / "train_state.pt").read_bytes()
    for extra, message in (
        (["--lr", "0.0002"], "was started with --lr 0.0001, this resume gives 0.0002"),
        (["--epochs", "30"], "was started with --epochs 20, this resume gives 30"),
        (["--seed", "1"], "was started with --seed 0, this resume gives 1"),
        (["--precision", "bf16"], "was started with --precision 'fp32', this resume gives 'bf16'"),
        (["--subset", str(data / "one.txt")], "was started with the images of --real \\(and --subset\\) '2 images"),
        (["--frozen-batch", "3"], "was started with --frozen-batch None, this resume gives 3"),
        (["--no-affine"], "was started with augmentation \\{'scale': 0.2, .*this resume gives \\{'scale': 0.0"),
    ):
        assert _train(data, out, "--resume", *extra) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err
        assert (out / "train_state.pt").read_bytes() == state  # nothing trained, nothing written
    leftover = out / ".train_state.4242.0123456789ab.part.pt"  # a kill's half-written state
    leftover.write_bytes(b"half")
    assert _train(data, out, "--resume", "--max-batches", "1") == 0  # the same settings resume
    assert not leftover.exists()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [  # as saved before 2026-12-03: the paper's MSGE directions (h along x, v along y), the old streams
        ("msge_gradients", "h along y, v along x (HoVer-Net's code)", "recorded no MSGE gradient directions"),
        (
            "rng_streams",
            "plan [seed, epoch, 0], batch b [seed, epoch, 1, b]",
            "recorded no random streams of the epoch plans and batches",
        ),
        (  # before 2026-12-04: no affine augmentation, and none recorded
            "augment",
            dataclasses.asdict(Augment()),
            "recorded no augmentation",
        ),
    ],
)
def test_a_state_saved_before_a_required_record_is_not_resumed(data, tmp_path, capsys, key, value, message):
    import json

    out = tmp_path / "run"
    assert _train(data, out, "--max-batches", "1") == 0
    state = torch.load(out / "train_state.pt", weights_only=True)
    settings = json.loads(state["settings"])
    assert settings["train"].pop(key) == value
    state["settings"] = json.dumps(settings)
    torch.save(state, out / "train_state.pt")
    assert _train(data, out, "--resume") == 2
    assert f"older version that {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("dropped", "windows"),
    [  # recorded on 2026-12-04 before the two were separate: one mode for both sets
        (("synthetic_windows",), "mirror"),
        (("windows", "synthetic_windows"), "valid"),  # before the flags: every tile cut valid
    ],
)
def test_an_older_run_resumes_with_the_windows_it_was_cut_with(data, tmp_path, capsys, dropped, windows):
    import json

    out = tmp_path / "run"
    assert _train(data, out, "--max-batches", "1", "--windows", windows, "--synthetic-windows", windows) == 0
    state = torch.load(out / "train_state.pt", weights_only=True)
    settings = json.loads(state["settings"])
    for key in dropped:
        assert settings["train"].pop(key) == windows
    state["settings"] = json.dumps(settings)
    torch.save(state, out / "train_state.pt")
    other = "valid" if windows == "mirror" else "mirror"
    assert _train(data, out, "--resume", "--windows", windows, "--synthetic-windows", other) == 2
    assert f"--synthetic-windows '{windows}', this resume gives '{other}'" in capsys.readouterr().err
    same = ["--windows", windows, "--synthetic-windows", windows]
    assert _train(data, out, "--resume", "--max-batches", "1", *same) == 0


def test_an_epochs_plan_and_its_batches_draw_from_streams_of_their_own():
    from nudiff_seg._train import _batch_rng, _plan_rng

    for seed, epoch in ((0, 0), (0, 3), (7, 1)):
        first = [_plan_rng(seed, epoch).random(4)] + [_batch_rng(seed, epoch, b).random(4) for b in range(5)]
        first += [_plan_rng(seed, epoch + 1).random(4), _batch_rng(seed, epoch + 1, 0).random(4)]
        assert len({tuple(draws) for draws in first}) == len(first), (seed, epoch)


def test_a_resumed_epoch_logs_the_uninterrupted_row(data, tmp_path):
    import csv

    assert _train(data, tmp_path / "whole", "--epochs", "1") == 0
    assert _train(data, tmp_path / "split", "--epochs", "1", "--max-batches", "2") == 0
    assert not (tmp_path / "split" / "log.csv").exists()
    assert _train(data, tmp_path / "split", "--epochs", "1", "--resume") == 0
    rows = {}
    for run in ("whole", "split"):
        with open(tmp_path / run / "log.csv") as fh:
            rows[run] = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]
    assert rows["split"] == rows["whole"] and int(rows["whole"][0]["batches"]) > 2
    # windows trained: batches of 2, the last one possibly short
    batches, windows = int(rows["whole"][0]["batches"]), int(rows["whole"][0]["windows"])
    assert 2 * batches - 1 <= windows <= 2 * batches


@pytest.mark.parametrize("content", [b"", b"not a torch file", b"PK\x03\x04 truncated zip"])
def test_an_unreadable_train_state_is_named(data, tmp_path, capsys, content):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_state.pt").write_bytes(content)
    assert _train(data, out, "--resume") == 2
    err = capsys.readouterr().err
    assert "train_state.pt' is not a usable training state" in err and "Traceback" not in err


def test_a_train_state_without_its_keys_is_named(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": {}}, out / "train_state.pt")
    assert _train(data, out, "--resume") == 2
    assert "expected the keys ['model', 'optimizer'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lr", "inf"], "`--lr` must be a positive finite number, got inf"),
        (["--lr", "nan"], "`--lr` must be a positive finite number, got nan"),
        (["--max-batches", "0"], "`--max-batches` must be >= 1, got 0"),
        (["--batch", "0"], "`--batch` must be >= 1, got 0"),
    ],
)
def test_bad_numbers_fail_before_any_work(data, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert _train(data, out, *extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("absent.pth", None, "weights file not found"),
        ("bad.pth", b"not a torch file", "could not be read as a weights file"),
    ],
)
def test_unusable_encoder_weights_are_named_by_their_flag(data, tmp_path, capsys, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    assert _train(data, tmp_path / "run", "--encoder-weights", str(tmp_path / name)) == 2
    err = capsys.readouterr().err
    assert "error: --encoder-weights: " in err and name in err and message in err, err


def test_diverged_weights_are_never_saved(data, tmp_path, capsys, monkeypatch):
    """A batch whose loss is finite but whose gradient is NaN (0 * d sqrt(0)) turns the
    weights to NaN in Adam's step; only the check before saving can catch it."""
    import nudiff_seg._train as train_module

    real_loss = train_module.hovernet_loss

    def nan_gradient_loss(pred, np_target, hv_target):
        loss, parts = real_loss(pred, np_target, hv_target)
        return loss + 0.0 * torch.sqrt(pred["np"].sum() * 0.0), parts

    monkeypatch.setattr(train_module, "hovernet_loss", nan_gradient_loss)
    out = tmp_path / "run"
    assert _train(data, out, "--max-batches", "1") == 2
    err = capsys.readouterr().err
    assert "weight tensor(s) are NaN or inf after 1 batch(es)" in err and "they were not saved" in err, err
    assert not (out / "train_state.pt").exists() and not (out / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("scores", "best_epoch"), [((float("nan"), float("nan")), 1), ((float("nan"), 0.2), 2), ((0.3, float("nan")), 1)]
)
def test_the_run_folder_holds_the_best_epoch_and_never_none(data, tmp_path, monkeypatch, scores, best_epoch):
    import json

    from nudiff_seg import _train as train_module

    calls = iter(scores)  # validation AJI per epoch; NaN: no nuclei in any map of the set

    def score(*args, **kwargs):
        aji = next(calls)
        return [], {"dice": aji, "aji": aji, "pq": aji}

    monkeypatch.setattr(train_module, "score_pairs", score)
    out = tmp_path / "run"
    assert _train(data, out, "--epochs", "2", "--val", str(data / "real")) == 0
    assert json.loads((out / "config.json").read_text())["epoch"] == best_epoch
    assert json.loads((out / "last" / "config.json").read_text())["epoch"] == 2


def test_a_phase_one_state_of_the_version_that_froze_the_stem_is_named(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(data, out, "--frozen-epochs", "1", "--max-batches", "1") == 0
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["phase"] == 1
    group = state["optimizer"]["param_groups"][0]
    dropped = group["params"][:6]  # that version's phase 1 left out conv0 and d0's shortcut and BN
    group["params"] = group["params"][6:]
    state["optimizer"]["state"] = {k: v for k, v in state["optimizer"]["state"].items() if k not in dropped}
    torch.save(state, out / "train_state.pt")
    assert _train(data, out, "--frozen-epochs", "1", "--resume") == 2
    assert "saved by a nudiff-seg whose phase 1 also froze the stem" in capsys.readouterr().err


def test_a_state_saved_at_the_end_of_phase_one_resumes_into_phase_two(data, tmp_path):
    """Its optimizer is not used (phase 2 starts a fresh Adam), so its size does not matter."""
    import csv

    assert _train(data, tmp_path / "probe", "--epochs", "1") == 0
    with open(tmp_path / "probe" / "log.csv") as fh:
        per_epoch = int(next(csv.DictReader(fh))["batches"])
    out = tmp_path / "run"
    assert _train(data, out, "--epochs", "2", "--frozen-epochs", "1", "--max-batches", str(per_epoch)) == 0
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert (state["phase"], state["epoch"], state["batch"]) == (1, 1, 0)
    state["optimizer"]["param_groups"][0]["params"] = state["optimizer"]["param_groups"][0]["params"][6:]
    torch.save(state, out / "train_state.pt")  # as the version that froze the stem saved it
    assert _train(data, out, "--epochs", "2", "--frozen-epochs", "1", "--resume") == 0
    with open(out / "log.csv") as fh:
        assert [int(r["phase"]) for r in csv.DictReader(fh)] == [1, 2]


def test_the_frozen_phase_trains_at_its_own_batch_size(data, tmp_path):
    import csv

    out = tmp_path / "run"
    assert _train(data, out, "--epochs", "2", "--frozen-epochs", "1", "--frozen-batch", "3") == 0
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [r["phase"] for r in rows] == ["1", "2"]
    for row, batch in zip(rows, (3, 2), strict=True):  # phase 1 at --frozen-batch, phase 2 at --batch
        assert int(row["batches"]) == -(-int(row["windows"]) // batch), row
