"""``nudiff-seg``: train HoVer-Net on real (+ synthetic) pairs, import HoVer-Net's released
weights, predict, evaluate, check label fidelity, and ResNet patch embeddings."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _ratio(text: str) -> float | str:
    if text == "pool":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1) or 'pool', got {text!r}") from None


def _device(args: argparse.Namespace) -> torch.device:
    """``--device``, checked before any work (an unknown or absent device fails here)."""
    from nudiff_diffusion import resolve_device

    return resolve_device(args.device)


def _cmd_train(args: argparse.Namespace) -> int:
    from nudiff_diffusion import warn_if_emulated_precision
    from nudiff_postproc._io import check_output_outside

    from ._data import load_tiles, read_name_list, smallest_tile
    from ._hovernet import PRESETS
    from ._train import DEFAULT_AUGMENT, NO_AFFINE, SegTrainConfig, train_hovernet

    check_output_outside(args.out, {"--real": args.real, "--synthetic": args.synthetic, "--val": args.val})
    config = SegTrainConfig(
        preset=args.preset,
        epochs=args.epochs,
        frozen_epochs=args.frozen_epochs,
        batch=args.batch,
        frozen_batch=args.frozen_batch,
        lr=args.lr,
        synthetic_ratio=args.synthetic_ratio,
        precision=args.precision,
        seed=args.seed,
        encoder_weights=args.encoder_weights,
        windows=args.windows,
        synthetic_windows=args.synthetic_windows,
    )
    if args.synthetic_ratio != "pool" and not args.synthetic:
        raise ValueError(
            f"--synthetic-ratio {args.synthetic_ratio} mixes synthetic pairs into each batch: "
            "give --synthetic FOLDER too"
        )
    device = _device(args)
    warn_if_emulated_precision(device, args.precision)
    sizes = PRESETS[args.preset].input_size, PRESETS[args.preset].output_size
    least = {mode: smallest_tile(mode, *sizes) for mode in ("mirror", "valid")}
    out_px = f"{least['mirror']}x{least['mirror']}"

    def reason(flag: str, mode: str) -> str:
        if mode == "mirror":
            return f"a {flag} mirror window (the model's output region)"
        return f"a {flag} valid window (the model's input window; {flag} mirror needs {out_px})"

    names = read_name_list(args.subset) if args.subset else None
    real = load_tiles(
        args.real,
        names=names,
        min_size=least[args.windows],
        what="--real",
        size_reason=reason("--windows", args.windows),
    )
    synthetic = (
        load_tiles(
            args.synthetic,
            min_size=least[args.synthetic_windows],
            what="--synthetic",
            size_reason=reason("--synthetic-windows", args.synthetic_windows),
        )
        if args.synthetic
        else None
    )
    val = load_tiles(args.val, what="--val") if args.val else None
    print(
        f"training {args.preset} on {len(real)} real"
        + (f" + {len(synthetic)} synthetic" if synthetic else "")
        + f" images ({'subset ' + args.subset if args.subset else 'all'}), {args.epochs} epochs on {device} "
        f"-> {args.out}",
        flush=True,
    )
    train_hovernet(
        real,
        args.out,
        config,
        synthetic=synthetic,
        val=val,
        augment=NO_AFFINE if args.no_affine else DEFAULT_AUGMENT,
        resume=args.resume,
        device=device,
        progress=not args.quiet,
        max_batches=args.max_batches,
    )
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from nudiff_diffusion import MODEL_FLAG, claimed_output_folder
    from nudiff_postproc._folders import IMAGE_SUFFIXES, list_files
    from tqdm.auto import tqdm

    from ._data import read_rgb
    from ._onnx import load_engine, model_digest
    from ._predict import predict_instances, prediction_paths, write_prediction

    if bool(args.checkpoint) == bool(args.engine):
        raise ValueError("give either --checkpoint RUN (PyTorch) or --engine model.onnx (ONNX Runtime)")
    model = load_engine(args.engine or args.checkpoint, device=_device(args))
    if hasattr(model, "check_batch"):  # an exported graph: its batch limit, before --out is made
        model.check_batch(args.batch)
    images = list_files(args.images, IMAGE_SUFFIXES, "image")
    # the maps already in --out are skipped: only if this model made them (checked first, by
    # the claim; a first try that fails before its first output leaves no folder)
    with claimed_output_folder(args.out, {"model": model_digest(model)}, flags=MODEL_FLAG):
        todo = [
            n
            for n in images
            if not any(p.exists() for p in (prediction_paths(args.out, n, f)["instance_map"] for f in (".png", ".tif")))
        ]
        # every image to predict is read once before the first prediction: an unreadable one
        # (grey, translucent, not 8-bit) is named now, with all the others, not hours into the run
        unreadable = []
        for name in tqdm(todo, desc="check images", disable=args.quiet, leave=False):
            try:
                read_rgb(images[name])
            except (ValueError, TypeError) as exc:
                unreadable.append(str(exc))
        if unreadable:
            raise ValueError(
                f"{len(unreadable)} of the {len(todo)} image(s) to predict in '{args.images}' cannot be read as "
                "RGB:\n  " + "\n  ".join(unreadable)
            )
        for name in tqdm(todo, desc="predict", disable=args.quiet):
            image = read_rgb(images[name])
            inst, _ = predict_instances(model, image, batch=args.batch)
            write_prediction(args.out, name, image, inst)
    print(f"predicted {len(todo)} image(s) ({len(images) - len(todo)} already done) into {args.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ._onnx import export_hovernet_onnx

    worst = export_hovernet_onnx(args.checkpoint, args.out, batch_max=args.batch_max, opset=args.opset)
    print(f"wrote {args.out} (batch <= {args.batch_max}); ONNX Runtime vs PyTorch: max abs diff {worst:.2e}")
    return 0


def _cmd_import_hovernet(args: argparse.Namespace) -> int:
    import glob
    import os
    import shutil
    import uuid
    from pathlib import Path

    from ._hovernet import save_hovernet
    from ._reference_weights import load_reference_hovernet

    out = Path(args.out)
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"--out '{out}' already exists; give a new folder for the imported model")
    try:
        model, record = load_reference_hovernet(args.weights)
    except (ValueError, OSError) as exc:  # the messages name the file: name the flag too
        raise type(exc)(f"--weights: {exc}") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{glob.escape(out.name)}.*.part"):  # a killed import's
        shutil.rmtree(stale, ignore_errors=True)
    # made by mkdir, so it gets the usual permissions (mkdtemp's are the owner's only)
    staging = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.part"
    staging.mkdir()
    try:  # the folder appears whole or not at all
        save_hovernet(staging, model, extra={"imported": record})
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    config = model.config
    print(
        f"imported {record['file']} ({config.mode} mode, {config.input_size} px in, {config.output_size} px out, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters)"
        + (f"; left out {', '.join(record['left_out'])}" if record["left_out"] else "")
        + f" -> {out}"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from nudiff_postproc.cli import main as postproc_main

    return postproc_main(
        ["--quiet", "evaluate", "--true", args.true, "--pred", args.pred, *(["--out", args.out] if args.out else [])],
        prog="nudiff-seg",
    )


def _cmd_fidelity(args: argparse.Namespace) -> int:
    from nudiff_postproc._io import check_output_file

    from ._data import load_tiles
    from ._hovernet import load_hovernet
    from ._predict import score_pairs

    check_output_file(args.out)
    model = load_hovernet(args.checkpoint, device=_device(args))
    sets = [("synthetic", args.pairs, "--pairs")] + ([("real", args.real, "--real")] if args.real else [])
    # every folder read (and checked) before the first is scored
    loaded = [(label, load_tiles(folder, what=flag)) for label, folder, flag in sets]
    print(
        f"{'pairs':<10} {'images':>6}  " + "  ".join(f"{k:>8}" for k in ("dice", "aji", "aji_plus", "dq", "sq", "pq"))
    )
    scores = {}
    for label, tiles in loaded:
        pairs = zip(tiles.names, tiles.images, tiles.maps, strict=True)
        _, mean = score_pairs(model, pairs, batch=args.batch, progress=None if args.quiet else f"{label} pairs")
        scores[label] = {"images": len(tiles), **{k: float(v) for k, v in mean.items()}}
        print(
            f"{label:<10} {len(tiles):>6}  "
            + "  ".join(f"{mean[k]:8.4f}" for k in ("dice", "aji", "aji_plus", "dq", "sq", "pq"))
        )
    if args.out:
        import json

        from nudiff_diffusion import finite_or_null
        from nudiff_postproc._io import atomic_path

        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(finite_or_null(scores), indent=2, allow_nan=False) + "\n")
    return 0


def _cmd_features(args: argparse.Namespace) -> int:
    import numpy as np
    from nudiff_postproc._folders import dataset_pairs, read_pair
    from nudiff_postproc._io import atomic_path, check_output_file

    from ._features import load_backbone, patch_embeddings

    check_output_file(args.out)
    model = load_backbone(args.weights, args.arch).to(_device(args))
    pairs = dataset_pairs(args.data)
    images = [read_pair(i, m, strict=True)[0] for _, i, m in pairs]
    sizes = {im.shape for im in images}
    if len(sizes) != 1:
        raise ValueError(f"'{args.data}': the images differ in size {sorted(sizes)}; cut patches first")
    features = patch_embeddings(np.stack(images), model, batch=args.batch)
    with atomic_path(args.out) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, names=np.array([name for name, _, _ in pairs]), features=features)
    print(f"wrote {features.shape[1]}-d {args.arch} features of {len(pairs)} patches to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nudiff_diffusion import add_device_argument

    from ._hovernet import PRESETS

    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="nudiff-seg", description=__doc__, formatter_class=fmt)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train HoVer-Net on real (+ synthetic) pairs", formatter_class=fmt)
    p.add_argument("--real", required=True, help="dataset folder of real pairs (images/, instance_maps/)")
    p.add_argument("--subset", help="text file of the real images to use, one name per line (nudiff-postproc subset)")
    p.add_argument("--synthetic", help="dataset folder of synthetic pairs (nudiff-histo sample output)")
    p.add_argument(
        "--synthetic-ratio",
        type=_ratio,
        default="pool",
        help="share of each batch from --synthetic, or 'pool' (the paper: one shuffled pool)",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="light", help="model size and mode")
    p.add_argument("--out", required=True, help="run directory (checkpoint, train_state.pt, log.csv)")
    p.add_argument("--epochs", type=int, default=20, help="epochs over the real windows, both phases together")
    p.add_argument(
        "--frozen-epochs",
        type=int,
        help="phase-1 epochs with the encoder frozen (default: half with --encoder-weights, else 0)",
    )
    p.add_argument(
        "--encoder-weights",
        help="ImageNet ResNet-50 weights for the encoder (full-width presets): HoVer-Net's own "
        "ImageNet-ResNet50-Preact_pytorch.tar (the reference's start) or torchvision's resnet50 .pth/.safetensors",
    )
    p.add_argument("--batch", type=int, default=4, help="windows per batch")
    p.add_argument(
        "--frozen-batch",
        type=int,
        help="windows per batch in phase 1, the encoder frozen (default: --batch; HoVer-Net's code: 16, "
        "the Nudiff paper's copy of it: 32)",
    )
    p.add_argument(
        "--lr", type=float, default=1e-4, help="Adam learning rate (10x lower for the second half of each phase)"
    )
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    p.add_argument("--val", help="dataset folder of validation tiles: Dice/AJI/PQ each epoch, best epoch kept by AJI")
    p.add_argument("--seed", type=int, default=0, help="seed of the window order and augmentation")
    p.add_argument(
        "--no-affine",
        action="store_true",
        help="leave out HoVer-Net's affine augmentation (scale, shear, rotation, translation); keep the rest",
    )
    p.add_argument(
        "--windows",
        choices=("valid", "mirror"),
        default="valid",
        help="how the real tiles are cut: valid, input windows inside the tile (the border band is context "
        "only); mirror, the output regions cover the tile, the input mirrored beyond it (HoVer-Net's "
        "extract_patches, which the paper used on its patches)",
    )
    p.add_argument(
        "--synthetic-windows",
        choices=("valid", "mirror"),
        default="mirror",
        help="how the synthetic tiles are cut (they have no context beyond them: valid would leave their border "
        "band unsupervised, 59%% of a 256 px tile)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--max-batches", type=int, help="stop after this many batches (resumable; for time-boxed runs)")
    add_device_argument(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("predict", help="instance maps of images of any size (tiled)", formatter_class=fmt)
    p.add_argument("--checkpoint", help="run directory of nudiff-seg train")
    p.add_argument("--engine", help="an .onnx graph of nudiff-seg export (ONNX Runtime) instead of --checkpoint")
    p.add_argument("--images", required=True, help="folder of RGB images (PNG/TIFF/JPEG)")
    p.add_argument("--out", required=True, help="output folder: instance_maps/, mat/, geojson/, overlays/")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    add_device_argument(p)  # for --checkpoint; an --engine graph runs where ONNX Runtime's provider does
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="HoVer-Net checkpoint -> ONNX graph for predict --engine", formatter_class=fmt)
    p.add_argument("--checkpoint", required=True, help="run directory of nudiff-seg train")
    p.add_argument("--out", required=True, help="the .onnx file (config.json is written beside it)")
    p.add_argument("--batch-max", type=int, default=16, help="largest batch the graph accepts")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (the dynamo exporter needs >= 18)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "import-hovernet",
        help="HoVer-Net's released weights -> a run directory for predict, export and fidelity",
        formatter_class=fmt,
    )
    p.add_argument(
        "--weights",
        required=True,
        help="a trained HoVer-Net in the reference's layout: vqdang/hover_net's .tar "
        "(hovernet_original_kumar_notype_tf2pytorch.tar, ...) or TIAToolbox's .pth; a type branch is left out",
    )
    p.add_argument("--out", required=True, help="new run directory (config.json, model.safetensors)")
    p.set_defaults(func=_cmd_import_hovernet)

    p = sub.add_parser("evaluate", help="Dice, AJI, AJI+, DQ, SQ, PQ per image and the mean", formatter_class=fmt)
    p.add_argument("--true", required=True, help="folder of reference instance maps")
    p.add_argument("--pred", required=True, help="folder of predicted instance maps (same stems)")
    p.add_argument("--out", help="CSV to write")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "fidelity", help="label fidelity: a model trained on real data scored on synthetic pairs", formatter_class=fmt
    )
    p.add_argument("--checkpoint", required=True, help="run directory of a model trained on real data")
    p.add_argument("--pairs", required=True, help="synthetic dataset folder (images/, instance_maps/)")
    p.add_argument("--real", help="real dataset folder scored the same way, for reference")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    p.add_argument("--out", help="JSON file of the mean scores per set")
    add_device_argument(p)
    p.set_defaults(func=_cmd_fidelity)

    p = sub.add_parser("features", help="ImageNet ResNet embeddings of a patch folder", formatter_class=fmt)
    p.add_argument("--data", required=True, help="dataset folder of patches (images/, instance_maps/)")
    p.add_argument("--weights", required=True, help="torchvision ImageNet weights (.pth or .safetensors)")
    p.add_argument("--arch", choices=("resnet50", "resnet18"), default="resnet50", help="architecture of the weights")
    p.add_argument("--batch", type=int, default=32, help="patches per forward pass")
    p.add_argument("--out", required=True, help="output .npz (names, features) for `nudiff-postproc subset`")
    add_device_argument(p)
    p.set_defaults(func=_cmd_features)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input)."""
    from nudiff_postproc import retain_freed_memory
    from nudiff_postproc._runs import report_interrupt, sigterm_as_interrupt

    args = build_parser().parse_args(argv)
    retain_freed_memory()  # PyTorch's large CPU tensors: no page faults on every reuse
    try:
        with sigterm_as_interrupt():  # a kill cleans up as Ctrl-C does
            return int(args.func(args))
    except (ValueError, TypeError, OSError, RuntimeError, FloatingPointError) as exc:
        print(f"nudiff-seg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return report_interrupt("nudiff-seg", args.command)


if __name__ == "__main__":
    sys.exit(main())
