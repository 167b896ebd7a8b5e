"""The process and its machine: a process-wide setting that nudiff's command lines apply
(keep freed memory for reuse), and the CPU description that every benchmark prints."""

from __future__ import annotations

import ctypes
import math
import os
import platform
import sys
from pathlib import Path

__all__ = ["describe_cpu", "retain_freed_memory", "usable_cores"]

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


#: CPU bandwidth limits of a container: cgroup v2's one file, cgroup v1's two
_CGROUP_V2_MAX = "/sys/fs/cgroup/cpu.max"
_CGROUP_V1 = ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def _cgroup_cpu_limit(v2_max: str | Path, v1_files: tuple[str | Path, str | Path]) -> float | None:
    """The CPU quota of this process's control group in cores, or None where none is set."""
    try:
        quota, period = Path(v2_max).read_text().split()[:2]  # "max 100000" or "200000 100000"
    except (OSError, ValueError):
        try:
            quota, period = (Path(f).read_text().strip() for f in v1_files)  # "-1" when unlimited
        except OSError:
            return None
    try:
        q, per = float(quota), float(period)
    except ValueError:  # "max"
        return None
    return q / per if q > 0 and per > 0 else None


def usable_cores(
    *, cgroup_v2_max: str | Path = _CGROUP_V2_MAX, cgroup_v1: tuple[str | Path, str | Path] = _CGROUP_V1
) -> int:
    """The number of cores this process may use: the default thread count of nudiff's pools.

    ``os.cpu_count()`` counts the machine's cores, which overstates what a process gets in
    the places this toolkit runs: a Slurm job, ``taskset`` or a cpuset restricts the CPU
    affinity (16 of 128 cores, say), and a container started with ``--cpus=2`` gets a CFS
    bandwidth quota while seeing every core of the host. Threads beyond either limit only
    wait for each other (on this project's 2-core VM, two OpenMP threads per worker against
    another worker made one test take 183 s instead of 9 s). This takes the smallest of the
    machine's core count, the affinity mask (``os.process_cpu_count`` on Python 3.13+,
    else ``os.sched_getaffinity`` where the platform has it) and the control group's
    quota rounded up (cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``),
    as loky and joblib do. It is written here rather than taken from joblib because
    nudiff-postproc depends on numpy, scipy and scikit-image only.

    Parameters
    ----------
    cgroup_v2_max, cgroup_v1 : str or Path, and a pair of them
        Where the quota is read (the Linux defaults; for tests). Unreadable files mean no
        quota.

    Returns
    -------
    int
        At least 1.
    """
    limits = [os.cpu_count() or 1]
    if hasattr(os, "process_cpu_count"):  # Python 3.13+: the affinity mask, or -X cpu_count
        limits.append(os.process_cpu_count() or limits[0])
    elif hasattr(os, "sched_getaffinity"):
        limits.append(len(os.sched_getaffinity(0)))
    quota = _cgroup_cpu_limit(cgroup_v2_max, cgroup_v1)
    if quota is not None:
        limits.append(math.ceil(quota))
    return max(1, min(limits))


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
    usable, machine = usable_cores(), os.cpu_count() or 1
    cores = f"{usable} cores" if usable == machine else f"{usable} of {machine} cores usable"
    cores += f", {platform.system()} {platform.release()}"
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
