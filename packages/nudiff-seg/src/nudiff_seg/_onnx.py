"""HoVer-Net as an ONNX graph, and an ONNX Runtime engine for ``nudiff-seg predict --engine``.

The export, the parity check against PyTorch (float32: max abs diff <= 1e-4 times the
largest output magnitude, on random windows, batches 1 and 3) and the session settings are nudiff-diffusion's
(:func:`nudiff_diffusion.export_graph`, ``onnx_session`` and the graph config helpers): one implementation for
every nudiff graph.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._hovernet import HoVerNet, HoVerNetConfig, load_hovernet

__all__ = ["export_hovernet_onnx", "OnnxHoVerNet", "load_engine", "model_digest"]

GRAPH_KIND = "hovernet"


def _onnx_tools() -> Any:
    """nudiff-diffusion, imported on first use: ``nudiff-seg train`` never loads ONNX."""
    import nudiff_diffusion as onnx_tools

    return onnx_tools


class _Graph(nn.Module):
    """``images (N, 3, S, S) in [0, 1] -> (np probability (N, s, s), hv (N, 2, s, s))``."""

    def __init__(self, model: HoVerNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images)
        return out["np"], out["hv"]


def export_hovernet_onnx(
    checkpoint: str | os.PathLike[str], path: str | os.PathLike[str], *, batch_max: int = 16, opset: int = 18
) -> float:
    """Export a HoVer-Net checkpoint to ``path`` (``.onnx``) with a dynamic batch axis up to
    ``batch_max`` and write ``config.json`` beside it. Returns the max abs difference to
    PyTorch found by the parity check (the export fails above 1e-4 of the largest output
    magnitude)."""
    onnx_tools = _onnx_tools()
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"`--out` must name an .onnx file, got '{path}'")
    onnx_tools.check_export_folder(path)
    model = load_hovernet(checkpoint)
    size = model.config.input_size

    def feeds(n: int) -> dict[str, torch.Tensor]:
        return {"images": torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(n))}

    # HoVer-Net's logits reach O(100) (a random model's: 144), where float32 summation order
    # alone moves them by ~1e-6 relative: the bar is 1e-4 of the largest output magnitude
    with torch.no_grad():
        scale = max(1.0, *(float(t.abs().max()) for n in (1, 3) for t in _Graph(model)(*feeds(n).values())))
    worst = onnx_tools.export_graph(
        _Graph(model),
        path,
        feeds(2),
        batched=["images"],
        batch_max=batch_max,
        feeds=feeds,
        output_names=("np", "hv"),
        opset=opset,
        tolerance=onnx_tools.PARITY_TOLERANCE["float32"] * scale,
    )
    onnx_tools.write_graph_config(
        path,
        {
            "kind": GRAPH_KIND,
            "hovernet": model.config.to_dict(),
            "batch_max": batch_max,
            "checkpoint": str(checkpoint),
            "weights_sha256": onnx_tools.weights_digest(model.state_dict()),
        },
    )
    return worst


class OnnxHoVerNet:
    """A HoVer-Net graph in ONNX Runtime, called like the model: ``engine(images)`` with
    images (N, 3, S, S) float32 in [0, 1] returns ``{"np": logits, "hv": maps}`` tensors."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        onnx_tools = _onnx_tools()
        self.path = Path(path)
        config = onnx_tools.read_graph_config(self.path)
        if config.get("kind") != GRAPH_KIND:
            raise ValueError(f"'{self.path}' is a {config.get('kind', config.get('layout'))!r} graph, not a HoVer-Net")
        try:
            self.config = HoVerNetConfig.from_dict(config["hovernet"])
            self.batch_max = int(config["batch_max"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"'{self.path.with_name('config.json')}' is not a HoVer-Net graph config ({exc})") from exc
        self.weights_sha256 = config.get("weights_sha256")
        self._check_batch = onnx_tools.check_batch
        self.session = onnx_tools.onnx_session(self.path)
        size = self.config.input_size
        shape = self.session.get_inputs()[0].shape  # [batch, 3, S, S]; the batch axis is named
        if list(shape[1:]) != [3, size, size]:
            raise ValueError(
                f"'{self.path}' takes images of shape {shape[1:]}, but its config.json describes a {size} px "
                f"{self.config.mode!r} HoVer-Net; export the graph and its config together again"
            )

    def check_batch(self, n: int) -> None:
        """Refuse a batch of ``n`` images beyond the graph's exported limit (naming it)."""
        self._check_batch(self.path, n, self.batch_max)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_batch(images.shape[0])
        np_logits, hv = self.session.run(None, {"images": np.ascontiguousarray(images.cpu().numpy(), np.float32)})
        return {"np": torch.from_numpy(np_logits), "hv": torch.from_numpy(hv)}


def model_digest(model: HoVerNet | OnnxHoVerNet) -> str | None:
    """The weights' digest (``nudiff_diffusion.weights_digest``) of a model or of the
    checkpoint a graph was exported from (None for graphs exported before it was recorded)."""
    if isinstance(model, OnnxHoVerNet):
        return model.weights_sha256
    return _onnx_tools().weights_digest(model.state_dict())


def load_engine(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> HoVerNet | OnnxHoVerNet:
    """A checkpoint directory -> the PyTorch model; ``*.onnx`` -> ONNX Runtime."""
    path = Path(path)
    if path.suffix == ".onnx":
        return OnnxHoVerNet(path)
    return load_hovernet(path, device=device)
