"""The pipeline's machinery: stages, their fingerprints and markers, and a runner that
executes them as child processes, ``parallel`` at a time, resuming what a killed run left.

One run at a time holds an output folder (a lock file in it); SIGTERM and SIGINT end the
running child processes before the runner stops (a stage's in-process Python step, such as
building a dataset or the report, finishes first), and on Linux a child is also ended when
the runner itself is killed (even by SIGKILL), so a rerun never races a stage left behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline_config import ConfigError

_SAME: Any = object()  # Stage.legacy_settings: as settings


@dataclass
class Stage:
    """One step of the pipeline: commands run in order, then an optional Python step."""

    name: str
    deps: list[str]
    commands: list[list[str]] = field(default_factory=list)
    python: Callable[[Callable[[list[str]], None]], None] | None = None  # gets run(command)
    outputs: list[Path] = field(default_factory=list)  # what --redo removes
    settings: Any = None  # anything else the result depends on (in the fingerprint)
    free_flags: tuple[str, ...] = ()  # flags whose values do not change the result (not in it)
    # its commands continue from what a killed attempt left (trainings, sampling): it may
    # then rerun only with the settings it started with
    resumable: bool = False
    legacy_settings: Any = _SAME  # ``settings`` as markers of the earlier format hashed them


def cli(package: str, *args: Any) -> list[str]:
    """The command line of a package CLI run by this interpreter."""
    return [sys.executable, "-m", f"{package}.cli", "--quiet", *[str(a) for a in args]]


# Run before the command itself (``exec`` keeps the setting): the kernel sends the command
# SIGTERM when the thread that started it (the runner's, which waits for it) dies, even by
# SIGKILL (Linux's PR_SET_PDEATHSIG); a runner that died before the call is noticed through
# the parent pid. Done in a fresh interpreter instead of a ``preexec_fn``, which CPython
# documents as unsafe in a process with threads (the runner starts commands from several).
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(143)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _dying_with_runner(command: list[str]) -> list[str]:
    """``command`` wrapped so that it ends when the runner does (Linux; as is elsewhere)."""
    if not sys.platform.startswith("linux"):
        return command
    program = command[0] if os.sep in command[0] else shutil.which(command[0])
    if program is None:
        raise RuntimeError(f"`{command[0]}` is not a program on PATH")
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), program, *command[1:]]


def _hold_lock(out: Path) -> Any:
    """Take ``OUT/.pipeline.lock`` for this process (released when it ends, however it
    ends); a second run on the same folder is refused, naming the holder."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".pipeline.lock", "a+")  # noqa: SIM115 - held open for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "pid unknown"
        handle.close()
        raise ConfigError(
            f"'{out}' is in use by another pipeline run ({holder}); wait for it to end or give another --out"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


class Runner:
    """Runs stage commands as child processes with a given thread count, logging to a file;
    ``stop()`` ends every child (a failed stage or a signal)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.children: set[subprocess.Popen] = set()
        self.lock = threading.RLock()  # a signal's stop() may land inside stop() on the same thread
        self.stopping = False

    def run(self, stage: str, command: list[str], threads: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        env["PYTHONUNBUFFERED"] = "1"
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{stage}.log"
        with open(log_path, "a") as log:
            log.write(f"\n$ {' '.join(command)}   # {threads} thread(s), {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            log.flush()
            with self.lock:
                if self.stopping:
                    raise RuntimeError(f"stage {stage}: stopped")
                child = subprocess.Popen(_dying_with_runner(command), stdout=log, stderr=subprocess.STDOUT, env=env)
                self.children.add(child)
            code = child.wait()
            with self.lock:
                self.children.discard(child)
        if code != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(
                f"stage {stage}: `{_short(command)} ...` exited with status {code}; "
                f"see {log_path}:\n    " + "\n    ".join(tail)
            )

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            children = list(self.children)
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()


def _short(command: list[str]) -> str:
    """The words that say which tool a command runs (no interpreter, launcher or --quiet)."""
    words = command[1:] if command[0] == sys.executable else command
    words = [w for w in words if w not in ("-m", "--quiet") and not w.startswith("--nproc_per_node")]
    if words and words[0] == "torch.distributed.run":
        words = words[1:]
    if words and words[0].endswith(".py"):
        words[0] = Path(words[0]).name
    return " ".join(words[:2])


def _step_name(stage: Stage) -> str | None:
    step = getattr(stage.python, "func", stage.python)  # a functools.partial's function
    return step.__name__ if step else None


def stage_inputs(stage: Stage, out: Path) -> dict[str, Any]:
    """What a stage's result depends on besides the stages before it, as its fingerprint
    hashes it: the interpreter as ``python`` and the output folder (``out``, resolved, as
    the stages' commands name it) as ``{out}`` (another spelling of the same folder, or the
    folder moved, is the same stage), without the stage's ``free_flags`` and their values."""
    top = str(out)

    def word(w: str) -> str:
        if w == sys.executable:
            return "python"
        if w == top or w.startswith(top + os.sep):
            return "{out}" + w[len(top) :]
        return w

    commands = []
    for command in stage.commands:
        kept, skip = [], False
        for w in command:
            if skip or w in stage.free_flags:
                skip = not skip
                continue
            kept.append(word(w))
        commands.append(kept)
    settings = json.loads(json.dumps(stage.settings, default=str))
    return {"commands": commands, "python": _step_name(stage), "settings": settings}


def fingerprints(stages: list[Stage], out: Path) -> dict[str, str]:
    """A hash per stage of its :func:`stage_inputs` and the hashes of what it depends on."""
    by_name = {s.name: s for s in stages}
    prints: dict[str, str] = {}

    def of(name: str) -> str:
        if name not in prints:
            s = by_name[name]
            text = json.dumps(stage_inputs(s, out), sort_keys=True) + "".join(of(d) for d in s.deps)
            prints[name] = hashlib.sha256(text.encode()).hexdigest()[:16]
        return prints[name]

    for s in stages:
        of(s.name)
    return prints


def _legacy_fingerprints(stages: list[Stage], out: Path, spelled: str) -> dict[str, str]:
    """The fingerprints markers recorded before they held their inputs: of the commands as
    they were spelled then (the output folder as given, ``spelled``, where the commands now
    name it resolved, ``out``) and of the settings then: such a marker is still honoured
    when its stage is unchanged."""
    top = str(out)

    def word(w: str) -> str:
        if w == sys.executable:  # even when it lies in the output folder
            return w
        if w == top:
            return spelled
        if w.startswith(top + os.sep):
            return w[len(top) + 1 :] if spelled == "." else spelled + w[len(top) :]
        return w

    by_name = {s.name: s for s in stages}
    prints: dict[str, str] = {}

    def of(name: str) -> str:
        if name not in prints:
            s = by_name[name]
            commands = [[word(w) for w in c] for c in s.commands]
            settings = s.settings if s.legacy_settings is _SAME else s.legacy_settings
            text = json.dumps([commands, _step_name(s), settings], default=str) + "".join(of(d) for d in s.deps)
            prints[name] = hashlib.sha256(text.encode()).hexdigest()[:16]
        return prints[name]

    for s in stages:
        of(s.name)
    return prints


def _word_changes(old: list[str], new: list[str]) -> list[str]:
    """``flag old -> flag new`` for the words that differ between two command lines."""
    import difflib

    changes = []
    for op, a0, a1, b0, b1 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        flag = old[a0 - 1] if a0 > 0 else ""
        is_flag = flag.startswith("-") and not flag.lstrip("-").replace(".", "", 1).isdigit()
        context = flag + " " if is_flag else ""
        before, after = " ".join(old[a0:a1]) or "(nothing)", " ".join(new[b0:b1]) or "(nothing)"
        changes.append(f"`{context}{before}` -> `{context}{after}`")
    return changes


def _what_changed(recorded: dict[str, Any], inputs: dict[str, Any], deps: dict[str, str]) -> str:
    """What differs between a marker's record and the stage as configured now."""
    if "inputs" not in recorded:
        return "recorded by an earlier version of the pipeline, which kept no details"
    parts = []
    changed = [d for d, fp in deps.items() if recorded.get("deps", {}).get(d) != fp]
    if changed:
        parts.append(f"the stage(s) it depends on changed: {', '.join(changed)}")
    old = recorded["inputs"]
    if old.get("settings") != inputs["settings"]:
        parts.append(f"settings {json.dumps(old.get('settings'))[:300]} -> {json.dumps(inputs['settings'])[:300]}")
    if old.get("python") != inputs["python"]:
        parts.append(f"Python step {old.get('python')} -> {inputs['python']}")
    old_commands = old.get("commands", [])
    for i in range(max(len(old_commands), len(inputs["commands"]))):
        a = old_commands[i] if i < len(old_commands) else []
        b = inputs["commands"][i] if i < len(inputs["commands"]) else []
        if a != b:
            parts.append(f"command {i + 1}: " + ", ".join(_word_changes(a, b)[:4]))
    return "; ".join(parts) or "its fingerprint differs"


def _marker(out: Path, name: str) -> Path:
    return out / "stages" / f"{name}.json"


def _started_marker(out: Path, name: str) -> Path:
    """Written when a stage starts, removed when it is done: a stage killed midway is
    resumed only with the settings it started with."""
    return out / "stages" / f"{name}.started.json"


_REDO_PENDING = ".redo.json"  # stages/: the stages whose outputs a --redo is still removing


def _clear_stages(out: Path, stages: list[Stage], names: set[str]) -> None:
    """Remove the markers, then the outputs, of ``names`` and of a --redo that was
    interrupted before it finished (recorded first, so a kill never leaves a stage's
    marker without its outputs, nor outputs that a rerun would resume from)."""
    pending = out / "stages" / _REDO_PENDING
    if pending.is_file():
        names = names | set(json.loads(pending.read_text()))
    if not names:
        return
    _write_json(pending, sorted(names))
    for name in names:
        _marker(out, name).unlink(missing_ok=True)
        _started_marker(out, name).unlink(missing_ok=True)
    for stage in stages:
        if stage.name in names:
            for path in stage.outputs:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    pending.unlink()


def _pending_redo(out: Path) -> set[str]:
    pending = out / "stages" / _REDO_PENDING
    return set(json.loads(pending.read_text())) if pending.is_file() else set()


def _check_out_folder(out: Path) -> None:
    """The output folder is new, empty or a pipeline's: the stages replace folders in it."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file; expected a folder for the pipeline's outputs")
    if out.is_dir() and not ((out / ".pipeline.lock").exists() or (out / "stages").is_dir()):
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            raise ConfigError(
                f"--out '{out}' holds {len(entries)} other file(s) or folder(s) (e.g. {entries[:3]}) and no pipeline "
                "run; the stages replace folders in it (data/, engines/, ...): give a new or empty folder"
            )


def _downstream(stages: list[Stage], names: set[str]) -> set[str]:
    result = set(names)
    changed = True
    while changed:
        changed = False
        for s in stages:
            if s.name not in result and result.intersection(s.deps):
                result.add(s.name)
                changed = True
    return result


def _upstream(stages: list[Stage], name: str) -> set[str]:
    by_name = {s.name: s for s in stages}
    result, todo = set(), [name]
    while todo:
        n = todo.pop()
        if n not in result:
            result.add(n)
            todo.extend(by_name[n].deps)
    return result


def run_pipeline(
    config: dict[str, Any],
    stages: list[Stage],
    *,
    until: str | None = None,
    redo: list[str] = (),
    dry_run: bool = False,
    progress: bool = True,
) -> int:
    """Run the stages that are not done yet, ``parallel`` at a time; returns an exit status."""
    out = Path(config["out"])
    resolved = out.resolve()  # how the stages' commands name it
    names = [s.name for s in stages]
    for name in [*redo, *([until] if until else [])]:
        if name not in names:
            raise ConfigError(f"unknown stage {name!r}; the stages are {names}")
    _check_out_folder(out)
    prints = fingerprints(stages, resolved)
    wanted = _upstream(stages, until) if until else set(names)
    # every stage after a redone one is stale, whether this run is asked for it or not
    redone = _downstream(stages, set(redo))
    lock = None if dry_run else _hold_lock(out)
    try:
        redone |= _pending_redo(out)
        return _run_stages(config, stages, out, wanted, redone, prints, dry_run, progress)
    finally:
        if lock is not None:
            lock.close()


def _run_stages(
    config: dict[str, Any],
    stages: list[Stage],
    out: Path,
    wanted: set[str],
    redone: set[str],
    prints: dict[str, str],
    dry_run: bool,
    progress: bool,
) -> int:
    if not dry_run:
        _clear_stages(out, stages, redone)
    legacy = _legacy_fingerprints(stages, out.resolve(), str(out))
    done: set[str] = set()
    for s in stages:
        if s.name not in wanted or s.name in redone:  # a dry run shows --redo as to run
            continue
        marker, started = _marker(out, s.name), _started_marker(out, s.name)
        record_path = marker if marker.is_file() else started if s.resumable and started.is_file() else None
        if record_path is None:
            continue
        recorded = json.loads(record_path.read_text())
        matches = recorded.get("fingerprint") == prints[s.name]
        if not matches and "inputs" not in recorded:  # a marker of the earlier format
            matches = recorded.get("fingerprint") == legacy[s.name]
        if not matches:
            deps = {d: prints[d] for d in s.deps}
            how = "ran" if record_path == marker else "failed or was interrupted while running"
            raise ConfigError(
                f"stage {s.name} in '{out}' {how} with other settings or inputs "
                f"({_what_changed(recorded, stage_inputs(s, out.resolve()), deps)}); restore them, rerun it with "
                f"`--redo {s.name}` (which removes its outputs and redoes the stages after it) or give another --out"
            )
        if record_path == marker:
            done.add(s.name)
    todo = [s for s in stages if s.name in wanted and s.name not in done]
    if dry_run:
        for s in stages:
            state = "done" if s.name in done else ("to run" if s.name in wanted else "not asked")
            print(f"{s.name}  [{state}]  after: {', '.join(s.deps) or '-'}")
            for c in s.commands:
                print("    " + " ".join(c))
            if s.python:
                print(f"    (python: {getattr(s.python, 'func', s.python).__name__})")
        return 0
    from nudiff_postproc import usable_cores

    cores = config["threads"] or usable_cores()
    runner = Runner(out / "logs")
    _say(f"{config['name']}: {len(todo)} stage(s) to run, {len(done)} done, in '{out}' ({cores} cores)")

    def execute(stage: Stage, threads: int) -> float:
        t0, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S")
        identity = {
            "fingerprint": prints[stage.name],
            "inputs": stage_inputs(stage, out.resolve()),
            "deps": {d: prints[d] for d in stage.deps},
        }
        if stage.resumable:
            _write_json(_started_marker(out, stage.name), {**identity, "started": started})
        for command in stage.commands:
            runner.run(stage.name, command, threads)
        if stage.python:
            try:
                stage.python(lambda command: runner.run(stage.name, command, threads))
            except Exception as exc:
                log = out / "logs" / f"{stage.name}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "a") as fh:
                    fh.write(traceback.format_exc())
                if str(exc).startswith(f"stage {stage.name}: "):  # a command of the step: already told
                    raise
                raise RuntimeError(f"stage {stage.name}: {exc} (traceback in {log})") from exc
        seconds = time.perf_counter() - t0
        record = {**identity, "seconds": round(seconds, 1), "threads": threads}
        record["started"], record["finished"] = started, time.strftime("%Y-%m-%d %H:%M:%S")
        record["commands"] = [" ".join(c) for c in stage.commands]
        _write_json(_marker(out, stage.name), record)
        _started_marker(out, stage.name).unlink(missing_ok=True)
        return seconds

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(signum: int, frame: Any) -> None:
        runner.stop()  # before the pool's exit waits for the stages' threads
        raise KeyboardInterrupt

    for sig in previous:
        signal.signal(sig, on_signal)
    bar = _bar(len(todo), progress)
    failed: BaseException | None = None
    try:
        with ThreadPoolExecutor(max_workers=config["parallel"]) as pool:
            running: dict[Future, Stage] = {}
            while todo or running:
                ready = [s for s in todo if all(d in done for d in s.deps)]
                slots = config["parallel"] - len(running)
                launch = ready[:slots] if failed is None else []
                share = len(running) + len(launch)
                for s in launch:
                    threads = max(1, cores // max(1, share))
                    _say(f"start {s.name} ({threads} thread(s); log: {out / 'logs' / (s.name + '.log')})", bar)
                    running[pool.submit(execute, s, threads)] = s
                    todo.remove(s)
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    s = running.pop(future)
                    try:
                        seconds = future.result()
                    except BaseException as exc:  # noqa: BLE001 - reported below, the others stopped
                        if failed is None:
                            failed = exc
                            runner.stop()
                        continue
                    done.add(s.name)
                    _say(f"done  {s.name} in {seconds:.0f} s", bar)
                    if bar is not None:
                        bar.update(1)
    except KeyboardInterrupt:
        runner.stop()
        _say("interrupted: rerun the same command to resume")
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if bar is not None:
            bar.close()
    if failed is not None:
        print(f"pipeline: error: {failed}", file=sys.stderr)
        return 1
    _say(f"finished: {len(done)} stage(s) done in '{out}'")
    return 0


def _bar(total: int, progress: bool) -> Any:
    if not progress or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="stage", desc="pipeline", file=sys.stderr)


def _say(text: str, bar: Any = None) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {text}"
    if bar is not None:
        bar.write(line, file=sys.stdout)
    else:
        print(line, flush=True)


def _write_json(path: Path, data: Any) -> None:
    from nudiff_postproc._io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
