"""Export a trained nudiff UNet (structure or histology checkpoint) to ONNX.

    python tools/export_onnx.py RUN -o engines/histo/model.onnx [--batch-max 16 --opset 18]
        [--guided | --cached-modulation] [--fp16] [--slim]

Layouts: by default the graph takes ``(x, t)`` (structure model) or ``(x, t, cond)``
(histology model: the SPADE modulation is computed inside, every call). ``--guided``
(histology): one graph ``(x, t, cond, guidance_scale)`` that runs both halves of
classifier-free guidance as one batch inside. ``--cached-modulation`` (histology): two
graphs, ``NAME.modulation.onnx`` (structures -> SPADE modulations, run once per batch) and
``NAME.onnx`` (``(x, t, modulations)`` -> eps, every step). ``--fp16``: float16 arithmetic
behind float32 inputs and outputs, normalisations and softmax in float32. ``--slim``:
simplify with onnxslim (``pip install onnxslim``).

Every graph has a dynamic batch axis up to ``--batch-max`` (a larger batch is refused at run
time) and is checked against PyTorch on random inputs (max abs difference printed; bar 1e-4
for float32, 2e-2 for float16). A ``config.json`` beside it lets ``nudiff-structure sample
--engine`` and ``nudiff-histo sample --engine`` run it. One export per folder.
"""

from __future__ import annotations

import argparse
import sys
import time


def _opset(text: str) -> int:
    """--opset, refused before any work when the dynamo exporter cannot write it."""
    from nudiff_diffusion import check_opset  # here: --help stays free of torch

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    try:
        return check_opset(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run or checkpoint directory (config.json + model.safetensors)")
    parser.add_argument("-o", "--output", required=True, help="the .onnx file to write (config.json goes beside it)")
    parser.add_argument("--batch-max", type=int, default=16, help="largest batch the graph accepts")
    parser.add_argument(
        "--opset",
        type=_opset,
        default=18,
        help="ONNX opset: 18 (17 breaks the dynamo exporter's Split) up to the newest onnx knows",
    )
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--guided", action="store_true", help="histology: guidance inside one graph")
    layout.add_argument("--cached-modulation", action="store_true", help="histology: modulation graph + step graph")
    parser.add_argument("--fp16", action="store_true", help="float16 graph (normalisations, softmax in float32)")
    parser.add_argument("--slim", action="store_true", help="simplify the graph with onnxslim")
    args = parser.parse_args(argv)
    try:
        from nudiff_diffusion import export_onnx, load_model, read_config
        from nudiff_postproc._io import check_output_file

        check_output_file(args.output, "-o")  # before the export's minutes, not at its end

        config = read_config(args.checkpoint)
        settings = config.get("diffusion", {})
        kind = settings.get("kind", "structure")
        if kind != "histo" and (args.guided or args.cached_modulation):
            flag = "--guided" if args.guided else "--cached-modulation"
            raise ValueError(f"{flag} is for histology models; '{args.checkpoint}' holds a {kind!r} model")
        common = dict(
            batch_max=args.batch_max,
            opset=args.opset,
            settings=settings,
            precision="float16" if args.fp16 else "float32",
            slim=args.slim,
        )
        t0 = time.perf_counter()
        if kind == "histo":
            from nudiff_histo import export_histo_onnx, load_histo_model

            model = load_histo_model(args.checkpoint)
            if args.cached_modulation:
                written = export_histo_onnx(model, args.output, **common)
            else:
                layout = "guided" if args.guided else "eps"
                cond = int(settings["cond_channels"])
                written = export_onnx(model, args.output, cond_channels=cond, layout=layout, **common)
        else:
            written = export_onnx(load_model(args.checkpoint), args.output, **common)
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        print(f"export_onnx: error: {exc}", file=sys.stderr)
        return 2
    extra = f" (+ {written['modulation_graph']})" if written.get("modulation_graph") else ""
    print(
        f"wrote {args.output}{extra}: {kind} model, layout {written['layout']}, {written['precision']}, inputs "
        f"{written['inputs']}, batch <= {written['batch_max']}, opset {written['opset']}"
        f"{', slimmed' if written['slim'] else ''}, in {time.perf_counter() - t0:.1f} s; max abs difference to "
        f"float32 PyTorch on random inputs: {written['max_abs_diff']:.2e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
