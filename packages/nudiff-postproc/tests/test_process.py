"""retain_freed_memory: large blocks are reused instead of page-faulted in again;
describe_cpu: the CPU line of benchmark headers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# a 64 MiB block malloc'ed, touched and freed ten times (as PyTorch's CPU allocator does,
# without numpy's huge-page advice); the page faults of the last nine
_PROBE = textwrap.dedent("""
    import ctypes, resource, sys
    from nudiff_postproc import retain_freed_memory
    applied = retain_freed_memory() if sys.argv[1] == "retain" else False
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB)
    def cycle():
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
    cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(9):
        cycle()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str, **env: str) -> tuple[str, int]:
    import os

    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env={**os.environ, **env}, check=True
    )
    applied, faults = done.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_freed_blocks_are_reused_without_page_faults():
    applied, retained = _faults("retain")
    if applied != "True":
        pytest.skip("this C library has no mallopt (not glibc)")
    _, default = _faults("default")
    # glibc's default maps every 64 MiB block anew: up to 16,384 pages of 4 KiB each time
    assert default > 9 * 10_000, default  # measured: 147,465 = 9 x 16,384 + 9
    assert retained < 1_000, retained


def test_the_environment_opts_out():
    assert _faults("retain", NUDIFF_SYSTEM_MALLOC="1")[0] == "False"


def _cpuinfo(tmp_path, model: str, family: int, number: int, flags: str, more: dict | None = None) -> str:
    fields = {"processor": "{}", "cpu family": family, "model": number, "model name": model, "flags": flags}
    fields.update(more or {})
    block = "".join(f"{key}\t: {value}\n" for key, value in fields.items())
    path = tmp_path / "cpuinfo"
    # two processors: only the first one's block is read
    path.write_text(block.format(0) + "\n" + block.format(1).replace(model, "other"))
    return str(path)


def test_describe_cpu_names_the_model_and_its_vector_extensions(tmp_path):
    from nudiff_postproc import describe_cpu

    zen3 = describe_cpu(_cpuinfo(tmp_path, "AMD EPYC", 25, 1, "fpu sse avx fma avx2 bmi2"))
    assert zen3.startswith("AMD EPYC (family 25, model 1), AVX2 FMA, no AVX-512, ")
    with_clock = describe_cpu(_cpuinfo(tmp_path, "AMD EPYC", 25, 1, "avx2", {"cpu MHz": "2445.406"}))
    assert with_clock.startswith("AMD EPYC (family 25, model 1, 2445 MHz), AVX2, no AVX-512, ")
    zen5 = describe_cpu(_cpuinfo(tmp_path, "AMD EPYC", 26, 2, "avx2 fma avx512f avx512_bf16 avx512_vnni"))
    assert zen5.startswith("AMD EPYC (family 26, model 2), AVX2 FMA AVX512F AVX512_BF16 AVX512_VNNI, ")
    assert "other" not in zen5


def test_describe_cpu_falls_back_without_proc_cpuinfo(tmp_path):
    from nudiff_postproc import describe_cpu

    line = describe_cpu(tmp_path / "missing")
    assert "cores" in line and "family" not in line
