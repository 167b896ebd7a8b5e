"""ResNet patch embeddings on this machine's CPU: patches per second by patch size
(median of a few runs after a warm-up; random weights time the same as ImageNet ones).

Run: ``python packages/nudiff-seg/benchmarks/benchmark_features.py``
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import numpy as np
import torch
from nudiff_seg import patch_embeddings, resnet18, resnet50


def main() -> int:
    print("# nudiff-seg patch embeddings")
    print(
        f"# machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), float32, batch 32, median of 3 runs"
    )
    print()
    print("| network | patch | patches / s |")
    print("|---|---|---|")
    rng = np.random.default_rng(0)
    for name, build in (("resnet18", resnet18), ("resnet50", resnet50)):
        model = build().eval()
        for size in (64, 128, 256):
            images = rng.integers(0, 256, (32, size, size, 3), dtype=np.uint8)
            patch_embeddings(images[:4], model)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                patch_embeddings(images, model, batch=32)
                times.append(time.perf_counter() - t0)
            print(f"| {name} | {size} px | {32 / statistics.median(times):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
