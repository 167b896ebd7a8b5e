"""Shared test fixtures: where ../shared is (data and reference fixtures), or a skip."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent


def shared_dir() -> Path | None:
    """``$NUDIFF_SHARED`` or ``../shared`` beside the repository, if it exists."""
    env = os.environ.get("NUDIFF_SHARED")
    path = Path(env) if env else ROOT.parent / "shared"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if path is None:
        pytest.skip("../shared (data and reference fixtures) is not beside the repository; set NUDIFF_SHARED")
    return path


@pytest.fixture(scope="session")
def parity(shared: Path) -> dict[str, np.ndarray]:
    """The reference outputs of HoVer-Net / Nudiff (../shared/fixtures/README.md)."""
    path = shared / "fixtures" / "parity_kumar256.npz"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def kumar(shared: Path) -> Path:
    """The MoNuSeg 2018 training folder (images/, instance_maps/, annotations_xml/, splits/)."""
    path = shared / "data" / "monuseg-train"
    if not (path / "instance_maps").is_dir():
        pytest.skip(f"{path} is missing")
    return path


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs ``-n 2``), each worker gets its share of the
    cores: ``OMP_NUM_THREADS`` = cores // workers, which torch, numpy's OpenBLAS and the
    subprocesses the tests start all follow (ONNX Runtime sessions take torch's count).
    Measured on 2 cores: two workers with two threads each made OpenMP's barriers spin
    against each other (a 9 s test took 183 s; the suite 26.8 min against 25.6 min serial);
    one thread each: 16.5 min (12.8 min once the benchmark tools' tests shared their
    exports, the killed pipeline trained fewer steps and the long files started first)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    from nudiff_postproc import usable_cores

    threads = max(1, usable_cores() // int(workers))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``slow`` tests run only with ``--runslow`` (the suite must stay under 15 minutes on 2 cores)."""
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
