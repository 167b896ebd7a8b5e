"""The one pair of conversions between the NumPy side (HWC) and the models' tensors (NCHW
float32 in [-1, 1]) of DESIGN.md: for structures and for RGB images."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["structures_to_tensor", "tensor_to_structures", "images_to_tensor", "tensor_to_images"]


def structures_to_tensor(structures: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) structures ``[fg in {0, 1} or [0, 1], h, v]`` -> (N, 3, H, W) float32
    in [-1, 1] (the foreground is mapped to ``2 fg - 1``). The input is not modified."""
    if not isinstance(structures, np.ndarray) or structures.ndim != 4 or structures.shape[-1] != 3:
        raise ValueError(f"`structures` must be (N, H, W, 3), got {getattr(structures, 'shape', type(structures))}")
    x = torch.from_numpy(np.ascontiguousarray(structures, dtype=np.float32)).permute(0, 3, 1, 2).clone()
    x[:, 0] = x[:, 0] * 2 - 1
    return x


def tensor_to_structures(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) model samples in [-1, 1] -> (N, H, W, 3) float32 ``[probability in
    [0, 1], h, v]`` (clipped to the valid ranges), the input of
    ``nudiff_postproc.instances_from_structures``."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) structures, got {tuple(x.shape)}")
    out = x.detach().float().clamp(-1, 1).permute(0, 2, 3, 1).cpu().numpy().copy()
    out[..., 0] = (out[..., 0] + 1) / 2
    return out


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32 in [-1, 1] (``v / 127.5 - 1``)."""
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"`images` must be (N, H, W, 3) uint8, got {getattr(images, 'shape', type(images))} "
            f"{getattr(images, 'dtype', '')}"
        )
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) model samples in [-1, 1] -> (N, H, W, 3) uint8 RGB (clipped, rounded)."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) images, got {tuple(x.shape)}")
    out = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return out.permute(0, 2, 3, 1).cpu().numpy().copy()
