"""``nudiff-seg``: segmentation-side tools (patch embeddings now; HoVer-Net follows)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_features(args: argparse.Namespace) -> int:
    import numpy as np
    from nudiff_postproc._folders import dataset_pairs, read_pair
    from nudiff_postproc._io import atomic_path

    from ._features import load_backbone, patch_embeddings

    model = load_backbone(args.weights, args.arch)
    pairs = dataset_pairs(args.data)
    images = [read_pair(i, m)[0] for _, i, m in pairs]
    sizes = {im.shape for im in images}
    if len(sizes) != 1:
        raise ValueError(f"'{args.data}': the images differ in size {sorted(sizes)}; cut patches first")
    features = patch_embeddings(np.stack(images), model, batch=args.batch)
    with atomic_path(args.out) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, names=np.array([name for name, _, _ in pairs]), features=features)
    print(f"wrote {features.shape[1]}-d {args.arch} features of {len(pairs)} patches to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="nudiff-seg", description=__doc__, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("features", help="ImageNet ResNet embeddings of a patch folder", formatter_class=fmt)
    p.add_argument("--data", required=True, help="dataset folder of patches (images/, instance_maps/)")
    p.add_argument("--weights", required=True, help="torchvision ImageNet weights (.pth or .safetensors)")
    p.add_argument("--arch", choices=("resnet50", "resnet18"), default="resnet50", help="architecture of the weights")
    p.add_argument("--batch", type=int, default=32, help="patches per forward pass")
    p.add_argument("--out", required=True, help="output .npz (names, features) for `nudiff-postproc subset`")
    p.set_defaults(func=_cmd_features)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"nudiff-seg {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
