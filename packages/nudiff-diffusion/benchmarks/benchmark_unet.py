"""ADM UNet presets: parameters, FLOPs per forward, and forward / forward+backward time on
this machine's CPU (median of a few runs after a warm-up).

Run: ``python packages/nudiff-diffusion/benchmarks/benchmark_unet.py [--with-paper]``
(``--with-paper`` adds the 553 M-parameter ``paper-256`` preset: about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch
from nudiff_diffusion import UNet, UNetConfig, median_seconds
from torch.utils.flop_counter import FlopCounterMode


def _flops(config: UNetConfig) -> float:
    with torch.device("meta"):
        model = UNet(config)
        x = torch.randn(1, config.in_channels, config.image_size, config.image_size)
        with FlopCounterMode(display=False) as counter:
            model(x, torch.tensor([1]))
    return counter.get_total_flops()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--with-paper", action="store_true", help="also time the paper-256 preset")
    args = parser.parse_args()
    print("# nudiff-diffusion UNet benchmark")
    print(
        f"# machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), float32"
    )
    print()
    print("| preset | image | parameters | GFLOP / forward (batch 1) | batch | forward | forward + backward |")
    print("|---|---|---|---|---|---|---|")
    cases = [("tiny-64", (1, 8)), ("small-128", (1, 4))] + ([("paper-256", (1,))] if args.with_paper else [])
    for name, batches in cases:
        config = UNetConfig.preset(name)
        model = UNet(config)
        n = sum(p.numel() for p in model.parameters())
        gflop = _flops(config) / 1e9
        for batch in batches:
            x = torch.randn(batch, config.in_channels, config.image_size, config.image_size)
            t = torch.randint(1000, (batch,))

            def forward(model: UNet = model, x: torch.Tensor = x, t: torch.Tensor = t) -> None:
                with torch.no_grad():
                    model(x, t)

            def forward_backward(model: UNet = model, x: torch.Tensor = x, t: torch.Tensor = t) -> None:
                model.zero_grad(set_to_none=True)
                model(x, t).square().mean().backward()

            repeat = 3 if name == "paper-256" else 5
            fwd, fwd_bwd = median_seconds(forward, repeat), median_seconds(forward_backward, repeat)
            print(
                f"| {name} | {config.image_size} | {n / 1e6:.2f} M | {gflop:.1f} | {batch} | "
                f"{fwd * 1e3:.0f} ms | {fwd_bwd * 1e3:.0f} ms |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
