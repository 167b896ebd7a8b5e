"""tools/bench_engine_ops.py (operator accounting on a real tiny UNet in both engines) and
tools/bench_pair.py (alternating rounds, ratios within a round), tools/bench_sampling.py's step timing."""

from __future__ import annotations

import importlib
import json
import statistics
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture(scope="module")
def graph_cache(tmp_path_factory) -> Path:
    """The --graph-cache folder the benchmark tools of this module share."""
    return tmp_path_factory.mktemp("graphs")


def _tool(name: str):
    sys.path.insert(0, str(TOOLS))  # a tool imports its sibling bench_sampling, as when run as a script
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(TOOLS))


def test_graph_cache_reuses_an_export_of_the_same_weights_and_settings(tmp_path):
    import torch

    bench_sampling = _tool("bench_sampling")
    calls, killed = [], []

    def export(model, path, **settings):  # stands in for export_onnx: writes the graph's file
        path.parent.mkdir(parents=True)
        if killed:  # a kill midway through writing
            killed.clear()
            path.write_text("half a graph")
            raise KeyboardInterrupt
        calls.append(settings)
        path.write_text("graph")

    export_graph, cache = bench_sampling.export_graph, tmp_path / "cache"
    model = bench_sampling.bench_model("structure", "tiny-64")
    first = export_graph(export, model, tmp_path / "a", cache, batch_max=2)
    rebuilt = bench_sampling.bench_model("structure", "tiny-64")  # seeded: the same weights again
    assert export_graph(export, rebuilt, tmp_path / "b", cache, batch_max=2) == first
    assert len(calls) == 1 and first.read_text() == "graph" and first.parent.parent == cache
    assert export_graph(export, model, tmp_path / "c", cache, batch_max=4) != first  # other settings
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert export_graph(export, model, tmp_path / "d", cache, batch_max=2) != first  # other weights
    assert len(calls) == 3 and not list(cache.glob("*.partial"))

    # an export killed midway leaves only a .partial folder, which the next call replaces
    killed.append(True)
    with pytest.raises(KeyboardInterrupt):
        export_graph(export, model, tmp_path / "f", cache, batch_max=8)
    assert len(list(cache.glob("*.partial"))) == 1
    redone = export_graph(export, model, tmp_path / "f", cache, batch_max=8)
    assert redone.read_text() == "graph" and not list(cache.glob("*.partial")) and len(calls) == 4
    # without a cache the export goes to the folder given, every time
    assert export_graph(export, model, tmp_path / "e", None, batch_max=2) == tmp_path / "e" / "model.onnx"
    assert len(calls) == 5


@pytest.fixture(scope="module")
def ops():
    return _tool("bench_engine_ops")


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
def test_breakdowns_account_for_the_calls(ops, kind, tmp_path, graph_cache):
    import torch

    # the batches bench_pair exports for (n = 2 pairs: the guided histology UNet sees 4), so
    # that the pair benchmark below finds these graphs in the cache
    batch = 2 if kind == "structure" else 4
    with torch.no_grad():
        row = ops.case(kind, "tiny-64", batch=batch, rounds=3, tmp=tmp_path, cache=graph_cache)
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


def test_pair_benchmark_alternates_and_divides_within_rounds(tmp_path, monkeypatch, capsys, graph_cache):
    bench_pair = _tool("bench_pair")
    out = tmp_path / "pair.json"
    args = ["--preset", "tiny-64", "--batch", "2", "--rounds", "2", "--steps", "2", "--paper-steps", "1"]
    args += ["--graph-cache", str(graph_cache)]
    monkeypatch.setattr(sys, "argv", ["bench_pair.py", *args, "--json", str(out)])
    assert bench_pair.main() == 0
    result = json.loads(out.read_text())
    assert len(result["rounds"]) == 2
    for engine in ("onnxruntime", "pytorch"):
        ratios = [r["paper"] / r[engine] for r in result["rounds"]]
        assert all(r > 1 for r in ratios)  # even 2 nudiff steps per model beat 1000 ancestral ones
        assert result["median_ratio"][engine] == pytest.approx(statistics.median(ratios))
    assert "| median ratio |" in capsys.readouterr().out
    # one structure and one histology graph: the breakdowns' exports (same seeded weights,
    # same settings) were reused, not exported again under another fingerprint
    cached = sorted(json.loads((d / "config.json").read_text())["batch_max"] for d in graph_cache.iterdir())
    assert cached == [2, 4]


def test_ms_per_step_stays_a_step_when_the_preparation_time_varies():
    # a histology runtime whose guided eps costs 20 ms a call, plus the SPADE modulations it
    # makes on its first call: 150 ms while they are timed, 30 ms in the sampling run (a
    # loaded machine). A step costs 20 ms; the run less the timed preparation was negative.
    import argparse
    import time

    import torch

    bench_sampling = _tool("bench_sampling")
    args = argparse.Namespace(repeat=3, steps=4)
    runs = 1 + (1 + args.repeat) + 1  # guided() for the calls, for the first calls, for the run

    class Runtime:
        made = 0

        def guided(self, cond, null, scale):
            Runtime.made += 1
            first = [0.15 if Runtime.made < runs else 0.03]

            def eps(x, t):
                time.sleep(0.02 + first[0])
                first[0] = 0.0
                return torch.zeros_like(x)

            return eps

    row = bench_sampling._time_row("histo", Runtime(), 1, 8, args)
    assert Runtime.made == runs
    assert 120 <= row["ms_prepare"] <= 250, row
    assert 20 <= row["ms_per_step"] <= 40, row
