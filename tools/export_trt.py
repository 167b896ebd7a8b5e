"""Build a TensorRT engine from a graph of tools/export_onnx.py.

    python tools/export_trt.py engines/histo/model.onnx -o engines/histo-trt/model.plan \\
        [--fp16 | --bf16] [--min-batch 1 --opt-batch 8 --max-batch 16] [--workspace 4] [--timing-cache FILE]

Needs TensorRT 10 or 11 and an NVIDIA GPU (``pip install nudiff-diffusion[trt]`` on a
machine with an NVIDIA driver); without them it stops with a message that says what is
missing, writing nothing. The builder parses the graph (an ``eps`` or ``--guided`` export),
sets one optimisation profile over the batch axis (min/opt/max; max at most the graph's
``--batch-max``), serializes the engine, checks it against ONNX Runtime on random inputs and
writes ``config.json`` beside it (a folder of its own). Precision: from a float32 graph,
``--fp16`` / ``--bf16`` let TensorRT 10 use float16 / bfloat16 kernels while normalisation
and softmax layers stay float32 (weakly typed; TensorRT 11 removed this); from a float16
graph (``tools/export_onnx.py ... --fp16``), ``--fp16`` builds a strongly typed network that
keeps the graph's types (TensorRT 10 and 11). ``nudiff-histo sample --engine model.plan`` /
``nudiff-structure sample --engine`` then run it. Not executed in this project's workplace
(no TensorRT there).
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx", help="the .onnx graph (config.json beside it)")
    parser.add_argument("-o", "--output", required=True, help="the engine to write (.plan or .engine)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument(
        "--fp16", action="store_true", help="float16: kernels of a float32 graph, or the types of a float16 graph"
    )
    precision.add_argument("--bf16", action="store_true", help="allow bfloat16 kernels")
    parser.add_argument("--min-batch", type=int, default=1, help="smallest batch of the profile")
    parser.add_argument("--opt-batch", type=int, help="batch TensorRT tunes for (default: --max-batch)")
    parser.add_argument("--max-batch", type=int, help="largest batch (default: the graph's --batch-max)")
    parser.add_argument("--workspace", type=float, default=4.0, help="workspace memory limit, GiB")
    parser.add_argument("--timing-cache", help="timing cache file (read if present, written after the build)")
    args = parser.parse_args(argv)
    try:
        from nudiff_diffusion import EngineUnavailableError, build_engine, check_engine_args, require_tensorrt

        options = dict(
            precision="float16" if args.fp16 else "bfloat16" if args.bf16 else "float32",
            min_batch=args.min_batch,
            opt_batch=args.opt_batch,
            max_batch=args.max_batch,
            workspace_gib=args.workspace,
        )
        check_engine_args(args.onnx, args.output, timing_cache=args.timing_cache, **options)  # before TensorRT
        require_tensorrt(args.output)
        t0 = time.perf_counter()
        written = build_engine(args.onnx, args.output, timing_cache=args.timing_cache, **options)
    except EngineUnavailableError as exc:
        print(f"export_trt: error: {exc}", file=sys.stderr)
        return 3
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        print(f"export_trt: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.output}: TensorRT {written['tensorrt']}, {written['precision']}, batch "
        f"{written['batch_min']}..{written['batch_max']} (tuned for {written['batch_opt']}), in "
        f"{time.perf_counter() - t0:.1f} s; max abs difference to ONNX Runtime: "
        f"{written['max_abs_diff_vs_onnxruntime']:.2e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
