"""tools/pipeline.py: config checks before any work, the whole method end to end at toy
scale (the demo config, smaller), and a run killed midway that resumes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "tools" / "pipeline.py"
DEMO = ROOT / "configs" / "demo.toml"

# the demo config, smaller: 4 procedural tiles of 256 px, tens of steps per model
SMALL = [
    "data.tiles=4",
    "data.tile_size=256",
    "data.test_tiles=1",
    "prepare.fraction=0.3",
    "structure.steps=20",
    "structure.save_every=10",
    "histo.pretrain_steps=10",
    "histo.finetune_steps=5",
    "histo.save_every=5",
    "sample.num=8",
    "sample.steps=4",
    "sample.batch=4",
    'seg.runs=[{name="subset", real="subset", synthetic=false, epochs=2},'
    ' {name="subset+synthetic", real="subset", synthetic=true, epochs=1}]',
]


def _command(out: Path, *extra: str, config: Path = DEMO) -> list[str]:
    sets = [arg for item in SMALL for arg in ("--set", item)]
    return [sys.executable, str(PIPELINE), str(config), "--out", str(out), "--quiet", *sets, *extra]


def _run(out: Path, *extra: str, config: Path = DEMO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NUDIFF_DATA"}
    return subprocess.run(_command(out, *extra, config=config), capture_output=True, text=True, env=env, timeout=900)


def test_unknown_key_fails_before_any_work(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text(DEMO.read_text().replace("[structure]\n", "[structure]\nstepz = 5\n"))
    result = _run(tmp_path / "out", config=config)
    assert result.returncode == 2
    assert "structure.stepz" in result.stderr and str(config) in result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_section_and_bad_types_are_named(tmp_path):
    result = _run(tmp_path / "out", "--set", "histo.steps=5")
    assert result.returncode == 2 and "histo.steps" in result.stderr
    result = _run(tmp_path / "out", "--set", "structure.steps='many'")
    assert result.returncode == 2 and "structure.steps must be a int" in result.stderr and "'many'" in result.stderr
    result = _run(tmp_path / "out", "--set", 'seg.runs=[{name="a", real="half", synthetic=false, epochs=1}]')
    assert result.returncode == 2 and "seg.runs[0].real" in result.stderr and "'half'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_data_folder_fails_before_any_work(tmp_path):
    missing = tmp_path / "no-such-tiles"
    result = _run(tmp_path / "out", "--data", str(missing))
    assert result.returncode == 2
    assert str(missing) in result.stderr and "data folder" in result.stderr
    assert not (tmp_path / "out").exists()


def _config_error(*sets: str, data: str | None = None) -> str:
    """The ConfigError that loading the demo config (smaller) with ``sets`` raises."""
    if str(ROOT / "tools") not in sys.path:
        sys.path.insert(0, str(ROOT / "tools"))
    from pipeline_config import ConfigError, load_config

    try:
        load_config(DEMO, data=data, overrides=[*SMALL, *sets])
    except ConfigError as exc:
        return str(exc)
    raise AssertionError(f"{sets} was accepted")


def test_settings_out_of_range_are_named_before_any_work():
    for setting, message in (
        ("sample.guidance=nan", "sample.guidance must be a finite number in [0, inf), got nan"),
        ("seg.batch=0", "seg.batch must be >= 1, got 0"),
        ("histo.drop_prob=1.5", "histo.drop_prob must be a finite number in [0, 1], got 1.5"),
        ("structure.lr=0", "structure.lr must be a finite number in (0, inf), got 0.0"),
        ("prepare.stride=300", "prepare.stride (300) must not exceed prepare.patch_size (256)"),
        ("sample.num=3", "sample.num (3) must be >= 4"),
        ("sample.steps=5000", "sample.steps must be at most 1000"),
        ('seg.runs=[{name="a|b", real="subset", synthetic=false, epochs=1}]', "seg.runs[0].name must be a non-empty"),
        # settings that failed only when their stage ran, hours in
        ('sample.sampler="dpm-solver"', "sample.sampler: `method` (--sampler) must be 'ddpm', 'ddim' or 'dpmpp2m'"),
        (
            "seg.frozen_epochs=5",
            "seg.frozen_epochs (5) must not exceed the epochs of every run (run 'subset+synthetic'",
        ),
        ("prepare.patch_size=200", "prepare.patch_size (200) must be at least 256 for seg.preset 'tiny'"),
        ("data.tile_size=200", "data.tile_size (200) must be at least prepare.patch_size (256)"),
        ('data.train_split="train.txt"', "data.train_split / data.test_split name files of a dataset folder"),
        (
            'histo.spade_layers="encoder"',
            "histo.spade_layers 'encoder' must be one of ('decoder', 'all') (the paper's: 'decoder')",
        ),
        (
            'histo.cond_foreground="0/255"',
            "histo.cond_foreground '0/255' must be one of ('binary', 'signed') (the paper's: 'binary')",
        ),
    ):
        assert message in _config_error(setting), setting
    # synthetic-seg always runs, with or without a run that trains on its tiles
    only_real = 'seg.runs=[{name="a", real="subset", synthetic=false, epochs=1}]'
    assert "sample.num (3) must be >= 4" in _config_error("sample.num=3", only_real)


def test_overlapping_or_repeated_splits_are_refused(tmp_path):
    data = tmp_path / "tiles"
    for sub in ("images", "instance_maps"):
        (data / sub).mkdir(parents=True)
    (data / "train.txt").write_text("a\nb\nc\n")
    for test, message in (("c\nd\n", "names 'c' also in"), ("d\nd\n", "names 'd' twice in it"), ("", "names nothing")):
        (data / "test.txt").write_text(test)
        error = _config_error("data.train_split='train.txt'", "data.test_split=['test.txt']", data=str(data))
        assert message in error and "test.txt" in error, error
    (data / "test.txt").write_text("d\n")
    error = _config_error("data.train_split='train.txt'", "data.test_split=['test.txt', '']", data=str(data))
    assert "data.test_split[1] is empty" in error, error


def test_a_data_folder_inside_the_output_folder_is_refused(tmp_path):
    """The stages replace folders of the output folder (prepare's data/ first)."""
    data = tmp_path / "project" / "data" / "tiles"
    for sub in ("images", "instance_maps"):
        (data / sub).mkdir(parents=True)
    (data / "images" / "keep.png").write_bytes(b"a user's tile")
    result = _run(tmp_path / "project", "--data", str(data), "--until", "prepare")
    assert result.returncode == 2 and "lies inside the output folder" in result.stderr, result.stderr
    assert (data / "images" / "keep.png").read_bytes() == b"a user's tile"


def test_tiles_edited_after_prepare_stop_the_run_until_prepare_is_redone(tmp_path):
    """The prepared patches and subset are copies, the test tiles links: an edited label left
    the old patches and models beside edited test maps, and the run went on."""
    from nudiff_postproc import read_instance_map, write_instance_map, write_synthetic_dataset

    data = tmp_path / "tiles"
    names = write_synthetic_dataset(data, 3, size=256, seed=5)
    out = tmp_path / "run"
    assert _run(out, "--data", str(data), "--until", "prepare").returncode == 0
    assert _run(out, "--data", str(data), "--until", "prepare").returncode == 0  # unchanged: done
    edited = data / "instance_maps" / f"{names[0]}.png"
    inst = read_instance_map(edited)
    write_instance_map(edited, np.where(inst == inst.max(), 0, inst))  # one nucleus removed
    result = _run(out, "--data", str(data), "--until", "prepare")
    assert result.returncode == 2, result.stderr
    assert f"'{edited}' changed since the data in '{out / 'data'}' was prepared from it" in result.stderr
    assert "`--redo prepare`" in result.stderr
    assert _run(out, "--data", str(data), "--until", "prepare", "--redo", "prepare").returncode == 0
    assert _run(out, "--data", str(data), "--until", "prepare").returncode == 0
    (out / "data" / "sources.json").write_text("{")  # truncated
    result = _run(out, "--data", str(data), "--until", "prepare")
    assert result.returncode == 2 and "sources.json' (the digests of the tiles" in result.stderr, result.stderr


def test_encoder_weights_are_checked_first_and_passed_to_every_training(tmp_path):
    missing = tmp_path / "resnet50.pth"
    result = _run(tmp_path / "out", "--set", f"seg.encoder_weights='{missing}'", "--dry-run")
    assert result.returncode == 2 and "seg.encoder_weights" in result.stderr and str(missing) in result.stderr
    missing.write_bytes(b"weights")  # the dry run only checks that it is there
    weights = ("--set", f"seg.encoder_weights='{missing}'")
    result = _run(tmp_path / "out", *weights, "--set", "seg.frozen_epochs=1", "--dry-run")
    assert result.returncode == 0, result.stderr
    trainings = [line for line in result.stdout.splitlines() if "nudiff_seg.cli --quiet train" in line]
    assert len(trainings) == 2
    assert all(f"--encoder-weights {missing} --frozen-epochs 1" in line for line in trainings)
    assert not (tmp_path / "out").exists()


def test_gradient_clipping_is_passed_only_where_it_is_not_the_default(tmp_path):
    result = _run(tmp_path / "out", "--set", "structure.grad_clip=0", "--set", "histo.grad_clip=0.5", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    structure = [line for line in lines if "nudiff_structure.cli --quiet train" in line]
    histo = [line for line in lines if "nudiff_histo.cli --quiet train" in line]
    assert len(structure) == 1 and "--grad-clip 0.0 " in structure[0]
    assert len(histo) == 2 and all("--grad-clip 0.5 " in line for line in histo)
    default = _run(tmp_path / "out", "--dry-run")
    assert default.returncode == 0  # earlier runs' commands unchanged
    assert not any(f in default.stdout for f in ("--grad-clip", "--optimizer", "--weight-decay", "--lr-cycle"))
    paper = ["histo.optimizer='adam'", "histo.weight_decay=0.01", "histo.lr_cycle=100", "histo.lr_warmup=20"]
    result = _run(tmp_path / "out", *[w for setting in paper for w in ("--set", setting)], "--dry-run")
    histo = [line for line in result.stdout.splitlines() if "nudiff_histo.cli --quiet train" in line]
    assert len(histo) == 2
    assert all("--optimizer adam --weight-decay 0.01 --lr-cycle 100 --lr-warmup 20" in line for line in histo)
    assert "histo.lr_warmup (100) must be below histo.lr_cycle (100)" in _config_error(
        "histo.lr_cycle=100", "histo.lr_warmup=100"
    )
    assert "structure.grad_clip must be a finite number in [0, inf), got -1.0" in _config_error(
        "structure.grad_clip=-1"
    )


def test_the_frozen_phases_batch_is_passed_when_set_and_the_windows_always(tmp_path):
    sets = ["--set", "seg.frozen_batch=32", "--set", "seg.windows=mirror", "--set", "seg.synthetic_windows=valid"]
    result = _run(tmp_path / "out", *sets, "--dry-run")
    assert result.returncode == 0, result.stderr
    trainings = [line for line in result.stdout.splitlines() if "nudiff_seg.cli --quiet train" in line]
    assert len(trainings) == 2
    assert all(
        "--frozen-batch 32" in line and "--windows mirror --synthetic-windows valid" in line for line in trainings
    )
    default = _run(tmp_path / "out", "--dry-run").stdout
    # the windows always named (a stage from before the flags cut other synthetic windows)
    assert "--frozen-batch" not in default and default.count("--windows valid --synthetic-windows mirror") == 2
    assert "seg.frozen_batch must be >= 0, got -1" in _config_error("seg.frozen_batch=-1")
    assert "seg.windows 'same' must be one of ('mirror', 'valid')" in _config_error("seg.windows=same")
    assert "seg.synthetic_windows 'x' must be one of" in _config_error("seg.synthetic_windows=x")


def test_a_runs_synthetic_share_of_each_batch_is_passed_and_checked_first(tmp_path):
    runs = (
        'seg.runs=[{name="pooled", real="subset", synthetic=true, epochs=1}, '
        '{name="half", real="subset", synthetic=true, epochs=2, synthetic_ratio=0.5}]'
    )
    result = _run(tmp_path / "out", "--set", runs, "--dry-run")
    assert result.returncode == 0, result.stderr
    trainings = [line for line in result.stdout.splitlines() if "nudiff_seg.cli --quiet train" in line]
    assert ["--synthetic-ratio pool" in t and "seg/pooled" in t for t in trainings] == [True, False]
    assert ["--synthetic-ratio 0.5" in t and "seg/half" in t for t in trainings] == [False, True]
    for run, message in (
        ("synthetic=false, epochs=1, synthetic_ratio=0.5", "must be 'pool' or, with synthetic = true, a share"),
        ("synthetic=true, epochs=1, synthetic_ratio=1.0", "(0, 1), got 1.0 (synthetic = true)"),
        ('synthetic=true, epochs=1, synthetic_ratio="half"', "got 'half'"),
        # nudiff-seg's rule for the batch (seg.batch 4), before any work
        ("synthetic=true, epochs=1, synthetic_ratio=0.1", "synthetic_ratio (seg.batch 4) 0.1 of a batch of 4 is no"),
    ):
        assert message in _config_error(f'seg.runs=[{{name="a", real="subset", {run}}}]'), run
    # phase 1's batch too, which nudiff-seg builds even for 0 frozen epochs
    quarter = 'seg.runs=[{name="a", real="subset", synthetic=true, epochs=1, synthetic_ratio=0.25}]'
    message = "synthetic_ratio (seg.frozen_batch 2) 0.25 of a batch of 2 is no synthetic window"
    assert message in _config_error(quarter, "seg.frozen_epochs=0", "seg.frozen_batch=2")


def test_dry_run_lists_every_stage_and_writes_nothing(tmp_path):
    result = _run(tmp_path / "out", "--dry-run")
    assert result.returncode == 0, result.stderr
    stages = [line.split()[0] for line in result.stdout.splitlines() if line and not line.startswith(" ")]
    assert stages == [
        "prepare",
        "structure-train",
        "histo-train",
        "structure-sample",
        "histo-engine",
        "histo-sample",
        "synthetic-seg",
        "seg-train-subset",
        "seg-eval-subset",
        "seg-train-subset+synthetic",
        "seg-eval-subset+synthetic",
        "judge-synthetic",
        "report",
    ]
    assert "--cached-modulation" not in result.stdout  # a Python step, not a listed command
    assert "nudiff_histo.cli --quiet sample" in result.stdout and "--engine" in result.stdout
    # the demo's SPADE everywhere: the new model's flag; the fine-tuning keeps its --init's
    trainings = [line for line in result.stdout.splitlines() if "nudiff_histo.cli --quiet train" in line]
    assert ["--spade-layers all --cond-foreground signed" in line for line in trainings] == [True, False]
    assert not (tmp_path / "out").exists()


def _wait_for(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_end_to_end_killed_midway_resumes_and_writes_the_report(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "NUDIFF_DATA"}
    first = subprocess.Popen(_command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # kill it once the histology model has written its first checkpoint, mid-training
    checkpoints = out / "histo-pretrain" / "checkpoints"
    reached = _wait_for(lambda: checkpoints.is_dir() and any(checkpoints.iterdir()), 600)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert reached, err
    assert first.returncode == 130, err
    assert (out / "stages" / "prepare.json").is_file()
    assert not (out / "stages" / "histo-train.json").exists()
    assert not (out / "stages" / "report.json").exists()

    second = subprocess.run(_command(out), capture_output=True, text=True, env=env, timeout=900)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "done  prepare" not in second.stdout  # skipped: its marker holds the same settings

    # resumed, not restarted: the pre-training log shows two commands and no repeated step
    log = (out / "logs" / "histo-train.log").read_text()
    assert log.count("--out " + str(out / "histo-pretrain")) == 2
    with open(out / "histo-pretrain" / "log.csv", newline="") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh)]
    assert steps[-1] == 10
    # nothing lost or duplicated
    assert len(list((out / "synthetic" / "images").glob("*.png"))) == 8
    assert len(list((out / "synthetic-structures" / "structures").glob("*.npy"))) == 8
    manifest = json.loads((out / "synthetic-seg" / "manifest.json").read_text())
    assert manifest == {**manifest, "grid": 2, "tiles": 2, "pairs_used": 8, "tile_size": 256}
    # every file of the report
    for name in ("report.md", "report.html"):
        assert (out / name).stat().st_size > 1000
    for figure in ("synthetic", "real_vs_synthetic", "predictions", "curves"):
        assert (out / "figures" / f"{figure}.png").is_file(), figure
    report = (out / "report.md").read_text()
    for text in ("| subset |", "| subset+synthetic |", "morphology distance", "haematoxylin W1", "label fidelity"):
        assert text in report, text
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "<table>" in html
    for run in ("subset", "subset+synthetic"):
        with open(out / "eval" / f"{run}.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert [r["name"] for r in rows] == ["synthetic_003", "mean"]
    # a second run finds everything done
    third = subprocess.run(_command(out), capture_output=True, text=True, env=env, timeout=120)
    assert third.returncode == 0 and "0 stage(s) to run, 13 done" in third.stdout
    # a changed setting is refused, naming the stage and the way out
    changed = subprocess.run(
        _command(out, "--set", "sample.guidance=3.0"), capture_output=True, text=True, env=env, timeout=120
    )
    assert changed.returncode == 2
    assert "stage histo-sample" in changed.stderr and "--redo histo-sample" in changed.stderr


def test_the_report_plots_hovernet_losses_against_the_windows_seen():
    if str(ROOT / "tools") not in sys.path:
        sys.path.insert(0, str(ROOT / "tools"))
    from pipeline_report import windows_seen

    rows = [{"epoch": "1", "windows": "22"}, {"epoch": "2", "windows": "22"}, {"epoch": "3", "windows": "534"}]
    assert windows_seen(rows) == [22, 44, 578] and windows_seen([]) == []
