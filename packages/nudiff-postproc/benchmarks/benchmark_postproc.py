"""nudiff-postproc speed: asv-style benchmark classes and a runner that prints a table.

Run: ``make bench`` or ``python packages/nudiff-postproc/benchmarks/benchmark_postproc.py
[--repeat N] [--shared DIR]``. Uses the Kumar tiles and parity fixtures in ../shared when
present (the numbers in the README come from them), else procedurally generated maps.
Each row is the median of ``--repeat`` timed runs after one warm-up run (5x as many for
the millisecond-scale 256 px watershed rows, a third as many for the batch).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import nudiff_postproc as npp
import numpy as np
from scipy import ndimage as ndi

SHARED = Path(os.environ.get("NUDIFF_SHARED", Path(__file__).resolve().parents[4] / "shared"))


def _kumar_map() -> np.ndarray:
    path = SHARED / "data" / "monuseg-train" / "instance_maps" / "TCGA-18-5592-01Z-00-DX1.png"
    if path.is_file():
        return npp.read_instance_map(path)
    return npp.synthetic_instance_map((1000, 1000), n_nuclei=700, seed=0)


def _noisy_preds(n: int) -> np.ndarray:
    path = SHARED / "fixtures" / "parity_kumar256.npz"
    if path.is_file():
        with np.load(path) as data:
            base = data["noisy_pred"][:24].astype(np.float32)
    else:
        rng = np.random.default_rng(0)
        base = []
        for seed in range(24):
            s = npp.encode_structure(npp.synthetic_instance_map((256, 256), n_nuclei=90, seed=seed))
            s = ndi.gaussian_filter(s, (1, 1, 0)) + rng.normal(0, 0.1, s.shape)
            s[..., 0] = np.clip(s[..., 0], 0, 1)
            base.append(s.astype(np.float32))
        base = np.stack(base)
    return np.stack([base[i % len(base)] for i in range(n)])


class HVMaps:
    def setup(self) -> None:
        self.tile = _kumar_map()
        self.crop = self.tile[372:628, 372:628].copy()

    def time_hv_maps_1000(self) -> None:
        npp.hv_maps(self.tile)

    def time_hv_maps_256(self) -> None:
        npp.hv_maps(self.crop)


class Watershed:
    def setup(self) -> None:
        self.preds = _noisy_preds(256)

    def time_one_pass_256(self) -> None:
        # cycle through the 24 distinct crops so no result is cached anywhere
        self.i = (getattr(self, "i", -1) + 1) % 24
        npp.instances_from_structure(self.preds[self.i])

    def time_eight_pass_256(self) -> None:
        self.j = (getattr(self, "j", -1) + 1) % 24
        npp.instances_from_structure(self.preds[self.j], orientations=8)

    def time_batch_256x256_2_workers(self) -> None:
        npp.instances_from_structures(self.preds, workers=2)


class Metrics:
    def setup(self) -> None:
        self.true = _kumar_map()
        rng = np.random.default_rng(0)
        pred = ndi.grey_dilation(self.true, size=3)
        pred[rng.random(pred.shape) < 0.002] = 0
        self.pred = np.where(pred > 0, pred * 7 + 3, 0)

    def time_evaluate_1000(self) -> None:
        npp.evaluate(self.true, self.pred)


# reference timings of the reference code on a 2-core machine, and nudiff's targets (seconds)
ROWS = [
    ("hv_maps 1000x1000 (Kumar tile)", HVMaps, "time_hv_maps_1000", "0.18-0.24 s", 0.010),
    ("hv_maps 256x256", HVMaps, "time_hv_maps_256", "4.0 ms", None),
    ("watershed 1 pass 256x256", Watershed, "time_one_pass_256", "4.4 ms", 0.003),
    ("watershed 8 passes 256x256 (Nudiff)", Watershed, "time_eight_pass_256", "29.6 ms", None),
    ("256 structures 256x256, 2 workers", Watershed, "time_batch_256x256_2_workers", "-", 0.6),
    ("evaluate 1000x1000 (6 metrics)", Metrics, "time_evaluate_1000", "3.2-6.3 s", 0.060),
]


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main() -> int:
    global SHARED
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=21, help="timed runs per row (median reported)")
    parser.add_argument("--shared", default=str(SHARED), help="the shared/ folder (data and fixtures)")
    args = parser.parse_args()
    SHARED = Path(args.shared)
    import scipy
    import skimage

    print(f"# nudiff-postproc {npp.__version__} benchmark")
    print(f"# machine: {npp.describe_cpu()}")
    print(
        f"# python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
        f"scikit-image {skimage.__version__}"
    )
    print(
        f"# data: {'Kumar tiles and parity fixtures from ' + str(SHARED) if SHARED.is_dir() else 'procedural'}; "
        f"median of {args.repeat} runs after a warm-up ({args.repeat * 5} for the 256 px watershed rows, "
        f"{max(5, args.repeat // 3)} for the batch)"
    )
    print()
    header = f"| {'operation':<38} | {'nudiff':>10} | {'reference code':>14} | {'target':>9} | {'met':>3} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    instances: dict[type, object] = {}
    all_met = True
    for label, cls, method, reference, target in ROWS:
        if cls not in instances:
            obj = cls()
            obj.setup()
            instances[cls] = obj
        fn = getattr(instances[cls], method)
        fn()
        # single calls on 256 px: many more runs (they take milliseconds on a noisy VM)
        repeat = max(5, args.repeat // 3) if "batch" in method else args.repeat * (5 if "pass" in method else 1)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        met = "-" if target is None else ("yes" if median <= target else "NO")
        all_met &= met != "NO"
        target_txt = "-" if target is None else _fmt(target)
        print(f"| {label:<38} | {_fmt(median):>10} | {reference:>14} | {target_txt:>9} | {met:>3} |")
    return 0 if all_met else 1


if __name__ == "__main__":
    sys.exit(main())
