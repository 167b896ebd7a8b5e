"""HoVer-Net's own weights files (github vqdang/hover_net, and TIAToolbox's copies of them).

Two kinds of file use the reference's module names (``models/hovernet/net_desc.py`` and
``net_utils.py``), which are nudiff-seg's except the batch norms inside units:

- trained HoVer-Nets, as released with the reference code
  (``hovernet_original_kumar_notype_tf2pytorch.tar``, ``..._consep_type_...``,
  ``hovernet_fast_pannuke_type_tf2pytorch.tar``, ...: ``{"desc": state_dict}``; TIAToolbox's
  ``hovernet_original-kumar.pth`` and the like: the state dict itself), which
  :func:`load_reference_hovernet` turns into a nudiff-seg model;
- the pre-activation ResNet-50 the reference trains from
  (``ImageNet-ResNet50-Preact_pytorch.tar``: the encoder alone), which
  :func:`load_encoder_from_reference` loads into a model's encoder.

Their batch norms are named ``preact/bn``, ``conv1/bn``, ``conv2/bn`` in the residual units
and ``preact_bna/bn``, ``conv1/bn`` in the dense units, where nudiff-seg has ``preact_bn``,
``conv1_bn``, ``conv2_bn`` (:func:`nudiff_key`). The converted files carry the reference's
fixed 2x2 unpooling matrix (``upsample2x.unpool_mat``, all ones: nudiff-seg's upsampling
is the same nearest-neighbour repeat) and no BatchNorm step counters. A type branch
(``decoder.tp``) is left out: nudiff-seg predicts instances, not classes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from nudiff_postproc._io import file_sha256

from ._hovernet import HoVerNet, HoVerNetConfig, _encoder_from_torchvision_state
from ._weights_file import read_state_dict

__all__ = ["load_encoder_from_reference", "load_encoder_weights", "load_reference_hovernet", "nudiff_key"]

#: what a reference file holds beside the model's parameters
_UNPOOL = "upsample2x.unpool_mat"
_TYPE_BRANCH = "decoder.tp."
_ENCODER_PREFIXES = ("conv0.", "d0.", "d1.", "d2.", "d3.")
_STEP_COUNTER = ".num_batches_tracked"


def nudiff_key(reference_key: str) -> str:
    """nudiff-seg's name of a parameter of the reference HoVer-Net.

    >>> nudiff_key("decoder.np.u3.dense.units.0.preact_bna/bn.weight")
    'decoder.np.u3.dense.units.0.preact_bn.weight'
    >>> nudiff_key("d1.units.2.conv1/bn.running_var")
    'd1.units.2.conv1_bn.running_var'
    >>> nudiff_key("conv0./.weight")  # the stem's convolution is named "/" in both
    'conv0./.weight'
    """
    return reference_key.replace("preact_bna/bn", "preact_bn").replace("/bn", "_bn")


def _renamed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {nudiff_key(k): v for k, v in state.items()}


def _infer_config(state: dict[str, torch.Tensor], path: Path) -> HoVerNetConfig:
    """Mode, width and depth of the HoVer-Net whose (renamed) weights are ``state``."""
    needed = ("conv0./.weight", "decoder.np.u3.conva.weight", "decoder.hv.u0.conv.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        some = sorted(state)[:3]
        raise ValueError(
            f"'{path}' is not a HoVer-Net with NP and HV branches in the reference's layout: no {missing[0]!r} "
            f"(its first keys: {some})"
        )
    kernel = state["decoder.np.u3.conva.weight"].shape[-1]
    if kernel not in (3, 5):
        raise ValueError(
            f"'{path}': decoder.np.u3.conva has {kernel}x{kernel} kernels; expected 5 (original) or 3 (fast)"
        )
    stem = state["conv0./.weight"].shape[0]
    if stem not in (64, 32, 16, 8):
        raise ValueError(f"'{path}': conv0 has {stem} channels; expected 64 (or 64 / 2, 4, 8)")
    units = []
    for stage in range(4):
        found = {int(m.group(1)) for k in state if (m := re.match(rf"d{stage}\.units\.(\d+)\.", k))}
        if not found or found != set(range(len(found))):
            raise ValueError(f"'{path}': the units of encoder stage d{stage} are {sorted(found)}; expected 0..n-1")
        units.append(len(found))
    return HoVerNetConfig("original" if kernel == 5 else "fast", 64 // stem, tuple(units))  # type: ignore[arg-type]


def _check_fit(
    expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], path: Path, what: str
) -> dict[str, torch.Tensor]:
    """``given`` checked against ``expected`` (BatchNorm step counters may be absent: the
    model's own are kept); returns the tensors to load."""
    missing = sorted(k for k in set(expected) - set(given) if not k.endswith(_STEP_COUNTER))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(
        f"{k} {tuple(given[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(expected) & set(given)
        if tuple(expected[k].shape) != tuple(given[k].shape)
    )
    if missing or unexpected or wrong:
        raise ValueError(
            f"'{path}' does not fit {what}: {len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected "
            f"{unexpected[:3]}, {len(wrong)} of the wrong shape {wrong[:3]}"
        )
    return {k: v.to(expected[k].dtype) for k, v in given.items()}


def load_reference_hovernet(path: str | os.PathLike[str]) -> tuple[HoVerNet, dict[str, Any]]:
    """A trained HoVer-Net from one of the reference's weights files.

    Parameters
    ----------
    path : str or PathLike
        ``.tar``/``.pth``/``.pt`` (read with ``weights_only=True``) or ``.safetensors``, in
        the reference's module names; see the module docstring.

    Returns
    -------
    model : HoVerNet
        In eval mode, its config read off the weights (mode from the decoder's kernels,
        width from the stem, units per stage); its NP and HV branches and encoder are the
        file's.
    record : dict
        ``file`` (name), ``sha256`` (of the file), ``config`` and ``left_out`` (the type
        branch, if any): what :func:`nudiff_seg.save_hovernet` should keep with it.
    """
    path = Path(path)
    state = _renamed(read_state_dict(path))
    config = _infer_config(state, path)
    types = state.get("decoder.tp.u0.conv.weight")
    left_out = [f"decoder.tp (the type branch, {types.shape[0]} classes)"] if types is not None else []
    kept = {k: v for k, v in state.items() if not k.startswith(_TYPE_BRANCH) and k != _UNPOOL}
    if _UNPOOL in state and not torch.equal(state[_UNPOOL].float(), torch.ones(2, 2)):
        raise ValueError(f"'{path}': {_UNPOOL} is not the reference's 2x2 matrix of ones; cannot reproduce it")
    model = HoVerNet(config)
    model.load_state_dict(_check_fit(model.state_dict(), kept, path, f"a {config.mode} HoVer-Net"), strict=False)
    record = {"file": path.name, "sha256": file_sha256(path), "config": config.to_dict(), "left_out": left_out}
    return model.eval(), record


def load_encoder_from_reference(model: HoVerNet, path: str | os.PathLike[str]) -> HoVerNet:
    """Initialise ``model``'s encoder (``conv0``, ``d0``-``d3``) from a reference file:
    HoVer-Net's pre-activation ImageNet ResNet-50 (``ImageNet-ResNet50-Preact_pytorch.tar``,
    the start of the reference's training; the same network as nudiff-seg's encoder, so
    the same function) or the encoder of a trained HoVer-Net. Every encoder tensor must be
    in the file; the rest of the file (bottleneck, decoders) is not read. In place;
    returns ``model``."""
    return _load_encoder(model, read_state_dict(path), Path(path))


def _load_encoder(model: HoVerNet, state: dict[str, torch.Tensor], path: Path) -> HoVerNet:
    """:func:`load_encoder_from_reference` of a file's tensors already read."""
    state = _renamed(state)
    encoder = {k: v for k, v in model.state_dict().items() if k.startswith(_ENCODER_PREFIXES)}
    given = {k: v for k, v in state.items() if k.startswith(_ENCODER_PREFIXES)}
    what = f"this model's encoder ({model.config.mode}, width 1/{model.config.width_divisor})"
    model.load_state_dict(_check_fit(encoder, given, path, what), strict=False)
    return model


def load_encoder_weights(model: HoVerNet, path: str | os.PathLike[str]) -> HoVerNet:
    """``nudiff-seg train --encoder-weights``: a reference file (its stem is ``conv0./``)
    through :func:`load_encoder_from_reference`, a torchvision ResNet-50 (``conv1``)
    through :func:`nudiff_seg.load_encoder_from_torchvision`."""
    state = read_state_dict(path)
    keys = state.keys()
    if "conv0./.weight" in keys:
        return _load_encoder(model, state, Path(path))
    if "conv1.weight" in keys:
        return _encoder_from_torchvision_state(model, state, path)
    raise ValueError(
        f"'{path}' is neither HoVer-Net's encoder (no 'conv0./.weight') nor a torchvision ResNet-50 "
        f"(no 'conv1.weight'); its first keys: {sorted(keys)[:3]}"
    )
