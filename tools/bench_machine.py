"""What a benchmark measures of the machine itself: peak memory over a block, the attainable
matrix-product peak of the CPU or GPU, GPU-synchronised calls and FLOP counts (shared by
``tools/bench_sampling.py`` and the tools built on it)."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nudiff_diffusion import onnx_session
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["PeakMemory", "count_flops", "cpu_peak_gflops", "cuda_peak_gflops", "synced"]


class PeakMemory:
    """Peak memory above the start of a ``with`` block: torch.cuda's max allocated on a
    GPU, else the process RSS polled every 2 ms from /proc (MiB)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.peak_mib = cuda, 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        self._start, self._peak, self._stop = self._rss(), self._rss(), False

        def poll() -> None:
            while not self._stop:
                self._peak = max(self._peak, self._rss())
                time.sleep(0.002)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.peak_mib = (torch.cuda.max_memory_allocated() - self._start) / 2**20
            return
        self._stop = True
        self._thread.join()
        self.peak_mib = (self._peak - self._start) / 2**20


def cpu_peak_gflops() -> tuple[float, str]:
    """The attainable float32 peak of this CPU: the best of 10 4096^2 float32 matrix
    products, in torch and in ONNX Runtime, with torch's threads (the theoretical peak needs
    the clock under load, which a VM does not show), and how it was derived. Both, because
    torch's BLAS here (MKL) takes its AVX2 path on AMD CPUs: 190 GFLOP/s against ONNX
    Runtime's 386-421 (MLAS, AVX-512) on this project's 2-core EPYC with AVX-512; on an
    AVX2-only EPYC host, 114 against 102."""
    import onnx
    from onnx import TensorProto, helper

    n = 4096
    a, b = torch.randn(n, n), torch.randn(n, n)
    spec = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in "abc"]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", spec[:2], spec[2:])
    with tempfile.TemporaryDirectory() as folder:  # the engines' own session settings (threads as torch's)
        path = Path(folder) / "matmul.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
        session = onnx_session(path, providers=["CPUExecutionProvider"])
    feed = {"a": a.numpy(), "b": np.ascontiguousarray(b.numpy())}
    best = {}
    for name, product in (("torch", lambda: a @ b), ("onnxruntime", lambda: session.run(None, feed))):
        product()
        seconds = float("inf")
        for _ in range(10):
            t0 = time.perf_counter()
            product()
            seconds = min(seconds, time.perf_counter() - t0)
        best[name] = 2 * n**3 / seconds / 1e9
    gflops = max(best.values())
    # float32 lanes of the widest vectors PyTorch's kernels use here; two FMA pipes per core
    # (an upper bound: AMD's Zen 4 runs 512-bit FMAs on 256-bit pipes, half of it)
    bits = 512 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 256
    per_cycle = 2 * 2 * bits // 32
    threads = torch.get_num_threads()
    return gflops, (
        f"best of 10 4096^2 float32 matmuls, {threads} threads: torch {best['torch']:.0f}, "
        f"onnxruntime {best['onnxruntime']:.0f} GFLOP/s; the better is the peak, measured now, so it moves with "
        f"the machine's load (for comparison, two {bits}-bit FMA pipes per core give at most {per_cycle} "
        f"FLOP/cycle/core, {per_cycle * threads} per cycle for {threads} threads; the clock under load is not "
        "visible in a VM)"
    )


def cuda_peak_gflops(device: torch.device) -> tuple[float, str]:
    """The attainable bfloat16 matrix peak of the GPU: the best of 10 8192^2 products."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    a @ b
    best = float("inf")
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize(device)
        best = min(best, start.elapsed_time(end) / 1e3)
    gflops = 2 * 8192**3 / best / 1e9
    name = torch.cuda.get_device_name(device)
    return gflops, f"{name}: best of 10 8192^2 bfloat16 matmuls in torch: {gflops:.0f} GFLOP/s"


def synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``fn`` that waits for the GPU's work before returning (wall-clock timing of CUDA)."""
    if device.type != "cuda":
        return fn

    def call() -> Any:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())
