"""Checkpoint directories: ``config.json`` + ``model.safetensors`` (DESIGN.md)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from nudiff_postproc._io import atomic_path

from ._config import UNetConfig
from ._unet import NormFactory, UNet

__all__ = [
    "save_model",
    "load_model",
    "read_config",
    "weights_digest",
    "check_weights_digest",
    "evaluating",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_FORMAT = "nudiff-diffusion/unet"


def _atomic_write(path: Path, write) -> None:  # type: ignore[no-untyped-def]
    """``write(tmp)`` then rename onto ``path`` (:func:`nudiff_postproc._io.atomic_path`:
    the folder is made when missing, and a failed write leaves nothing)."""
    with atomic_path(path) as tmp:
        write(tmp)


@contextlib.contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` in eval mode for the body of a ``with``; afterwards every submodule has
    its own mode again (a function given a model in training mode leaves it so)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A short SHA-256 of a state dict (names, dtypes, shapes and values, in name order):
    what identifies a model's weights across its checkpoint and the graphs exported from it.

    Returns 16 hex digits. Checkpoints record it as ``weights_sha256`` in ``config.json``.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def check_weights_digest(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], weights: Path) -> None:
    """Refuse weights other than those a checkpoint's ``config.json`` was written with (its
    ``weights_sha256``; configs written before it was recorded are not checked): a save
    interrupted between the weights and the config leaves such a pair."""
    recorded = config.get("weights_sha256")
    if recorded is None:
        return
    found = weights_digest(state)
    if found != recorded:
        raise ValueError(
            f"'{weights}' is not the weights '{weights.parent / CONFIG_NAME}' was written with (sha256 {found}, "
            f"the config records {recorded}): a save was interrupted between the two files"
        )


def save_model(
    directory: str | os.PathLike[str],
    model: UNet,
    *,
    diffusion: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` (model config, diffusion settings, extras) and the weights as
    ``model.safetensors`` into ``directory``; each file is replaced atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = {
        "format": _FORMAT,
        "unet": model.config.to_dict(),
        "diffusion": diffusion or {},
        "weights_sha256": weights_digest(state),
        **(extra or {}),
    }
    text = json.dumps(config, indent=2) + "\n"  # a config that cannot be written fails before any file changes
    # weights first, then their config: a kill between the two leaves a pair whose digests
    # differ, which load_model refuses (a directory that must appear whole is renamed into place)
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": _FORMAT}))
    _atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(text))
    return directory


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (a ``config.json``); a file that is not valid JSON, or
    holds something other than an object, raises a ValueError that names it."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"'{path}' is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"'{path}' holds a JSON {type(data).__name__}; expected an object of settings")
    return data


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint directory, with clear errors."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: '{directory}'")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"'{directory}' has no {CONFIG_NAME}; expected a checkpoint directory")
    config = read_json_object(path)
    if config.get("format") != _FORMAT or "unet" not in config:
        raise ValueError(f"'{path}' is not a nudiff UNet config (expected format '{_FORMAT}' and a 'unet' entry)")
    return config


def load_model(
    directory: str | os.PathLike[str],
    *,
    norm_factory: NormFactory | None = None,
    cond_norm_factory: NormFactory | None = None,
    device: str | torch.device = "cpu",
) -> UNet:
    """Rebuild a UNet from a checkpoint directory (no flags needed) and load its weights.
    ``norm_factory``, ``cond_norm_factory``: as for :class:`UNet`.

    The weights are read with safetensors (no code runs); missing or unexpected tensors,
    a truncated file, a config with unknown keys or weights other than those the config
    was written with (its ``weights_sha256``) raise an error naming the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ._runtime import resolve_device  # imports this module: here, not at the top

    device = resolve_device(device)  # an unknown or absent device is named before any file is read
    directory = Path(directory)
    config = read_config(directory)
    try:
        unet_config = UNetConfig.from_dict(config["unet"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"'{directory / CONFIG_NAME}': {exc}") from exc
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"'{directory}' has no {WEIGHTS_NAME}")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"'{weights}' could not be read as safetensors ({exc}); is it truncated?") from exc
    model = UNet(unet_config, norm_factory, cond_norm_factory)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"'{weights}' does not fit the config in '{directory / CONFIG_NAME}': missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}"
        )
    check_weights_digest(state, config, weights)
    model.load_state_dict(state)
    return model.to(device).eval()
