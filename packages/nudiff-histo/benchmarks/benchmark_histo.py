"""Histology UNet: what the SPADE modulation cache and batched guidance save per sampling
step on this machine's CPU, and seconds per image of the paper's procedure against nudiff's.

Expected before measuring: the cache removes the SPADE MLPs (conv3x3 3 -> hidden -> 2 x C at
SPADE layer: the middle and decoder residual blocks) from every step after the first, so the per-call time should fall
by about their share of the forward FLOPs (printed as "predicted"); batching the two halves of
guidance does the same arithmetic as two calls, so on a CPU it should save little (larger
matrix products use the cores a little better), on a GPU more (fewer launches, fuller kernels).

Run: ``python packages/nudiff-histo/benchmarks/benchmark_histo.py [--with-paper] [--procedure]``
(``--with-paper`` adds the 553 M-parameter paper-256 preset at batch 1, minutes on 2 cores;
``--procedure`` times whole samplings of the tiny-64 model: 1000 ancestral steps with two
uncached calls per step, the paper's, against nudiff's default).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from nudiff_diffusion import median_seconds
from nudiff_histo import HistoDenoiser, ModulationCache, build_histo_unet, paint_images
from torch.utils.flop_counter import FlopCounterMode


def _spade_share(preset: str) -> tuple[int, float]:
    """Parameters and the share of forward FLOPs spent in the SPADE modulation MLPs."""
    with torch.device("meta"):
        model = build_histo_unet(preset)
        size = model.config.image_size
        x, cond = torch.randn(1, 3, size, size), torch.randn(1, 3, size, size)
        with FlopCounterMode(display=False) as total:
            model(x, torch.tensor([1]), cond)
        with FlopCounterMode(display=False) as spade:
            cache = ModulationCache(cond)
            model(x, torch.tensor([1]), cache)  # fills the cache: exactly the SPADE MLPs extra
        with FlopCounterMode(display=False) as cached:
            model(x, torch.tensor([1]), cache)
    params = sum(p.numel() for p in build_histo_unet(preset).parameters())
    share = 1 - cached.get_total_flops() / total.get_total_flops()
    assert abs(spade.get_total_flops() - total.get_total_flops()) < 1e-6 * total.get_total_flops()
    return params, share


def _time_preset(preset: str, n: int, repeat: int) -> tuple[float, float, float, float]:
    """Seconds per call: uncached, cached, two uncached calls (cond + zeros), guided 2N cached."""
    torch.manual_seed(0)
    model = build_histo_unet(preset).eval()
    size = model.config.image_size
    x, cond = torch.randn(n, 3, size, size), torch.rand(n, 3, size, size) * 2 - 1
    zeros, t = torch.zeros_like(cond), torch.full((n,), 500)
    x2, t2 = torch.cat([x, x]), torch.cat([t, t])
    with torch.no_grad():
        cache, both = ModulationCache(cond), ModulationCache(torch.cat([cond, zeros]))
        model(x, t, cache)  # fill the caches (the first step of a sampling run)
        model(x2, t2, both)
        return (
            median_seconds(lambda: model(x, t, cond), repeat),
            median_seconds(lambda: model(x, t, cache), repeat),
            median_seconds(lambda: (model(x, t, cond), model(x, t, zeros)), repeat),
            median_seconds(lambda: model(x2, t2, both), repeat),
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--with-paper", action="store_true", help="also time paper-256 (batch 1)")
    parser.add_argument("--procedure", action="store_true", help="time whole samplings of tiny-64")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per row (median)")
    args = parser.parse_args()
    print("# nudiff-histo benchmark: cost of one sampling step")
    print(
        f"# machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), float32, median of {args.repeat} runs"
    )
    print()
    print(
        "| preset | parameters | N | uncached call (N) | cached call (N) | saved: measured / predicted "
        "| two uncached calls (paper) | guided 2N, cached (nudiff) | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    cases = [("tiny-64", 4), ("small-128", 2)] + ([("paper-256", 1)] if args.with_paper else [])
    for preset, n in cases:
        params, share = _spade_share(preset)
        uncached, cached, paper, nudiff = _time_preset(preset, n, repeat=args.repeat if preset != "paper-256" else 2)
        print(
            f"| {preset} | {params / 1e6:.1f} M | {n} | {uncached * 1e3:.1f} ms | {cached * 1e3:.1f} ms | "
            f"{1 - cached / uncached:.0%} / {share:.0%} | {paper * 1e3:.1f} ms | {nudiff * 1e3:.1f} ms | "
            f"{paper / nudiff:.2f}x |"
        )
    if args.procedure:
        print()
        print("| tiny-64, 4 images | UNet calls | seconds | seconds / image |")
        print("|---|---|---|---|")
        torch.manual_seed(0)
        model = build_histo_unet("tiny-64").eval()
        cond = torch.rand(4, 3, 64, 64) * 2 - 1
        runs = [
            (
                "paper: ddpm 1000 steps, 2 sequential uncached calls",
                HistoDenoiser(model, cache=False),
                "ddpm",
                1000,
                False,
            ),
            ("nudiff: dpmpp2m 20 steps, one guided 2N call, cached", HistoDenoiser(model), "dpmpp2m", 20, True),
        ]
        for label, runtime, sampler, steps, batched in runs:
            g = torch.Generator().manual_seed(0)
            t0 = time.perf_counter()
            paint_images(
                runtime, cond, guidance=2.0, sampler=sampler, steps=steps, generator=g, batched_guidance=batched
            )
            seconds = time.perf_counter() - t0
            calls = steps * (1 if batched else 2)
            print(f"| {label} | {calls} | {seconds:.1f} | {seconds / 4:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
