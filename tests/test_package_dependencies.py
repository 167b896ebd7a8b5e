"""Each package declares the nudiff packages its sources import (``pip install`` of one
package alone must give a package that imports)."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").is_file())


def _declared(package: Path) -> set[str]:
    """The distribution names of ``package``'s required dependencies (extras aside)."""
    project = tomllib.loads((package / "pyproject.toml").read_text())["project"]
    return {re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0].lower() for spec in project.get("dependencies", [])}


def _imported_nudiff(package: Path) -> dict[str, str]:
    """nudiff modules imported anywhere in ``package``'s sources (lazy imports included),
    each with one file that imports it."""
    found: dict[str, str] = {}
    for source in sorted((package / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top.startswith("nudiff_"):
                    found.setdefault(top, str(source.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("package", PACKAGES, ids=[p.name for p in PACKAGES])
def test_every_imported_nudiff_package_is_a_declared_dependency(package):
    own = package.name.replace("-", "_")
    imported = _imported_nudiff(package)
    # the scan sees the imports: every package but the base builds on another one
    assert (package.name == "nudiff-postproc") != bool(set(imported) - {own}), (package.name, imported)
    missing = {
        module.replace("_", "-"): where
        for module, where in imported.items()
        if module != own and module.replace("_", "-") not in _declared(package)
    }
    assert not missing, f"{package.name}/pyproject.toml does not declare what its sources import: {missing}"
