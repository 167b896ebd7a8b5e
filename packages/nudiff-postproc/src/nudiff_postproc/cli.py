"""``nudiff-postproc``: instance maps from structures, evaluation, XML conversion, patches,
labelled subsets."""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._folders import STRUCTURE_SUFFIXES, dataset_pairs, list_files, read_pair, read_structure
from ._io import (
    IMAGE_SUFFIXES,
    INSTANCE_MAP_SUFFIXES,
    atomic_path,
    check_output_file,
    lies_within,
    read_image,
    read_instance_map,
    read_monuseg_xml,
    replace_folder,
    write_image,
    write_instance_map,
)
from ._metrics import METRIC_KEYS, evaluate, mean_metrics
from ._patches import extract_patches
from ._runs import INTERRUPTED, claimed_output_folder, sigterm_as_interrupt
from ._watershed import _check_options, _check_scale, instances_from_structures

_MAP_FORMATS = (".png", ".tif", ".mat", ".npy")  # what the commands write instance maps as


def _progress(iterable, total: int, desc: str, quiet: bool):  # type: ignore[no-untyped-def]
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="file", disable=quiet or total < 2, file=sys.stderr)


def _cmd_instances(args: argparse.Namespace) -> int:
    files = list_files(args.structures, STRUCTURE_SUFFIXES, "structure")
    # the maps already in --out are skipped: only if they were made the same way
    _check_options(args.threshold, args.orientations)  # before --out is made
    _check_scale(args.scale)
    settings = {"threshold": args.threshold, "orientations": args.orientations, "scale": args.scale}
    settings["format"] = args.format  # maps of two formats side by side would be two answers per name
    if args.overwrite:  # the old maps go first: a killed overwrite must not leave them beside new ones
        for name in files:
            for suffix in _MAP_FORMATS:  # in any format the folder's maps were made in
                (Path(args.out) / f"{name}{suffix}").unlink(missing_ok=True)
    remedy = "give the settings its maps were made with, --overwrite to redo them all, or another output folder"
    with claimed_output_folder(args.out, settings, replace=args.overwrite, remedy=remedy) as out_dir:
        todo = [
            (name, p) for name, p in files.items() if args.overwrite or not (out_dir / f"{name}{args.format}").exists()
        ]
        if len(todo) < len(files):
            print(
                f"skipping {len(files) - len(todo)} structure(s) whose instance map exists (--overwrite to redo)",
                file=sys.stderr,
            )
        chunk = max(1, args.batch)
        bar = _progress(range(len(todo)), len(todo), "instances", args.quiet)
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            preds = [read_structure(p) for _, p in part]
            shapes = {p.shape for p in preds}
            if len(shapes) == 1:
                maps = instances_from_structures(
                    np.stack(preds),
                    threshold=args.threshold,
                    orientations=args.orientations,
                    workers=args.workers,
                    scale=args.scale,
                )
            else:
                maps = [
                    instances_from_structures(
                        p[None], threshold=args.threshold, orientations=args.orientations, workers=1, scale=args.scale
                    )[0]
                    for p in preds
                ]
            for (name, _), inst in zip(part, maps, strict=True):
                write_instance_map(out_dir / f"{name}{args.format}", inst)
            bar.update(len(part))
        bar.close()
    print(f"wrote {len(todo)} instance map(s) to {out_dir}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    check_output_file(args.out)
    true_files = list_files(args.true, INSTANCE_MAP_SUFFIXES, "true instance map")
    pred_files = list_files(args.pred, INSTANCE_MAP_SUFFIXES, "predicted instance map")
    missing = sorted(set(true_files) - set(pred_files))
    if missing:
        raise ValueError(f"'{args.pred}' lacks predictions for {len(missing)} true map(s), e.g. {missing[:3]}")
    rows = []
    for name in _progress(true_files, len(true_files), "evaluate", args.quiet):
        true = read_instance_map(true_files[name])
        pred = read_instance_map(pred_files[name])
        if true.shape != pred.shape:
            raise ValueError(
                f"'{pred_files[name]}' has shape {pred.shape}, its true map '{true_files[name]}' {true.shape}"
            )
        rows.append((name, evaluate(true, pred, one_empty="zero")))
    mean = mean_metrics(r for _, r in rows)
    header = ["name", *METRIC_KEYS]
    lines = [[name, *(f"{r[k]:.6f}" for k in METRIC_KEYS)] for name, r in rows]
    lines.append(["mean", *(f"{mean[k]:.6f}" for k in METRIC_KEYS)])
    if args.out:
        with atomic_path(args.out) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(lines)
    width = max(len(line[0]) for line in lines)
    print(f"{'name':<{width}}  " + "  ".join(f"{k:>8}" for k in METRIC_KEYS))
    for line in lines:
        print(f"{line[0]:<{width}}  " + "  ".join(f"{v:>8}" for v in line[1:]))
    empty = sum(1 for _, r in rows if not np.isfinite(r["dice"]))
    if empty:
        print(f"{empty} image(s) with no nuclei in either map are NaN and left out of the mean")
    return 0


def _parse_shape(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape must be H,W (e.g. 1000,1000), got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"--shape must be two positive sizes H,W (e.g. 1000,1000), got {text!r}")
    return h, w


def _cmd_xml2inst(args: argparse.Namespace) -> int:
    src = Path(args.xml)
    xmls = {src.stem: src} if src.is_file() else list_files(src, (".xml",), "XML annotation")
    images = list_files(args.images, IMAGE_SUFFIXES, "image") if args.images else {}
    if not images and args.shape is None:
        raise ValueError("give --images DIR (tiles whose sizes to use) or --shape H,W")
    if images:  # before any map is written
        missing = [name for name in xmls if name not in images]
        if missing:
            raise ValueError(
                f"no image in '{args.images}' for {len(missing)} XML file(s), e.g. '{xmls[missing[0]]}' "
                f"(expected an image named '{missing[0]}' with one of {', '.join(IMAGE_SUFFIXES)})"
            )
    out = Path(args.out)
    # a map of the same name in any format: two maps per name would be two answers
    taken = [out / f"{name}{s}" for name in xmls for s in _MAP_FORMATS if (out / f"{name}{s}").exists()]
    if taken and not args.overwrite:
        raise ValueError(
            f"'{taken[0]}' exists ({len(taken)} map(s) of these names do); pass --overwrite to replace them"
        )
    # every map is made in a staging folder first: a bad XML file leaves no map of the others
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".xml2inst.{os.getpid()}.partial"
    try:
        for name, path in _progress(xmls.items(), len(xmls), "xml2inst", args.quiet):
            shape = read_image(images[name]).shape[:2] if images else args.shape
            write_instance_map(staging / f"{name}{args.format}", read_monuseg_xml(path, shape))
        for path in taken:  # --overwrite: maps of these names in other formats go too
            path.unlink(missing_ok=True)
        for name in xmls:
            os.replace(staging / f"{name}{args.format}", out / f"{name}{args.format}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {len(xmls)} instance map(s) to {out}")
    return 0


def _cmd_patches(args: argparse.Namespace) -> int:
    pairs = dataset_pairs(args.data)
    out = Path(args.out)
    inputs = [Path(args.data), Path(args.data) / "images", Path(args.data) / "instance_maps"]
    if lies_within(Path(args.data), out) or any(lies_within(out, folder) for folder in inputs[1:]):
        # --overwrite would delete the data it cuts
        raise ValueError(
            f"--out '{out}' is, holds or lies inside the --data folder '{args.data}' or its images/ or "
            "instance_maps/; give another output folder"
        )
    if out.exists() and not args.overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out '{out}' already exists and is not empty; give a new folder or --overwrite")
    # built beside --out and renamed into place: a failed or killed run leaves no partial dataset
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        index = []
        for name, image_path, map_path in _progress(pairs, len(pairs), "patches", args.quiet):
            image, inst = read_pair(image_path, map_path, strict=True)  # H&E colour: no grey, no translucency
            try:
                img_patches, origins = extract_patches(image, args.size, args.stride)
            except ValueError as exc:
                raise ValueError(f"'{image_path}': {exc} (--size {args.size}, --stride {args.stride})") from exc
            map_patches, _ = extract_patches(inst, args.size, args.stride)
            # the tile's ids are kept; PNG holds ids up to 65,535, TIFF the rest
            suffix = ".png" if int(inst.max()) <= np.iinfo(np.uint16).max else ".tif"
            for img, lab, (r, c) in zip(img_patches, map_patches, origins, strict=True):
                stem = f"{name}_r{r:05d}_c{c:05d}"
                write_image(staging / "images" / f"{stem}.png", img)
                write_instance_map(staging / "instance_maps" / f"{stem}{suffix}", lab)
                index.append((stem, name, int(r), int(c), int(np.count_nonzero(np.unique(lab)))))
        with open(staging / "patches.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["patch", "source", "row", "col", "nuclei"])
            writer.writerows(index)
        replace_folder(staging, out)  # a kill never leaves a half-deleted --out
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {len(index)} patch pairs of {args.size}x{args.size} to {out}")
    return 0


def _read_features(path: str, names: list[str]) -> np.ndarray:
    """Rows of a features ``.npz`` (``names``, ``features``, e.g. ``nudiff-seg features``)
    in the order of ``names``; every name must be there."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f"it holds one {type(data).__name__}, not an .npz archive")
        with data:
            stored, features = [str(n) for n in data["names"]], np.asarray(data["features"], np.float64)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"'{path}' is not a features file with 'names' and 'features' arrays ({exc})") from exc
    if features.ndim != 2 or features.shape[0] != len(stored):
        raise ValueError(f"'{path}': features of shape {features.shape} for {len(stored)} names")
    index = {n: i for i, n in enumerate(stored)}
    missing = [n for n in names if n not in index]
    if missing:
        raise ValueError(f"'{path}' has no features for {len(missing)} patches of the data, e.g. {missing[:3]}")
    chosen = features[[index[n] for n in names]]
    bad = [n for n, row in zip(names, chosen, strict=True) if not np.isfinite(row).all()]
    if bad:
        raise ValueError(f"'{path}': the features of {len(bad)} patches hold NaN or inf, e.g. {bad[:3]}")
    return chosen


def _patch_sources(data: str, names: list[str]) -> list[str] | None:
    """The tile of each patch, from the ``patches.csv`` that ``patches`` writes beside them
    (None without one: nuclei are then counted per patch)."""
    index = Path(data) / "patches.csv"
    if not index.is_file():
        return None
    with open(index, newline="") as fh:
        reader = csv.DictReader(fh)
        if not {"patch", "source"} <= set(reader.fieldnames or ()):
            raise ValueError(
                f"'{index}' has the columns {reader.fieldnames}; expected 'patch' and 'source' (as `patches` writes)"
            )
        rows = {row["patch"]: row["source"] for row in reader}
    missing = [n for n in names if n not in rows]
    if missing:
        raise ValueError(f"'{index}' does not list {len(missing)} patches of '{data}', e.g. {missing[:3]}")
    return [rows[n] for n in names]


def _cmd_subset(args: argparse.Namespace) -> int:
    from ._subset import nuclei_share, select_subset

    check_output_file(args.out)
    pairs = dataset_pairs(args.data)
    names = [name for name, _, _ in pairs]
    sources = _patch_sources(args.data, names)
    patches = [read_pair(i, m) for _, i, m in _progress(pairs, len(pairs), "read", args.quiet)]
    features = None
    if args.features:
        features = _read_features(args.features, names)
    chosen = select_subset(patches, args.fraction, seed=args.seed, features=features, sources=sources)
    held, total = nuclei_share(patches, chosen, sources)
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text("".join(f"{pairs[i][0]}\n" for i in chosen))
    what = "distinct nuclei of the tiles (patches.csv)" if sources else "nuclei counted per patch (no patches.csv)"
    print(
        f"wrote {len(chosen)} of {len(pairs)} patches to {args.out}: {held} of {total} {what} "
        f"({held / total:.1%}, asked {args.fraction:.1%})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="nudiff-postproc", description=__doc__, formatter_class=fmt)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    quiet = argparse.ArgumentParser(add_help=False)  # --quiet also after the command's name
    quiet.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_command(name: str, **kwargs: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[quiet], formatter_class=fmt, **kwargs)

    p = add_command("instances", help="structures (.npy or PNG) -> instance maps")
    p.add_argument("structures", help="folder of structures: (H, W, 3) float .npy [prob, h, v] or RGB PNG")
    p.add_argument("out", help="output folder of instance maps")
    p.add_argument("--threshold", type=float, default=0.5, help="foreground threshold on channel 0")
    p.add_argument(
        "--orientations",
        type=int,
        choices=(1, 8),
        default=1,
        help="1: HoVer-Net's one pass; 8: the Nudiff paper's try-all-orientations variant",
    )
    p.add_argument("--workers", type=int, default=None, help="threads (default: all cores)")
    p.add_argument(
        "--scale",
        type=int,
        default=1,
        help="post-process upsampled this many times (structures downscaled for a model)",
    )
    p.add_argument("--batch", type=int, default=64, help="structures read and processed at a time")
    p.add_argument("--format", choices=_MAP_FORMATS, default=".png", help="output format")
    p.add_argument(
        "--overwrite", action="store_true", help="redo maps that exist (default: skip them, so a run resumes)"
    )
    p.set_defaults(func=_cmd_instances)

    p = add_command("evaluate", help="Dice/AJI/AJI+/DQ/SQ/PQ per image and their mean")
    p.add_argument("--true", required=True, help="folder of reference instance maps")
    p.add_argument("--pred", required=True, help="folder of predicted instance maps (same stems)")
    p.add_argument("--out", help="CSV to write (per image, then the mean)")
    p.set_defaults(func=_cmd_evaluate)

    p = add_command("xml2inst", help="MoNuSeg / Aperio XML -> instance maps")
    p.add_argument("xml", help="an .xml file or a folder of them")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--images", help="folder of the tiles (their sizes are used)")
    p.add_argument("--shape", type=_parse_shape, help="tile size H,W when no --images")
    p.add_argument("--format", choices=_MAP_FORMATS, default=".png", help="output format")
    p.add_argument("--overwrite", action="store_true", help="replace maps of the same names in --out")
    p.set_defaults(func=_cmd_xml2inst)

    p = add_command("patches", help="dataset folder -> patch dataset folder")
    p.add_argument("--data", required=True, help="folder with images/ and instance_maps/")
    p.add_argument("--out", required=True, help="output dataset folder (images/, instance_maps/, patches.csv)")
    p.add_argument("--size", type=int, default=256, help="patch size in pixels")
    p.add_argument("--stride", type=int, default=128, help="step between patches")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out folder")
    p.set_defaults(func=_cmd_patches)
    p = add_command("subset", help="representative patches holding a fraction of the nuclei")
    p.add_argument("--data", required=True, help="dataset folder (images/, instance_maps/), usually patches")
    p.add_argument(
        "--fraction",
        type=float,
        required=True,
        help="share of all nuclei the subset holds, e.g. 0.1 (each counted once when the data has the patches.csv "
        "of `patches`, else once per patch)",
    )
    p.add_argument("--out", required=True, help="text file: the chosen names, one per line")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (same seed, same subset)")
    p.add_argument(
        "--features",
        help="features .npz (names, features), e.g. ResNet-50 embeddings from `nudiff-seg features`; "
        "default: colour and morphology statistics",
    )
    p.set_defaults(func=_cmd_subset)
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "nudiff-postproc") -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input). ``prog`` names the
    program in error messages (another package's command that forwards here)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with sigterm_as_interrupt():  # a kill cleans up as Ctrl-C does
            return int(args.func(args))
    except (ValueError, TypeError, OSError) as exc:  # bad input, or a path that cannot be written
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "instances":
            print("interrupted; finished files are complete, rerun to resume", file=sys.stderr)
        else:  # the others write their output whole at the end (staging folders, atomic files)
            print("interrupted; nothing was written", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
