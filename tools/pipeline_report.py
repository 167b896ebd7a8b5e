"""The pipeline's report: ``OUT/report.md`` and the same content as one self-contained
``OUT/report.html`` (pictures embedded), with the pictures in ``OUT/figures/``."""

from __future__ import annotations

import base64
import csv
import html
import itertools
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("dice", "aji", "aji_plus", "dq", "sq", "pq")

# A report is a list of blocks, rendered once as Markdown and once as HTML:
# ("h", level, text) | ("p", text) | ("table", header, rows) | ("img", file, caption) | ("pre", text)
Block = tuple


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _mean_row(path: Path) -> dict[str, float] | None:
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    mean = next((r for r in rows if r["name"] == "mean"), None)
    if mean is None:
        return None
    return {"images": len(rows) - 1, **{k: float(mean[k]) for k in METRICS}}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.{digits}f}"
    return str(value)


def _log(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _synthetic_grid(out: Path, n: int) -> np.ndarray | None:
    """Cells of structure -> instance map -> synthetic image -> image with outlines."""
    from nudiff_postproc import (
        instances_rgb,
        outline_overlay,
        picture_grid,
        read_image,
        read_instance_map,
        structure_rgb,
    )
    from nudiff_postproc._folders import read_structure

    src = out / "synthetic"
    names = sorted(p.stem for p in (src / "images").glob("*.png"))[:n] if (src / "images").is_dir() else []
    if not names:
        return None
    cells = []
    for name in names:
        structure = read_structure(src / "structures" / f"{name}.npy")
        inst = read_instance_map(src / "instance_maps" / f"{name}.png")
        image = read_image(src / "images" / f"{name}.png")
        cells.append([_big(structure_rgb(structure)), _big(instances_rgb(inst))])
        cells[-1] += [_big(image), _big(outline_overlay(image, inst))]
    return picture_grid(cells, columns=2)


def _big(image: np.ndarray, side: int = 128) -> np.ndarray:
    """Nearest-neighbour enlargement to at least ``side`` pixels (pixels stay visible)."""
    k = max(1, side // image.shape[0])
    return np.repeat(np.repeat(image, k, axis=0), k, axis=1)


def _real_vs_synthetic(out: Path, n: int) -> np.ndarray | None:
    """Real subset patches and synthetic pairs at the segmentation's scale, outlined."""
    from nudiff_postproc import outline_overlay, picture_grid, read_image, read_instance_map
    from nudiff_postproc._folders import dataset_pairs

    def cells(folder: Path) -> list[np.ndarray]:
        if not folder.is_dir():
            return []
        pairs = dataset_pairs(folder)
        pick = np.linspace(0, len(pairs) - 1, min(n, len(pairs))).round().astype(int) if pairs else []
        return [outline_overlay(read_image(pairs[i][1]), read_instance_map(pairs[i][2])) for i in pick]

    real, synthetic = cells(out / "data" / "subset"), cells(out / "synthetic-seg")
    if not real or not synthetic:
        return None
    side = min(min(im.shape[:2]) for im in real + synthetic)
    real = [im[:side, :side] for im in real]
    synthetic = [im[:side, :side] for im in synthetic]
    k = min(len(real), len(synthetic))
    return picture_grid([[r, s] for r, s in zip(real[:k], synthetic[:k], strict=True)], columns=2)


def windows_seen(rows: list[dict[str, str]]) -> list[int]:
    """The training windows a HoVer-Net run had seen at the end of each epoch of its
    ``log.csv`` rows (the running sum of their ``windows`` column)."""
    return list(itertools.accumulate(int(r["windows"]) for r in rows))


def _curves(out: Path, config: dict[str, Any], path: Path) -> bool:
    """Training losses of the diffusion models (per step) and of each HoVer-Net (per epoch,
    against the windows it had seen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    drawn = False
    for run, label in ((out / "structure", "structure"), (out / "histo-pretrain", "histology, phase 1")):
        rows = _log(run / "log.csv")
        if rows:
            axes[0 if label == "structure" else 1].plot(
                [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], ".-", label=label, markersize=3
            )
            drawn = True
    offset = len(_log(out / "histo-pretrain" / "log.csv")) and int(_log(out / "histo-pretrain" / "log.csv")[-1]["step"])
    rows = _log(out / "histo" / "log.csv")
    if rows:
        label = "histology, phase 2" if offset else "histology"
        axes[1].plot(
            [offset + int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], ".-", label=label, markersize=3
        )
        drawn = True
    seg_logs = [(run["name"], _log(out / "seg" / run["name"] / "log.csv")) for run in config["seg"]["runs"]]
    seg_logs = [(name, rows) for name, rows in seg_logs if rows]
    # the runs' common budget is windows, not epochs (22 to 784 windows an epoch): x = windows seen
    by_windows = all("windows" in rows[0] for _, rows in seg_logs)
    for name, rows in seg_logs:
        xs = windows_seen(rows) if by_windows else [int(r["epoch"]) for r in rows]
        axes[2].plot(xs, [float(r["loss"]) for r in rows], ".-", label=name, markersize=4)
        drawn = True
    titles = ("structure model (hybrid loss)", "histology model (hybrid loss)", "HoVer-Net (CE + Dice + MSE + MSGE)")
    seg_x = "windows seen (epochs' ends)" if by_windows else "epoch"
    for ax, title, xlabel in zip(axes, titles, ("step", "step", seg_x), strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=90)
    plt.close(fig)
    return drawn


def _predicted_nuclei(out: Path, run: str) -> int | None:
    """How many nuclei a run's model found on all the test tiles (None: no predictions)."""
    from nudiff_postproc import read_instance_map
    from nudiff_postproc._folders import INSTANCE_MAP_SUFFIXES, list_files

    folder = out / "predictions" / run / "instance_maps"
    if not folder.is_dir():
        return None
    # the maps only: no hidden files, no temporary files of a killed write
    maps = list_files(folder, INSTANCE_MAP_SUFFIXES, "predicted instance map") if any(folder.iterdir()) else {}
    return sum(len(np.unique(read_instance_map(m))) - 1 for m in maps.values()) if maps else None


def _predictions(out: Path, config: dict[str, Any], side: int = 256) -> np.ndarray | None:
    """The centre of the first test tile: truth, then each run's prediction, outlined."""
    from nudiff_postproc import outline_overlay, picture_grid, read_image, read_instance_map
    from nudiff_postproc._folders import dataset_pairs

    pairs = dataset_pairs(out / "data" / "test")
    name, image_path, map_path = pairs[0]
    image, truth = read_image(image_path), read_instance_map(map_path)
    r0, c0 = max(0, (image.shape[0] - side) // 2), max(0, (image.shape[1] - side) // 2)
    crop = (slice(r0, r0 + side), slice(c0, c0 + side))
    cells = [outline_overlay(image[crop], truth[crop], (0, 0, 0))]
    for run in config["seg"]["runs"]:
        pred_path = out / "predictions" / run["name"] / "instance_maps" / f"{name}.png"
        if not pred_path.is_file():
            return None
        cells.append(outline_overlay(image[crop], read_instance_map(pred_path)[crop]))
    return picture_grid([cells], columns=1)


def report_blocks(
    out: Path, config: dict[str, Any], figures: dict[str, str], stages: Sequence[str] = ()
) -> list[Block]:
    """The report's content from what the stages wrote under ``out``; ``stages``: the
    names of the config's stages, whose markers give the table of stage times."""
    blocks: list[Block] = [("h", 1, f"nudiff report: {config['name']}")]
    data = config["data"]
    source = "procedurally generated H&E-like tiles" if data["source"] == "procedural" else f"`{data['source']}`"
    data_dir = out / "data"
    counts = {s: len(list((data_dir / s / "images").glob("*"))) for s in ("train", "test", "patches", "subset")}
    synth = _read_json(out / "synthetic-seg" / "manifest.json") or {}
    blocks.append(
        (
            "p",
            f"Data: {source}; {counts['train']} training and {counts['test']} test tiles; {counts['patches']} patches "
            f"of {config['prepare']['patch_size']} px, of which {counts['subset']} form the labelled subset "
            f"(fraction {config['prepare']['fraction']} of the nuclei). Synthetic: "
            f"{len(list((out / 'synthetic' / 'images').glob('*.png')))} pairs at the {config['histo']['preset']} "
            f"preset, {synth.get('pairs_used', 0)} of them upsampled {synth.get('upsampled', 1)}x and laid "
            f"{synth.get('grid', 1)} x {synth.get('grid', 1)} into {synth.get('tiles', 0)} training tiles of "
            f"{synth.get('tile_size', '-')} px.",
        )
    )
    blocks.append(("h", 2, "Segmentation on the test tiles"))
    rows = []
    for run in config["seg"]["runs"]:
        mean = _mean_row(out / "eval" / f"{run['name']}.csv") or {}
        real = "labelled subset" if run["real"] == "subset" else "all training patches"
        log = _log(out / "seg" / run["name"] / "log.csv")  # what was trained (a resumed run may differ)
        epochs = str(max((int(r["epoch"]) for r in log), default=0))
        if all(r.get("windows") for r in log):
            windows = str(sum(int(r["windows"]) for r in log))
        else:  # a log from before nudiff-seg counted windows: full batches, an upper bound
            windows = f"<= {sum(int(r['batches']) for r in log) * config['seg']['batch']}"
        if run["synthetic"]:
            ratio = run.get("synthetic_ratio", "pool")
            batch = config["seg"]["batch"]  # the share a batch gets: round(batch x ratio) windows
            real += " + synthetic" + ("" if ratio == "pool" else f", {round(batch * ratio)} of every {batch} windows")
        rows.append([run["name"], real, epochs, windows] + [_fmt(mean.get(k)) for k in METRICS])
    header = ["run", "training data", "epochs", "windows", "Dice", "AJI", "AJI+", "DQ", "SQ", "PQ"]
    blocks.append(("table", header, rows))
    empty = [r["name"] for r in config["seg"]["runs"] if _predicted_nuclei(out, r["name"]) == 0]
    if empty:
        blocks.append(
            (
                "p",
                f"{', '.join(empty)}: the model found no nucleus on any test tile; its scores are those of an "
                "empty prediction (0), not of nuclei found and missed.",
            )
        )
    if "predictions" in figures:
        names = ", ".join(r["name"] for r in config["seg"]["runs"])
        blocks.append(
            (
                "img",
                figures["predictions"],
                f"centre of the first test tile: truth outlined in black, then the predictions of {names} in green",
            )
        )
    blocks.append(("h", 2, "The synthetic data"))
    s_eval = _read_json(out / "eval" / "structures.json") or {}
    h_eval = _read_json(out / "eval" / "histology.json") or {}
    fid = _read_json(out / "eval" / "fidelity.json") or {}
    rows = [
        [
            "morphology distance to the test tiles' nuclei (0 = same; scaled W1)",
            _fmt(s_eval.get("morphology_distance")),
        ],
        [
            "nuclei per patch, synthetic / real",
            f"{_fmt(s_eval.get('nuclei_per_patch'), 1)} / {_fmt(s_eval.get('real_nuclei_per_patch'), 1)}",
        ],
        [
            "h/v self-consistency of the structures (h = v = 0 scores 0.76-0.78: read it with the skill)",
            _fmt(s_eval.get("self_consistency")),
        ],
        [
            "h/v self-consistency skill (0 = h/v say nothing, 1 = the maps' own)",
            _fmt(s_eval.get("self_consistency_skill")),
        ],
        ["haematoxylin W1 to real pixels", _fmt(h_eval.get("h_wasserstein"), 4)],
        ["eosin W1 to real pixels", _fmt(h_eval.get("e_wasserstein"), 4)],
        [
            "alignment: H inside nuclei / outside, synthetic (real)",
            f"{_fmt(h_eval.get('alignment'), 2)} ({_fmt(h_eval.get('real_alignment'), 2)})",
        ],
    ]
    if fid:
        judge = next((r for r in config["seg"]["runs"] if not r["synthetic"]), {"name": "?"})
        tiles = fid.get("synthetic", {}).get("images", "?")
        rows.append(
            [
                f"label fidelity: AJI of the {judge['name']} model on the {tiles} synthetic training tiles (on the "
                "real test tiles)",
                f"{_fmt(fid.get('synthetic', {}).get('aji'))} ({_fmt(fid.get('real', {}).get('aji'))})",
            ]
        )
        rows.append(
            [
                "label fidelity: Dice, synthetic (real)",
                f"{_fmt(fid.get('synthetic', {}).get('dice'))} ({_fmt(fid.get('real', {}).get('dice'))})",
            ]
        )
    blocks.append(("table", ["measure", "value"], rows))
    if "synthetic" in figures:
        blocks.append(
            (
                "img",
                figures["synthetic"],
                "structure (h red, v green, nuclei blue) -> instance map -> painted image -> image with the instance "
                "outlines",
            )
        )
    if "real_vs_synthetic" in figures:
        blocks.append(("img", figures["real_vs_synthetic"], "real subset patch | synthetic training tile, outlined"))
    if not config["report"]["real_pictures"]:
        blocks.append(("p", "Pictures of real tiles are left out (report.real_pictures = false: licensed data)."))
    if "curves" in figures:
        blocks.append(("h", 2, "Training"))
        blocks.append(("img", figures["curves"], "training losses"))
    blocks.append(("h", 2, "Stages"))
    rows = []
    total = 0.0
    # the markers of this config's finished stages (not those of stages a config no longer has)
    markers = [out / "stages" / f"{name}.json" for name in stages]
    markers = sorted((m for m in markers if m.is_file()), key=lambda p: p.stat().st_mtime)
    records = [json.loads(m.read_text()) for m in markers]
    for marker, record in zip(markers, records, strict=True):
        total += record["seconds"]
        rows.append([marker.stem, f"{record['seconds']:.1f}", str(record["threads"]), record["finished"]])
    blocks.append(("table", ["stage", "seconds", "threads", "finished"], rows))
    if records:
        from datetime import datetime

        def when(text: str) -> datetime:
            return datetime.strptime(text, "%Y-%m-%d %H:%M:%S")

        first = min(when(r.get("started", r["finished"])) for r in records)
        wall = (max(when(r["finished"]) for r in records) - first).total_seconds()
        blocks.append(
            (
                "p",
                f"Sum of the stage times: {total / 60:.1f} min; from the first stage's start to the last one's end: "
                f"{wall / 60:.1f} min (stages side by side overlap; a resumed stage counts its last attempt).",
            )
        )
    blocks.append(("h", 2, "Config"))
    config_path = Path(config.get("config_path", ""))
    made_from = f"`{config_path.name}` merged with the defaults" if config_path.name else "the defaults"
    blocks.append(("p", f"The settings of this run: {made_from}, `--set`, `--data` and `--out`."))
    settings = {k: v for k, v in config.items() if k != "config_path"}
    blocks.append(("pre", json.dumps(settings, indent=2, default=str)))
    return blocks


def to_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            lines += ["#" * block[1] + " " + block[2], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "table":
            lines.append("| " + " | ".join(block[1]) + " |")
            lines.append("|" + "---|" * len(block[1]))
            lines += ["| " + " | ".join(row) + " |" for row in block[2]]
            lines.append("")
        elif kind == "img":
            lines += [f"![{block[2]}]({block[1]})", "", f"*{block[2]}*", ""]
        elif kind == "pre":
            lines += ["```json", block[1].rstrip(), "```", ""]
    return "\n".join(lines)


def to_html(blocks: list[Block], root: Path) -> str:
    """One self-contained page: the pictures are embedded as data URIs."""
    import re

    def inline(text: str) -> str:
        return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>nudiff report</title><style>",
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}",
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}",
        "td:first-child,th:first-child{text-align:left}img{max-width:100%;image-rendering:pixelated}",
        "pre{background:#f4f4f4;padding:1em;overflow:auto}figcaption{font-style:italic;color:#555}",
        "</style></head><body>",
    ]
    for block in blocks:
        kind = block[0]
        if kind == "h":
            parts.append(f"<h{block[1]}>{inline(block[2])}</h{block[1]}>")
        elif kind == "p":
            parts.append(f"<p>{inline(block[1])}</p>")
        elif kind == "table":
            parts.append("<table><tr>" + "".join(f"<th>{inline(h)}</th>" for h in block[1]) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in block[2]]
            parts.append("</table>")
        elif kind == "img":
            data = base64.b64encode((root / block[1]).read_bytes()).decode()
            parts.append(
                f"<figure><img alt='{html.escape(block[2])}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{inline(block[2])}</figcaption></figure>"
            )
        elif kind == "pre":
            parts.append(f"<pre>{html.escape(block[1])}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run: Callable[[list[str]], None], *, config: dict[str, Any], stages: Sequence[str] = ()) -> None:
    """Draw the pictures and write ``report.md`` and ``report.html`` under ``config['out']``
    (``stages``: the names of the config's stages, for the table of stage times)."""
    from nudiff_postproc import write_image
    from nudiff_postproc._io import atomic_path

    out = Path(config["out"])
    figures_dir = out / "figures.partial"
    shutil.rmtree(figures_dir, ignore_errors=True)
    figures_dir.mkdir(parents=True)
    figures: dict[str, str] = {}
    n, real = config["report"]["pictures"], config["report"]["real_pictures"]
    for key, picture in (
        ("synthetic", _synthetic_grid(out, n)),
        ("real_vs_synthetic", _real_vs_synthetic(out, max(2, n // 2)) if real else None),
        ("predictions", _predictions(out, config) if real else None),
    ):
        if picture is not None:
            write_image(figures_dir / f"{key}.png", picture)
            figures[key] = f"figures/{key}.png"
    if _curves(out, config, figures_dir / "curves.png"):
        figures["curves"] = "figures/curves.png"
    shutil.rmtree(out / "figures", ignore_errors=True)
    figures_dir.rename(out / "figures")
    blocks = report_blocks(out, config, figures, stages)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(to_markdown(blocks))
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(to_html(blocks, out))
