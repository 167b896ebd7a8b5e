"""Cross-package checks: the monorepo layout and its contracts (the main job: tests/test_pipeline.py)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").is_file())


def test_there_are_packages():
    assert {"nudiff-postproc", "nudiff-diffusion"} <= {p.name for p in PACKAGES}


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_package_layout(package):
    meta = tomllib.loads((package / "pyproject.toml").read_text())
    assert meta["build-system"]["build-backend"] == "poetry.core.masonry.api"
    assert meta["project"]["name"] == package.name
    assert meta["project"]["version"]
    module = package.name.replace("-", "_")
    assert (package / "src" / module / "__init__.py").is_file()
    assert (package / "src" / module / "py.typed").is_file()
    assert list((package / "tests").glob("test_*.py"))
    assert list((package / "benchmarks").glob("*.py"))
    # the licence text travels in each wheel (poetry-core picks up LICENSE beside pyproject.toml)
    assert meta["project"]["license"] == "MIT"
    assert (package / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()
    for dep in meta["project"].get("dependencies", []):
        assert "==" not in dep, f"{package.name} pins {dep}: libraries declare ranges"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_postproc_imports_no_torch_opencv_or_numba():
    src = ROOT / "packages" / "nudiff-postproc" / "src"
    used = set().union(*(_imports(p) for p in src.rglob("*.py")))
    assert not used & {"torch", "cv2", "numba", "tensorflow"}, used


def test_nothing_imports_tools():
    for path in ROOT.rglob("*.py"):
        if ".venv" in path.parts or "tools" in path.parts:
            continue
        assert "tools" not in _imports(path), path


def test_root_workspace_and_ci():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["tool"]["poetry"]["package-mode"] is False
    deps = meta["tool"]["poetry"]["dependencies"]
    for package in PACKAGES:
        assert deps[package.name] == {"path": f"packages/{package.name}", "develop": True}
    assert {"pytest", "hypothesis", "ruff"} <= set(meta["tool"]["poetry"]["group"]["dev"]["dependencies"])
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
