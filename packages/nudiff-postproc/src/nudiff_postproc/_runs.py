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
import signal
import sys
import threading
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_path

__all__ = [
    "check_resume_settings",
    "claim_output_folder",
    "claimed_output_folder",
    "names_digest",
    "sigterm_as_interrupt",
    "report_interrupt",
    "RUN_STAMP",
]

#: a command line's exit status when it was interrupted (SIGINT or SIGTERM) and cleaned up
INTERRUPTED = 130

#: The file in an output folder that records the settings it is being filled with.
RUN_STAMP = ".nudiff-run.json"


def names_digest(names: Sequence[str], what: str = "names") -> str:
    """What a run works on, as one comparable string: the count of ``names`` (of images,
    patches) and a digest of them in order, e.g. ``"16 patches, names sha256 ..."``."""
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    return f"{len(names)} {what}, names sha256 {digest}"


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else str(value)


def _comparable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_plain))  # tuples as lists, numpy scalars as numbers, as saved


def check_resume_settings(
    where: str | os.PathLike[str],
    saved: Mapping[str, Any],
    given: Mapping[str, Any],
    *,
    may_change: Collection[str] = (),
    flags: Mapping[str, str] | None = None,
    remedy: str = "resume with the run's settings or start a new run with another --out",
    required: Collection[str] = (),
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
    remedy : str
        What the message tells the user to do instead.
    required : collection of str
        Keys of ``given`` that the saved run must hold too: a run saved without one was
        made by an older version that worked differently, and cannot be continued.

    Raises
    ------
    ValueError
        Naming the first differing flag, its saved and its given value.
    """
    for key, value in given.items():
        flag = (flags or {}).get(key, "--" + key.replace("_", "-"))
        if key in required and key not in saved:
            raise ValueError(
                f"'{where}' was made by an older version that recorded no {flag} (this one uses {value!r}): "
                "its files were made differently and cannot be continued; start a new run with another --out"
            )
        if key in may_change or key not in saved or _comparable(saved[key]) == _comparable(value):
            continue
        raise ValueError(f"'{where}' was started with {flag} {saved[key]!r}, this resume gives {value!r}; {remedy}")


def _read_stamp(stamp: Path, out: Path) -> dict[str, Any]:
    try:
        saved = json.loads(stamp.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"'{stamp}' is not valid JSON ({exc}); it records how '{out}' was made") from exc
    if not isinstance(saved, dict):
        raise ValueError(f"'{stamp}' holds {type(saved).__name__}, not the settings '{out}' was made with")
    return saved


def recorded_settings(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The settings a nudiff run recorded for ``folder`` (:func:`claim_output_folder`),
    or None when it records none (a folder made otherwise, or before the record existed)."""
    stamp = Path(folder) / RUN_STAMP
    return _read_stamp(stamp, Path(folder)) if stamp.is_file() else None


def _first_file(out: Path) -> Path | None:
    """A file below ``out`` (folders aside) other than a run's record being written, if any."""
    for folder, _, files in os.walk(out):
        for name in files:
            if not (name.startswith(f".{RUN_STAMP}.") and name.endswith(".part")) and name != RUN_STAMP:
                return Path(folder, name)
    return None


def claim_output_folder(
    out: str | os.PathLike[str],
    settings: Mapping[str, Any],
    *,
    may_change: Collection[str] = (),
    flags: Mapping[str, str] | None = None,
    replace: bool = False,
    remedy: str = "resume with the run's settings or start a new run with another --out",
    required: Collection[str] = (),
) -> Path:
    """Create ``out`` for work that skips what already exists there, or check that the
    work already in it was made with ``settings``.

    The first call writes ``settings`` to ``out/.nudiff-run.json``; a later one (a resumed
    or repeated run) must give the same ones, except ``may_change``, else the files it
    would skip were made differently and a ``ValueError`` names the first differing flag
    (see :func:`check_resume_settings`; ``remedy`` ends its message). Values are compared
    as JSON. The file is created exclusively, so of two runs (ranks, shards) starting at
    once with different settings one is refused. A folder that holds files but no record
    (a dataset, another program's output) is refused: the work would be mixed into them.
    ``replace``: the caller has removed what the folder held (``--overwrite``), so
    ``settings`` replace the recorded ones.
    ``required``: keys an earlier record must hold (see :func:`check_resume_settings`).
    Returns ``out``.
    """
    out = Path(out)
    stamp = out / RUN_STAMP
    record = _comparable(dict(settings))
    for folder in (out, *out.parents):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"output folder '{out}': '{folder}' is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if replace:
        with atomic_path(stamp) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
        return out
    if not stamp.is_file():
        stranger = _first_file(out)
        if stranger is not None:
            raise ValueError(
                f"'{out}' already holds files that no nudiff run recorded making (e.g. '{stranger}'): the work "
                "would be mixed into them; give a new or empty folder"
            )
        tmp = out / f".{RUN_STAMP}.{os.getpid()}.{uuid.uuid4().hex[:12]}.part"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.link(tmp, stamp)  # exclusive and whole: fails when another run wrote it first
            return out
        except FileExistsError:
            pass  # another run (a rank, a shard) was first: compare with its settings
        except OSError:  # a file system without hard links: not exclusive, still whole
            os.replace(tmp, stamp)
            return out
        finally:
            tmp.unlink(missing_ok=True)
    saved = _read_stamp(stamp, out)
    check_resume_settings(out, saved, record, may_change=may_change, flags=flags, remedy=remedy, required=required)
    return out


def _folders_below(out: Path) -> set[Path]:
    return {Path(folder) for folder, _, _ in os.walk(out)} - {out}


def _take_back(out: Path, kept: set[Path], existed: bool) -> None:
    """Remove the folders below ``out`` but ``kept`` (empty: :func:`_first_file` found none),
    then the stamp and, unless it ``existed``, ``out``; a folder that is not empty after all
    (another process wrote into it) keeps the stamp and ``out``."""
    for folder in sorted(_folders_below(out) - kept, key=lambda p: -len(p.parts)):  # the deepest first
        try:
            folder.rmdir()
        except OSError:
            return
    (out / RUN_STAMP).unlink(missing_ok=True)
    if not existed:
        try:
            out.rmdir()
        except OSError:
            pass


@contextmanager
def claimed_output_folder(out: str | os.PathLike[str], settings: Mapping[str, Any], **options: Any) -> Iterator[Path]:
    """:func:`claim_output_folder` around the work that fills the folder (``options`` as
    there): when the work fails (an error, Ctrl-C) before it has put any file into the
    folder, the claim is taken back: the settings' record and the empty folders go (and
    ``out`` itself if this run made it), so that a failed first try leaves nothing behind
    and does not bind the next try to its settings. Once a file is there, the record stays
    with it: a rerun resumes that work.

    Yields
    ------
    Path
        ``out``.
    """
    out = Path(out)
    existed = out.is_dir()
    resumed = (out / RUN_STAMP).is_file() and not options.get("replace", False)
    kept = set() if resumed or not existed else _folders_below(out)  # the user's own folders stay
    claim_output_folder(out, settings, **options)
    try:
        yield out
    except BaseException:
        if not resumed and _first_file(out) is None:  # nothing made yet: take the claim back
            _take_back(out, kept, existed)
        raise


def _interrupt(signum: int, frame: Any) -> None:  # noqa: ARG001 - the signal module's signature
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM (``kill``, a scheduler, the pipeline stopping a stage)
    raises ``KeyboardInterrupt`` as Ctrl-C does, so that the same clean-up runs (temporary
    files removed, a claim without output taken back; see :func:`claimed_output_folder`)
    instead of the process dying on the spot. Only in the main thread (elsewhere Python
    cannot install handlers: nothing changes); the previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def report_interrupt(prog: str, command: str) -> int:
    """Say that ``prog command`` was interrupted and that rerunning it resumes (``train``:
    with ``--resume``); returns :data:`INTERRUPTED`, the exit status."""
    resume = " --resume" if command == "train" else ""
    print(f"{prog} {command}: interrupted; what it finished is kept, rerun it{resume} to go on", file=sys.stderr)
    return INTERRUPTED
