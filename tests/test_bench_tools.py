"""tools/bench_engine_ops.py (operator accounting on a real tiny UNet in both engines) and
tools/bench_pair.py (alternating rounds, ratios within a round)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture(scope="module")
def ops():
    sys.path.insert(0, str(TOOLS))  # the tool imports its sibling bench_sampling, as when run as a script
    try:
        import bench_engine_ops
    finally:
        sys.path.remove(str(TOOLS))
    return bench_engine_ops


@pytest.mark.parametrize(
    ("op", "engine", "expected"),
    [
        ("aten::mkldnn_convolution", "torch", "convolution"),
        ("aten::addmm", "torch", "attention and linear"),  # not an elementwise add
        ("aten::add", "torch", "elementwise"),
        ("aten::native_group_norm", "torch", "normalisation"),
        ("aten::cat", "torch", "resampling, concatenation, other"),
        ("Conv", "ort", "convolution"),
        ("QuickGelu", "ort", "elementwise"),
        ("ReorderOutput", "ort", "layout conversion (NCHWc)"),
        ("Einsum", "ort", "attention and linear"),
        ("Resize", "ort", "resampling, concatenation, other"),
    ],
)
def test_operators_fall_into_their_kind(ops, op, engine, expected):
    assert ops.category(op, engine) == expected


@pytest.mark.parametrize("kind", ["structure", "histo"])
def test_breakdowns_account_for_the_calls(ops, kind, tmp_path):
    import torch

    with torch.no_grad():
        row = ops.case(kind, "tiny-64", batch=2, rounds=3, tmp=tmp_path)
    assert len(row["eager_ms"]) == len(row["ort_ms"]) == 3
    ort_sum, eager_sum = sum(row["ort_ops_ms"].values()), sum(row["eager_ops_ms"].values())
    ort_call = statistics.mean(row["ort_ms"])
    # the profiled nodes of a run are inside its wall time (one after the other), and most of it
    assert 0.5 * ort_call < ort_sum <= ort_call
    assert row["ort_ops_ms"]["convolution"] > 0.3 * ort_sum
    assert row["eager_ops_ms"]["convolution"] > 0.3 * eager_sum
    assert row["ort_ops_ms"]["layout conversion (NCHWc)"] >= 0 and row["eager_ops_ms"]["layout conversion (NCHWc)"] == 0
    # the ceiling (every other operator free) is above the measured ratio
    assert row["ceiling"] > row["speedup"] > 0


def test_pair_benchmark_alternates_and_divides_within_rounds(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(TOOLS))
    try:
        import bench_pair
    finally:
        sys.path.remove(str(TOOLS))
    out = tmp_path / "pair.json"
    args = ["--preset", "tiny-64", "--batch", "2", "--rounds", "2", "--steps", "2", "--paper-steps", "1"]
    monkeypatch.setattr(sys, "argv", ["bench_pair.py", *args, "--json", str(out)])
    assert bench_pair.main() == 0
    result = json.loads(out.read_text())
    assert len(result["rounds"]) == 2
    for engine in ("onnxruntime", "pytorch"):
        ratios = [r["paper"] / r[engine] for r in result["rounds"]]
        assert all(r > 1 for r in ratios)  # even 2 nudiff steps per model beat 1000 ancestral ones
        assert result["median_ratio"][engine] == pytest.approx(statistics.median(ratios))
    assert "| median ratio |" in capsys.readouterr().out
