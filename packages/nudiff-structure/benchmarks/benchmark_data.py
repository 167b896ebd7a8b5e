"""Building the structure dataset: seconds to encode the Kumar training tiles per preset
(first build, then from the cache). Run: ``python packages/nudiff-structure/benchmarks/benchmark_data.py``."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from nudiff_structure import build_structures

SHARED = Path(os.environ.get("NUDIFF_SHARED", Path(__file__).resolve().parents[4] / "shared"))


def main() -> int:
    data = SHARED / "data" / "monuseg-train"
    if not (data / "instance_maps").is_dir():
        print(f"no Kumar data at {data}; set NUDIFF_SHARED")
        return 1
    tiles = len(list((data / "instance_maps").iterdir()))
    print(f"# nudiff-structure dataset build, {os.cpu_count()} cores, {tiles} tiles")
    print("| preset | patches | first build | from cache |")
    print("|---|---|---|---|")
    for preset in ("tiny-64", "small-128", "paper-256"):
        cache = Path(tempfile.mkdtemp())
        t0 = time.perf_counter()
        s, _ = build_structures(data, preset, cache_dir=cache)
        t1 = time.perf_counter()
        build_structures(data, preset, cache_dir=cache)
        t2 = time.perf_counter()
        print(f"| {preset} | {len(s)} | {t1 - t0:.2f} s | {t2 - t1:.2f} s |")
        shutil.rmtree(cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
