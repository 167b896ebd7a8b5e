"""retain_freed_memory: large blocks are reused instead of page-faulted in again."""

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
