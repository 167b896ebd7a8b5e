"""HoVer-Net on this machine: a training step, a forward window, and a whole 1000x1000 tile
(tiled prediction + watershed) per preset (median of runs after a warm-up).

Run: ``python packages/nudiff-seg/benchmarks/benchmark_hovernet.py [--presets light tiny] [--repeat 3]``.
Uses a Kumar tile from ../shared when present (else random pixels: the model time is the
same, the watershed time differs).
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import numpy as np
import torch
from nudiff_diffusion import median_seconds  # the benchmarks' shared timer (nudiff-seg[test] installs it)
from nudiff_seg import build_hovernet, hovernet_loss, predict_instances

SHARED = Path(os.environ.get("NUDIFF_SHARED", Path(__file__).resolve().parents[4] / "shared"))


def _tile() -> np.ndarray:
    path = SHARED / "data" / "monuseg-train" / "images" / "TCGA-21-5786-01Z-00-DX1.tif"
    if path.is_file():
        from nudiff_postproc import read_image

        return read_image(path)
    return np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)


def _row(name: str, batch: int, repeat: int, tile: np.ndarray) -> str:
    torch.manual_seed(0)
    model = build_hovernet(name)
    size, out = model.config.input_size, model.config.output_size
    x = torch.rand(batch, 3, size, size)
    np_t = (torch.rand(batch, out, out) > 0.5).float()
    hv_t = torch.rand(batch, 2, out, out) * 2 - 1
    opt = torch.optim.Adam(model.parameters(), 1e-4)

    def step() -> None:
        model.train()
        loss, _ = hovernet_loss(model(x), np_t, hv_t)
        opt.zero_grad()
        loss.backward()
        opt.step()

    train = median_seconds(step, repeat) / batch
    model.eval()
    x8 = torch.rand(8, 3, size, size)
    with torch.no_grad():
        fwd = median_seconds(lambda: model(x8), repeat) / 8
    whole = median_seconds(lambda: predict_instances(model, tile, batch=8), repeat)
    return f"| {name} | {train:.3f} | {fwd * 1e3:.0f} | {whole:.2f} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["tiny", "light"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="training batch")
    args = parser.parse_args(argv)
    print("# nudiff-seg HoVer-Net")
    print(
        f"# machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), float32, training batch {args.batch}, median of {args.repeat} runs"
    )
    print()
    print(
        "| preset | train step per window (s) | forward per window (ms, batch 8) "
        "| 1000x1000 tile: predict + watershed (s) |"
    )
    print("|---|---:|---:|---:|")
    tile = _tile()
    for name in args.presets:
        print(_row(name, args.batch, args.repeat, tile), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
