"""nudiff-diffusion samplers: error against steps on Gaussian data, and per-step overhead.

Run: ``python packages/nudiff-diffusion/benchmarks/benchmark_samplers.py``. For data
x0 ~ N(0.3, 0.5^2) the exact noise predictor is known, so the error of each sampler and
spacing is the sampler's own; the overhead rows time everything but the model call (the
model is the closed-form predictor, a few elementwise operations).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import torch
from nudiff_diffusion import NoiseSchedule, gaussian_eps_fn, sample

MU, S = 0.3, 0.5
SCHEDULE = NoiseSchedule.linear(1000)
gaussian_eps = gaussian_eps_fn(SCHEDULE, MU, S)


def main() -> int:
    torch.set_num_threads(os.cpu_count() or 1)
    print("# nudiff-diffusion sampler benchmark")
    print(
        f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )
    print("# Gaussian data N(0.3, 0.5^2), 8192 samples of 1x8x8, seed 0: |std - 0.5| (mean error in brackets)")
    print()
    steps_list = (10, 20, 50, 100, 250, 1000)
    print("| sampler, spacing | " + " | ".join(f"{k} steps" for k in steps_list) + " |")
    print("|---|" + "---|" * len(steps_list))
    for method, spacing in [
        ("ddpm", "uniform"),
        ("ddim", "uniform"),
        ("ddim", "logsnr"),
        ("ddim", "quadratic"),
        ("dpmpp2m", "uniform"),
        ("dpmpp2m", "logsnr"),
        ("dpmpp2m", "quadratic"),
    ]:
        cells = []
        for steps in steps_list:
            x = sample(
                gaussian_eps,
                shape=(8192, 1, 8, 8),
                schedule=SCHEDULE,
                method=method,
                steps=steps,
                spacing=spacing,
                generator=torch.Generator().manual_seed(0),
            )
            cells.append(f"{abs(x.std().item() - S):.3f} ({abs(x.mean().item() - MU):.3f})")
        print(f"| {method}, {spacing} | " + " | ".join(cells) + " |")
    print()
    print("| sampler | overhead per step, batch 16 x 3 x 256 x 256 (median of 5) |")
    print("|---|---|")
    for method in ("ddpm", "ddim", "dpmpp2m"):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            sample(
                lambda x, t: torch.zeros_like(x),
                shape=(16, 3, 256, 256),
                schedule=SCHEDULE,
                method=method,
                steps=20,
                generator=torch.Generator().manual_seed(0),
            )
            times.append((time.perf_counter() - t0) / 20)
        print(f"| {method} | {statistics.median(times) * 1e3:.2f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
