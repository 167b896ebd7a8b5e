"""Sampling engines on this machine: ms per UNet call and per sampler step, images per second,
for PyTorch eager and ONNX Runtime, plain (structure) and SPADE (histology) UNets.

    python tools/bench_sampling.py [--presets tiny-64 small-128] [--batch 8] [--json out.json]

Random weights (timing does not depend on them); float32; median of --repeat runs after a
warm-up. The ONNX graphs are exported into a temporary folder first (tens of seconds each).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import torch
from nudiff_diffusion import (
    NoiseSchedule,
    TorchDenoiser,
    UNet,
    UNetConfig,
    export_onnx,
    guided,
    load_denoiser,
    median_seconds,
    sample,
)
from nudiff_histo import HistoDenoiser, build_histo_unet
from torch.utils.flop_counter import FlopCounterMode


def _flops(model: UNet, batch: int, cond: bool) -> float:
    size = model.config.image_size
    x = torch.randn(batch, 3, size, size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, torch.zeros(batch, dtype=torch.int64), torch.zeros_like(x) if cond else None)
    return counter.get_total_flops()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny-64", "small-128"], help="UNet presets")
    parser.add_argument("--batch", type=int, default=8, help="images per call (guided histology: 2x in the UNet)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per row (median)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps for the per-step and images/s columns")
    parser.add_argument("--json", help="also write the rows as JSON")
    args = parser.parse_args()
    print("# nudiff sampling engines")
    import onnxruntime

    print(
        f"# machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}; float32; batch {args.batch}; "
        f"dpmpp2m {args.steps} steps; median of {args.repeat}"
    )
    print()
    print("| model | preset | engine | ms / UNet call | ms / step | images / s | GFLOP/s | vs eager |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    schedule = NoiseSchedule.linear(1000)
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            for kind in ("structure", "histo"):
                torch.manual_seed(0)
                if kind == "structure":
                    model = UNet(UNetConfig.preset(preset)).eval()
                    torch_rt = TorchDenoiser(model)
                else:
                    model = build_histo_unet(preset).eval()
                    torch_rt = HistoDenoiser(model)
                size, n = model.config.image_size, args.batch
                unet_batch = 2 * n if kind == "histo" else n
                path = Path(tmp) / f"{kind}-{preset}" / "model.onnx"
                export_onnx(model, path, cond_channels=3 if kind == "histo" else 0, batch_max=unet_batch)
                ort_rt = load_denoiser(path)
                flops = _flops(model, unet_batch, kind == "histo")
                x = torch.randn(unet_batch, 3, size, size)
                t = torch.full((unet_batch,), 500)
                cond = torch.rand(n, 3, size, size) * 2 - 1
                eager_call = None
                for engine, rt in (("pytorch eager", torch_rt), ("onnxruntime", ort_rt)):
                    if kind == "histo":
                        prepared = rt.prepare(torch.cat([cond, torch.zeros_like(cond)]))
                        call = median_seconds(lambda rt=rt, p=prepared, x=x, t=t: rt.eps(x, t, p), args.repeat)
                        eps = guided(rt.eps, cond, torch.zeros_like(cond), 2.0, prepare=rt.prepare)
                    else:
                        call = median_seconds(lambda rt=rt, x=x, t=t: rt.eps(x, t), args.repeat)
                        eps = rt.eps
                    shape = (n, 3, size, size)
                    run = median_seconds(
                        lambda eps=eps, shape=shape: sample(eps, shape=shape, schedule=schedule, steps=args.steps),
                        max(1, args.repeat // 2),
                    )
                    eager_call = eager_call or call
                    row = {
                        "model": kind,
                        "preset": preset,
                        "engine": engine,
                        "ms_per_call": call * 1e3,
                        "ms_per_step": run / args.steps * 1e3,
                        "images_per_s": n / run,
                        "gflop_per_s": flops / call / 1e9,
                        "speedup_vs_eager": eager_call / call,
                    }
                    rows.append(row)
                    print(
                        f"| {kind} | {preset} | {engine} | {row['ms_per_call']:.1f} | {row['ms_per_step']:.1f} | "
                        f"{row['images_per_s']:.2f} | {row['gflop_per_s']:.1f} | {row['speedup_vs_eager']:.2f}x |"
                    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
