"""``nudiff-structure``: train, sample and judge the nuclei-structure model."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_train(args: argparse.Namespace) -> int:
    from nudiff_diffusion import setup_distributed, train_config_from_args
    from nudiff_postproc._io import check_output_outside

    from ._train import train_structure_model

    check_output_outside(args.out, {"--data": args.data})
    setup_distributed(args.device)  # under torchrun: DDP over the ranks; else nothing
    config = train_config_from_args(args)
    train_structure_model(
        args.data, args.out, args.preset, config, subset=args.subset, resume=args.resume, progress=not args.quiet
    )
    print(f"trained {args.preset} for {args.steps} steps; the model is in {args.out}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from nudiff_diffusion import load_denoiser, read_config, runtime_options_from_args

    from ._sample import sample_structures

    source = args.engine or args.checkpoint
    options = runtime_options_from_args(args)  # --device checked before any work
    if not args.engine:  # before building the network: a histology checkpoint would not fit it
        kind = read_config(source).get("diffusion", {}).get("kind", "structure")
        if kind != "structure":
            raise ValueError(f"'{source}' holds a {kind!r} model, not a structure model")
    runtime = load_denoiser(source, **options)
    kind = runtime.config.get("diffusion", {}).get("kind", "structure")
    if kind != "structure":
        raise ValueError(f"'{source}' holds a {kind!r} model, not a structure model")
    manifest = sample_structures(
        runtime,
        args.out,
        args.num,
        batch=args.batch,
        sampler=args.sampler,
        steps=args.steps,
        seed=args.seed,
        clip=args.clip or None,
        rank=args.rank,
        world_size=args.world_size,
        progress=not args.quiet,
    )
    print(
        f"{manifest['this_rank']} structures of rank {args.rank} in {args.out} "
        f"({manifest['drawn_now']} drawn now, {manifest['seconds']} s)"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from nudiff_diffusion import report_evaluation
    from nudiff_postproc._io import check_output_file

    check_output_file(args.out)  # before the work

    from ._evaluate import evaluate_structures

    report_evaluation(evaluate_structures(args.samples, args.real, preset=args.preset), args.samples, args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nudiff_diffusion import add_evaluate_arguments, add_sampling_arguments, add_train_arguments
    from nudiff_postproc import PATCH_GEOMETRY  # the presets' names (no torch import for --help)

    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="nudiff-structure", description=__doc__, formatter_class=fmt)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a structure model", formatter_class=fmt)
    p.add_argument("--data", required=True, help="dataset folder (its instance_maps/ are used)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, previews, logs)")
    p.add_argument("--preset", choices=sorted(PATCH_GEOMETRY), default="tiny-64", help="model preset")
    p.add_argument("--subset", help="text file of patch names to train on (nudiff-postproc subset)")
    add_train_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sample", help="draw structures and their instance maps", formatter_class=fmt)
    add_sampling_arguments(p, batch=16, what="structures")
    p.add_argument("--num", type=int, required=True, help="structures to draw (over all ranks)")
    p.add_argument("--clip", type=float, default=1.0, help="clip predicted x0 to [-clip, clip] (0: no clipping)")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("evaluate", help="judge sampled structures against real ones", formatter_class=fmt)
    add_evaluate_arguments(
        p,
        samples="output folder of `sample`",
        real="dataset folder of real instance maps",
        preset="preset to encode the real maps with (default: by the samples' size)",
    )
    p.set_defaults(func=_cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input)."""
    from nudiff_diffusion import run_cli
    from nudiff_postproc import retain_freed_memory

    retain_freed_memory()  # PyTorch's large CPU tensors: no page faults on every reuse
    return run_cli(build_parser(), argv, "nudiff-structure")


if __name__ == "__main__":
    sys.exit(main())
