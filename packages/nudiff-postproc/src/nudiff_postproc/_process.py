"""The process and its machine: a process-wide setting that nudiff's command lines apply
(keep freed memory for reuse), and the CPU description that every benchmark prints."""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path

__all__ = ["describe_cpu", "retain_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_OPT_OUT = "NUDIFF_SYSTEM_MALLOC"


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process instead of returning it.

    By default glibc serves every allocation above its mmap threshold (at most 32 MiB) with
    a fresh ``mmap`` and unmaps it on ``free``, so each such block is page-faulted in again,
    4 KiB at a time, when the next one is touched. PyTorch allocates CPU tensors with
    malloc and keeps no cache of its own, and a UNet's activations at 128 px and batch 8
    are 32-64 MiB each: on this project's 2-core VM one small-128 forward pass took 850,000
    page faults and 4.0-4.6 s instead of 2.3 s, and a small-128 training step 4.5 s instead
    of 3.75 s. This sets ``M_MMAP_MAX`` to 0 (large blocks come from the heap and are reused)
    and the trim threshold to 2 GiB (the heap keeps its free top), as the tuning guides do
    with jemalloc or tcmalloc. The process's resident memory then stays near its peak.

    Process-wide, so called by applications (nudiff's command lines call it), not at
    import. Does nothing where the C library has no ``mallopt`` (not glibc) or when the
    environment sets ``NUDIFF_SYSTEM_MALLOC=1``.

    Returns
    -------
    bool
        Whether the setting was applied.
    """
    if os.environ.get(_OPT_OUT, "") not in ("", "0") or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


#: vector extensions that decide float32 and bfloat16 throughput, in the order printed
_VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")


def describe_cpu(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """One line naming this machine's CPU, for the headers of benchmark tables.

    The hosts behind this project's VMs change between sessions (an EPYC with AVX-512 and
    bf16 one day, one with AVX2 only the next, 3-4x apart on the same benchmark), so a
    table names the CPU model, its family and model numbers and its vector extensions,
    besides the core count and the operating system.

    Parameters
    ----------
    cpuinfo : str or Path, default "/proc/cpuinfo"
        Linux's CPU description; where it cannot be read (other systems), the line falls
        back to :func:`platform.processor`.

    Returns
    -------
    str
        For example ``"AMD EPYC (family 25, model 1, 2445 MHz), AVX2 FMA, no AVX-512,
        2 cores, Linux 6.18"``.
    """
    fields: dict[str, str] = {}
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, sep, value = line.partition(":")
            if not sep:
                if fields:  # the end of the first processor's block
                    break
                continue
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cores = f"{os.cpu_count()} cores, {platform.system()} {platform.release()}"
    if "model name" not in fields:
        return f"{platform.processor() or platform.machine()}, {cores}"
    flags = set(fields.get("flags", "").split())
    vector = " ".join(name.upper() for name in _VECTOR_FLAGS if name in flags) or "no AVX2"
    if "avx512f" not in flags:
        vector += ", no AVX-512"
    family = f"family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}"
    if "cpu MHz" in fields:  # the nominal clock (in a VM, the host's TSC), not the clock under load
        family += f", {float(fields['cpu MHz']):.0f} MHz"
    return f"{fields['model name']} ({family}), {vector}, {cores}"
