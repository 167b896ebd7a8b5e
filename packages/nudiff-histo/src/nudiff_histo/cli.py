"""``nudiff-histo``: train, sample and judge the histology model."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_train(args: argparse.Namespace) -> int:
    from nudiff_diffusion import setup_distributed, train_config_from_args
    from nudiff_postproc._io import check_output_outside

    from ._train import train_histo_model

    check_output_outside(args.out, {"--pairs": args.pairs, "--init": args.init})
    setup_distributed(args.device)  # under torchrun: DDP over the ranks; else nothing
    config = train_config_from_args(args, cond_drop_prob=args.drop_prob)
    train_histo_model(
        args.pairs,
        args.out,
        args.preset,
        config,
        init=args.init,
        resume=args.resume,
        progress=not args.quiet,
        spade_layers=args.spade_layers,
        foreground=args.cond_foreground,
    )
    print(f"trained {args.preset} for {args.steps} steps; the model is in {args.out}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from nudiff_diffusion import runtime_options_from_args

    from ._model import load_histo_denoiser
    from ._sample import sample_histology

    runtime = load_histo_denoiser(args.engine or args.checkpoint, **runtime_options_from_args(args))
    manifest = sample_histology(
        runtime,
        args.structures,
        args.out,
        guidance=args.guidance,
        sampler=args.sampler,
        steps=args.steps,
        batch=args.batch,
        seed=args.seed,
        num=args.num,
        rank=args.rank,
        world_size=args.world_size,
        progress=not args.quiet,
    )
    print(
        f"{manifest['this_rank']} images of rank {args.rank} in {args.out} "
        f"({manifest['drawn_now']} painted now, {manifest['seconds']} s)"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from nudiff_diffusion import report_evaluation
    from nudiff_postproc._io import check_output_file

    check_output_file(args.out)  # before the work

    from ._evaluate import evaluate_histology

    report_evaluation(evaluate_histology(args.samples, args.real, preset=args.preset), args.samples, args.out)
    return 0


def _cmd_seg_tiles(args: argparse.Namespace) -> int:
    from nudiff_postproc import PATCH_GEOMETRY
    from nudiff_postproc._folders import list_files
    from nudiff_postproc._io import IMAGE_SUFFIXES, read_image

    from ._seg_tiles import seg_tile_grid, write_seg_tiles

    preset = args.preset
    if preset is None:  # by the painted images' size
        first = next(iter(list_files(f"{args.samples}/images", IMAGE_SUFFIXES, "synthetic image").values()))
        size = read_image(first).shape[0]
        matches = [name for name, g in PATCH_GEOMETRY.items() if g.image_size == size]
        if not matches:
            raise ValueError(f"no histology preset paints {size} px images ('{first}'); pass --preset")
        preset = matches[0]
    manifest = write_seg_tiles(args.samples, args.out, preset=preset, grid=seg_tile_grid(preset, args.window))
    print(
        f"wrote {manifest['tiles']} tiles of {manifest['tile_size']} px ({manifest['grid']} x {manifest['grid']} "
        f"pairs upsampled {manifest['upsampled']}x) to {args.out}"
    )
    return 0


def _guidance(value: str) -> float:
    from ._paint import check_guidance

    try:
        v = float(value)
        check_guidance(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value!r}") from None
    return v


def build_parser() -> argparse.ArgumentParser:
    from nudiff_diffusion import add_evaluate_arguments, add_sampling_arguments, add_train_arguments
    from nudiff_postproc import PATCH_GEOMETRY  # the presets' names

    from ._data import COND_FOREGROUNDS
    from ._model import SPADE_LAYERS

    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="nudiff-histo", description=__doc__, formatter_class=fmt)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or fine-tune) a histology model", formatter_class=fmt)
    p.add_argument("--pairs", required=True, help="dataset folder: images/ and instance_maps/")
    p.add_argument("--out", required=True, help="run directory (checkpoints, previews, logs)")
    p.add_argument("--preset", choices=sorted(PATCH_GEOMETRY), default="tiny-64", help="model preset")
    p.add_argument("--drop-prob", type=float, default=0.2, help="share of structures dropped to zeros (CFG)")
    p.add_argument("--init", help="histology checkpoint to fine-tune (the paper's second phase)")
    p.add_argument(
        "--spade-layers",
        choices=SPADE_LAYERS,
        help="where a new model's SPADE layers sit: decoder (default: the middle and decoder blocks, the paper's) or "
        "all (every normalisation: paints from its structure after far fewer steps, for CPU-scale runs)",
    )
    p.add_argument(
        "--cond-foreground",
        choices=COND_FOREGROUNDS,
        help="how a new model's conditions encode the foreground: binary, {0, 1} (default, the paper's: the null "
        "condition is an empty structure) or signed, {-1, 1} (the null condition a token of its own: sparse "
        "structures still paint after a few hundred CPU steps)",
    )
    add_train_arguments(p)  # the paper: lr 1e-4 pre-training, 2e-5 fine-tuning
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sample", help="paint images for structures", formatter_class=fmt)
    p.add_argument(
        "--structures",
        required=True,
        help="output folder of `nudiff-structure sample`, or a dataset folder of real instance maps",
    )
    add_sampling_arguments(p, batch=8, what="images (the UNet sees twice as many)")
    p.add_argument("--guidance", type=_guidance, default=2.0, help="classifier-free guidance scale")
    p.add_argument("--num", type=int, help="paint only the first NUM structures (default: all)")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("evaluate", help="stain statistics and alignment against real pairs", formatter_class=fmt)
    add_evaluate_arguments(
        p,
        samples="output folder of `sample` (or any dataset folder)",
        real="dataset folder of real pairs",
        preset="preset to cut the real tiles with (default: by the samples' size)",
    )
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "seg-tiles",
        help="synthetic pairs at the tiles' resolution, side by side, for `nudiff-seg train --synthetic`",
        formatter_class=fmt,
    )
    p.add_argument("--samples", required=True, help="output folder of `sample`")
    p.add_argument("--out", required=True, help="dataset folder to write (replaced if it exists)")
    p.add_argument("--preset", choices=sorted(PATCH_GEOMETRY), help="default: by the images' size")
    p.add_argument("--window", type=int, default=256, help="the segmentation network's input window (px)")
    p.set_defaults(func=_cmd_seg_tiles)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input)."""
    from nudiff_diffusion import run_cli
    from nudiff_postproc import retain_freed_memory

    retain_freed_memory()  # PyTorch's large CPU tensors: no page faults on every reuse
    return run_cli(build_parser(), argv, "nudiff-histo")


if __name__ == "__main__":
    sys.exit(main())
