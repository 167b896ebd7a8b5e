"""Patch embeddings from an ImageNet ResNet, e.g. as the features of labelled subsets
(``nudiff-postproc subset --features``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from nudiff_diffusion import evaluating

from ._resnet import ResNet, load_resnet_weights, resnet18, resnet50

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "patch_embeddings", "load_backbone"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_ARCHS = {"resnet50": resnet50, "resnet18": resnet18}


def load_backbone(weights: str | os.PathLike[str], arch: str = "resnet50") -> ResNet:
    """A torchvision-layout ResNet with the user's ImageNet weights, in eval mode."""
    if arch not in _ARCHS:
        raise ValueError(f"unknown `arch` {arch!r}; choose one of {sorted(_ARCHS)}")
    return load_resnet_weights(_ARCHS[arch](), Path(weights)).eval()


def patch_embeddings(images: np.ndarray, model: ResNet, *, batch: int = 32) -> np.ndarray:
    """Global-average-pooled last-stage features of RGB patches.

    Parameters
    ----------
    images : (N, H, W, 3) uint8
        RGB patches (H, W >= 32), ImageNet-normalised here.
    model : ResNet
        On the CPU or a GPU: the patches are moved to its device.
    batch : int
        Patches per forward pass.

    Returns
    -------
    (N, 2048) float32 for ResNet-50 (512 for ResNet-18)
    """
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"`images` must be (N, H, W, 3) uint8, got {getattr(images, 'shape', type(images))}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"`batch` must be an integer >= 1, got {batch!r}")
    if min(images.shape[1:3]) < 32:
        raise ValueError(f"patches must be at least 32 px, got {images.shape[1:3]}")
    device = next(model.parameters()).device  # the patches go where the model is
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    out = []
    with torch.no_grad(), evaluating(model):  # batch statistics must not move: the caller's model keeps its mode
        for start in range(0, len(images), batch):
            x = torch.from_numpy(images[start : start + batch]).to(device).permute(0, 3, 1, 2).float() / 255.0
            out.append(model.features((x - mean) / std).cpu().numpy())
    return np.concatenate(out).astype(np.float32)
