"""Export a trained nudiff UNet (structure or histology checkpoint) to ONNX.

    python tools/export_onnx.py RUN -o engines/structure/model.onnx [--batch-max 16 --opset 18]

The graph takes ``(x, t)`` (structure model) or ``(x, t, cond)`` (histology model: the SPADE
modulation is computed inside), has a dynamic batch axis up to ``--batch-max``, and is checked
against PyTorch on random inputs (max abs difference printed; float32 bar 1e-4). A
``config.json`` beside it lets ``nudiff-structure sample --engine`` and ``nudiff-histo sample
--engine`` run it in ONNX Runtime. One graph per folder.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run or checkpoint directory (config.json + model.safetensors)")
    parser.add_argument("-o", "--output", required=True, help="the .onnx file to write (config.json goes beside it)")
    parser.add_argument("--batch-max", type=int, default=16, help="largest batch the graph accepts")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (17 breaks the dynamo exporter's Split)")
    for flag in ("--fp16", "--guided", "--cached-modulation"):
        parser.add_argument(flag, action="store_true", help="not in this version (refused)")
    args = parser.parse_args(argv)
    try:
        unsupported = [f for f in ("fp16", "guided", "cached_modulation") if getattr(args, f)]
        if unsupported:
            raise ValueError(f"--{unsupported[0].replace('_', '-')} is not supported by this version yet")
        from nudiff_diffusion import export_onnx, load_model, read_config

        config = read_config(args.checkpoint)
        settings = config.get("diffusion", {})
        if settings.get("kind") == "histo":
            from nudiff_histo import load_histo_model

            model, cond_channels = load_histo_model(args.checkpoint), int(settings["cond_channels"])
        else:
            model, cond_channels = load_model(args.checkpoint), 0
        t0 = time.perf_counter()
        written = export_onnx(
            model,
            args.output,
            cond_channels=cond_channels,
            batch_max=args.batch_max,
            opset=args.opset,
            settings=settings,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"export_onnx: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.output} ({settings.get('kind', 'structure')} model, inputs {written['inputs']}, batch <= "
        f"{written['batch_max']}, opset {written['opset']}) in {time.perf_counter() - t0:.1f} s; "
        f"max abs difference to PyTorch on random inputs: {written['max_abs_diff']:.2e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
