"""Model runtimes behind one call, ``eps(x, t, cond=None)``: samplers never know which runs.

A checkpoint directory runs in PyTorch (here), ``*.onnx`` in ONNX Runtime (``_onnx``),
``*.plan`` / ``*.engine`` in TensorRT (``_tensorrt``); the last two are imported only when
asked for.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ._checkpoint import load_model, read_config
from ._guidance import GuidedRuntime
from ._unet import UNet

__all__ = [
    "TorchDenoiser",
    "load_denoiser",
    "resolve_device",
    "check_runtime_options",
    "warn_if_emulated_precision",
    "ENGINE_SUFFIXES",
    "PRECISIONS",
]

ENGINE_SUFFIXES = (".plan", ".engine")  # TensorRT

#: ``--precision`` of a PyTorch run: the autocast dtype (None: float32)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cpu_has_bf16_instructions() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX), as PyTorch
    sees it; True where PyTorch cannot say (other architectures, older versions)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probe is None for probe in probes) or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return True
    return any(probe() for probe in probes)


def warn_if_emulated_precision(device: torch.device, precision: str) -> bool:
    """Warn (``RuntimeWarning``) when ``precision`` has no hardware support on ``device``.

    bf16 autocast on a CPU without AVX-512 BF16 or AMX runs emulated: on an AVX2-only EPYC
    a small-128 UNet call at batch 8 took 30.7 s against 4.2 s in float32 (7.3x slower),
    while on an EPYC with AVX-512 BF16 it was 1.6x faster than float32.

    Parameters
    ----------
    device : torch.device
        Where the model runs (a GPU never warns).
    precision : str
        A key of :data:`PRECISIONS` (``"fp32"``, ``"bf16"``, ``"fp16"``).

    Returns
    -------
    bool
        Whether it warned.
    """
    if device.type != "cpu" or precision != "bf16" or _cpu_has_bf16_instructions():
        return False
    warnings.warn(
        f"--precision bf16 on this CPU ({torch.backends.cpu.get_cpu_capability()}, no AVX-512 BF16 or AMX): "
        "bfloat16 is emulated there, measured 7x slower than fp32 on such a CPU; use --precision fp32",
        RuntimeWarning,
        stacklevel=2,
    )
    return True


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device a ``--device`` value names.

    ``"auto"`` (or None) is the CUDA GPU when PyTorch sees one, else the CPU; ``"cuda"``
    without an index is the current CUDA device, which under ``torchrun`` is this process's
    ``LOCAL_RANK`` (:func:`setup_distributed` sets it).

    Raises
    ------
    ValueError
        For an unknown device string, or a CUDA device on a machine or PyTorch build that
        has none (the message says what this PyTorch is and what to do instead).
    """
    if spec is None or (isinstance(spec, str) and spec == "auto"):
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"`device` must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"`device` must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"`device` {str(spec)!r} asks for a CUDA GPU, but this PyTorch ({torch.__version__}) sees none "
                "(torch.cuda.is_available() is False); use --device cpu (or auto), or install a CUDA build of PyTorch"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise ValueError(f"`device` {str(spec)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


_Forward = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


class _CapturedStep:
    """One UNet call captured as a CUDA graph, replayed for every later call with the same
    input shapes and the same prepared condition (a sampling run: every step).

    The inputs are copied into the graph's static buffers; a tensor condition too, while a
    prepared one (e.g. a SPADE modulation cache) is captured by reference and kept alive
    here, so its memory stays what the graph reads. One graph at a time: a new signature
    (batch, image size, condition) captures anew and frees the old graph.
    """

    def __init__(self, forward: _Forward, warmup: int = 2) -> None:
        self.forward = forward
        self.warmup = warmup
        self.key: tuple[Any, ...] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: dict[str, Any] = {}

    def _signature(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> tuple[Any, ...]:
        if cond is None or isinstance(cond, torch.Tensor):
            shape = None if cond is None else (tuple(cond.shape), cond.dtype)
            return (tuple(x.shape), x.dtype, tuple(t.shape), "tensor", shape)
        return (tuple(x.shape), x.dtype, tuple(t.shape), "prepared", id(cond))

    def _capture(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> None:
        self.graph, self.static = None, {}  # free the previous graph's memory first
        static = {"x": x.clone(), "t": t.clone(), "cond": cond.clone() if isinstance(cond, torch.Tensor) else cond}
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up off the capture (cuDNN autotuning, lazy init)
            for _ in range(self.warmup):
                self.forward(static["x"], static["t"], static["cond"])
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static["out"] = self.forward(static["x"], static["t"], static["cond"])
        self.graph, self.static = graph, static

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        key = self._signature(x, t, cond)
        if key != self.key or self.graph is None:
            self._capture(x, t, cond)
            self.key = key
        self.static["x"].copy_(x)
        self.static["t"].copy_(t)
        if isinstance(cond, torch.Tensor):
            self.static["cond"].copy_(cond)
        self.graph.replay()
        return self.static["out"].clone()  # the next replay overwrites the static output


class TorchDenoiser(GuidedRuntime):
    """A UNet in PyTorch as a runtime: ``eps(x, t, cond=None)``, no gradients.

    Parameters
    ----------
    model : UNet
        The network, on the device it should run on. The runtime owns it from then on: it
        is put in eval mode (and, with ``channels_last``, converted), as sampling needs.
    config : dict, optional
        The checkpoint's ``config.json``.
    dtype : torch.dtype, optional
        Autocast dtype (``torch.bfloat16``, ``torch.float16``); None runs in float32.
    compile : bool
        Run the model through ``torch.compile`` (a GPU option: on this project's 2-core CPU
        it compiles for about a minute per input shape and stays slower than ONNX Runtime).
    cuda_graphs : bool
        Capture one UNet call as a CUDA graph and replay it for every step of a run with
        fixed shapes (CUDA devices only): removes the per-kernel launch cost.
    channels_last : bool
        Run the convolutions in the channels-last (NHWC) memory layout: the model's 4-D
        weights are converted in place (their values do not change) and each call's input
        with them. On this project's 2-core CPU oneDNN's convolutions ran the UNets 14-22%
        faster so (8 of 8 interleaved calls, tiny-64 and small-128, batch 8), and
        :func:`load_denoiser` turns it on for the CPU; off by default here because it
        changes the caller's model.

    Attributes
    ----------
    config : dict
        The checkpoint's ``config.json`` (model and diffusion settings).
    device : torch.device
        Where the model runs; :meth:`eps` returns its output on the device of ``x``.
    """

    def __init__(
        self,
        model: UNet,
        config: dict[str, Any] | None = None,
        *,
        dtype: torch.dtype | None = None,
        compile: bool = False,
        cuda_graphs: bool = False,
        channels_last: bool = False,
    ) -> None:
        device = next(model.parameters()).device
        if dtype not in PRECISIONS.values():
            raise ValueError(f"`dtype` must be one of {list(PRECISIONS.values())}, got {dtype!r}")
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"`cuda_graphs` needs the model on a CUDA device, got device {device}")
        # checked first: a refused runtime leaves the model as it was given
        self.model = model.eval()  # a runtime samples: the model it is given stays in eval mode
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.config = config or {"unet": model.config.to_dict()}
        self.device = device
        self.autocast_dtype = dtype
        network = torch.compile(self.model) if compile else self.model
        self._forward = _CapturedStep(self._autocast(network)) if cuda_graphs else self._autocast(network)

    def _autocast(self, network: Callable[..., torch.Tensor]) -> _Forward:
        def forward(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
            with (
                torch.no_grad(),
                torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None),
            ):
                return network(x, t, cond).float()

        return forward

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def in_channels(self) -> int:
        return self.model.config.in_channels

    def prepare(self, cond: torch.Tensor) -> Any:
        """The condition argument for a run of :meth:`eps` calls on the same conditions
        (here the tensor on the model's device; conditional runtimes may cache work)."""
        return cond.to(self.device)

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The model's output (N, C or 2C, H, W) float32, on the device of ``x``, for x
        (N, C, H, W) at timesteps t (N,), with ``cond`` a tensor or what :meth:`prepare`
        returned."""
        self.check_eps_inputs(x, t)
        if isinstance(cond, torch.Tensor):
            cond = cond.to(self.device)
        x_in = x.to(self.device, torch.float32).contiguous(memory_format=self.memory_format)
        return self._forward(x_in, t.to(self.device), cond).to(x.device)

    __call__ = eps


def check_runtime_options(path: Path, *, precision: str, compile: bool, cuda_graphs: bool) -> None:
    """Check the runtime options for a model at ``path``: a known ``precision``; with an
    exported graph, whose precision was fixed when it was exported or built, neither
    ``precision`` nor ``compile``, and ``cuda_graphs`` only for a TensorRT engine (ONNX
    Runtime's graphs run as they are)."""
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {sorted(PRECISIONS)}, got {precision!r}")
    suffix = path.suffix.lower()
    if suffix == ".onnx" or suffix in ENGINE_SUFFIXES:
        graphs = cuda_graphs and suffix == ".onnx"
        options = (("precision", precision != "fp32"), ("compile", compile), ("cuda_graphs", graphs))
        asked = [name for name, on in options if on]
        if asked:
            raise ValueError(
                f"{' and '.join(asked)} cannot be used with the exported graph '{path}': precision and compile "
                "apply to PyTorch checkpoints (an export's precision is fixed when it is exported or built), "
                "cuda_graphs to PyTorch checkpoints and TensorRT engines"
            )


def load_denoiser(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    compile: bool = False,
    cuda_graphs: bool = False,
) -> Any:
    """The runtime for ``path``: a checkpoint directory runs in PyTorch on ``device``,
    ``*.onnx`` in ONNX Runtime (:class:`OnnxDenoiser`; a CPU ``device`` keeps it on the CPU
    provider, any other lets it take the CUDA or TensorRT provider where present),
    ``*.plan`` / ``*.engine`` in TensorRT
    (:class:`TensorRTDenoiser`, on ``device`` when it is a CUDA device, else ``cuda``).

    ``precision`` (``"fp32"``, ``"bf16"``, ``"fp16"`` autocast) and ``compile`` are options of
    the PyTorch runtime (:class:`TorchDenoiser`, channels-last on the CPU), ``cuda_graphs`` of
    it and of TensorRT's; an
    exported graph's precision is fixed when it is built, so asking for them with one that
    cannot take them is an error.

    Raises
    ------
    EngineUnavailableError
        For a TensorRT engine on a machine without TensorRT or a CUDA GPU (the message
        says what to install).
    ValueError
        For an unknown precision, or PyTorch options given with an engine file.
    """
    path = Path(path)
    check_runtime_options(path, precision=precision, compile=compile, cuda_graphs=cuda_graphs)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from ._onnx import OnnxDenoiser, providers_for

        return OnnxDenoiser(path, providers=providers_for(device))
    if suffix in ENGINE_SUFFIXES:
        from ._tensorrt import TensorRTDenoiser

        device = torch.device(device)
        return TensorRTDenoiser(path, device=device if device.type == "cuda" else "cuda", cuda_graphs=cuda_graphs)
    model = load_model(path, device=device)
    return TorchDenoiser(
        model,
        read_config(path),
        dtype=PRECISIONS[precision],
        compile=compile,
        cuda_graphs=cuda_graphs,
        channels_last=next(model.parameters()).device.type == "cpu",
    )
