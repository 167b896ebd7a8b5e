"""Seconds per synthetic pair: the paper's procedure against nudiff's defaults, measured in
alternating rounds, so that both sides of each ratio see the same phase of the host.

    python tools/bench_pair.py [--preset small-128] [--batch 8] [--rounds 3] [--json out.json]

Each round times, one after the other: the paper's procedure (PyTorch eager float32 NCHW,
as the paper's code runs: 1000 ancestral structure steps, then 1000 image steps of two
sequential guidance calls without a modulation cache; --paper-steps of each are timed and
scaled to 1000, as in ``tools/bench_sampling.py``), then nudiff's defaults as a user runs
them, end to end and not extrapolated: DPM-Solver++(2M) with --steps structure steps and
--steps guided image steps (scale 2, both halves in one batch, the SPADE modulations
prepared once), in ONNX Runtime (the plain graph and the ``--cached-modulation`` export)
and in PyTorch (eager float32 channels-last with the modulation cache, as the command lines
load a checkpoint on the CPU), after one untimed run of each. The ratio of a round divides
that round's paper time by its nudiff time; the table gives each round and the median.
Postprocessing is left out on both sides. Random weights, perturbed as in
``tools/bench_sampling.py`` (timing does not depend on them).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
from bench_sampling import (
    GUIDANCE,
    SCHEDULE,
    add_graph_cache_argument,
    bench_model,
    export_graph,
    finish,
    paper_seconds_per_pair,
)
from nudiff_diffusion import TorchDenoiser, export_onnx, int_at_least, load_denoiser, sample
from nudiff_histo import HistoDenoiser, export_histo_onnx, load_histo_denoiser
from nudiff_postproc import describe_cpu, retain_freed_memory


def nudiff_seconds_per_pair(structure: Any, histo: Any, n: int, size: int, steps: int) -> float:
    """Wall seconds per pair of one default run of each runtime on a batch of ``n``: the
    structure model's sampling, then the guided histology sampling of those structures
    (preparation of their modulations included)."""
    g = torch.Generator().manual_seed(2)
    t0 = time.perf_counter()
    structures = sample(structure.eps, shape=(n, 3, size, size), schedule=SCHEDULE, steps=steps, generator=g, clip=1.0)
    eps = histo.guided(structures, torch.zeros_like(structures), GUIDANCE)
    sample(eps, shape=(n, 3, size, size), schedule=SCHEDULE, steps=steps, generator=g, clip=1.0)
    return (time.perf_counter() - t0) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small-128", help="UNet preset of both models")
    parser.add_argument("--batch", type=int_at_least(2), default=8, help="pairs per run")
    parser.add_argument("--rounds", type=int_at_least(1), default=3, help="alternating rounds (median)")
    parser.add_argument(
        "--steps", type=int_at_least(1), default=20, help="nudiff's sampler steps per model (its default: 20)"
    )
    parser.add_argument(
        "--paper-steps", type=int_at_least(1), default=2, help="ancestral steps timed for the paper's procedure"
    )
    parser.add_argument("--json", help="also write the header and rounds as JSON")
    add_graph_cache_argument(parser)
    args = parser.parse_args()
    if args.batch < 1 or args.rounds < 1 or args.steps < 1 or args.paper_steps < 1:
        parser.error("--batch, --rounds, --steps and --paper-steps must be positive")
    retained = retain_freed_memory()
    header = {
        "machine": describe_cpu(),
        "versions": f"python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), onnxruntime {ort.__version__}",
        "settings": f"{args.preset}, batch {args.batch}, nudiff {args.steps} + {args.steps} steps, paper timed over "
        f"{args.paper_steps} steps, {args.rounds} rounds; "
        + ("freed memory retained" if retained else "glibc default malloc"),
        "load_average_at_start": os.getloadavg()[0],
    }
    for key, value in header.items():
        print(f"# {key}: {value}")
    print()
    n = args.batch
    structure = bench_model("structure", args.preset)
    histo = bench_model("histo", args.preset)
    size = structure.config.image_size
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        s_graph = export_graph(export_onnx, structure, Path(tmp) / "s", args.graph_cache, batch_max=n)
        h_graph = export_graph(export_histo_onnx, histo, Path(tmp) / "h", args.graph_cache, batch_max=2 * n)
        engines = {
            "onnxruntime": (load_denoiser(s_graph), load_histo_denoiser(h_graph)),
            # copies: the paper's runtimes keep the NCHW originals
            "pytorch": (
                TorchDenoiser(copy.deepcopy(structure), channels_last=True),
                HistoDenoiser(copy.deepcopy(histo), channels_last=True),
            ),
        }
        for s_rt, h_rt in engines.values():  # warm-up: allocations, ONNX Runtime's first runs
            nudiff_seconds_per_pair(s_rt, h_rt, n, size, 1)
        paper_seconds_per_pair(structure, histo, n, args)  # and the paper's first calls
        print("| round | paper s / pair | " + " | ".join(f"{e} s / pair | ratio" for e in engines) + " |")
        print("|---|---|" + "---|---|" * len(engines))
        for r in range(args.rounds):
            paper = paper_seconds_per_pair(structure, histo, n, args)
            row = {"paper": paper["structure_s"] + paper["histo_s"]}
            for name, (s_rt, h_rt) in engines.items():
                row[name] = nudiff_seconds_per_pair(s_rt, h_rt, n, size, args.steps)
            rounds.append(row)
            cells = " | ".join(f"{row[e]:.2f} | {row['paper'] / row[e]:.0f}x" for e in engines)
            print(f"| {r + 1} | {row['paper']:.1f} | {cells} |", flush=True)
        medians = {e: statistics.median(row["paper"] / row[e] for row in rounds) for e in engines}
        print(f"| median ratio | | {' | '.join(f'| {medians[e]:.0f}x' for e in engines)} |")
    finish(header, args.json, {"rounds": rounds, "median_ratio": medians})
    return 0


if __name__ == "__main__":
    sys.exit(main())
