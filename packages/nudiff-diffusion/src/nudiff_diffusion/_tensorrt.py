"""TensorRT: building an engine from an exported ONNX graph, and running it behind the same
``eps(x, t, cond)``.

Written to the TensorRT 10 and 11 Python API (``tensorrt``: builder, ONNX parser, optimisation
profile, ``execute_async_v3`` with tensor addresses). Neither part has been executed in
this project's workplace, which has no TensorRT (see the nudiff-diffusion README); what runs
here is everything around them: the argument checks and the error when TensorRT or a CUDA
GPU is missing. ``tensorrt`` is imported only inside these functions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from nudiff_postproc._io import check_output_file

from ._checkpoint import CONFIG_NAME, _atomic_write, read_json_object
from ._onnx import ONNX_FORMAT, GraphRuntime, onnx_session, read_graph_config, require_unet_graph

__all__ = [
    "TRT_FORMAT",
    "EngineUnavailableError",
    "require_tensorrt",
    "check_engine_args",
    "build_engine",
    "TensorRTDenoiser",
]

TRT_FORMAT = "nudiff-diffusion/tensorrt"
EnginePrecision = Literal["float32", "float16", "bfloat16"]
INSTALL_HINT = (
    "install it with `pip install nudiff-diffusion[trt]` (the TensorRT wheels, from NVIDIA's index) "
    "on a machine with an NVIDIA GPU and driver, or run the .onnx graph in ONNX Runtime instead"
)
# largest max abs difference of a new engine to ONNX Runtime (CPU, float32) on random
# inputs; float32 engines use TF32 matrix maths by default. Not measured here (no TensorRT).
ENGINE_TOLERANCE: dict[str, float] = {"float32": 1e-2, "float16": 5e-2, "bfloat16": 1e-1}


class EngineUnavailableError(RuntimeError):
    """The engine needs software or hardware that this machine lacks (TensorRT, CUDA)."""


def require_tensorrt(what: str | os.PathLike[str]) -> Any:
    """The ``tensorrt`` module, or :class:`EngineUnavailableError` saying what is missing
    (TensorRT, or a CUDA GPU that torch sees) and what to install; ``what`` names the file."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: bindings without libnvinfer.so
        raise EngineUnavailableError(
            f"'{what}' needs TensorRT, which is not installed here ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
        ) from exc
    if not torch.cuda.is_available():
        raise EngineUnavailableError(
            f"'{what}' needs a CUDA GPU, and torch sees none (torch {torch.__version__}); TensorRT runs only on "
            "NVIDIA GPUs: use a machine with one and a CUDA build of torch, or run the .onnx graph in ONNX Runtime"
        )
    return trt


def check_engine_args(
    onnx_path: str | os.PathLike[str],
    plan_path: str | os.PathLike[str],
    *,
    precision: EnginePrecision = "float32",
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    workspace_gib: float = 4.0,
    timing_cache: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """Check :func:`build_engine`'s arguments without TensorRT, before the build's minutes:
    the graph and its config, the output name and folder, the timing cache's path, the
    batch profile ``min <= opt <= max <= batch_max`` and a finite workspace.

    Returns
    -------
    (dict, (int, int, int))
        The graph's ``config.json`` and the resolved (min, opt, max) batch.
    """
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if onnx_path.suffix != ".onnx":
        raise ValueError(f"'{onnx_path}': give the .onnx graph written by tools/export_onnx.py")
    config = read_graph_config(onnx_path)
    require_unet_graph(onnx_path, config)
    if config.get("layout", "eps") not in ("eps", "guided"):
        raise ValueError(
            f"'{onnx_path}' is a {config.get('layout')!r} export (two graphs); build engines from an "
            "'eps' or 'guided' export (tools/export_onnx.py without --cached-modulation)"
        )
    graph_precision = config.get("precision", "float32")
    if graph_precision != "float32" and precision != graph_precision:
        raise ValueError(
            f"'{onnx_path}' is a {graph_precision} graph, which builds strongly typed (the graph's own types, "
            f"its normalisations and softmax already float32): pass --fp16; for a {precision} engine, build from "
            "the float32 graph"
        )
    if plan_path.suffix not in (".plan", ".engine"):
        raise ValueError(f"'{plan_path}': the engine's name must end in .plan or .engine")
    check_output_file(plan_path, "-o")
    check_output_file(timing_cache, "--timing-cache")
    existing = plan_path.parent / CONFIG_NAME
    if existing.is_file():
        other = read_json_object(existing)
        if other.get("format") != TRT_FORMAT or other.get("graph") != plan_path.name:
            raise ValueError(
                f"'{existing}' belongs to another graph or checkpoint; write the engine into a folder of its own"
            )
    if precision not in ENGINE_TOLERANCE:
        raise ValueError(f"`precision` must be one of {sorted(ENGINE_TOLERANCE)}, got {precision!r}")
    graph_max = int(config["batch_max"])
    max_batch = graph_max if max_batch is None else max_batch
    opt_batch = max_batch if opt_batch is None else opt_batch
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"batches must satisfy 1 <= min <= opt <= max, got {min_batch}, {opt_batch}, {max_batch}")
    if max_batch > graph_max:
        raise ValueError(f"--max-batch {max_batch} exceeds the {graph_max} '{onnx_path}' was exported for")
    if (
        isinstance(workspace_gib, bool)
        or not isinstance(workspace_gib, (int, float))
        or not 0 < workspace_gib < 1 << 20
    ):
        raise ValueError(f"`workspace_gib` (--workspace) must be a number of GiB in (0, 2^20), got {workspace_gib!r}")
    return config, (min_batch, opt_batch, max_batch)


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.BOOL: torch.bool,
    }
    if dtype not in table:
        raise TypeError(f"TensorRT tensor type {dtype} has no torch equivalent here")
    return table[dtype]


def build_engine(
    onnx_path: str | os.PathLike[str],
    plan_path: str | os.PathLike[str],
    *,
    precision: EnginePrecision = "float32",
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    workspace_gib: float = 4.0,
    timing_cache: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Build a TensorRT engine from an exported graph, check it against ONNX Runtime and
    write it with its ``config.json``.

    Parameters
    ----------
    onnx_path : path
        An ``eps`` or ``guided`` graph of ``tools/export_onnx.py``: float32, or float16
        (``--fp16``) with ``precision="float16"``, built strongly typed (TensorRT 11's only
        kind of network).
    plan_path : path
        The serialized engine (``.plan`` / ``.engine``), in a folder of its own.
    precision : {"float32", "float16", "bfloat16"}
        With a float32 graph, reduced precision lets TensorRT pick float16 / bfloat16
        kernels; normalisation and softmax layers stay float32 (precision constraints
        obeyed; TensorRT 10 only). A float16 graph needs "float16": its types are kept.
    min_batch, opt_batch, max_batch : int
        The optimisation profile over the batch axis (default: 1, max, the graph's limit).
    workspace_gib : float
        Workspace memory pool limit in GiB.
    timing_cache : path, optional
        A timing cache file, read when it exists and written after the build.

    Returns
    -------
    dict
        The written ``config.json``.
    """
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    config, (lo, opt, hi) = check_engine_args(
        onnx_path,
        plan_path,
        precision=precision,
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
        workspace_gib=workspace_gib,
        timing_cache=timing_cache,
    )
    trt = require_tensorrt(plan_path)
    # a float16 graph (export_onnx --fp16) carries its types: a strongly typed network keeps
    # them (TensorRT 10 with the flag; TensorRT 11 builds nothing else and ignores the flag).
    # A float32 graph with --fp16/--bf16 is weakly typed: TensorRT picks the kernels' types.
    strongly_typed = config.get("precision", "float32") != "float32"
    weak_flag = {"float16": "FP16", "bfloat16": "BF16"}.get(precision)
    if not strongly_typed and weak_flag and not hasattr(trt.BuilderFlag, weak_flag):
        hint = (
            "export a float16 graph (tools/export_onnx.py CHECKPOINT_DIR -o model.onnx --fp16) and build from it "
            "with --fp16, which builds strongly typed"
            if precision == "float16"
            else "build a float32 engine"
        )
        raise EngineUnavailableError(
            f"TensorRT {trt.__version__} has no weakly typed {precision} builds of a float32 graph (TensorRT 11 "
            f"removed the precision flags): {hint}, or install TensorRT 10: pip install 'tensorrt>=10,<11'"
        )
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    typed_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None) if strongly_typed else None
    network = builder.create_network(0 if typed_flag is None else 1 << int(typed_flag))  # batch: always explicit
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT could not parse '{onnx_path}': {errors}")
    build = builder.create_builder_config()
    build.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if weak_flag and not strongly_typed:  # (a strongly typed network refuses layer precisions)
        build.set_flag(getattr(trt.BuilderFlag, weak_flag))
        build.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        keep = (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in keep:  # GroupNorm (InstanceNormalization of C/32 channels) and attention softmax
                layer.precision = trt.float32
                for k in range(layer.num_outputs):
                    layer.set_output_type(k, trt.float32)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if shape and shape[0] == -1:
            rest = shape[1:]
            profile.set_shape(tensor.name, (lo, *rest), (opt, *rest), (hi, *rest))
    build.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    if cache_path is not None:
        cache = build.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        build.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, build)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from '{onnx_path}' (see its log above)")
    if cache_path is not None:
        data = build.get_timing_cache().serialize()
        _atomic_write(cache_path, lambda p: p.write_bytes(bytes(data)))
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan_path.parent / f".{plan_path.name}.part"
    try:
        tmp.write_bytes(bytes(serialized))
        worst = _compare_with_onnxruntime(tmp, onnx_path, config, opt)
        bar = ENGINE_TOLERANCE[precision]
        if not worst <= bar:
            raise RuntimeError(f"the {precision} engine differs from ONNX Runtime by {worst:.3g} (allowed {bar:g})")
        os.replace(tmp, plan_path)
    finally:
        tmp.unlink(missing_ok=True)
    written = {
        **config,
        "format": TRT_FORMAT,
        "graph": plan_path.name,
        "onnx": str(onnx_path),
        "onnx_format": ONNX_FORMAT,
        "precision": precision,
        "batch_min": lo,
        "batch_opt": opt,
        "batch_max": hi,
        "workspace_gib": workspace_gib,
        "tensorrt": trt.__version__,
        "max_abs_diff_vs_onnxruntime": worst,
    }
    _atomic_write(plan_path.parent / CONFIG_NAME, lambda p: p.write_text(json.dumps(written, indent=2) + "\n"))
    return written


def _compare_with_onnxruntime(plan: Path, onnx_path: Path, config: dict[str, Any], batch: int) -> float:
    """Max abs difference of the engine ``plan`` to ONNX Runtime (CPU) on random inputs."""
    runtime = TensorRTDenoiser.__new__(TensorRTDenoiser)
    runtime._load(plan, {**config, "format": TRT_FORMAT, "graph": plan.name})
    session = onnx_session(onnx_path, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    size, ch = int(config["unet"]["image_size"]), int(config["unet"]["in_channels"])
    x, t = torch.randn(batch, ch, size, size, generator=g), torch.randint(1000, (batch,), generator=g)
    cond = torch.rand(batch, int(config.get("cond_channels") or 1), size, size, generator=g) * 2 - 1
    scale = 2.0 if config.get("layout") == "guided" else None
    feed = runtime._inputs(x, t, cond, scale)
    ref = session.run(None, {k: v.numpy() for k, v in feed.items()})[0]
    out = runtime._run(x, t, cond, scale).cpu().numpy()
    return float(np.abs(out - ref).max())


class TensorRTDenoiser(GraphRuntime):
    """A TensorRT engine (``*.plan`` / ``*.engine`` of ``tools/export_trt.py``) behind
    ``eps(x, t, cond)``: inputs and outputs are torch CUDA tensors handed to TensorRT by
    address, run on torch's current stream. The sampler runs on :attr:`device`, the
    condition is moved there once per batch (:meth:`prepare`) and the guidance scale is
    kept there, so a sampling step copies nothing from the host. With ``cuda_graphs``,
    each run replays a CUDA graph of the engine's run, captured anew when the input
    shapes change (a sampling run: once).

    Raises
    ------
    EngineUnavailableError
        Without TensorRT or a CUDA GPU (the message says what to install).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, device: str | torch.device = "cuda", cuda_graphs: bool = False
    ) -> None:
        path = Path(path)
        require_tensorrt(path)
        self._load(path, read_graph_config(path, fmt=TRT_FORMAT), device, cuda_graphs)

    def _load(
        self, path: Path, config: dict[str, Any], device: str | torch.device = "cuda", cuda_graphs: bool = False
    ) -> None:
        trt = require_tensorrt(path)
        self.cuda_graphs = cuda_graphs
        self._graph: Any = None
        self._graph_key: tuple[Any, ...] | None = None
        self._scales: dict[float, torch.Tensor] = {}  # guidance scales as device tensors
        self.path, self.config = path, config
        self._check_layout()
        self.batch_max = int(config["batch_max"])
        self.batch_min = int(config.get("batch_min", 1))
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"a TensorRT engine runs on a CUDA device, got device={self.device}")
        self._trt = trt
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ValueError(
                f"'{path}' could not be loaded as a TensorRT engine (built by another TensorRT version or GPU?)"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

    def prepare(self, cond: torch.Tensor) -> torch.Tensor:
        """The condition on the engine's device, float32: once per batch, not every step."""
        return cond.to(self.device, torch.float32).contiguous()

    def _run(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, scale: float | None) -> torch.Tensor:
        """A batch smaller than the engine's profile allows (``--min-batch``; a run's short
        last batch) is padded with copies of its last row, whose outputs are dropped; the
        inputs are checked first, so that errors name the shapes the caller gave."""
        self._check_rows(x, t, cond)
        n, short = x.shape[0], self.batch_min - x.shape[0]
        if short <= 0 or n == 0:
            return self._run_engine(x, t, cond, scale)

        def padded(rows: torch.Tensor) -> torch.Tensor:
            return torch.cat([rows, rows[-1:].expand(short, *rows.shape[1:])])

        return self._run_engine(padded(x), padded(t), None if cond is None else padded(cond), scale)[:n]

    def _run_engine(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, scale: float | None
    ) -> torch.Tensor:
        feed = self._inputs(x, t, cond, scale)
        if scale is not None:  # one device tensor per scale, not a host copy per step
            if scale not in self._scales:
                self._scales[scale] = torch.tensor([scale], dtype=torch.float32, device=self.device)
            feed["guidance_scale"] = self._scales[scale]
        missing = sorted(set(self._inputs_names) - set(feed))
        if missing:
            raise ValueError(f"'{self.path}' expects inputs {self._inputs_names}; missing {missing}")
        if self.cuda_graphs:
            return self._replay(feed).to(x.device)
        # the device tensors must outlive the asynchronous run
        keep = {name: feed[name].to(self.device, self._dtypes[name]).contiguous() for name in self._inputs_names}
        outputs = self._bind(keep)
        self._enqueue(torch.cuda.current_stream(self.device))
        return outputs[0].float().to(x.device)

    def _bind(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Set the input shapes and hand TensorRT the addresses of ``inputs`` (device
        tensors by name) and of new output tensors, which are returned."""
        for name in self._inputs_names:
            self.context.set_input_shape(name, tuple(inputs[name].shape))
            self.context.set_tensor_address(name, inputs[name].data_ptr())
        outputs = []
        for name in self._output_names:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtypes[name], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        return outputs

    def _enqueue(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run '{self.path}'")

    def _replay(self, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        """One run as a CUDA graph: captured for the first call with a new set of input
        shapes, replayed after copying the inputs into its static buffers. As TensorRT
        asks: shapes and addresses are set, one run is enqueued and waited for (the first
        run after new shapes does work that cannot be captured), and the capture runs on
        a non-default stream; addresses and shapes then stay fixed until the next capture."""
        key = tuple((name, tuple(feed[name].shape)) for name in self._inputs_names)
        if key != self._graph_key:
            self._graph, self._graph_key = None, None  # free the old graph first
            static = {n: feed[n].to(self.device, self._dtypes[n]).contiguous().clone() for n in self._inputs_names}
            outputs = self._bind(static)
            stream = torch.cuda.Stream(device=self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            self._enqueue(stream)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                self._enqueue(stream)
            self._graph, self._graph_key, self._static, self._graph_outputs = graph, key, static, outputs
        else:
            for name in self._inputs_names:
                self._static[name].copy_(feed[name].to(self.device, self._dtypes[name]))
        self._graph.replay()
        return self._graph_outputs[0].float().clone()  # the next replay overwrites the output
