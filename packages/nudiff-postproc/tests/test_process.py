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


@pytest.fixture
def sixteen_core_machine_with_eight_allowed(monkeypatch):
    """A machine of 16 cores whose affinity mask allows 8 (a Slurm job, taskset)."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    if hasattr(os, "process_cpu_count"):  # Python 3.13+
        monkeypatch.setattr(os, "process_cpu_count", lambda: 8)


def _cgroup(tmp_path, v2=None, v1=None):
    """Paths to cgroup files holding the given texts (None: the file does not exist)."""
    v2_path, quota, period = tmp_path / "cpu.max", tmp_path / "cfs_quota_us", tmp_path / "cfs_period_us"
    if v2 is not None:
        v2_path.write_text(v2 + "\n")
    if v1 is not None:
        quota.write_text(v1[0] + "\n")
        period.write_text(v1[1] + "\n")
    return {"cgroup_v2_max": v2_path, "cgroup_v1": (quota, period)}


@pytest.mark.parametrize(
    ("v2", "v1", "expected"),
    [
        (None, None, 8),  # no control group files: the affinity mask decides
        ("max 100000", None, 8),  # cgroup v2 without a quota
        ("150000 100000", None, 2),  # docker --cpus=1.5: rounded up
        ("1600000 100000", None, 8),  # a quota above the mask
        (None, ("-1", "100000"), 8),  # cgroup v1 without a quota
        (None, ("250000", "100000"), 3),
        ("garbage", ("50000", "100000"), 1),  # an unreadable v2 file: v1 is read
        (None, ("garbage", "100000"), 8),
    ],
)
def test_usable_cores_is_the_smallest_of_machine_affinity_and_quota(
    tmp_path, sixteen_core_machine_with_eight_allowed, v2, v1, expected
):
    from nudiff_postproc import usable_cores

    assert usable_cores(**_cgroup(tmp_path, v2, v1)) == expected


def test_describe_cpu_says_how_many_cores_are_usable(tmp_path, sixteen_core_machine_with_eight_allowed):
    from nudiff_postproc import describe_cpu

    assert "8 of 16 cores usable" in describe_cpu(_cpuinfo(tmp_path, "AMD EPYC", 25, 1, "avx2"))


@pytest.mark.parametrize(("cores", "pool_workers"), [(1, None), (3, 3)])
def test_the_batch_watershed_uses_the_usable_cores_by_default(monkeypatch, cores, pool_workers):
    """instances_from_structures(workers=None) starts one thread per usable core, none on one."""
    import numpy as np
    from nudiff_postproc import _watershed, encode_structure, instances_from_structure, instances_from_structures

    pools = []

    class RecordingPool(_watershed.ThreadPoolExecutor):
        def __init__(self, max_workers=None, **kwargs):
            pools.append(max_workers)
            super().__init__(max_workers=max_workers, **kwargs)

    monkeypatch.setattr(_watershed, "usable_cores", lambda: cores)
    monkeypatch.setattr(_watershed, "ThreadPoolExecutor", RecordingPool)
    inst = np.zeros((64, 64), np.int32)
    inst[10:25, 10:25], inst[30:50, 35:55] = 3, 7
    preds = np.stack([encode_structure(inst)] * 4)
    out = instances_from_structures(preds)
    assert pools == ([] if pool_workers is None else [pool_workers])
    assert all(np.array_equal(o, instances_from_structure(preds[0])) for o in out)
