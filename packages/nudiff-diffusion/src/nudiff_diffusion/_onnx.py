"""ONNX export of a UNet and the ONNX Runtime runtime behind the same ``eps(x, t, cond)``.

onnx, onnxscript (export) and onnxruntime (running) are imported only here, lazily.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._checkpoint import CONFIG_NAME, _atomic_write
from ._unet import UNet

__all__ = ["export_onnx", "OnnxDenoiser", "ONNX_FORMAT"]

ONNX_FORMAT = "nudiff-diffusion/onnx"


class _EpsGraph(nn.Module):
    """``(x, t[, cond]) -> model output``, the signature of the exported graph."""

    def __init__(self, model: UNet, conditional: bool) -> None:
        super().__init__()
        self.model = model
        self.conditional = conditional

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x, t, cond if self.conditional else None)


def export_onnx(
    model: UNet,
    path: str | os.PathLike[str],
    *,
    cond_channels: int = 0,
    batch_max: int = 16,
    opset: int = 18,
    settings: dict[str, Any] | None = None,
    tolerance: float = 1e-4,
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
        Largest batch the graph is exported for (the runtime refuses larger ones).
    opset : int
        ONNX opset (18: the dynamo exporter's opset 17 writes an invalid Split node).
    settings : dict, optional
        The checkpoint's ``diffusion`` entry, copied into ``config.json``.
    tolerance : float
        Largest allowed max abs difference to PyTorch on random float32 inputs.

    Returns
    -------
    dict
        The written ``config.json`` (``max_abs_diff`` included).
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"'{path}': the exported graph's name must end in .onnx")
    if batch_max < 2:
        raise ValueError(f"`batch_max` must be >= 2, got {batch_max}")
    config_path = path.parent / CONFIG_NAME
    if config_path.is_file():
        existing = json.loads(config_path.read_text())
        if existing.get("format") != ONNX_FORMAT or existing.get("graph") != path.name:
            raise ValueError(f"'{config_path}' belongs to another checkpoint or graph; export into a folder of its own")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    cfg = model.config
    size = cfg.image_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, size, size, generator=g)
    t = torch.tensor([10, 700])
    args: tuple[torch.Tensor, ...] = (x, t)
    batch = torch.export.Dim("batch", min=1, max=batch_max)
    shapes: dict[str, Any] = {"x": {0: batch}, "t": {0: batch}}
    names = ["x", "t"]
    if cond_channels:
        args += (torch.rand(2, cond_channels, size, size, generator=g) * 2 - 1,)
        shapes["cond"] = {0: batch}
        names.append("cond")
    tmp = path.parent / f".{path.name}.part"
    try:
        torch.onnx.export(
            _EpsGraph(model, bool(cond_channels)),
            args,
            str(tmp),
            dynamo=True,
            opset_version=opset,
            input_names=names,
            output_names=["out"],
            dynamic_shapes=shapes,
            external_data=False,
            verbose=False,
        )
        onnx.checker.check_model(str(tmp))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        worst = 0.0
        for n in (1, 3):  # batches other than the example's: the batch axis is dynamic
            feed = {"x": torch.randn(n, cfg.in_channels, size, size, generator=g), "t": torch.randint(1000, (n,))}
            if cond_channels:
                feed["cond"] = torch.rand(n, cond_channels, size, size, generator=g) * 2 - 1
            with torch.no_grad():
                ref = model(feed["x"], feed["t"], feed.get("cond")).numpy()
            out = session.run(None, {k: v.numpy() for k, v in feed.items()})[0]
            worst = max(worst, float(np.abs(out - ref).max()))
        if not worst <= tolerance:
            raise RuntimeError(f"the ONNX graph differs from PyTorch by {worst:.3g} (allowed {tolerance:g})")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    config = {
        "format": ONNX_FORMAT,
        "graph": path.name,
        "unet": cfg.to_dict(),
        "diffusion": settings or {},
        "inputs": names,
        "cond_channels": cond_channels,
        "batch_max": batch_max,
        "opset": opset,
        "max_abs_diff": worst,
    }
    _atomic_write(config_path, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return config


class OnnxDenoiser:
    """An exported UNet in ONNX Runtime: ``eps(x, t, cond=None)`` on torch tensors.

    One session per instance, graph optimisations on; the CUDA execution provider when
    onnxruntime-gpu and a CUDA device are there, else the CPU.
    """

    def __init__(self, path: str | os.PathLike[str], *, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX graph not found: '{self.path}'")
        config_path = self.path.parent / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"'{self.path}' has no {CONFIG_NAME} beside it (written by tools/export_onnx.py)")
        config = json.loads(config_path.read_text())
        if config.get("format") != ONNX_FORMAT or config.get("graph") != self.path.name:
            raise ValueError(f"'{config_path}' does not describe the graph '{self.path.name}'")
        self.config = config
        if providers is None:
            providers = ["CPUExecutionProvider"]
            if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
                providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001  # ORT raises its own exception types: name the file
            raise ValueError(f"'{self.path}' could not be loaded as an ONNX graph ({exc})") from exc
        self.batch_max = int(config["batch_max"])
        self.conditional = bool(config.get("cond_channels"))

    @property
    def image_size(self) -> int:
        return int(self.config["unet"]["image_size"])

    @property
    def in_channels(self) -> int:
        return int(self.config["unet"]["in_channels"])

    def prepare(self, cond: torch.Tensor) -> torch.Tensor:
        """The condition as is (the graph recomputes any modulation itself)."""
        return cond

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Model output (N, C or 2C, H, W) float32 on x's device for x (N, C, H, W), t (N,)."""
        n = x.shape[0]
        if n > self.batch_max:
            raise ValueError(
                f"'{self.path}' was exported for batches of at most {self.batch_max}, got {n}; "
                f"use a smaller --batch or export again with --batch-max {n}"
            )
        feed = {"x": x.detach().float().cpu().numpy(), "t": t.detach().to(torch.int64).cpu().numpy()}
        if self.conditional:
            if cond is None:
                raise ValueError(f"'{self.path}' is a conditional graph: give `cond`")
            feed["cond"] = cond.detach().float().cpu().numpy()
        out = self.session.run(None, feed)[0]
        return torch.from_numpy(out).to(x.device)

    __call__ = eps
