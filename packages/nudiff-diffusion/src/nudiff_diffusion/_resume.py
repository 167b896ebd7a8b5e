"""Resuming a training run: its saved state, read safely (an unreadable file is named
instead of surfacing a raw traceback). The settings a resume must repeat and the output
folders that remember theirs are nudiff-postproc's (``nudiff_postproc._runs``, re-exported
here): one rule for every package."""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import Any, NoReturn

import torch
from nudiff_postproc._runs import (
    RUN_STAMP,
    check_resume_settings,
    claim_output_folder,
    claimed_output_folder,
    names_digest,
)

__all__ = [
    "read_train_state",
    "runtime_weights_digest",
    "runtime_precision",
    "refuse_train_state",
    "check_resume_settings",
    "claim_output_folder",
    "claimed_output_folder",
    "names_digest",
    "RUN_STAMP",
    "MODEL_FLAG",
]

#: The flag of a model's identity (its weights' digest) in a refusal.
MODEL_FLAG = {"model": "the model (the weights' sha256) of --checkpoint / --engine"}


def runtime_weights_digest(runtime: Any) -> str | None:
    """What identifies a runtime's model in an output folder's record: the weights' digest
    its checkpoint or graph recorded (``weights_sha256``), else the digest of the PyTorch
    model it runs; None only for a graph exported before digests were recorded."""
    recorded = getattr(runtime, "config", {}).get("weights_sha256")
    if recorded:
        return str(recorded)
    model = getattr(runtime, "model", None)
    if isinstance(model, torch.nn.Module):
        from ._checkpoint import weights_digest

        return weights_digest(model.state_dict())
    return None


_AUTOCAST_NAMES = {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def runtime_precision(runtime: Any) -> str:
    """The precision a runtime computes in: a PyTorch runtime's autocast dtype
    (``--precision``), else what its exported graph or engine records (``float32``,
    ``float16``, ``bfloat16``). Samples of one model differ between precisions (float16
    moves a structure by about 0.01), so a folder of samples records it."""
    if hasattr(runtime, "autocast_dtype"):
        return _AUTOCAST_NAMES.get(runtime.autocast_dtype, str(runtime.autocast_dtype))
    return str(getattr(runtime, "config", {}).get("precision", "float32"))


def _refuse(path: Path, why: str) -> NoReturn:
    raise ValueError(f"'{path}' is not a usable training state ({why}); start a new run with another --out")


def read_train_state(
    path: str | os.PathLike[str], *, device: str | torch.device, keys: Collection[str]
) -> dict[str, Any]:
    """Load a ``train_state.pt`` with ``weights_only=True`` and check it holds ``keys``.

    Raises
    ------
    ValueError
        Naming the file, when it is empty, truncated, not a torch file, holds objects
        other than tensors and plain containers, or lacks one of ``keys``.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated, empty, not a torch file, or holding non-tensor objects
        first = str(exc).splitlines()[0] if str(exc) else "unreadable"
        _refuse(path, f"{type(exc).__name__}: {first}")
    if not isinstance(state, dict) or any(k not in state for k in keys):
        _refuse(path, f"expected the keys {list(keys)}")
    return state


def refuse_train_state(path: str | os.PathLike[str], exc: BaseException) -> NoReturn:
    """Re-raise an error met while restoring a state (e.g. weights of another model) as a
    ``ValueError`` that names the file."""
    _refuse(Path(path), f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
