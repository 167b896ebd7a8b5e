"""The main job until the full pipeline lands: nudiff-postproc on a bundled example.

A nuclei layout (procedurally generated, or the first tile of the dataset folder that
``NUDIFF_DATA`` points at) is encoded as a structure, degraded the way a network's output
is (blur and noise), turned back into instances with HoVer-Net's watershed, and scored.
Prints the metrics and timings; writes ``demo_out/postproc_demo.png``.

Usage: ``make demo`` (or ``python tools/demo.py [--data DIR] [--out DIR] [--seed S]``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nudiff_postproc as npp
import numpy as np
from scipy import ndimage as ndi
from skimage.color import label2rgb
from skimage.segmentation import find_boundaries


def _example(data: str | None, size: int, seed: int) -> tuple[str, np.ndarray]:
    if data:
        maps = sorted(
            p for p in (Path(data) / "instance_maps").iterdir() if p.suffix.lower() in (".png", ".tif", ".mat")
        )
        if not maps:
            raise SystemExit(f"demo: no instance maps in '{data}/instance_maps'")
        inst = npp.read_instance_map(maps[0])
        r0, c0 = (inst.shape[0] - size) // 2, (inst.shape[1] - size) // 2
        return f"{maps[0].name} (centre {size}x{size} crop)", inst[r0 : r0 + size, c0 : c0 + size]
    return f"procedural example (seed {seed})", npp.synthetic_instance_map((size, size), n_nuclei=90, seed=seed)


def _picture(inst: np.ndarray, structure: np.ndarray, pred: np.ndarray, out: np.ndarray) -> np.ndarray:
    def grey(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
        g = np.clip((x - lo) / (hi - lo), 0, 1)
        return (np.repeat(g[..., None], 3, -1) * 255).astype(np.uint8)

    def labels(x: np.ndarray) -> np.ndarray:
        rgb = (label2rgb(x, bg_label=0) * 255).astype(np.uint8)
        rgb[find_boundaries(x, mode="inner")] = 255
        return rgb

    gap = np.full((inst.shape[0], 4, 3), 255, np.uint8)
    panels = [
        labels(inst),
        grey(structure[..., 1], -1, 1),
        grey(structure[..., 2], -1, 1),
        grey(pred[..., 0], 0, 1),
        labels(out),
    ]
    row = [panels[0]]
    for p in panels[1:]:
        row += [gap, p]
    return np.concatenate(row, axis=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("NUDIFF_DATA"), help="dataset folder (default: $NUDIFF_DATA)")
    parser.add_argument("--out", default="demo_out", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the example and of the noise")
    args = parser.parse_args()

    name, inst = _example(args.data, 256, args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    structure = npp.encode_structure(inst)
    t_encode = time.perf_counter() - t0
    # what a segmentation network's output looks like: blurred, noisy, probability in [0, 1]
    pred = ndi.gaussian_filter(structure, sigma=(1.5, 1.5, 0)) + rng.normal(0, 0.1, structure.shape)
    pred[..., 0] = np.clip(pred[..., 0], 0, 1)
    pred = pred.astype(np.float32)

    print(f"nudiff-postproc {npp.__version__} demo on {name}: {len(np.unique(inst)) - 1} nuclei, {inst.shape}")
    print(f"encode_structure: {t_encode * 1e3:.1f} ms")
    rows = []
    for orientations in (1, 8):
        t0 = time.perf_counter()
        out = npp.instances_from_structure(pred, orientations=orientations)
        dt = time.perf_counter() - t0
        rows.append((orientations, int(out.max()), dt, npp.evaluate(inst, out)))
        if orientations == 1:
            first = out
    print(f"\n{'watershed':<22}{'nuclei':>7}{'ms':>8}" + "".join(f"{k:>9}" for k in npp.METRIC_KEYS))
    for orientations, count, dt, m in rows:
        label = "HoVer-Net (1 pass)" if orientations == 1 else "Nudiff (8 passes)"
        print(f"{label:<22}{count:>7}{dt * 1e3:>8.1f}" + "".join(f"{m[k]:>9.4f}" for k in npp.METRIC_KEYS))

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    picture = out_dir / "postproc_demo.png"
    npp.write_image(picture, _picture(inst, structure, pred, first))
    print(f"\nwrote {picture}: true instances | h map | v map | predicted probability | watershed instances")
    return 0


if __name__ == "__main__":
    sys.exit(main())
