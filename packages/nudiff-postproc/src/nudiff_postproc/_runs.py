"""Resumable work in folders: the settings a resumed run must repeat, and output folders that
remember the settings they are being filled with.

Every command that skips what already exists (structure and histology sampling, HoVer-Net
prediction, ``nudiff-postproc instances``) and every trainer that resumes checks here that
it is continuing the same work: what it ends with is then what an uninterrupted run would
have made, and a run with other settings is refused, naming the flag, instead of mixing two
runs' files. Pure Python, so that every package (this one has no torch) uses the one rule.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._io import atomic_path

__all__ = ["check_resume_settings", "claim_output_folder", "names_digest", "RUN_STAMP"]

#: The file in an output folder that records the settings it is being filled with.
RUN_STAMP = ".nudiff-run.json"


def names_digest(names: Sequence[str], what: str = "names") -> str:
    """What a run works on, as one comparable string: the count of ``names`` (of images,
    patches) and a digest of them in order, e.g. ``"16 patches, names sha256 ..."``."""
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    return f"{len(names)} {what}, names sha256 {digest}"


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
    replace: bool = False,
) -> Path:
    """Create ``out`` for work that skips what already exists there, or check that the
    work already in it was made with ``settings``.

    The first call writes ``settings`` to ``out/.nudiff-run.json``; a later one (a resumed
    or repeated run) must give the same ones, except ``may_change``, else the files it
    would skip were made differently and a ``ValueError`` names the first differing flag
    (see :func:`check_resume_settings`). Values are compared as JSON. ``replace``: the
    caller redoes every file (``--overwrite``), so ``settings`` replace the recorded ones.
    Returns ``out``.
    """
    out = Path(out)
    stamp = out / RUN_STAMP
    record = _comparable(dict(settings))
    if stamp.is_file() and not replace:
        try:
            saved = json.loads(stamp.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"'{stamp}' is not valid JSON ({exc}); it records how '{out}' was made") from exc
        if not isinstance(saved, dict):
            raise ValueError(f"'{stamp}' holds {type(saved).__name__}, not the settings '{out}' was made with")
        check_resume_settings(out, saved, record, may_change=may_change, flags=flags)
        return out
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(stamp) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return out
