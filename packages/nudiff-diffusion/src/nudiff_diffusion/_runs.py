"""What every model's command line shares: training flags, sampling flags, shards of a
sampling run and the per-sample starting noise that makes shards and resumes exact."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from nudiff_postproc._runs import report_interrupt, sigterm_as_interrupt

from ._resume import MODEL_FLAG, claimed_output_folder, runtime_precision, runtime_weights_digest
from ._runtime import PRECISIONS, resolve_device, warn_if_emulated_precision
from ._sampling import LOWER_ORDER_FINAL_BELOW, seeded_generator
from ._trainer import OPTIMIZERS, TrainConfig

__all__ = [
    "noise_generator",
    "step_noise_generators",
    "sampling_record",
    "claimed_samples_folder",
    "int_at_least",
    "evaluation_preset",
    "finite_or_null",
    "run_cli",
    "add_evaluate_arguments",
    "report_evaluation",
    "median_seconds",
    "add_train_arguments",
    "train_config_from_args",
    "add_sampling_arguments",
    "add_device_argument",
    "runtime_options_from_args",
    "shard_indices",
    "initial_noise",
]


def int_at_least(low: int, why: str = "") -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low``, else a usage error naming the value
    (and ``why``, when given, saying what the bound is for)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}" + (f": {why}" if why else ""))
        return value

    return parse


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """``--steps --batch --lr --ema --precision --save-every --resume --seed --weight-decay
    --optimizer --lr-cycle --lr-warmup --grad-clip --device`` (the defaults: batch 4, AdamW
    at a constant lr 1e-4 with weight decay 0.05, the paper code's settings for its structure
    model; its histology code: --optimizer adam --weight-decay 0.01 --batch 1 --lr-cycle 10000
    --lr-warmup 2000; neither clips gradients: --grad-clip 0)."""
    parser.add_argument("--steps", type=int, default=10000, help="training steps")
    parser.add_argument("--batch", type=int, default=4, help="batch size (the paper's structure model: 4)")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate (the peak of each cycle with --lr-cycle)")
    parser.add_argument("--ema", type=float, default=0.9999, help="EMA rate")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast precision")
    parser.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints and previews")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of --out")
    parser.add_argument("--seed", type=int, default=0, help="seed of data order, noise and initial weights")
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=0.05,
        help="weight decay (the paper's structure model: 0.05 with adamw; its histology model: 0.01 with adam)",
    )
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="adamw",
        help="adamw (decoupled weight decay); adam: weight decay as an L2 penalty (the paper's histology model)",
    )
    parser.add_argument(
        "--lr-cycle",
        type=int,
        default=0,
        help="cosine learning-rate cycles of this many steps (0: constant; the paper's histology model: 10000)",
    )
    parser.add_argument(
        "--lr-warmup",
        type=int,
        default=0,
        help="linear warm-up steps at the start of each cycle (the paper's histology model: 2000)",
    )
    parser.add_argument(
        "--grad-clip",
        type=float,
        default=1.0,
        help="clip the gradients' global norm to this (0: no clipping, as the paper's code)",
    )
    add_device_argument(parser)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``: auto (the CUDA GPU when PyTorch sees one, else the CPU), cpu, cuda, cuda:N."""
    parser.add_argument(
        "--device", default="auto", help="where PyTorch runs: auto (the CUDA GPU if there is one), cpu, cuda, cuda:N"
    )


def train_config_from_args(args: argparse.Namespace, **extra: Any) -> TrainConfig:
    """The :class:`TrainConfig` of :func:`add_train_arguments`' flags (plus ``extra`` fields);
    ``--device`` is checked here, before any work."""
    warn_if_emulated_precision(resolve_device(args.device), args.precision)
    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        lr=args.lr,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        optimizer=args.optimizer,
        lr_cycle=args.lr_cycle,
        lr_warmup=args.lr_warmup,
        device=args.device,
        ema_rate=args.ema,
        precision=args.precision,
        save_every=args.save_every,
        seed=args.seed,
        **extra,
    )


def add_sampling_arguments(parser: argparse.ArgumentParser, *, batch: int, what: str) -> None:
    """``--checkpoint --engine --sampler --steps --batch --seed --out --rank --world-size
    --device --precision --compile --cuda-graphs``."""
    parser.add_argument("--checkpoint", help="run directory (or checkpoint directory) of a trained model")
    parser.add_argument(
        "--engine", help="an exported engine (.onnx: ONNX Runtime; .plan/.engine: TensorRT); overrides --checkpoint"
    )
    parser.add_argument("--sampler", choices=("ddpm", "ddim", "dpmpp2m"), default="dpmpp2m", help="sampler")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps")
    parser.add_argument("--batch", type=int, default=batch, help=f"{what} per batch")
    parser.add_argument("--seed", type=int, default=0, help="seed: names and noise derive from it")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--rank", type=int, default=0, help="this shard's index")
    parser.add_argument("--world-size", type=int, default=1, help="number of shards")
    add_device_argument(parser)
    parser.add_argument(
        "--precision", choices=sorted(PRECISIONS), default="fp32", help="autocast precision of a --checkpoint run"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the --checkpoint model (a GPU option)")
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay each sampler step as a CUDA graph (a --checkpoint model or a TensorRT --engine; GPU only)",
    )


def runtime_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``load_denoiser`` (and ``load_histo_denoiser``) from
    :func:`add_sampling_arguments`' flags: the resolved ``--device`` and the PyTorch options."""
    device = resolve_device(args.device)
    if not args.engine:  # an engine runs in its own precision
        warn_if_emulated_precision(device, args.precision)
    return {
        "device": device,
        "precision": args.precision,
        "compile": args.compile,
        "cuda_graphs": args.cuda_graphs,
    }


def shard_indices(num: int, rank: int, world_size: int) -> list[int]:
    """The indices ``i < num`` with ``i % world_size == rank``: rank ``r`` of ``k``'s share
    of a sampling run (the shards of all ranks are disjoint and cover ``range(num)``)."""
    for name, value in (("num", num), ("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"`{name}` (--{name.replace('_', '-')}) must be an integer, got {value!r}")
    if num < 0:
        raise ValueError(f"`num` (--num) must be >= 0, got {num}")
    if world_size < 1:
        raise ValueError(f"`world_size` (--world-size) must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"`rank` (--rank) must be in [0, world_size={world_size}), got {rank}")
    return list(range(rank, num, world_size))


def initial_noise(seed: int, indices: list[int], shape: tuple[int, ...], *, stream: int = 0) -> torch.Tensor:
    """(len(indices), *shape) float32 starting noise, sample ``i`` drawn from its own
    generator (``stream``, ``seed``, ``i``): the same x_T for an index whatever the batch or
    the rank. Each model kind samples from its own ``stream``, so that a structure and the
    image painted for it never start from the same noise for seeds below 10^9 and indices
    below 10^6 (with one shared stream, seed 0 for both made the image's noise a function of
    its own structure's noise); the mix is linear, so seeds or indices beyond those can meet
    another stream's."""
    if not indices:
        raise ValueError("`indices` is empty: no sample to draw noise for")
    return torch.stack([torch.randn(shape, generator=noise_generator(seed, i, stream=stream)) for i in indices])


def noise_generator(seed: int, index: int, *, stream: int = 0) -> torch.Generator:
    """The generator of sample ``index`` of ``seed`` in ``stream`` (see :func:`initial_noise`)."""
    return seeded_generator((stream * 1_000_000_007 + seed) * 1_000_003 + index)


#: streams of a sampler's step noise are these many above the starting noise's streams (0, 1)
_STEP_NOISE_STREAMS = 2


def step_noise_generators(seed: int, indices: Sequence[int], *, stream: int = 0) -> list[torch.Generator]:
    """One generator per sample ``indices[k]`` for a stochastic sampler's step noise
    (``ddpm``; ``sample(generator=...)`` draws row ``k`` of each step's noise from generator
    ``k``): a stream of its own, never a sample's starting noise (:func:`noise_generator`
    of the same seed and index), and per sample, so that a sample's steps do not depend on
    the batch, the rank or a resume that cut the batches differently."""
    return [noise_generator(seed, i, stream=stream + _STEP_NOISE_STREAMS) for i in indices]


#: what a folder of samples records for a sampler that draws step noise (``ddpm``): per
#: sample since 2026-12-03; earlier folders drew it per batch and cannot be resumed
STEP_NOISE = "per sample"
#: what a folder of dpmpp2m samples of few steps records: since 2026-12-04 the last of under
#: 10 updates is first order (DPM-Solver's lower_order_final); earlier folders cannot be resumed
FINAL_UPDATE = "first order"


def sampling_record(runtime: Any, *, sampler: str, steps: int, seed: int, **extra: Any) -> dict[str, Any]:
    """The settings an output folder of samples records (:func:`claim_output_folder`): the
    model (its weights' digest) and the precision it runs in (:func:`runtime_precision`;
    a float16 graph of a checkpoint shares its weights' digest), sampler, steps, seed and
    ``extra``; with ``ddpm``, how its step noise is drawn (``step_noise``: a folder that
    records none drew it per batch); with ``dpmpp2m`` of under 10 updates, that the last is
    first order (``final_update``: a folder that records none took it in second order)."""
    settings = {
        "model": runtime_weights_digest(runtime),
        "precision": runtime_precision(runtime),
        "sampler": sampler,
        "steps": steps,
        "seed": seed,
        **extra,
    }
    if sampler == "ddpm":
        settings["step_noise"] = STEP_NOISE
    if sampler == "dpmpp2m" and steps - 1 < LOWER_ORDER_FINAL_BELOW:
        settings["final_update"] = FINAL_UPDATE
    return settings


def claimed_samples_folder(
    out: str | Path, settings: Mapping[str, Any], *, flags: Mapping[str, str] | None = None
) -> AbstractContextManager[Path]:
    """:func:`claimed_output_folder` for the work that fills a folder of samples
    (``settings`` from :func:`sampling_record`; a first try that fails before its first
    sample leaves nothing): a folder whose record lacks the ``step_noise`` or
    ``final_update`` this run records was drawn by an older sampler, and is refused by name. ``flags``: how the
    caller's own keys read in a refusal."""
    named = {
        **MODEL_FLAG,
        "precision": "the precision (--precision, or the graph's)",
        "step_noise": "ddpm step-noise scheme",
        "final_update": "dpmpp2m final update",
        **(flags or {}),
    }
    return claimed_output_folder(out, settings, flags=named, required=("step_noise", "final_update"))


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None, prog: str) -> int:
    """Parse ``argv`` and run the chosen command (``args.func``); bad input (ValueError,
    TypeError, OSError, NotImplementedError, and an engine that this machine cannot
    run: ``EngineUnavailableError``) prints ``prog command: error: ...``
    and gives exit status 2. A ``sample`` command needs ``--checkpoint`` or ``--engine``.
    Ctrl-C or SIGTERM (:func:`nudiff_postproc._runs.sigterm_as_interrupt`) ends the command
    with its clean-up, one line instead of a traceback, and exit status 130."""
    args = parser.parse_args(argv)
    if args.command == "sample" and not (args.checkpoint or args.engine):
        print(f"{prog} sample: error: give --checkpoint RUN (or --engine FILE)", file=sys.stderr)
        return 2
    from ._tensorrt import EngineUnavailableError

    try:
        with sigterm_as_interrupt():
            return int(args.func(args))
    except (ValueError, TypeError, OSError, NotImplementedError, EngineUnavailableError) as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return report_interrupt(prog, args.command)


def add_evaluate_arguments(parser: argparse.ArgumentParser, *, samples: str, real: str, preset: str) -> None:
    """``--samples --real --preset --out`` of an ``evaluate`` command."""
    parser.add_argument("--samples", required=True, help=samples)
    parser.add_argument("--real", required=True, help=real)
    parser.add_argument("--preset", help=preset)
    parser.add_argument("--out", help="JSON file (default: SAMPLES/evaluation.json)")


def evaluation_preset(presets: Mapping[str, Any], preset: str | None, size: int, *, kind: str, samples: Any) -> str:
    """The preset an ``evaluate`` command cuts the real data with: ``preset`` (``--preset``)
    when given, checked to make samples of ``size`` px (real data of another size would be
    compared at another scale), else the first of ``presets`` whose ``image_size`` is
    ``size``. ``kind`` ("structure", "histology") and ``samples`` (the folder) name them in
    errors."""
    if preset is None:
        matches = [name for name, p in presets.items() if p.image_size == size]
        if not matches:
            raise ValueError(f"no {kind} preset has image size {size} (the samples in '{samples}'); pass --preset")
        return matches[0]
    if preset not in presets:
        raise ValueError(f"unknown {kind} preset {preset!r}; choose one of {sorted(presets)}")
    if presets[preset].image_size != size:
        raise ValueError(
            f"--preset {preset} makes {presets[preset].image_size} px {kind} patches, but the samples in "
            f"'{samples}' are {size} px: the real data must be cut at the samples' size"
        )
    return preset


def finite_or_null(value: Any) -> Any:
    """``value`` (numbers, dicts, lists) with every NaN or infinite float replaced by None,
    for strict JSON (``json.dumps(..., allow_nan=False)``: null, where Python would write
    the non-standard NaN / Infinity that strict parsers refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def report_evaluation(result: dict[str, Any], samples: str | Path, out: str | Path | None) -> Path:
    """Print the numbers of an evaluation as a table (floats to 4 decimals; lists and dicts,
    e.g. histograms, only in the JSON) and write all of it to ``out`` (default
    ``SAMPLES/evaluation.json``), atomically. Returns the JSON's path."""
    from ._checkpoint import _atomic_write

    scalars = {k: v for k, v in result.items() if isinstance(v, (int, float))}
    width = max((len(k) for k in scalars), default=0)
    for key, value in scalars.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    path = Path(out) if out else Path(samples) / "evaluation.json"
    strict = finite_or_null(result)  # strict JSON: NaN and inf (undefined numbers) as null
    _atomic_write(path, lambda p: p.write_text(json.dumps(strict, indent=2, allow_nan=False) + "\n"))
    return path


def median_seconds(fn: Callable[[], Any], repeat: int) -> float:
    """Median wall time of ``repeat`` calls of ``fn`` after one warm-up call (benchmarks)."""
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"`repeat` (--repeat) must be an integer >= 1, got {repeat!r}")
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
