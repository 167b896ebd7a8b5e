"""Sampling engines on this machine, one row per (model, preset, engine, precision, batch):
ms per UNet call, ms per sampler step (sampler included), images per second, peak memory,
GFLOP/s and its share of the device's peak, the final sample's difference to float32 eager
PyTorch from the same noise; then the paper's procedure against nudiff's default.

    python tools/bench_sampling.py [--presets tiny-64 small-128] [--batch 8] [--json out.json]

With --int8, two int8 copies of the plain UNet graph (ONNX Runtime quantizer: dynamic, and
static QDQ calibrated at six noise levels) get rows too.

On a GPU (``--device auto`` finds one), the PyTorch rows run there and add float16
autocast, CUDA graphs (float32 and bf16) and, with --compile, torch.compile (bf16, alone and
under CUDA graphs); --no-onnx leaves out the ONNX Runtime rows (CPU-only without
onnxruntime-gpu). GPU times wait for the device (``torch.cuda.synchronize``) after each
call; the peak is the best bfloat16 8192^2 matmul. The GPU check of ../shared/GPU.md:

    python tools/bench_sampling.py --presets paper-256 --batch 16 --compile --no-onnx --repeat 5

Random weights, perturbed so that the zero-initialised output layers do not hide
differences (timing does not depend on the weights; sample differences do, so they are an
indication for an untrained model). Times are medians of --repeat calls after a warm-up;
the per-step column times one --steps run of DPM-Solver++(2M) (guided, scale 2, for the
histology model) less the once-per-batch preparation of the conditions (the SPADE
modulations of a cached histology runtime), which has its own column: a synthetic pair
costs one preparation and --default-steps steps, over the batch. The ONNX graphs are
exported into a temporary folder first (tens of seconds to minutes each). The paper's
procedure (1000 ancestral structure steps, then 1000 image steps of two sequential guidance
calls without a modulation cache, PyTorch eager) is timed over --paper-steps steps and
extrapolated linearly to 1000 (the cost per step of a respaced ancestral run does not
depend on the number of steps).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nudiff_diffusion
import numpy as np
import torch
from bench_machine import PeakMemory, count_flops, cpu_peak_gflops, cuda_peak_gflops, synced
from nudiff_diffusion import (
    NoiseSchedule,
    TorchDenoiser,
    UNet,
    UNetConfig,
    export_onnx,
    int_at_least,
    load_denoiser,
    median_seconds,
    resolve_device,
    sample,
)
from nudiff_diffusion.testing import perturbed_copy
from nudiff_histo import PRESETS as HISTO_PRESETS
from nudiff_histo import HistoDenoiser, build_histo_unet, export_histo_onnx, load_histo_denoiser
from nudiff_postproc import describe_cpu, retain_freed_memory
from nudiff_postproc._io import check_output_file

SCHEDULE = NoiseSchedule.linear(1000)
GUIDANCE = 2.0


def add_graph_cache_argument(parser: argparse.ArgumentParser) -> None:
    """``--graph-cache DIR`` of the benchmark tools (:func:`export_graph`)."""
    parser.add_argument(
        "--graph-cache",
        type=Path,
        help="keep the ONNX exports in this folder and reuse them in later runs (keyed by weights, settings, versions)",
    )


def bench_model(kind: str, preset: str) -> UNet:
    """The random model the benchmarks time, in eval mode: a plain (``structure``) or SPADE
    (``histo``) UNet of ``preset``, built after seeding torch, so that every run and every
    tool gets the same weights (which :func:`export_graph` relies on), every parameter then
    perturbed by N(0, 0.02) noise (the zero-initialised output layers would make every
    engine agree trivially)."""
    torch.manual_seed(0)
    model = UNet(UNetConfig.preset(preset)) if kind == "structure" else build_histo_unet(preset)
    return perturbed_copy(model).eval()


def export_graph(
    export: Callable[..., Any], model: torch.nn.Module, folder: Path, cache: Path | None, **settings: Any
) -> Path:
    """``folder / "model.onnx"`` written by ``export(model, path, **settings)``
    (:func:`nudiff_diffusion.export_onnx` or :func:`nudiff_histo.export_histo_onnx`).

    With a ``cache`` folder (``--graph-cache``), the export goes to a subfolder named by a
    fingerprint of the weights, the export function, ``settings`` and the versions of
    torch and nudiff, and a later call with the same fingerprint (another run, or another
    benchmark tool) reuses it: exporting a small-128 UNet takes minutes on a 2-core CPU.
    A change to the model's code under the same version is not in the fingerprint: clear
    the cache after one.
    """
    if cache is None:
        export(model, folder / "model.onnx", **settings)
        return folder / "model.onnx"
    digest = hashlib.sha256()
    described = {
        "export": f"{export.__module__}.{export.__qualname__}",
        "settings": settings,
        "config": model.config.to_dict(),
        "versions": [torch.__version__, nudiff_diffusion.__version__],
    }
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    cached = Path(cache) / digest.hexdigest()[:20]
    if not (cached / "model.onnx").is_file():
        partial = cached.with_name(cached.name + ".partial")  # an interrupted export is redone
        if partial.exists():
            shutil.rmtree(partial)
        export(model, partial / "model.onnx", **settings)
        os.replace(partial, cached)
    return cached / "model.onnx"


def quantized_int8(graph: Path, out: Path, *, static: bool, batch: int) -> Path:
    """An int8 copy of a plain UNet graph by ONNX Runtime's quantizer (weights int8).
    ``static``: QDQ format with uint8 activations calibrated on (x, t) at six noise levels
    of the schedule (random inputs: the weights are random too); else dynamic quantization
    (activations quantized per call: ConvInteger / MatMulInteger)."""
    import shutil

    import numpy as np
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(graph.parent / "config.json", out.parent / "config.json")
    if not static:
        quantize_dynamic(graph, out, weight_type=QuantType.QInt8)
        return out
    size = json.loads((graph.parent / "config.json").read_text())["unet"]["image_size"]

    class NoiseLevels(CalibrationDataReader):
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(3)
            self.items = iter(
                {"x": torch.randn(batch, 3, size, size, generator=g).numpy(), "t": np.full((batch,), t, np.int64)}
                for t in (999, 800, 600, 400, 200, 50)
            )

        def get_next(self) -> dict[str, Any] | None:
            return next(self.items, None)

    quantize_static(
        graph,
        out,
        NoiseLevels(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["Conv", "MatMul"],
    )
    return out


def torch_variants(cuda: bool, compile: bool, only: str | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    """(engine, precision, TorchDenoiser options) of the PyTorch rows: eager float32 first
    (every row's reference; channels-last on the CPU, as the command lines load it, then the
    plain NCHW layout), bf16 autocast; on a GPU CUDA graphs, float16 autocast; with
    ``compile``, torch.compile (bf16, and on a GPU with CUDA graphs too). ``only``: keep
    the reference and the rows whose engine name contains it."""
    layout = {} if cuda else {"channels_last": True}
    bf16 = {"dtype": torch.bfloat16, **layout}
    rows = [("pytorch eager", "fp32", layout)]
    if not cuda:
        rows.append(("pytorch eager NCHW", "fp32", {}))
    rows.append(("pytorch eager", "bf16 autocast", bf16))
    if cuda:
        rows += [
            ("pytorch eager", "fp16 autocast", {"dtype": torch.float16}),
            ("pytorch cuda graphs", "fp32", {"cuda_graphs": True}),
            ("pytorch cuda graphs", "bf16 autocast", {**bf16, "cuda_graphs": True}),
        ]
    if compile:
        rows.append(("pytorch compile", "bf16 autocast", {**bf16, "compile": True}))
        if cuda:
            both = {**bf16, "compile": True, "cuda_graphs": True}
            rows.append(("pytorch compile + cuda graphs", "bf16 autocast", both))
    return rows if only is None else [rows[0], *(row for row in rows[1:] if only in row[0])]


def engines(
    kind: str,
    model: UNet,
    tmp: Path,
    batch_max: int,
    slim: bool,
    int8: bool = False,
    *,
    onnx: bool = True,
    compile: bool = False,
    cache: Path | None = None,
    only: str | None = None,
) -> Iterator[tuple[str, str, Any]]:
    """(engine, precision, runtime) of one model: PyTorch (:func:`torch_variants`, on the
    model's device) and the ONNX exports of ``tools/export_onnx.py`` (exported here), made
    one at a time so that only one runtime (and its SPADE modulations: GBs at small-128) is
    alive. ``cache``: see :func:`export_graph`; ``only``: see :func:`torch_variants`."""
    cuda = next(model.parameters()).device.type == "cuda"
    for engine, precision, options in torch_variants(cuda, compile, only):
        # a channels-last runtime converts its model: a copy, so the others keep NCHW
        own = copy.deepcopy(model) if options.get("channels_last") else model
        if kind == "structure":
            yield (engine, precision, TorchDenoiser(own, **options))
        else:
            yield (f"{engine}, cached", precision, HistoDenoiser(own, **options))
    if not onnx:
        return
    if cuda:  # the exporter traces on the CPU, and ONNX Runtime runs there
        model = copy.deepcopy(model).cpu()
    if kind == "structure":
        for precision, slimmed in (("float32", False), ("float32", True), ("float16", False)):
            if slimmed and not slim:
                continue
            folder = tmp / f"s-{precision}-{slimmed}"
            settings = {"batch_max": batch_max, "precision": precision, "slim": slimmed}
            path = export_graph(export_onnx, model, folder, cache, **settings)
            if (precision, slimmed) == ("float32", False):
                float32_graph = path  # what the int8 rows quantize
            name = "onnxruntime" + (" slim" if slimmed else "")
            yield (name, "fp32" if precision == "float32" else "fp16", load_denoiser(path))
        for static in (False, True) if int8 else ():
            out = tmp / f"s-int8-{static}" / "model.onnx"
            path = quantized_int8(float32_graph, out, static=static, batch=batch_max)
            yield ("onnxruntime", "int8 static (QDQ)" if static else "int8 dynamic", load_denoiser(path))
        return
    exports = [
        ("uncached", "float32"),
        ("cached-modulation", "float32"),
        ("guided", "float32"),
        ("cached-modulation", "float16"),
    ]
    if slim:
        exports.append(("cached-modulation slim", "float32"))
    for layout, precision in exports:
        folder = tmp / f"h-{layout}-{precision}".replace(" ", "-")
        common: dict[str, Any] = {"batch_max": 2 * batch_max, "precision": precision, "settings": {"kind": "histo"}}
        if layout.startswith("cached-modulation"):
            path = export_graph(export_histo_onnx, model, folder, cache, slim=layout.endswith("slim"), **common)
        else:
            common["batch_max"] = batch_max if layout == "guided" else 2 * batch_max
            layout_name = "eps" if layout == "uncached" else "guided"
            path = export_graph(export_onnx, model, folder, cache, cond_channels=3, layout=layout_name, **common)
        yield (f"onnxruntime {layout}", "fp32" if precision == "float32" else "fp16", load_histo_denoiser(path))


def time_row(kind: str, runtime: Any, n: int, size: int, args: argparse.Namespace) -> dict[str, Any]:
    """ms per UNet call (the UNet sees 2n for the guided histology model), ms for the
    once-per-batch preparation of the conditions, ms per step and images/s of one --steps
    guided/plain sampling run (x0 clipped to [-1, 1] as the CLIs do), the peak memory over
    all of them (warm-up included), and the run's final sample."""
    with PeakMemory(torch.cuda.is_available()) as memory:
        row = _time_row(kind, runtime, n, size, args)
    return {**row, "peak_mib": memory.peak_mib}


def _time_row(kind: str, runtime: Any, n: int, size: int, args: argparse.Namespace) -> dict[str, Any]:
    device = getattr(runtime, "device", torch.device("cpu"))  # ONNX Runtime: CPU tensors in and out
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(n, 3, size, size, generator=g).to(device)
    t = torch.full((n,), 500, device=device)
    if kind == "histo":
        cond = (torch.rand(n, 3, size, size, generator=g) * 2 - 1).to(device)
        null = torch.zeros_like(cond)
        guided_eps = runtime.guided(cond, null, GUIDANCE)
        call = median_seconds(synced(lambda: guided_eps(x_T, t), device), args.repeat)
        del guided_eps  # its prepared modulations: one set alive at a time

        def make_eps() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
            return runtime.guided(cond, null, GUIDANCE)

        # the SPADE modulations of a batch's conditions, made once per batch: at guided()
        # in the ONNX Runtime graphs, on the first call in PyTorch's cache; either way the
        # time of guided() and a first call, less a prepared call
        first = median_seconds(synced(lambda: make_eps()(x_T, t), device), args.repeat)
        prepare = max(first - call, 0.0)
    else:
        call = median_seconds(synced(lambda: runtime.eps(x_T, t), device), args.repeat)
        prepare = 0.0

        def make_eps() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
            return runtime.eps

    stamps = [time.perf_counter()]

    def stamp(_: dict) -> None:  # the end of each step (a GPU's work included)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    eps_fn = make_eps()  # the run holds the preparation however the runtime makes it
    final = sample(
        eps_fn,
        shape=tuple(x_T.shape),
        schedule=SCHEDULE,
        steps=args.steps,
        x_T=x_T,
        clip=1.0,
        device=device,
        callback=stamp,
    ).cpu()
    run = time.perf_counter() - stamps[0]
    return {
        "ms_per_call": call * 1e3,
        "ms_prepare": prepare * 1e3,
        # the median step after the first, which holds the batch's preparation: the run
        # less a separately timed preparation could come out negative on a loaded machine
        "ms_per_step": float(np.median(np.diff(stamps)[1:])) * 1e3,
        "images_per_s": n / run,
        "final": final,
    }


def paper_seconds_per_pair(structure: UNet, histo: UNet, n: int, args: argparse.Namespace) -> dict[str, float]:
    """Seconds per synthetic pair of the paper's procedure, timed over --paper-steps
    ancestral steps of each model (PyTorch eager, float32, batch n) and scaled to 1000."""
    size = structure.config.image_size
    s_rt, h_rt = TorchDenoiser(structure), HistoDenoiser(histo, cache=False)
    device = s_rt.device
    cond = (torch.rand(n, 3, size, size) * 2 - 1).to(device)
    k = args.paper_steps
    common = {"shape": (n, 3, size, size), "schedule": SCHEDULE, "method": "ddpm", "steps": k, "device": device}
    s_run = median_seconds(synced(lambda: sample(s_rt.eps, **common), device), 1)
    sequential = h_rt.guided(cond, torch.zeros_like(cond), GUIDANCE, batched=False)
    h_run = median_seconds(synced(lambda: sample(sequential, **common), device), 1)
    return {"structure_s": s_run / k * 1000 / n, "histo_s": h_run / k * 1000 / n}


def finish(header: dict[str, Any], json_path: str | None, results: dict[str, Any]) -> None:
    """Close a benchmark run: the load average at its end next to the one at its start
    (``header["load_average_at_start"]``), and ``{"header": ..., **results}`` as JSON."""
    header["load_average_at_end"] = os.getloadavg()[0]
    print(
        f"\n# load average (1 min) at start {header['load_average_at_start']:.2f}, "
        f"at end {header['load_average_at_end']:.2f}"
    )
    if json_path:
        Path(json_path).write_text(json.dumps({"header": header, **results}, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--presets", nargs="+", default=["tiny-64", "small-128"], choices=sorted(HISTO_PRESETS), help="UNet presets"
    )
    parser.add_argument(
        "--batch", type=int_at_least(2), default=8, help="images per call (guided histology: 2x in the UNet)"
    )
    parser.add_argument(
        "--repeat", type=int_at_least(1), default=3, help="timed UNet calls per row (median, after a warm-up)"
    )
    parser.add_argument(
        "--steps",
        type=int_at_least(2, "ms per step is the median step after the first, which holds the batch's preparation"),
        default=4,
        help="sampler steps of the per-step / images/s run",
    )
    parser.add_argument(
        "--default-steps", type=int_at_least(1), default=20, help="nudiff's default sampler steps (dpmpp2m)"
    )
    parser.add_argument(
        "--paper-steps", type=int_at_least(1), default=3, help="ancestral steps timed for the paper's procedure"
    )
    parser.add_argument("--slim", action="store_true", help="also time onnxslim-simplified graphs")
    parser.add_argument("--int8", action="store_true", help="also time int8 quantized plain UNet graphs (ORT)")
    parser.add_argument("--json", help="also write header and rows as JSON")
    parser.add_argument("--device", default="auto", help="where the PyTorch rows run: auto, cpu, cuda, cuda:N")
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile (about a minute per shape on this CPU)"
    )
    parser.add_argument("--no-onnx", action="store_true", help="PyTorch rows only (e.g. a GPU without onnxruntime-gpu)")
    parser.add_argument(
        "--only",
        metavar="TEXT",
        help="PyTorch rows: only eager fp32 (the reference) and those whose engine contains TEXT "
        "(e.g. 'compile' after a run without --compile)",
    )
    add_graph_cache_argument(parser)
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc's malloc as it is (freed large tensors go back to the OS; nudiff's CLIs retain them)",
    )
    args = parser.parse_args()
    try:  # before minutes of work: the JSON's folder, the device
        check_output_file(args.json, "--json")
        if args.json and not Path(args.json).resolve().parent.is_dir():
            raise ValueError(f"--json '{args.json}': its folder does not exist")
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as exc:
        parser.error(str(exc))
    import onnxruntime

    retained = False if args.system_malloc else retain_freed_memory()

    peak, peak_note = cuda_peak_gflops(device) if device.type == "cuda" else cpu_peak_gflops()
    header = {
        "machine": describe_cpu(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": f"python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), "
        f"onnxruntime {onnxruntime.__version__} ({torch.get_num_threads()} intra-op threads, as torch)",
        "settings": f"batch {args.batch}; median of {args.repeat} calls after a warm-up; dpmpp2m {args.steps} steps "
        f"per row; guidance {GUIDANCE}; malloc: "
        + ("freed memory retained (retain_freed_memory, as the CLIs)" if retained else "glibc default"),
        "peak": peak_note,
        "peak_gflops": round(peak, 1),
        "load_average_at_start": os.getloadavg()[0],
    }
    for key, value in header.items():
        print(f"# {key}: {value}")
    print()
    print(
        "| model | preset | engine | precision | batch | ms / UNet call | ms prepare | ms / step | images / s "
        "| peak MiB | GFLOP / call | GFLOP/s | % of peak | vs eager fp32 | max abs diff of final sample |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows: list[dict[str, Any]] = []
    pair_models: dict[str, dict[str, UNet]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            for kind in ("structure", "histo"):
                model = bench_model(kind, preset).to(device)
                pair_models.setdefault(preset, {})[kind] = model
                size, n = model.config.image_size, args.batch
                unet_n = 2 * n if kind == "histo" else n
                x, t = torch.randn(unet_n, 3, size, size, device=device), torch.full((unet_n,), 500, device=device)
                cond = torch.rand(unet_n, 3, size, size, device=device) * 2 - 1 if kind == "histo" else None
                uncached = count_flops(lambda model=model, x=x, t=t, c=cond: model(x, t, c))
                cached = uncached
                if kind == "histo":
                    rt = HistoDenoiser(model)
                    prepared = rt.prepare(cond)
                    rt.eps(x, t, prepared)  # fills the cache
                    cached = count_flops(lambda rt=rt, x=x, t=t, p=prepared: rt.eps(x, t, p))
                    del rt, prepared
                reference = eager = None
                for engine, precision, runtime in engines(
                    kind,
                    model,
                    Path(tmp) / preset,
                    args.batch,
                    args.slim,
                    args.int8,
                    onnx=not args.no_onnx,
                    compile=args.compile,
                    cache=args.graph_cache,
                    only=args.only,
                ):
                    r = time_row(kind, runtime, n, size, args)
                    flops = cached if ("cached" in engine and "uncached" not in engine) else uncached
                    final = r.pop("final")
                    if reference is None:
                        reference, eager = final, r["ms_per_call"]
                    row = {
                        "model": kind,
                        "preset": preset,
                        "engine": engine,
                        "precision": precision,
                        "batch": n,
                        **r,
                        "gflop_per_call": flops / 1e9,
                        "gflop_per_s": flops / r["ms_per_call"] / 1e6,
                        "percent_of_peak": 100 * flops / r["ms_per_call"] / 1e6 / peak,
                        "speedup_vs_eager_fp32": eager / r["ms_per_call"],
                        "final_max_abs_diff": float((final - reference).abs().max()),
                    }
                    rows.append(row)
                    del runtime, final
                    print(
                        f"| {kind} | {preset} | {engine} | {precision} | {n} | {row['ms_per_call']:.1f} | "
                        f"{row['ms_prepare']:.1f} | {row['ms_per_step']:.1f} | {row['images_per_s']:.2f} | "
                        f"{row['peak_mib']:.0f} | "
                        f"{row['gflop_per_call']:.1f} | {row['gflop_per_s']:.0f} | {row['percent_of_peak']:.0f}% | "
                        f"{row['speedup_vs_eager_fp32']:.2f}x | {row['final_max_abs_diff']:.1e} |",
                        flush=True,
                    )
    print()
    print("| preset | procedure | s / synthetic pair | ratio |")
    print("|---|---|---|---|")
    pairs = []
    for preset, models in pair_models.items():
        paper = paper_seconds_per_pair(models["structure"], models["histo"], args.batch, args)
        paper_s = paper["structure_s"] + paper["histo_s"]

        def per_pair(kind: str, engine_prefix: str, preset: str = preset) -> float:
            """Seconds per image of the fastest float32 variant: one preparation of the
            batch's conditions and --default-steps steps, over the batch."""
            seconds = [
                (r["ms_prepare"] + r["ms_per_step"] * args.default_steps) / 1e3 / r["batch"]
                for r in rows
                if r["preset"] == preset
                and r["model"] == kind
                and r["engine"].startswith(engine_prefix)
                and r["precision"] == "fp32"
            ]
            return min(seconds)

        procedures = [
            (
                f"paper: 1000 ddpm structure + 1000 x 2 sequential image steps, eager fp32 "
                f"(extrapolated from {args.paper_steps} steps)",
                paper_s,
            ),
            (
                f"nudiff default, PyTorch: dpmpp2m {args.default_steps} + {args.default_steps} steps, "
                "batched guidance, SPADE cache, fastest fp32 variant",
                per_pair("structure", "pytorch") + per_pair("histo", "pytorch"),
            ),
        ]
        if not args.no_onnx:
            procedures.append(
                (
                    f"nudiff default, ONNX Runtime: dpmpp2m {args.default_steps} + {args.default_steps} steps, "
                    "fastest fp32 graphs",
                    per_pair("structure", "onnxruntime") + per_pair("histo", "onnxruntime"),
                )
            )
        for name, seconds in procedures:
            pairs.append(
                {"preset": preset, "procedure": name, "seconds_per_pair": seconds, "ratio_vs_paper": paper_s / seconds}
            )
            print(f"| {preset} | {name} | {seconds:.2f} | {paper_s / seconds:.0f}x |")
    finish(header, args.json, {"rows": rows, "pairs": pairs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
