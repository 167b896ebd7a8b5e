"""tools/pipeline_runner.py with stand-in stages: how the usable cores are split between the
stages that run at once (the pipeline end to end is in test_pipeline.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from pipeline_runner import Stage, run_pipeline  # noqa: E402

_PRINT_THREADS = [sys.executable, "-c", "import os; print('threads', os.environ['OMP_NUM_THREADS'])"]


@pytest.mark.parametrize(
    ("usable", "configured", "parallel_share", "alone"), [(3, 0, 1, 3), (1, 0, 1, 1), (3, 4, 2, 4)]
)
def test_stages_share_the_usable_cores_unless_threads_is_set(
    tmp_path, monkeypatch, usable, configured, parallel_share, alone
):
    """Two independent stages run side by side on half the cores each (at least one); the
    stage after both gets them all. ``threads`` in the config replaces the usable count."""
    import nudiff_postproc

    monkeypatch.setattr(nudiff_postproc, "usable_cores", lambda: usable)
    stages = [
        Stage("left", [], commands=[_PRINT_THREADS]),
        Stage("right", [], commands=[_PRINT_THREADS]),
        Stage("after", ["left", "right"], commands=[_PRINT_THREADS]),
    ]
    config = {"name": "stand-in", "out": str(tmp_path), "threads": configured, "parallel": 2}
    assert run_pipeline(config, stages, progress=False) == 0
    expected = {"left": parallel_share, "right": parallel_share, "after": alone}
    for name, threads in expected.items():
        assert f"threads {threads}\n" in (tmp_path / "logs" / f"{name}.log").read_text()
        assert json.loads((tmp_path / "stages" / f"{name}.json").read_text())["threads"] == threads


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
    from pipeline_config import ConfigError
    from pipeline_runner import _hold_lock

    config = {"name": "stand-in", "out": str(tmp_path), "threads": 1, "parallel": 1}
    stages = [Stage("only", [], commands=[_PRINT_THREADS])]
    held = _hold_lock(tmp_path)  # as another run would (flock: per open file, so even in this process)
    try:
        with pytest.raises(ConfigError, match=f"is in use by another pipeline run \\(pid {os.getpid()}, started"):
            run_pipeline(config, stages, progress=False)
        assert not (tmp_path / "stages").exists()
    finally:
        held.close()
    assert run_pipeline(config, stages, progress=False) == 0  # released: the next run goes ahead


_RUNNER = """
import sys
sys.path.insert(0, {tools!r})
from pipeline_runner import Stage, run_pipeline
stage = Stage("long", [], commands=[[sys.executable, "-c", {child!r}]])
sys.exit(run_pipeline({{"name": "t", "out": {out!r}, "threads": 1, "parallel": 1}}, [stage], progress=False))
"""
_CHILD = "import os, time; open({pid!r}, 'w').write(str(os.getpid())); time.sleep(120)"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has ended; only its reaping is left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT])
def test_a_stopped_or_killed_runner_leaves_no_stage_running(tmp_path, signum):
    """SIGINT to the runner alone (not its process group) and even SIGKILL end the child
    at once: a rerun must never race a stage left running."""
    pid_file = tmp_path / "child.pid"
    script = _RUNNER.format(
        tools=str(Path(__file__).resolve().parents[1] / "tools"),
        child=_CHILD.format(pid=str(pid_file)),
        out=str(tmp_path / "out"),
    )
    runner = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not pid_file.is_file() or not pid_file.read_text():
            assert time.monotonic() < deadline and runner.poll() is None, "the stage never started"
            time.sleep(0.1)
        child = int(pid_file.read_text())
        assert _alive(child)
        t0 = time.monotonic()
        runner.send_signal(signum)
        runner.wait(timeout=30)
        while _alive(child) and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        assert not _alive(child), f"the stage outlived its runner by {time.monotonic() - t0:.0f} s"
        assert time.monotonic() - t0 < 10  # not after the stage's 120 s
        if signum == signal.SIGINT:
            assert runner.returncode == 130
    finally:
        if runner.poll() is None:
            runner.kill()


def test_a_dry_run_shows_what_redo_would_rerun(tmp_path, capsys):
    stages = [
        Stage("left", [], commands=[_PRINT_THREADS]),
        Stage("right", [], commands=[_PRINT_THREADS]),
        Stage("after", ["left"], commands=[_PRINT_THREADS]),
    ]
    config = {"name": "stand-in", "out": str(tmp_path), "threads": 1, "parallel": 1}
    assert run_pipeline(config, stages, progress=False) == 0
    capsys.readouterr()
    assert run_pipeline(config, stages, redo=["left"], dry_run=True, progress=False) == 0
    listing = [line for line in capsys.readouterr().out.splitlines() if line and not line.startswith(" ")]
    states = {line.split()[0]: line.split("[")[1].split("]")[0] for line in listing}
    assert states == {"left": "to run", "right": "done", "after": "to run"}
    assert (tmp_path / "stages" / "left.json").is_file()  # a dry run removes nothing


def _writer(path: Path, text: str, *extra: str) -> list[str]:
    """A stand-in command that writes ``text`` to ``path`` (and ignores ``extra``)."""
    return [sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])", str(path), text, *extra]


def _config(out: Path | str) -> dict:
    return {"name": "stand-in", "out": str(out), "threads": 1, "parallel": 1}


def _chain(out: Path, version: str = "v1") -> list[Stage]:
    """a -> b, each writing one file under ``out``."""
    return [
        Stage("a", [], commands=[_writer(out / "a.txt", version)], outputs=[out / "a.txt"]),
        Stage("b", ["a"], commands=[_writer(out / "b.txt", version)], outputs=[out / "b.txt"]),
    ]


def test_redo_makes_every_later_stage_stale_even_beyond_until(tmp_path, capsys):
    assert run_pipeline(_config(tmp_path), _chain(tmp_path), progress=False) == 0
    assert run_pipeline(_config(tmp_path), _chain(tmp_path, "v2"), redo=["a"], until="a", progress=False) == 0
    assert (tmp_path / "a.txt").read_text() == "v2"
    assert not (tmp_path / "b.txt").exists() and not (tmp_path / "stages" / "b.json").exists()
    capsys.readouterr()
    assert run_pipeline(_config(tmp_path), _chain(tmp_path, "v2"), progress=False) == 0
    assert "1 stage(s) to run, 1 done" in capsys.readouterr().out  # b again, on the new a
    assert (tmp_path / "b.txt").read_text() == "v2"


def test_an_interrupted_redo_is_finished_by_the_next_run(tmp_path):
    """A kill between --redo's record of what it removes and the end of the removals: the
    next run, with or without --redo, removes the rest before it looks at any marker."""
    assert run_pipeline(_config(tmp_path), _chain(tmp_path), progress=False) == 0
    (tmp_path / "stages" / ".redo.json").write_text('["a", "b"]')  # markers and outputs still there
    assert run_pipeline(_config(tmp_path), _chain(tmp_path, "v2"), progress=False) == 0
    assert (tmp_path / "a.txt").read_text() == (tmp_path / "b.txt").read_text() == "v2"
    assert not (tmp_path / "stages" / ".redo.json").exists()


def test_a_stage_killed_midway_resumes_only_with_the_settings_it_started_with(tmp_path):
    from pipeline_config import ConfigError

    def stage(code: str, steps: int) -> list[Stage]:  # a command that continues what it left
        return [Stage("a", [], commands=[[sys.executable, "-c", code, "--steps", str(steps)]], resumable=True)]

    fails = stage("raise SystemExit(3)", 3)
    assert run_pipeline(_config(tmp_path), fails, progress=False) == 1
    assert (tmp_path / "stages" / "a.started.json").is_file()
    changed = stage("pass", 4)
    with pytest.raises(ConfigError, match="stage a in .* failed or was interrupted while running with other settings"):
        run_pipeline(_config(tmp_path), changed, progress=False)
    with pytest.raises(ConfigError, match="`-c raise SystemExit\\(3\\)` -> `-c pass`"):
        run_pipeline(_config(tmp_path), stage("pass", 3), progress=False)  # the command's code is part of it too
    assert run_pipeline(_config(tmp_path), fails, redo=["a"], progress=False) == 1  # --redo starts afresh
    assert run_pipeline(_config(tmp_path), changed, redo=["a"], progress=False) == 0
    assert not (tmp_path / "stages" / "a.started.json").exists()
    # a stage that starts afresh each time (a Python step building NAME.partial) is not held to them
    fresh = [Stage("b", [], commands=[[sys.executable, "-c", "raise SystemExit(3)"]])]
    assert run_pipeline(_config(tmp_path), fresh, progress=False) == 1
    assert not (tmp_path / "stages" / "b.started.json").exists()
    fixed = [Stage("b", [], commands=[[sys.executable, "-c", "pass"]])]
    assert run_pipeline(_config(tmp_path), fixed, progress=False) == 0


def test_fingerprints_ignore_the_folder_spelling_and_free_flags_and_name_a_change(tmp_path, monkeypatch, capsys):
    from pipeline_config import ConfigError

    monkeypatch.chdir(tmp_path)

    def stage(out: str, steps: int, save_every: int) -> list[Stage]:  # paths resolved, as build_stages makes them
        command = _writer(Path(out).resolve() / "x.txt", "x", "--steps", str(steps), "--save-every", str(save_every))
        return [Stage("train", [], commands=[command], free_flags=("--save-every",))]

    assert run_pipeline(_config("run"), stage("run", 3, 10), progress=False) == 0
    absolute = str(tmp_path / "run")
    assert run_pipeline(_config(absolute), stage(absolute, 3, 99), progress=False) == 0  # nothing to run
    monkeypatch.chdir(tmp_path / "run")
    capsys.readouterr()
    assert run_pipeline(_config("."), stage(".", 3, 10), progress=False) == 0
    assert "0 stage(s) to run, 1 done" in capsys.readouterr().out
    marker = json.loads((tmp_path / "run" / "stages" / "train.json").read_text())
    assert "--save-every" not in marker["inputs"]["commands"][0] and "{out}/x.txt" in marker["inputs"]["commands"][0]
    with pytest.raises(
        ConfigError, match="ran with other settings or inputs \\(command 1: `--steps 3` -> `--steps 4`\\)"
    ):
        run_pipeline(_config(absolute), stage(absolute, 4, 10), progress=False)


def _old_fingerprint(commands: list[list[str]], settings, deps: list[str]) -> str:
    """The fingerprint the pipeline recorded before its markers held their inputs (frozen
    here from tools/pipeline_runner.py at 9e695f0): commands as spelled then, no Python step."""
    import hashlib

    text = json.dumps([commands, None, settings], default=str) + "".join(deps)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_a_marker_of_the_earlier_format_is_honoured_while_its_stage_is_unchanged(tmp_path, monkeypatch, capsys):
    """Markers written with ``--out run`` (paths spelled relative, as the stages then named
    them) by the earlier pipeline, whose prepare-like stage hashed other settings."""
    from pipeline_config import ConfigError

    monkeypatch.chdir(tmp_path)

    def stages(version: str) -> list[Stage]:  # as build_stages makes them now: paths resolved
        out = (tmp_path / "run").resolve()
        return [
            Stage("a", [], [_writer(out / "a.txt", version)], settings={"new": 1}, legacy_settings=["old"]),
            Stage("b", ["a"], [_writer(out / "b.txt", version)]),
        ]

    assert run_pipeline(_config("run"), stages("v1"), progress=False) == 0
    a = _old_fingerprint([_writer(Path("run") / "a.txt", "v1")], ["old"], [])
    b = _old_fingerprint([_writer(Path("run") / "b.txt", "v1")], None, [a])
    for name, fingerprint in (("a", a), ("b", b)):
        record = {"fingerprint": fingerprint, "seconds": 1.0, "threads": 1, "finished": "2026-12-02 10:00:00"}
        (tmp_path / "run" / "stages" / f"{name}.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert run_pipeline(_config("run"), stages("v1"), progress=False) == 0
    assert "0 stage(s) to run, 2 done" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="stage a .*recorded by an earlier version of the pipeline"):
        run_pipeline(_config("run"), stages("v2"), progress=False)


def test_an_output_folder_holding_other_files_is_refused(tmp_path):
    from pipeline_config import ConfigError

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds 1 other file\\(s\\) or folder\\(s\\) \\(e.g. \\['notes.txt'\\]\\)"):
        run_pipeline(_config(tmp_path), _chain(tmp_path), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert run_pipeline(_config(tmp_path / "new"), _chain(tmp_path / "new"), progress=False) == 0


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m"])
def test_the_sampling_batch_changes_no_sampling_stage(tmp_path, sampler):
    """A deterministic sampler's samples are independent of the batch, so another
    sample.batch leaves the sampling stages' fingerprints alone."""
    from pipeline_config import load_config
    from pipeline_runner import fingerprints
    from pipeline_stages import build_stages

    config = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"  # procedural data

    def prints(batch: int) -> dict[str, str]:
        sets = [f'sample.sampler="{sampler}"', f"sample.batch={batch}", 'sample.engine="pytorch"']
        cfg = load_config(config, out=str(tmp_path / "out"), overrides=sets)
        return fingerprints(build_stages(cfg), tmp_path / "out")

    a, b = prints(4), prints(2)
    assert a["structure-sample"] == b["structure-sample"] and a["histo-sample"] == b["histo-sample"]
    assert prints(4) == a  # and the fingerprints are stable


def test_the_report_says_when_a_model_found_no_nucleus(tmp_path):
    # all-zero scores read as nuclei found and missed unless the report says the prediction was empty
    import numpy as np
    from nudiff_postproc import write_instance_map
    from pipeline_config import load_config
    from pipeline_report import report_blocks

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.toml", out=str(tmp_path))
    for run, found in (("subset", True), ("subset+synthetic", False)):
        inst = np.zeros((20, 20), np.int32)
        inst[2:6, 2:6] = int(found)
        write_instance_map(tmp_path / "predictions" / run / "instance_maps" / "t.png", inst)
    # what a folder may also hold: a hidden file, a killed write's temporary file
    (tmp_path / "predictions" / "subset+synthetic" / "instance_maps" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "predictions" / "subset" / "instance_maps" / ".t.png.123.part").write_bytes(b"\0")
    notes = [text for kind, *rest in report_blocks(tmp_path, config, {}) if kind == "p" for text in rest]
    empty = [t for t in notes if "found no nucleus" in t]
    assert len(empty) == 1 and empty[0].startswith("subset+synthetic: the model found no nucleus on any test tile")
