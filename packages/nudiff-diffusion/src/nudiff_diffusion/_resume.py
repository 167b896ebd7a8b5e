"""Resuming a training run: the saved state, read safely, and the settings a resume must repeat.

Used by the diffusion trainer and by ``nudiff-seg train``: a resume continues the run it
finds only when it is given the settings that run was started with, so that the weights
it ends with are the ones an uninterrupted run would have (or the run refuses, naming the
flag), and an unreadable state file is named instead of surfacing a raw traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch

__all__ = ["read_train_state", "refuse_train_state", "check_resume_settings"]


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


def _comparable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # tuples as lists, as the saved JSON has them


def check_resume_settings(
    where: str | os.PathLike[str],
    saved: Mapping[str, Any],
    given: Mapping[str, Any],
    *,
    may_change: Collection[str] = (),
    flags: Mapping[str, str] | None = None,
) -> None:
    """Refuse a resume whose settings differ from those the run was started with.

    Parameters
    ----------
    where : path
        The run (named in the error).
    saved, given : mapping
        Settings of the run, as saved (JSON) and as given to this resume. Keys the saved
        run lacks (written by an older version) are not compared.
    may_change : collection of str
        Keys a resume may change (e.g. how often it saves).
    flags : mapping, optional
        The command-line flag of a key, for the message (default ``--key-with-dashes``).

    Raises
    ------
    ValueError
        Naming the first differing flag, its saved and its given value.
    """
    for key, value in given.items():
        if key in may_change or key not in saved or _comparable(saved[key]) == _comparable(value):
            continue
        flag = (flags or {}).get(key, "--" + key.replace("_", "-"))
        raise ValueError(
            f"'{where}' was started with {flag} {saved[key]!r}, this resume gives {value!r}; resume with the run's "
            "settings or start a new run with another --out"
        )
