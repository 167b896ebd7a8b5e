"""tools/pipeline_runner.py with stand-in stages: how the usable cores are split between the
stages that run at once (the pipeline end to end is in test_pipeline.py)."""

from __future__ import annotations

import json
import sys
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
