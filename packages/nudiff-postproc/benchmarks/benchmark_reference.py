"""nudiff's watershed against HoVer-Net's own post-processing, on the same host, interleaved.

The absolute targets of ``benchmark_postproc.py`` were set against the reference code's
timings on one host; this VM's hosts differ by up to 2x between sessions. This script times
the reference beside nudiff in one process, in alternating rounds, so that the ratio holds
on any host.

The reference is HoVer-Net's ``__proc_np_hv`` (hover_net/models/hovernet/post_proc.py) as
written there, with OpenCV, which nudiff itself never imports. OpenCV is no dependency of
any nudiff package: install it somewhere else and point ``--opencv`` there, for example

    pip install --target /tmp/cvlib opencv-python-headless && rm -rf /tmp/cvlib/numpy*
    python packages/nudiff-postproc/benchmarks/benchmark_reference.py --opencv /tmp/cvlib

Before timing, it checks that the transcription reproduces ``postproc_single`` of the
parity fixtures (``../shared/fixtures``) and that nudiff equals it, both up to relabelling.
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
from scipy.ndimage import binary_fill_holes
from skimage.segmentation import watershed

SHARED = Path(os.environ.get("NUDIFF_SHARED", Path(__file__).resolve().parents[4] / "shared"))


def _remove_small_objects(labels: np.ndarray, min_size: int = 10) -> np.ndarray:
    """scikit-image's ``remove_small_objects(labels, min_size)`` before 0.26: sizes < min_size go."""
    out = labels.copy()
    out[(np.bincount(labels.ravel()) < min_size)[labels]] = 0
    return out


def hovernet_proc_np_hv(pred: np.ndarray, cv2) -> np.ndarray:  # noqa: ANN001  (the cv2 module)
    """HoVer-Net's ``__proc_np_hv``, line by line (``measurements.label`` is ``ndi.label``)."""
    pred = np.array(pred, dtype=np.float32)
    blb = np.array(pred[..., 0] >= 0.5, dtype=np.int32)
    blb = _remove_small_objects(ndi.label(blb)[0])
    blb[blb > 0] = 1
    h_dir = cv2.normalize(pred[..., 1], None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    v_dir = cv2.normalize(pred[..., 2], None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    sobelh = cv2.Sobel(h_dir, cv2.CV_64F, 1, 0, ksize=21)
    sobelv = cv2.Sobel(v_dir, cv2.CV_64F, 0, 1, ksize=21)
    sobelh = 1 - cv2.normalize(sobelh, None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    sobelv = 1 - cv2.normalize(sobelv, None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    overall = np.maximum(sobelh, sobelv)
    overall = overall - (1 - blb)
    overall[overall < 0] = 0
    dist = (1.0 - overall) * blb
    dist = -cv2.GaussianBlur(dist, (3, 3), 0)
    overall = np.array(overall >= 0.4, dtype=np.int32)
    marker = blb - overall
    marker[marker < 0] = 0
    marker = binary_fill_holes(marker).astype("uint8")
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    marker = cv2.morphologyEx(marker, cv2.MORPH_OPEN, kernel)
    marker = _remove_small_objects(ndi.label(marker)[0])
    return watershed(dist, markers=marker, mask=blb)


def _same_up_to_relabelling(a: np.ndarray, b: np.ndarray) -> bool:
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def _median_call(fn, preds: np.ndarray, calls: int) -> float:  # noqa: ANN001
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        fn(preds[i % len(preds)])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--opencv", help="a folder holding the cv2 package (pip install --target ...)")
    parser.add_argument("--rounds", type=int, default=20, help="alternating rounds (median of rounds reported)")
    parser.add_argument("--calls", type=int, default=48, help="calls per round and side")
    parser.add_argument("--batch-repeat", type=int, default=3, help="timed runs of the 256-structure batch")
    parser.add_argument("--shared", default=str(SHARED), help="the shared/ folder (parity fixtures)")
    args = parser.parse_args()
    if args.opencv:
        sys.path.append(args.opencv)
    try:
        import cv2
    except ImportError:
        print(
            "benchmark_reference: OpenCV is needed for the reference (and is no dependency of nudiff): "
            "pip install --target /tmp/cvlib opencv-python-headless, then --opencv /tmp/cvlib",
            file=sys.stderr,
        )
        return 2
    fixtures = Path(args.shared) / "fixtures" / "parity_kumar256.npz"
    if not fixtures.is_file():
        print(f"benchmark_reference: parity fixtures not found: '{fixtures}'", file=sys.stderr)
        return 2
    with np.load(fixtures) as data:
        preds = data["noisy_pred"][:24].astype(np.float32)
        expected = data["postproc_single"][:24]

    def reference(pred: np.ndarray) -> np.ndarray:
        return hovernet_proc_np_hv(pred, cv2)

    ref_ok = sum(_same_up_to_relabelling(reference(p), e) for p, e in zip(preds, expected, strict=True))
    ours_ok = sum(_same_up_to_relabelling(npp.instances_from_structure(p), reference(p)) for p in preds)
    import scipy
    import skimage

    print(f"# nudiff-postproc {npp.__version__} against HoVer-Net's __proc_np_hv (OpenCV {cv2.__version__})")
    print(f"# machine: {npp.describe_cpu()}")
    print(
        f"# python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
        f"scikit-image {skimage.__version__}, OpenCV threads {cv2.getNumThreads()}"
    )
    print(
        f"# the transcription equals the fixtures' postproc_single on {ref_ok}/24 crops; "
        f"nudiff equals the transcription on {ours_ok}/24"
    )
    print(f"# one pass: {args.rounds} alternating rounds of {args.calls} calls each on the 24 noisy Kumar crops")
    print()
    ours_t, ref_t, ratios = [], [], []
    for _ in range(args.rounds):
        ours_t.append(_median_call(npp.instances_from_structure, preds, args.calls))
        ref_t.append(_median_call(reference, preds, args.calls))
        ratios.append(ours_t[-1] / ref_t[-1])
    batch = np.stack([preds[i % len(preds)] for i in range(256)])
    ours_b, ref_b = [], []
    for _ in range(args.batch_repeat):
        t0 = time.perf_counter()
        npp.instances_from_structures(batch, workers=2)
        ours_b.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for pred in batch:
            reference(pred)
        ref_b.append(time.perf_counter() - t0)
    print("| | nudiff | reference (OpenCV) | nudiff / reference |")
    print("|---|---|---|---|")
    print(
        f"| one pass, 256x256 (median of rounds) | {statistics.median(ours_t) * 1e3:.2f} ms | "
        f"{statistics.median(ref_t) * 1e3:.2f} ms | {statistics.median(ratios):.2f} "
        f"(rounds {min(ratios):.2f}-{max(ratios):.2f}) |"
    )
    ob, rb = statistics.median(ours_b), statistics.median(ref_b)
    print(f"| 256 structures, nudiff on 2 workers, the reference in a loop | {ob:.3f} s | {rb:.3f} s | {ob / rb:.2f} |")
    return 0 if ref_ok == ours_ok == len(preds) else 1


if __name__ == "__main__":
    sys.exit(main())
