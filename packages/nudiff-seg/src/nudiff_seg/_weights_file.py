"""Reading a weights file (safetensors or a PyTorch file that cannot run code) into a state dict."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["read_state_dict"]


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: ``.safetensors``, or a PyTorch file read with
    ``weights_only=True`` (a file never runs code).

    A ``{"desc": ...}`` (HoVer-Net's checkpoints) or ``{"state_dict": ...}`` wrapper is
    taken off, as is the ``module.`` prefix that ``DataParallel`` puts on every key.
    Errors name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: '{path}'")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's message goes on to suggest weights_only=False
        found = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", str(exc))
        why = found.group(1) if found else str(exc).splitlines()[0]
        raise ValueError(
            f"'{path}' could not be read as a weights file: it holds Python objects that loading would have "
            f"to run, not only tensors ({why}); nudiff-seg loads weights files with weights_only=True only"
        ) from exc
    except Exception as exc:  # noqa: BLE001  # any reader failure: name the file
        raise ValueError(f"'{path}' could not be read as a weights file ({exc})") from exc
    for wrapper in ("desc", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not state:
        raise ValueError(f"'{path}' does not hold a state dict (got {type(state).__name__} {str(state)[:60]!r})")
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"'{path}' holds entries that are not tensors: {not_tensors[:3]}")
    if all(str(k).startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)
