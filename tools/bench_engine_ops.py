"""Where one UNet call's time goes in eager PyTorch and in ONNX Runtime, by kind of
operator, and how fast ONNX Runtime could at most be against eager on this machine.

    python tools/bench_engine_ops.py [--presets small-128] [--batch 8] [--rounds 5] [--json out.json]

For each preset, the plain (structure) UNet and the cached-modulation histology UNet (SPADE
modulations prepared once, as in sampling; one unguided call of ``--batch`` images) are
exported to ONNX as ``tools/export_onnx.py`` does, then called ``--rounds`` times, eager
and ONNX Runtime alternating after two warm-up calls of each. The wall time per call is the median
of those rounds; the breakdown comes from the profilers: ONNX Runtime's own (every node of
the timed rounds; its overhead is a few ms per call) and ``torch.profiler`` over two more
eager calls (operator self time). Both engines use torch's thread count; freed memory is
retained and eager runs channels-last, as in nudiff's command lines.

The ceiling is eager's call time over ONNX Runtime's convolution time alone: the speed-up
ONNX Runtime would reach if every other operator cost nothing. Both ratios use eager's
unprofiled call time: under ``torch.profiler`` a channels-last model's normalisations and
elementwise operators read 2-3x what they take without it (forward hooks: the same time as
NCHW), so eager's breakdown is indicative only. Random weights, perturbed as in
``tools/bench_sampling.py`` (timing does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
from bench_sampling import add_graph_cache_argument, bench_model, export_graph
from nudiff_diffusion import TorchDenoiser, UNetConfig, export_onnx, int_at_least, onnx_session
from nudiff_histo import HistoDenoiser, OnnxModulatedDenoiser, export_histo_onnx
from nudiff_postproc import describe_cpu, retain_freed_memory

WARM_UP = 2  # untimed calls of each engine before the timed rounds
CATEGORIES = (
    "convolution",
    "normalisation",
    "elementwise",
    "layout conversion (NCHWc)",
    "attention and linear",
    "resampling, concatenation, other",
)
_ORT = {
    "convolution": {"Conv", "FusedConv", "NchwcConv"},
    "normalisation": {"InstanceNormalization", "BatchNormalization", "GroupNormalization", "LayerNormalization"},
    "elementwise": {"QuickGelu", "Sigmoid", "Mul", "Add", "Sub", "Div", "Sum", "Sqrt", "Pow", "Sin", "Cos", "Exp"},
    "layout conversion (NCHWc)": {"ReorderInput", "ReorderOutput"},
    "attention and linear": {"Einsum", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "Softmax"},
}
_TORCH = {  # aten operators by name; every one with "conv" in its name is a convolution
    "normalisation": {"group_norm", "native_group_norm", "batch_norm", "native_batch_norm", "layer_norm"},
    "elementwise": {"silu", "silu_", "sigmoid", "add", "add_", "mul", "mul_", "sub", "rsub", "div"}
    | {"sin", "cos", "exp"},
    "attention and linear": {"bmm", "addmm", "mm", "matmul", "softmax", "_softmax", "einsum", "linear"},
}


def category(op: str, engine: str) -> str:
    """The kind of an ONNX Runtime node type or a PyTorch operator name (``aten::...``)."""
    if engine == "torch":
        op = op.removeprefix("aten::")
        if "conv" in op:
            return "convolution"
    for name, ops in (_TORCH if engine == "torch" else _ORT).items():
        if op in ops:
            return name
    return CATEGORIES[-1]


def ort_breakdown(profile: Path, skip_runs: int) -> tuple[dict[str, float], int]:
    """ms per run by category from an ONNX Runtime profile, leaving out the first
    ``skip_runs`` runs (warm-up); and the number of runs counted."""
    events = json.loads(profile.read_text())
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    begin, runs = starts[skip_runs], len(starts) - skip_runs
    totals: Counter[str] = Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= begin:
            totals[category(e["args"]["op_name"], "ort")] += e["dur"] / 1e3
    return {name: totals[name] / runs for name in CATEGORIES}, runs


def torch_breakdown(call: Callable[[], Any], calls: int = 2) -> dict[str, float]:
    """ms per call by category: operator self time under ``torch.profiler``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            call()
    totals: Counter[str] = Counter()
    for event in prof.key_averages():
        totals[category(event.key, "torch")] += event.self_cpu_time_total / 1e3
    return {name: totals[name] / calls for name in CATEGORIES}


def measure(
    eager: Callable[[], Any], session: Any, feed: dict[str, Any], rounds: int
) -> tuple[list[float], list[float]]:
    """Wall ms of ``rounds`` eager calls and session runs, alternating, after two warm-up
    calls of each (eager's second and third calls of a small-128 histology model still took
    1.5x the later ones)."""
    for _ in range(WARM_UP):
        eager()
        session.run(None, feed)
    eager_ms, ort_ms = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        eager()
        eager_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        session.run(None, feed)
        ort_ms.append((time.perf_counter() - t0) * 1e3)
    return eager_ms, ort_ms


def case(kind: str, preset: str, batch: int, rounds: int, tmp: Path, cache: Path | None = None) -> dict[str, Any]:
    """One model's row set: wall times, both breakdowns and the ceiling (``cache``: the
    ``--graph-cache`` folder of :func:`bench_sampling.export_graph`)."""
    g = torch.Generator().manual_seed(1)
    size = UNetConfig.preset(preset).image_size
    x = torch.randn(batch, 3, size, size, generator=g)
    t = torch.full((batch,), 500)
    folder = tmp / f"{kind}-{preset}"
    if kind == "structure":
        model = bench_model(kind, preset)
        graph = export_graph(export_onnx, model, folder, cache, batch_max=batch)
        runtime = TorchDenoiser(model, channels_last=True)  # as the command lines load it

        def eager() -> Any:
            return runtime.eps(x, t)

        feed = {"x": x.numpy(), "t": t.numpy()}
    else:
        model = bench_model(kind, preset)
        graph = export_graph(export_histo_onnx, model, folder, cache, batch_max=batch)
        cond = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
        runtime = HistoDenoiser(model, channels_last=True)
        prepared = runtime.prepare(cond)  # its modulations are made on the first call

        def eager() -> Any:
            return runtime.eps(x, t, prepared)

        arrays = OnnxModulatedDenoiser(graph).prepare(cond).arrays
        feed = {"x": x.numpy(), "t": t.numpy(), **arrays}
    folder.mkdir(parents=True, exist_ok=True)  # the profile's folder (the graph may be in the cache)
    session = onnx_session(graph, profile_prefix=str(folder / "ort"))
    eager_ms, ort_ms = measure(eager, session, feed, rounds)
    ort_ops, runs = ort_breakdown(Path(session.end_profiling()), skip_runs=WARM_UP)
    assert runs == rounds, f"the ONNX Runtime profile holds {runs} timed runs, expected {rounds}"
    torch_ops = torch_breakdown(eager)
    e, o = statistics.median(eager_ms), statistics.median(ort_ms)
    return {
        "model": kind,
        "preset": preset,
        "batch": batch,
        "eager_ms": eager_ms,
        "ort_ms": ort_ms,
        "eager_ops_ms": torch_ops,
        "ort_ops_ms": ort_ops,
        "speedup": e / o,
        "ceiling": e / ort_ops["convolution"],
    }


def print_case(row: dict[str, Any]) -> None:
    e, o = statistics.median(row["eager_ms"]), statistics.median(row["ort_ms"])
    te, to = sum(row["eager_ops_ms"].values()), sum(row["ort_ops_ms"].values())
    print(f"{row['model']} UNet, {row['preset']}, batch {row['batch']}:")
    print()
    print("| operators | eager ms / call | share | ONNX Runtime ms / call | share |")
    print("|---|---|---|---|---|")
    for name in CATEGORIES:
        a, b = row["eager_ops_ms"][name], row["ort_ops_ms"][name]
        print(f"| {name} | {a:.1f} | {100 * a / te:.0f}% | {b:.1f} | {100 * b / to:.0f}% |")
    print(f"| sum of operators (profiled) | {te:.1f} | | {to:.1f} | |")
    print(f"| call, unprofiled (median of {len(row['eager_ms'])}, interleaved) | {e:.1f} | | {o:.1f} | |")
    print()
    print(
        f"ONNX Runtime against eager: {row['speedup']:.2f}x per call; ceiling with every "
        f"non-convolution operator free: {row['ceiling']:.2f}x (eager call / ONNX Runtime convolutions)"
    )
    print(f"calls, ms: eager {[round(v) for v in row['eager_ms']]}, ONNX Runtime {[round(v) for v in row['ort_ms']]}")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small-128"], help="UNet presets")
    parser.add_argument("--models", nargs="+", default=["structure", "histo"], choices=["structure", "histo"])
    parser.add_argument("--batch", type=int_at_least(2), default=8, help="images per call")
    parser.add_argument("--rounds", type=int_at_least(1), default=5, help="timed calls per engine (median)")
    parser.add_argument("--json", help="also write the header and rows as JSON")
    add_graph_cache_argument(parser)
    args = parser.parse_args()
    if args.batch < 2 or args.rounds < 1:
        parser.error(f"--batch must be >= 2 and --rounds >= 1, got {args.batch} and {args.rounds}")
    retained = retain_freed_memory()
    header = {
        "machine": describe_cpu(),
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, onnxruntime {ort.__version__}",
        "threads": torch.get_num_threads(),
        "memory": "freed memory retained" if retained else "glibc default",
        "load_average": os.getloadavg()[0],
    }
    print("# one UNet call by kind of operator: eager PyTorch float32 against ONNX Runtime float32")
    for key, value in header.items():
        print(f"# {key}: {value}")
    print()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for preset in args.presets:
            for kind in args.models:
                rows.append(case(kind, preset, args.batch, args.rounds, Path(tmp), args.graph_cache))
                print_case(rows[-1])
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
