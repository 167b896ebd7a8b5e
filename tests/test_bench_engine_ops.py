"""tools/bench_engine_ops.py: its operator accounting on a real tiny UNet in both engines."""

from __future__ import annotations

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
