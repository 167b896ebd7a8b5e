"""Model runtimes behind one call, ``eps(x, t, cond=None)``: samplers never know which runs.

A checkpoint directory runs in PyTorch (here), ``*.onnx`` in ONNX Runtime (``_onnx``),
``*.plan`` / ``*.engine`` in TensorRT (``_tensorrt``); the last two are imported only when
asked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ._checkpoint import load_model, read_config
from ._guidance import GuidedRuntime
from ._unet import UNet

__all__ = ["TorchDenoiser", "load_denoiser", "ENGINE_SUFFIXES"]

ENGINE_SUFFIXES = (".plan", ".engine")  # TensorRT


class TorchDenoiser(GuidedRuntime):
    """A UNet in PyTorch as a runtime: ``eps(x, t, cond=None)``, no gradients.

    Attributes
    ----------
    config : dict
        The checkpoint's ``config.json`` (model and diffusion settings).
    """

    def __init__(self, model: UNet, config: dict[str, Any] | None = None, *, dtype: torch.dtype | None = None) -> None:
        self.model = model.eval()
        self.config = config or {"unet": model.config.to_dict()}
        self.device = next(model.parameters()).device
        self.autocast_dtype = dtype

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
        """The model's output (N, C or 2C, H, W) float32 for x (N, C, H, W) at timesteps t (N,),
        with ``cond`` a tensor or what :meth:`prepare` returned."""
        if isinstance(cond, torch.Tensor):
            cond = cond.to(self.device)
        with (
            torch.no_grad(),
            torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None),
        ):
            out = self.model(x.to(self.device), t.to(self.device), cond)
        return out.float()

    __call__ = eps


def load_denoiser(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Any:
    """The runtime for ``path``: a checkpoint directory runs in PyTorch on ``device``,
    ``*.onnx`` in ONNX Runtime (:class:`OnnxDenoiser`), ``*.plan`` / ``*.engine`` in TensorRT
    (:class:`TensorRTDenoiser`, on ``device`` when it is a CUDA device, else ``cuda``).

    Raises
    ------
    EngineUnavailableError
        For a TensorRT engine on a machine without TensorRT or a CUDA GPU (the message
        says what to install).
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        from ._onnx import OnnxDenoiser

        return OnnxDenoiser(path)
    if path.suffix.lower() in ENGINE_SUFFIXES:
        from ._tensorrt import TensorRTDenoiser

        device = torch.device(device)
        return TensorRTDenoiser(path, device=device if device.type == "cuda" else "cuda")
    return TorchDenoiser(load_model(path, device=device), read_config(path))
