"""ONNX export of a UNet and the ONNX Runtime runtime behind the same ``eps(x, t, cond)``.

onnx, onnxscript (export), onnxslim (optional simplification) and onnxruntime (running) are
imported only here, lazily. Graph layouts (``config.json``'s ``layout``):

* ``eps``: ``(x, t[, cond]) -> out``, the UNet as it is;
* ``guided``: ``(x, t, cond, guidance_scale) -> out``, both halves of classifier-free guidance
  in one 2N batch inside the graph, mixed by :func:`mix_guidance`;
* ``modulated``: a histology model's two graphs, written by ``nudiff_histo`` with
  :func:`export_graph` and run by its own runtime.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ._checkpoint import CONFIG_NAME, _atomic_write, evaluating, read_json_object, weights_digest
from ._guidance import GuidedRuntime, mix_guidance
from ._unet import UNet

__all__ = [
    "export_onnx",
    "export_graph",
    "check_export_folder",
    "write_graph_config",
    "onnx_session",
    "providers_for",
    "check_batch",
    "OnnxDenoiser",
    "GraphRuntime",
    "read_graph_config",
    "ONNX_FORMAT",
    "MIN_OPSET",
    "PARITY_TOLERANCE",
    "check_opset",
]

ONNX_FORMAT = "nudiff-diffusion/onnx"
Layout = Literal["eps", "guided"]
Precision = Literal["float32", "float16"]
# largest max abs difference to float32 PyTorch on random inputs (the bar of the check);
# float16 graphs: measured 3e-4 to 1.8e-3 on the tiny presets with perturbed random weights
PARITY_TOLERANCE: dict[str, float] = {"float32": 1e-4, "float16": 2e-2}
#: the lowest opset exported: at 17 the dynamo exporter writes an invalid Split node
MIN_OPSET = 18


class _EpsGraph(nn.Module):
    """``(x, t[, cond]) -> model output``, the signature of the ``eps`` layout."""

    def __init__(self, model: UNet, conditional: bool) -> None:
        super().__init__()
        self.model = model
        self.conditional = conditional

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x, t, cond if self.conditional else None)


class _GuidedGraph(nn.Module):
    """``(x, t, cond, guidance_scale) -> guided output``: the conditional and the
    unconditional (zero structure) half as one 2N batch, mixed as :func:`guided` does."""

    def __init__(self, model: UNet) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, guidance_scale: torch.Tensor
    ) -> torch.Tensor:
        n = x.shape[0]
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, torch.zeros_like(cond)]))
        # slices, not chunk(2): torch.export specialises the batch of a chunked 2N batch to 2
        return mix_guidance(out[:n], out[n:], guidance_scale, x.shape[1])


class _Float16(nn.Module):
    """A float16 copy of ``module`` behind a float32 interface (floating inputs cast to
    float16, outputs to float32). GroupNorm modules keep float32 weights: the UNet computes
    its normalisations (and the attention softmax) in float32 whatever the input dtype."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.inner = copy.deepcopy(module).half()
        for m in self.inner.modules():
            if isinstance(m, nn.GroupNorm):
                m.float()

    def forward(self, *args: torch.Tensor) -> Any:
        out = self.inner(*(a.half() if a.is_floating_point() else a for a in args))
        return tuple(o.float() for o in out) if isinstance(out, (tuple, list)) else out.float()


def check_opset(opset: int) -> int:
    """``opset`` if the dynamo exporter can write it: from :data:`MIN_OPSET` (at 17 it
    writes a Split node that onnx.checker and ONNX Runtime reject) to the newest opset the
    installed ``onnx`` knows (beyond it the export fails only after its work, in the
    version converter); else a ValueError naming the range."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if (
        isinstance(opset, (bool, np.bool_))
        or not isinstance(opset, (int, np.integer))
        or not MIN_OPSET <= opset <= newest
    ):
        raise ValueError(
            f"`opset` (--opset) must be an integer in [{MIN_OPSET}, {newest}], got {opset!r}: the dynamo exporter "
            f"needs opset {MIN_OPSET} or newer (at 17 it writes an invalid Split node), and onnx "
            f"{onnx.__version__} knows opsets up to {newest}"
        )
    return int(opset)


def check_export_folder(path: Path) -> Path:
    """``path``'s ``config.json``; refused when it belongs to a checkpoint or another graph."""
    config_path = path.parent / CONFIG_NAME
    if config_path.is_file():
        existing = read_json_object(config_path)
        if existing.get("format") != ONNX_FORMAT or existing.get("graph") != path.name:
            raise ValueError(f"'{config_path}' belongs to another checkpoint or graph; export into a folder of its own")
    return config_path


@contextlib.contextmanager
def making_parents(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Create the folders above ``path``; when the body raises, remove again those this
    call created and the failure left empty (an export that fails leaves no trace).

    Yields ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]  # innermost first
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for folder in made:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def export_graph(
    module: nn.Module,
    path: str | os.PathLike[str],
    example: Mapping[str, torch.Tensor],
    *,
    batched: Sequence[str],
    batch_max: int,
    feeds: Callable[[int], dict[str, torch.Tensor]],
    output_names: Sequence[str] = ("out",),
    opset: int = 18,
    precision: Precision = "float32",
    tolerance: float | None = None,
    slim: bool = False,
) -> float:
    """Export ``module`` (float32, eval mode) to ``path`` and check it against PyTorch.

    Parameters
    ----------
    module : nn.Module
        ``module(**example)`` -> a tensor or a tuple of tensors (``output_names``).
    path : path
        The ``.onnx`` file, replaced only once the checks pass.
    example : dict of str to tensor
        Example inputs by name, in the order of ``module.forward``'s arguments.
    batched : sequence of str
        The inputs whose first axis is the (dynamic) batch axis, at most ``batch_max``.
    feeds : callable
        ``feeds(n)`` -> random inputs of batch ``n`` for the parity check (n = 1 and 3).
    precision : {"float32", "float16"}
        float16 exports a float16 copy behind a float32 interface (normalisations and
        softmax stay float32); the check still compares with the float32 module.
    tolerance : float, optional
        Largest allowed max abs difference (default :data:`PARITY_TOLERANCE`).
    slim : bool
        Simplify the graph with onnxslim (``pip install onnxslim``) before the check.

    Returns
    -------
    float
        The max abs difference to the float32 module over the parity inputs.
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    if precision not in PARITY_TOLERANCE:
        raise ValueError(f"`precision` must be one of {sorted(PARITY_TOLERANCE)}, got {precision!r}")
    if batch_max < 2:
        raise ValueError(f"`batch_max` must be >= 2, got {batch_max}")
    check_opset(opset)
    if slim:
        try:
            import onnxslim
        except ImportError as exc:
            raise RuntimeError("--slim needs onnxslim: pip install onnxslim") from exc
    tolerance = PARITY_TOLERANCE[precision] if tolerance is None else tolerance
    graph = _Float16(module) if precision == "float16" else module
    batch = torch.export.Dim("batch", min=1, max=batch_max)
    specs = [{0: batch} if name in batched else None for name in example]
    params = list(inspect.signature(graph.forward).parameters.values())
    star = [i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_POSITIONAL]
    # torch.export wants the specs of a forward(*args) grouped as the arguments are
    shapes = (*specs[: star[0]], tuple(specs[star[0] :])) if star else tuple(specs)
    tmp = path.parent / f".{path.name}.part"
    with evaluating(module), evaluating(graph), making_parents(path):  # the caller's module keeps its mode
        try:
            torch.onnx.export(
                graph,
                tuple(example.values()),
                str(tmp),
                dynamo=True,
                opset_version=opset,
                input_names=list(example),
                output_names=list(output_names),
                dynamic_shapes=shapes,
                external_data=False,
                verbose=False,
            )
            if slim:
                onnx.save(onnxslim.slim(str(tmp)), str(tmp))
            try:
                onnx.checker.check_model(str(tmp))
                session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            except Exception as exc:  # noqa: BLE001 - the checker's and ORT's own exception types
                raise ValueError(f"the graph exported for '{path}' is invalid ({type(exc).__name__}: {exc})") from exc
            worst, largest = 0.0, 0.0
            for n in (1, 3):  # batches other than the example's: the batch axis is dynamic
                feed = feeds(n)
                with torch.no_grad():
                    ref = module(*feed.values())
                refs = ref if isinstance(ref, (tuple, list)) else (ref,)
                outs = session.run(None, {k: v.numpy() for k, v in feed.items()})
                for out, r in zip(outs, refs, strict=True):
                    worst = max(worst, float(np.abs(out - r.numpy()).max()))
                    largest = max(largest, float(r.abs().max()))
            if largest == 0.0:
                warnings.warn(
                    f"'{path}': the model answers 0 for every parity input (an untrained model: its output layers "
                    "start at zero), so the parity check compared zeros and proves nothing about the graph",
                    stacklevel=2,
                )
            if not worst <= tolerance:
                raise RuntimeError(
                    f"the {precision} ONNX graph for '{path}' differs from PyTorch by {worst:.3g} "
                    f"(allowed {tolerance:g})"
                )
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return worst


def write_graph_config(path: str | os.PathLike[str], config: dict[str, Any]) -> dict[str, Any]:
    """Write ``config.json`` beside the graph ``path`` (``format`` and ``graph`` added)."""
    path = Path(path)
    config = {"format": ONNX_FORMAT, "graph": path.name, **config}
    _atomic_write(path.parent / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return config


def export_onnx(
    model: UNet,
    path: str | os.PathLike[str],
    *,
    cond_channels: int = 0,
    batch_max: int = 16,
    opset: int = 18,
    settings: dict[str, Any] | None = None,
    layout: Layout = "eps",
    precision: Precision = "float32",
    tolerance: float | None = None,
    slim: bool = False,
) -> dict[str, Any]:
    """Export ``model`` to ONNX with a dynamic batch axis and check it against PyTorch.

    Parameters
    ----------
    model : UNet
        The network (plain, or conditional with ``cond_channels`` > 0: SPADE).
    path : path
        The ``.onnx`` file; ``config.json`` is written beside it (one graph per folder),
        and a folder holding a checkpoint's ``config.json`` is refused.
    cond_channels : int
        Channels of the condition input ``cond`` (0: the graph takes ``(x, t)`` only).
    batch_max : int
        Largest batch the graph is exported for (the runtime refuses larger ones); for
        ``layout="guided"`` the images per call (the UNet inside sees twice as many).
    opset : int
        ONNX opset (18: the dynamo exporter's opset 17 writes an invalid Split node).
    settings : dict, optional
        The checkpoint's ``diffusion`` entry, copied into ``config.json``.
    layout : {"eps", "guided"}
        ``guided``: one graph ``(x, t, cond, guidance_scale)`` doing both halves of
        classifier-free guidance (a zero structure as the null condition); conditional
        models only.
    precision : {"float32", "float16"}
        The graph's arithmetic (inputs and outputs stay float32).
    tolerance : float, optional
        Largest allowed max abs difference to float32 PyTorch on random inputs
        (default :data:`PARITY_TOLERANCE` of ``precision``).
    slim : bool
        Simplify the graph with onnxslim.

    Returns
    -------
    dict
        The written ``config.json`` (``max_abs_diff`` included).
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"'{path}': the exported graph's name must end in .onnx")
    if layout not in ("eps", "guided"):
        raise ValueError(f"`layout` must be 'eps' or 'guided', got {layout!r}")
    if layout == "guided" and not cond_channels:
        raise ValueError(
            "a guided graph needs a conditional model (`cond_channels` > 0): guidance mixes two conditions"
        )
    check_export_folder(path)
    with evaluating(model):  # the caller's model keeps its mode
        cfg = model.config
        size = cfg.image_size
        g = torch.Generator().manual_seed(0)

        def feeds(n: int) -> dict[str, torch.Tensor]:
            feed = {"x": torch.randn(n, cfg.in_channels, size, size, generator=g), "t": torch.randint(1000, (n,))}
            if cond_channels:
                feed["cond"] = torch.rand(n, cond_channels, size, size, generator=g) * 2 - 1
            if layout == "guided":
                feed["guidance_scale"] = torch.tensor([2.0])
            return feed

        example = feeds(2)
        module = _GuidedGraph(model) if layout == "guided" else _EpsGraph(model, bool(cond_channels))
        worst = export_graph(
            module,
            path,
            example,
            batched=[n for n in example if n != "guidance_scale"],
            batch_max=batch_max,
            feeds=feeds,
            opset=opset,
            precision=precision,
            tolerance=tolerance,
            slim=slim,
        )
        return write_graph_config(
            path,
            {
                "layout": layout,
                "precision": precision,
                "unet": cfg.to_dict(),
                "diffusion": settings or {},
                "weights_sha256": weights_digest(model.state_dict()),
                "inputs": list(example),
                "cond_channels": cond_channels,
                "batch_max": batch_max,
                "opset": opset,
                "slim": slim,
                "max_abs_diff": worst,
            },
        )


def providers_for(device: str | torch.device) -> list[str] | None:
    """ONNX Runtime providers for a ``device`` the user asked for: the CPU's alone for a
    CPU device (``--device cpu`` on a GPU machine must stay on the CPU), else None, which
    lets :func:`onnx_session` take the GPU providers that are present."""
    return ["CPUExecutionProvider"] if torch.device(device).type == "cpu" else None


def onnx_session(
    path: str | os.PathLike[str], *, providers: list[str] | None = None, profile_prefix: str | None = None
) -> Any:
    """An ONNX Runtime session for ``path`` with every graph optimisation on: the TensorRT
    and CUDA execution providers when onnxruntime-gpu has them and torch sees a CUDA device
    (the provider list names CUDA even without one), else the CPU. A file that is not a
    graph raises an error naming it.

    The CPU provider gets as many threads as PyTorch has (``torch.get_num_threads()``, which
    follows ``OMP_NUM_THREADS``): ONNX Runtime would otherwise take every physical core and
    ignore the variable, so two sampling processes that were given one thread each (the
    pipeline's parallel stages) would each run two on a 2-core machine.

    ``profile_prefix`` turns on ONNX Runtime's profiler: the time of every node of every
    run goes to ``{profile_prefix}_<date>.json``, whose path ``session.end_profiling()``
    returns (``tools/bench_engine_ops.py`` reads it).
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX graph not found: '{path}'")
    if providers is None:
        available = ort.get_available_providers()
        gpu = torch.cuda.is_available()
        providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if gpu and p in available]
        providers.append("CPUExecutionProvider")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # noqa: BLE001  # ORT raises its own exception types: name the file
        raise ValueError(f"'{path}' could not be loaded as an ONNX graph ({exc})") from exc


def check_batch(path: Path, n: int, batch_max: int) -> None:
    """Refuse a batch of ``n`` for an engine exported for at most ``batch_max``."""
    if n > batch_max:
        raise ValueError(
            f"'{path}' was exported for batches of at most {batch_max}, got {n}; "
            f"use a smaller --batch or export again with --batch-max {n}"
        )


def read_graph_config(path: Path, *, fmt: str = ONNX_FORMAT) -> dict[str, Any]:
    """The ``config.json`` beside an engine file ``path``, checked to describe it."""
    config_path = path.parent / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"ONNX graph not found: '{path}'" if fmt == ONNX_FORMAT else f"engine not found: '{path}'"
        )
    if not config_path.is_file():
        raise FileNotFoundError(f"'{path}' has no {CONFIG_NAME} beside it (written by tools/export_onnx.py)")
    config = read_json_object(config_path)
    if config.get("format") != fmt or config.get("graph") != path.name:
        raise ValueError(f"'{config_path}' does not describe the graph '{path.name}'")
    batch_max = config.get("batch_max")  # every exported graph has it (UNets and HoVer-Net)
    if isinstance(batch_max, bool) or not isinstance(batch_max, int) or batch_max < 1:
        raise ValueError(
            f"'{config_path}' has no positive integer 'batch_max' (got {batch_max!r}); export the graph again"
        )
    if "unet" in config:  # a UNet graph: the runtimes read its size and channels from here
        unet = config["unet"]
        sizes = [unet.get(k) for k in ("image_size", "in_channels")] if isinstance(unet, dict) else [None]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
            raise ValueError(
                f"'{config_path}': 'unet' must give positive integers image_size and in_channels, got {unet!r}"
            )
    elif "hovernet" not in config and config.get("kind") != "hovernet":
        raise ValueError(f"'{config_path}' describes neither a UNet ('unet') nor a HoVer-Net graph; export it again")
    return config


def require_unet_graph(path: Path, config: dict[str, Any]) -> None:
    """Refuse a graph whose config (:func:`read_graph_config`) is not a diffusion UNet's
    (a HoVer-Net graph of ``nudiff-seg export``), naming it."""
    if "unet" not in config:
        raise ValueError(
            f"'{path}' is a HoVer-Net graph (nudiff-seg export), not a diffusion model's; give a graph that "
            "tools/export_onnx.py wrote from a structure or histology checkpoint"
        )


class GraphRuntime(GuidedRuntime):
    """What the exported-graph runtimes share (ONNX Runtime, TensorRT): the config beside
    the graph, the batch limit and the ``eps`` / ``guided`` layouts. A subclass sets
    ``path``, ``config``, ``batch_max`` and implements :meth:`_run`.

    A ``guided`` graph does both halves of guidance itself: :meth:`guided` feeds it
    directly, and :meth:`eps` runs it at guidance scale 1 (the conditional model, at the
    cost of both halves).
    """

    path: Path
    config: dict[str, Any]
    batch_max: int

    @property
    def layout(self) -> str:
        return str(self.config.get("layout", "eps"))

    @property
    def conditional(self) -> bool:
        return bool(self.config.get("cond_channels"))

    @property
    def image_size(self) -> int:
        return int(self.config["unet"]["image_size"])

    @property
    def in_channels(self) -> int:
        return int(self.config["unet"]["in_channels"])

    def _check_layout(self) -> None:
        require_unet_graph(self.path, self.config)
        if self.layout not in ("eps", "guided"):
            raise ValueError(
                f"'{self.path}' is a {self.layout!r} graph of a histology model: load it with "
                "nudiff_histo.load_histo_denoiser (nudiff-histo sample --engine)"
            )

    def _run(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, scale: float | None) -> torch.Tensor:
        raise NotImplementedError

    def _check_rows(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> None:
        """:meth:`check_eps_inputs`, and a condition with one row per image where the graph
        takes one, naming the shapes the caller gave."""
        self.check_eps_inputs(x, t)
        if not self.conditional:
            return
        if cond is None:
            raise ValueError(f"'{self.path}' is a conditional graph: give `cond`")
        if not isinstance(cond, torch.Tensor) or cond.ndim != 4 or cond.shape[0] != x.shape[0]:
            got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"`cond` must be (N, C, H, W) with one row per image of `x` ({x.shape[0]}), got {got}")

    def _inputs(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, scale: float | None
    ) -> dict[str, torch.Tensor]:
        """The graph's inputs by name (float32 x, cond and scale; int64 t), checked."""
        self._check_rows(x, t, cond)
        check_batch(self.path, x.shape[0], self.batch_max)
        feed = {"x": x.detach().float(), "t": t.detach().to(torch.int64)}
        if self.conditional:
            feed["cond"] = cond.detach().float()
        if scale is not None:
            feed["guidance_scale"] = torch.tensor([scale], dtype=torch.float32)
        return feed

    def prepare(self, cond: torch.Tensor) -> torch.Tensor:
        """The condition as is (the graph computes any modulation itself)."""
        return cond

    def check_sampling_batch(self, n: int, *, guided: bool = False) -> None:
        """Refuse a sampling batch of ``n`` whose UNet calls exceed the exported batch
        limit: ``2 n`` under guidance over ``eps`` (both halves in one call), ``n`` for a
        ``guided`` graph or without guidance."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"`batch` (--batch) must be an integer >= 1, got {n!r}")
        per_call = 2 * n if guided and self.layout != "guided" else n
        if per_call == n:
            check_batch(self.path, n, self.batch_max)
        elif per_call > self.batch_max:
            raise ValueError(
                f"'{self.path}' was exported for batches of at most {self.batch_max}, got {per_call}: guidance runs "
                f"both halves of a batch of {n} in one call; use a --batch of at most {self.batch_max // 2} or "
                f"export again with --batch-max {per_call}"
            )

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Model output (N, C or 2C, H, W) float32 on x's device for x (N, C, H, W), t (N,)."""
        return self._run(x, t, cond, 1.0 if self.layout == "guided" else None)

    def guided(
        self, cond: torch.Tensor, null_cond: torch.Tensor, scale: float, *, batched: bool = True
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Classifier-free guidance: inside the graph for a ``guided`` graph (whose null
        condition is the zero structure, and whose halves always run as one batch)."""
        if self.layout != "guided":
            return super().guided(cond, null_cond, scale, batched=batched)
        if not scale >= 0:
            raise ValueError(f"guidance `scale` must be >= 0, got {scale}")
        if not batched:
            raise ValueError(f"'{self.path}' runs both halves of guidance as one batch; export without --guided")
        if torch.count_nonzero(null_cond):
            raise ValueError(f"'{self.path}' guides towards the zero structure; `null_cond` must be zeros")

        prepared = self.prepare(cond)  # once per batch (TensorRT: onto its device)

        def guided_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if x.shape[0] != prepared.shape[0]:
                raise ValueError(f"batch of {x.shape[0]} samples but {prepared.shape[0]} conditions")
            return self._run(x, t, prepared, float(scale))

        return guided_eps

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.eps(x, t, cond)


class OnnxDenoiser(GraphRuntime):
    """An exported UNet in ONNX Runtime: ``eps(x, t, cond=None)`` on torch tensors, one
    session per instance (:func:`onnx_session`)."""

    def __init__(self, path: str | os.PathLike[str], *, providers: list[str] | None = None) -> None:
        self.path = Path(path)
        self.config = read_graph_config(self.path)
        self._check_layout()
        self.session = onnx_session(self.path, providers=providers)
        self.batch_max = int(self.config["batch_max"])
        self._check_graph_inputs()

    def _check_graph_inputs(self) -> None:
        """Refuse a graph whose inputs are not those its ``config.json`` describes (a graph
        copied beside another export's config), naming both files, before any run."""
        expected = {"x", "t"} | ({"cond"} if self.conditional else set())
        expected |= {"guidance_scale"} if self.layout == "guided" else set()
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        size, channels = self.image_size, int(self.config["unet"]["in_channels"])
        x_shape = list(inputs.get("x", []))[1:]
        if set(inputs) != expected or x_shape != [channels, size, size]:
            raise ValueError(
                f"'{self.path}' does not fit its config '{self.path.parent / 'config.json'}': the graph takes "
                f"{sorted(inputs)} with x of (batch, {', '.join(map(str, x_shape))}), the config describes "
                f"{sorted(expected)} with x of (batch, {channels}, {size}, {size}); export the graph again"
            )

    def _run(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, scale: float | None) -> torch.Tensor:
        feed = {k: v.cpu().numpy() for k, v in self._inputs(x, t, cond, scale).items()}
        return torch.from_numpy(self.session.run(None, feed)[0]).to(x.device)
