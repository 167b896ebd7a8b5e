"""The whole method in one command: tiles -> structure and histology models -> synthetic
pairs -> HoVer-Net with and without them -> a report.

    python tools/pipeline.py configs/demo.toml [--data DIR] [--out DIR] [--set KEY=VALUE]
        [--until STAGE] [--redo STAGE] [--dry-run] [--quiet]

Stages (each skipped when its marker ``OUT/stages/NAME.json`` holds the same settings, so
a killed run resumes; a training stage that was killed continues from its last
checkpoint, a sampling stage keeps what it wrote):

    prepare            tiles (procedural, or a dataset folder split into train/test) ->
                       256 px patches -> the labelled subset (``nudiff-postproc subset``)
    structure-train    the structure model on the subset           } side by side
    histo-train        the histology model on the subset pairs     } (``parallel``)
    structure-sample   new structures and their instance maps
    histo-engine       the histology model as ONNX graphs (``sample.engine = "onnx"``)
    histo-sample       an H&E image painted for each new structure (classifier-free guidance)
    synthetic-seg      synthetic pairs at the segmentation's scale and window size
    seg-train-RUN      HoVer-Net per ``[[seg.runs]]`` (subset / full real data, +- synthetic)
    seg-eval-RUN       its predictions on the test tiles and their Dice/AJI/PQ
    judge-synthetic    morphology distance, stain distance, alignment, label fidelity
    report             OUT/report.md, OUT/report.html and the pictures

Every command a stage runs is one of the package CLIs (logged in ``OUT/logs/NAME.log``);
``--dry-run`` prints them. A stage whose settings changed since it ran stops the run with
a message: rerun it with ``--redo NAME`` (which also redoes what depends on it) or use
another ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the pipeline_* modules beside this file

from pipeline_config import ConfigError, load_config  # noqa: E402
from pipeline_runner import run_pipeline  # noqa: E402
from pipeline_stages import build_stages, check_prepared_data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="TOML config (configs/demo.toml, configs/cpu-kumar.toml, ...)")
    parser.add_argument("--data", default=os.environ.get("NUDIFF_DATA"), help="dataset folder (default: $NUDIFF_DATA)")
    parser.add_argument("--out", help="output folder (default: the config's `out`)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--until", help="run only this stage and what it needs")
    parser.add_argument("--redo", action="append", default=[], help="rerun this stage and those after it")
    parser.add_argument("--dry-run", action="store_true", help="print the stages and their commands, run nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, data=args.data, out=args.out, overrides=args.set)
        config["config_path"] = str(Path(args.config).resolve())
        stages = build_stages(config)
        if "prepare" not in args.redo:
            check_prepared_data(config)
        return run_pipeline(
            config, stages, until=args.until, redo=args.redo, dry_run=args.dry_run, progress=not args.quiet
        )
    except ConfigError as exc:
        print(f"pipeline: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
