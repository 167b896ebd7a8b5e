"""`make wheels` builds what `pip install nudiff-histo` will install once published.

The test builds every package's wheel and sdist with the Makefile's own target into a
temporary folder, installs ``nudiff-histo`` (and with it the packages it depends on) from
there into a fresh virtualenv, the package index still on for torch and friends, and runs
the installed command: ``--help`` and a tiny sample from an untrained model. Skipped, with
the reason, where pip cannot reach a package index or ``make`` is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from nudiff_postproc import read_image

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").is_file())
# the CPU wheel of torch (the Makefile's FIND_LINKS); from the index pip would pull a CUDA build
FIND_LINKS = ["--find-links", "/opt/wheels"] if Path("/opt/wheels").is_dir() else []
# the installed packages must not see the repository's sources
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def _run(cmd: list[str], *, timeout: float, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=CLEAN_ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _require_index(tmp_path: Path) -> None:
    """Skip unless pip reaches a package index (the isolated builds need poetry-core)."""
    probe = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--timeout", "10"]
    probe += ["--retries", "0", "--dest", str(tmp_path / "probe"), "poetry-core>=2.0"]
    try:
        proc = subprocess.run(probe, cwd=tmp_path, env=CLEAN_ENV, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("pip cannot reach a package index (downloading poetry-core timed out)")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"pip cannot reach a package index (downloading poetry-core failed: {last})")


def test_wheels_install_and_sample_in_a_fresh_venv(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("`make` is not installed (the test builds with `make wheels`)")
    _require_index(tmp_path)

    # (a) the Makefile's target, into tmp; -o: never rerun the set-up from a test; BIN: this interpreter
    dist = tmp_path / "dist"
    make = ["make", "-C", str(ROOT), "-o", ".venv/.nudiff-installed", "wheels"]
    _run([*make, f"DIST={dist}", f"BIN={Path(sys.executable).parent}"], timeout=900, cwd=ROOT)

    # (b) exactly one wheel and one sdist per package, and nothing else
    files = sorted(p.name for p in dist.iterdir())
    names = [p.replace("-", "_") for p in PACKAGES]
    for name in names:
        assert len([f for f in files if re.fullmatch(rf"{name}-[^-]+-py3-none-any\.whl", f)]) == 1, files
        assert len([f for f in files if re.fullmatch(rf"{name}-[^-]+\.tar\.gz", f)]) == 1, files
    assert len(files) == 2 * len(PACKAGES), files

    # (c) a fresh venv with nudiff-histo from dist/ (its nudiff dependencies too), the rest from the index
    # (no rmtree of the ~1.5 GB venv here: deleting files still being written back took ~2 minutes on
    # this disk; pytest keeps the last 3 base temp folders and removes older ones, cheaply, later)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=300, cwd=tmp_path)
    py, bin_dir = venv / "bin" / "python", venv / "bin"
    install = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "--find-links", str(dist)]
    install += [*FIND_LINKS, "-c", str(ROOT / "constraints.txt"), "nudiff-histo"]
    log = _run(install, timeout=1200, cwd=tmp_path).stdout
    for name in ("nudiff_histo", "nudiff_postproc", "nudiff_diffusion"):  # pip names the files it took
        took = re.search(rf"^Processing (\S*{name}-[^-]+-py3-none-any\.whl)", log, re.MULTILINE)
        assert took and (tmp_path / took.group(1)).resolve().parent == dist.resolve(), log
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], timeout=60, cwd=tmp_path)
    purelib = Path(site.stdout.strip()).resolve()
    for dep in ("nudiff-histo", "nudiff-postproc", "nudiff-diffusion"):
        show = _run([str(py), "-m", "pip", "show", dep], timeout=60, cwd=tmp_path).stdout
        location = re.search(r"^Location: (.+)$", show, re.MULTILINE)
        assert location and Path(location.group(1).strip()).resolve() == purelib, show
        assert "Editable project location" not in show, show
    found = _run([str(py), "-c", "import nudiff_postproc; print(nudiff_postproc.__file__)"], timeout=120, cwd=tmp_path)
    assert Path(found.stdout.strip()).resolve().is_relative_to(purelib), found.stdout
    assert not (purelib / "nudiff_structure").exists(), "nudiff-histo does not depend on nudiff-structure"

    # (d) the installed command
    helped = _run([str(bin_dir / "nudiff-histo"), "--help"], timeout=120, cwd=tmp_path)
    assert helped.stdout.startswith("usage: nudiff-histo"), helped.stdout
    for command in ("train", "sample", "evaluate"):
        assert command in helped.stdout, helped.stdout

    # (e) a tiny sample: an untrained tiny-64 model, two real-style instance maps, two steps
    ckpt, structures, out = tmp_path / "ckpt", tmp_path / "maps", tmp_path / "out"
    setup = (
        "import sys\n"
        "from nudiff_diffusion import save_model\n"
        "from nudiff_histo import build_histo_unet\n"
        "from nudiff_histo._model import histo_settings\n"
        "from nudiff_postproc import synthetic_instance_map, write_instance_map\n"
        "model = build_histo_unet('tiny-64')\n"
        "save_model(sys.argv[1], model, diffusion=histo_settings('tiny-64', model))\n"
        "for i in range(2):\n"
        "    inst = synthetic_instance_map((64, 64), n_nuclei=5, seed=i)\n"
        "    write_instance_map(f'{sys.argv[2]}/instance_maps/tile{i}.png', inst)\n"
    )
    _run([str(py), "-c", setup, str(ckpt), str(structures)], timeout=300, cwd=tmp_path)
    sample = [str(bin_dir / "nudiff-histo"), "--quiet", "sample", "--structures", str(structures)]
    sample += ["--checkpoint", str(ckpt), "--out", str(out), "--steps", "2", "--num", "2"]
    _run(sample, timeout=600, cwd=tmp_path)
    images = sorted((out / "images").glob("*.png"))
    assert len(images) == 2, images
    for path in images:
        image = read_image(path)
        assert image.shape == (64, 64, 3) and image.dtype.name == "uint8", (path, image.shape, image.dtype)
        assert (out / "instance_maps" / path.name).is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num"] == 2 and manifest["steps"] == 2 and manifest["drawn_now"] == 2, manifest
