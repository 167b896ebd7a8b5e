"""Screenshot a self-contained HTML page (``OUT/report.html``) with headless Chromium, to look at its pictures.

    python tools/screenshot_report.py OUT/report.html -o OUT/report.png [--width 1200] [--height N]

Without ``--height`` the page is rendered into a tall window (doubled until the page ends well above the
window's bottom, up to ``MAX_HEIGHT`` px) and the rows of plain background below the content are cropped.
The PNG is written under a temporary name and renamed at the end. Needs Debian's ``chromium`` package.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from nudiff_postproc import read_image, write_image

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
TALL = 6000  # first window height when measuring the page
MAX_HEIGHT = 24000
MARGIN = 16  # background rows kept below the content


def find_browser() -> str | None:
    """The first of ``BROWSERS`` on ``PATH``, or ``None``."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def capture(browser: str, html: Path, width: int, height: int, timeout: float) -> np.ndarray:
    """Render ``html`` in a ``width`` x ``height`` headless window.

    Returns
    -------
    numpy.ndarray
        The screenshot, ``(height, width, 3)`` uint8.
    """
    with tempfile.TemporaryDirectory(prefix="screenshot-report-") as tmp:
        shot = Path(tmp) / "shot.png"
        cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--force-device-scale-factor=1", "--run-all-compositor-stages-before-draw",
               f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}", f"--screenshot={shot}",
               html.resolve().as_uri()]  # fmt: skip
        # its own process group, so that a hung browser is killed with its renderer and GPU processes
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"{browser} did not finish within {timeout:g} s (--timeout)") from None
        if proc.returncode != 0 or not shot.is_file():
            tail = "\n".join(err.strip().splitlines()[-10:])
            raise RuntimeError(f"{browser} exited with status {proc.returncode} and no screenshot:\n{tail}")
        return read_image(shot)


def content_rows(image: np.ndarray) -> int:
    """Number of rows down to the last one that is not plain background (the bottom-left pixel's colour)."""
    rows = np.flatnonzero((image != image[-1, 0]).any(axis=(1, 2)))
    return int(rows[-1]) + 1 if rows.size else 0


def screenshot(html: Path, png: Path, width: int = 1200, height: int | None = None, timeout: float = 60.0) -> Path:
    """Write a screenshot of ``html`` to ``png``; ``height=None`` measures the page.

    Parameters
    ----------
    html, png : pathlib.Path
        The page, and where the picture goes (``.png``; written atomically).
    width, height : int
        The window's size in CSS px (device scale factor 1); without a height, the page's own.
    timeout : float
        Seconds each Chromium run may take.

    Returns
    -------
    pathlib.Path
        ``png``.
    """
    if not html.is_file():
        raise FileNotFoundError(f"no such HTML file: '{html}'")
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError(
            f"no Chromium on PATH (looked for {', '.join(BROWSERS)}); Debian's package: apt-get install chromium"
        )
    if height is not None:
        image = capture(browser, html, width, height, timeout)
    else:
        tall = TALL
        while True:
            image = capture(browser, html, width, tall, timeout)
            end = content_rows(image)
            if end <= tall * 3 // 4 or tall >= MAX_HEIGHT:  # a quarter of the window blank: the page has ended
                break
            tall = min(2 * tall, MAX_HEIGHT)
        if end >= tall:
            print(f"screenshot_report: the page is taller than {tall} px; the picture is cut", file=sys.stderr)
        image = image[: max(1, min(tall, end + MARGIN))]
    return write_image(png, np.ascontiguousarray(image))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("html", type=Path, help="the page, e.g. OUT/report.html")
    parser.add_argument("-o", "--output", type=Path, help="the PNG (default: beside the page, same stem)")
    parser.add_argument("--width", type=int, default=1200, help="window width in px (default 1200)")
    parser.add_argument("--height", type=int, help="window height in px (default: the page's height)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per Chromium run (default 60)")
    args = parser.parse_args(argv)
    if args.width < 1 or (args.height is not None and args.height < 1):
        parser.error("--width and --height must be positive")
    png = args.output or args.html.with_suffix(".png")
    try:
        path = screenshot(args.html, png, args.width, args.height, args.timeout)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"screenshot_report: {exc}", file=sys.stderr)
        return 1
    shape = read_image(path).shape
    print(f"{path} ({shape[1]}x{shape[0]} px)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
