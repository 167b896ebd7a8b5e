"""Resuming long work: a training run's saved state, read safely, the settings a resume
must repeat, and output folders that remember the settings they were filled with.

Used by the diffusion trainer, ``nudiff-seg train`` and every command that fills a folder
and skips what exists (sampling, prediction): a resume continues only when it is given the
settings the run was started with, so that what it ends with is what an uninterrupted run
would have made (or it refuses, naming the flag), and an unreadable state file is named
instead of surfacing a raw traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

__all__ = [
    "read_train_state",
    "refuse_train_state",
    "check_resume_settings",
    "claim_output_folder",
    "RUN_STAMP",
    "MODEL_FLAG",
]

#: The file in an output folder that records the settings it is being filled with.
RUN_STAMP = ".nudiff-run.json"
#: The flag of a model's identity (its weights' digest) in a refusal.
MODEL_FLAG = {"model": "the model (the weights' sha256) of --checkpoint / --engine"}


def names_digest(names: Sequence[str], what: str = "names") -> str:
    """What a run was trained on, as one comparable string: the count of ``names`` (of
    images, patches) and a digest of them in order, e.g. ``"16 patches, names sha256 ..."``."""
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    return f"{len(names)} {what}, names sha256 {digest}"


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


def claim_output_folder(
    out: str | os.PathLike[str],
    settings: Mapping[str, Any],
    *,
    may_change: Collection[str] = (),
    flags: Mapping[str, str] | None = None,
) -> Path:
    """Create ``out`` for work that skips what already exists there, or check that the
    work already in it was made with ``settings``.

    The first call writes ``settings`` to ``out/.nudiff-run.json``; a later one (a resumed
    or repeated run) must give the same ones, except ``may_change``, else the files it
    would skip were made differently and a ``ValueError`` names the first differing flag
    (see :func:`check_resume_settings`). Values are compared as JSON. Returns ``out``.
    """
    from ._checkpoint import _atomic_write, read_json_object

    out = Path(out)
    stamp = out / RUN_STAMP
    record = json.loads(json.dumps(dict(settings), default=str))
    if stamp.is_file():
        check_resume_settings(out, read_json_object(stamp), record, may_change=may_change, flags=flags)
        return out
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(stamp, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
    return out
