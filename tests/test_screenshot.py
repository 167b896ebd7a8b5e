"""tools/screenshot_report.py: a report-like page rendered by headless Chromium shows its embedded picture."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from nudiff_postproc import read_image, write_image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "screenshot_report.py"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _run(*args: object) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(SCRIPT), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)


def _page(tmp_path: Path, side: int = 96) -> Path:
    """A heading, a table, an embedded red square and a <pre>, styled like ``to_html``'s report."""
    square = np.zeros((side, side, 3), np.uint8)
    square[..., 0] = 255
    data = base64.b64encode(write_image(tmp_path / "square.png", square).read_bytes()).decode()
    page = tmp_path / "report.html"
    page.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>t</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:4px 8px}</style></head><body>\n"
        "<h1>Report</h1><table><tr><th>run</th><th>pq</th></tr><tr><td>subset</td><td>0.512</td></tr></table>\n"
        f"<figure><img alt='square' src='data:image/png;base64,{data}'><figcaption>a red square</figcaption></figure>\n"
        "<pre>[seg]\nepochs = 1</pre></body></html>"
    )
    return page


def _red_pixels(image: np.ndarray) -> int:
    diff = np.abs(image.astype(np.int16) - np.array([255, 0, 0], np.int16))
    return int((diff.max(axis=-1) <= 8).sum())


def test_screenshot_shows_the_embedded_picture(tmp_path):
    if not any(shutil.which(name) for name in BROWSERS):
        pytest.skip(f"no Chromium on PATH (looked for {', '.join(BROWSERS)}); apt-get install chromium")
    page = _page(tmp_path)
    out = tmp_path / "shots" / "report.png"
    result = _run(page, "-o", out, "--width", 800)
    assert result.returncode == 0, result.stderr
    image = read_image(out)
    assert image.shape[1] == 800
    # measured height: the page (heading, table, 96 px figure, pre) is a few hundred px, not the 6000 px window
    assert 200 < image.shape[0] < 1000
    assert _red_pixels(image) >= 0.9 * 96 * 96  # the square is drawn at its size (scale factor 1)
    assert (image[-1] == 255).all()  # the crop keeps a white margin below the content
    assert not [p.name for p in out.parent.iterdir() if p != out]  # no temporary files left

    fixed = _run(page, "-o", tmp_path / "fixed.png", "--width", 640, "--height", 120)
    assert fixed.returncode == 0, fixed.stderr
    assert read_image(tmp_path / "fixed.png").shape[:2] == (120, 640)


def test_missing_page_fails_clearly(tmp_path):
    missing = tmp_path / "no" / "report.html"
    out = tmp_path / "report.png"
    result = _run(missing, "-o", out)
    assert result.returncode != 0
    assert str(missing) in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
