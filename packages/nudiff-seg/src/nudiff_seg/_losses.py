"""HoVer-Net's training targets and losses.

Targets (``targets``): the nuclear-pixel mask and the h/v distance maps of
:func:`nudiff_postproc.hv_maps`, as HoVer-Net's ``gen_instance_hv_map`` makes them: each
4-connected part of an instance is a nucleus of its own (``fix_mirror_padding``); a
nucleus has distance maps when at least 30 of its pixels lie in the output crop
(``remove_small_objects(min_size=30)`` on the cropped map, with the scikit-image 0.17.2
HoVer-Net pins, which keeps 30), computed from all its pixels in the input
window (a nucleus cut by the output border keeps the centre of mass of its part in the
window); then the maps are centre-cropped to the output.

Losses (``hovernet_loss``), with the reference's weights (all 1): NP = cross entropy +
soft Dice; HV = MSE + MSGE, the MSE of 5x5 Sobel-like gradients inside nuclei. The
gradients are those of HoVer-Net's code, which differentiates the h map along y (rows)
and the v map along x (columns): the TensorFlow original calls ``get_gradient_hv(pred, 1,
0)`` with its x-kernel (``np.meshgrid``'s "xy" indexing) on channel 1 (v) and its
y-kernel on channel 0 (h), and the PyTorch port builds its kernels with ``torch.meshgrid``'s
"ij" indexing, which gives the h channel the y-kernel. The paper's equation writes
dh/dx and dv/dy; every published HoVer-Net model, and the Nudiff paper's segmentation
runs, trained with the code's directions, so they are kept here.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from nudiff_postproc import hv_maps
from skimage.measure import label

__all__ = ["targets", "xentropy_loss", "dice_loss", "mse_loss", "msge_loss", "sobel_kernels_5x5", "hovernet_loss"]

_EPS = 1e-7  # the reference's ``epsilon = 10e-8``
_MIN_NUCLEUS = 30  # pixels a nucleus needs in the output crop for distance maps


def targets(inst: np.ndarray, output_size: int) -> tuple[np.ndarray, np.ndarray]:
    """NP and HV targets of one input window.

    Parameters
    ----------
    inst : (S, S) ndarray of int
        Instance map of the whole input window. Not modified.
    output_size : int
        Side of the model's output; the targets are the centre ``output_size`` pixels.

    Returns
    -------
    np_target : (s, s) ndarray of float32
        1 on nuclei, 0 elsewhere.
    hv_target : (s, s, 2) ndarray of float32
        h and v distance maps.
    """
    size = inst.shape[0]
    if inst.ndim != 2 or inst.shape[1] != size or not 0 < output_size <= size:
        raise ValueError(f"`inst` must be a square map at least {output_size} px wide, got shape {inst.shape}")
    top = (size - output_size) // 2
    crop = (slice(top, top + output_size), slice(top, top + output_size))
    parts = label(inst, connectivity=1, background=0)  # equal-valued 4-connected regions
    big = np.bincount(parts[crop].ravel(), minlength=int(parts.max()) + 1) >= _MIN_NUCLEUS
    big[0] = False
    # the chosen ones, whatever their size and however thin (gen_instance_hv_map grows each box by 2 px)
    hv = hv_maps(np.where(big[parts], parts, 0), min_size=0, map_lines=True)[crop]
    return (inst[crop] > 0).astype(np.float32), np.ascontiguousarray(hv, dtype=np.float32)


def xentropy_loss(true: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of one-hot ``true`` and softmax ``prob``, both (N, C, H, W),
    probabilities clamped to [1e-7, 1 - 1e-7] as in the reference."""
    prob = prob / prob.sum(dim=1, keepdim=True)
    prob = prob.clamp(_EPS, 1.0 - _EPS)
    return -(true * prob.log()).sum(dim=1).mean()


def dice_loss(true: torch.Tensor, prob: torch.Tensor, smooth: float = 1e-3) -> torch.Tensor:
    """Soft Dice loss summed over the classes: ``sum_c 1 - (2 |p_c t_c| + s) / (|p_c| + |t_c| + s)``,
    each sum over the batch and all pixels; ``true``, ``prob`` (N, C, H, W)."""
    dims = (0, 2, 3)
    inter = (prob * true).sum(dims)
    return (1.0 - (2.0 * inter + smooth) / (prob.sum(dims) + true.sum(dims) + smooth)).sum()


def mse_loss(true: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element."""
    return (pred - true).square().mean()


def sobel_kernels_5x5() -> tuple[torch.Tensor, torch.Tensor]:
    """The (5, 5) gradient kernels ``x / (x^2 + y^2)`` and ``y / (x^2 + y^2)`` (0 at the
    centre), x the column offset and y the row offset, both in -2..2."""
    r = torch.arange(-2, 3, dtype=torch.float32)
    y, x = torch.meshgrid(r, r, indexing="ij")
    norm = x * x + y * y + 1e-15
    return x / norm, y / norm


#: what the MSGE differentiates (recorded with a training run: a resume must not switch)
MSGE_GRADIENTS = "h along y, v along x (HoVer-Net's code)"


def _gradients(hv: torch.Tensor) -> torch.Tensor:
    """``[d h / d y, d v / d x]`` of ``(N, 2, H, W)`` maps, zero-padded: HoVer-Net's code."""
    kx, ky = sobel_kernels_5x5()
    kx, ky = kx.to(hv), ky.to(hv)
    dh = F.conv2d(hv[:, :1], ky[None, None], padding=2)
    dv = F.conv2d(hv[:, 1:], kx[None, None], padding=2)
    return torch.cat([dh, dv], dim=1)


def msge_loss(true: torch.Tensor, pred: torch.Tensor, focus: torch.Tensor) -> torch.Tensor:
    """Mean squared gradient error inside ``focus``, the gradients as in HoVer-Net's code
    (h along y, v along x; see the module's docstring).

    Parameters
    ----------
    true, pred : (N, 2, H, W) tensor
        h and v maps.
    focus : (N, H, W) tensor
        1 on nuclei (the NP target), 0 elsewhere.
    """
    focus = focus[:, None].expand(-1, 2, -1, -1).to(pred)
    err = (_gradients(pred) - _gradients(true)).square() * focus
    return err.sum() / (focus.sum() + 1e-8)


def hovernet_loss(
    out: dict[str, torch.Tensor], np_target: torch.Tensor, hv_target: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """HoVer-Net's total loss (CE + Dice + MSE + MSGE) and its parts.

    Parameters
    ----------
    out : dict
        The model's ``{"np": (N, 2, s, s) logits, "hv": (N, 2, s, s)}``.
    np_target : (N, s, s) tensor of float
        Nuclear-pixel mask.
    hv_target : (N, 2, s, s) tensor of float
        h and v maps.
    """
    prob = out["np"].softmax(dim=1)
    onehot = torch.stack([1.0 - np_target, np_target], dim=1)
    parts = {
        "ce": xentropy_loss(onehot, prob),
        "dice": dice_loss(onehot, prob),
        "mse": mse_loss(hv_target, out["hv"]),
        "msge": msge_loss(hv_target, out["hv"], np_target),
    }
    total = parts["ce"] + parts["dice"] + parts["mse"] + parts["msge"]
    return total, {k: float(v.detach()) for k, v in parts.items()}
