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


@dataclass
class Stage:
    """One step of the pipeline: commands run in order, then an optional Python step."""

    name: str
    deps: list[str]
    commands: list[list[str]] = field(default_factory=list)
    python: Callable[[Callable[[list[str]], None]], None] | None = None  # gets run(command)
    outputs: list[Path] = field(default_factory=list)  # what --redo removes
    settings: Any = None  # anything else the result depends on (in the fingerprint)


def cli(package: str, *args: Any) -> list[str]:
    """The command line of a package CLI run by this interpreter."""
    return [sys.executable, "-m", f"{package}.cli", "--quiet", *[str(a) for a in args]]


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel send the child SIGTERM when the thread that
    started it (the runner's, which waits for it) dies: Linux's ``PR_SET_PDEATHSIG``."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_signal() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the runner died before the call: nobody would stop us
            os.kill(os.getpid(), signal.SIGTERM)

    return set_signal


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
        self.lock = threading.Lock()
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
                child = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_parent_death_signal()
                )
                self.children.add(child)
            code = child.wait()
            with self.lock:
                self.children.discard(child)
        if code != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(
                f"stage {stage}: `{' '.join(command[2:5])} ...` exited with status {code}; "
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


def fingerprints(stages: list[Stage]) -> dict[str, str]:
    """A hash per stage of its commands, settings and the hashes of what it depends on."""
    by_name = {s.name: s for s in stages}
    out: dict[str, str] = {}

    def of(name: str) -> str:
        if name not in out:
            s = by_name[name]
            step = getattr(s.python, "func", s.python)  # a functools.partial's function
            text = json.dumps([s.commands, step.__name__ if step else None, s.settings], default=str)
            text += "".join(of(d) for d in s.deps)
            out[name] = hashlib.sha256(text.encode()).hexdigest()[:16]
        return out[name]

    for s in stages:
        of(s.name)
    return out


def _marker(out: Path, name: str) -> Path:
    return out / "stages" / f"{name}.json"


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
    names = [s.name for s in stages]
    for name in [*redo, *([until] if until else [])]:
        if name not in names:
            raise ConfigError(f"unknown stage {name!r}; the stages are {names}")
    prints = fingerprints(stages)
    wanted = _upstream(stages, until) if until else set(names)
    redone = _downstream(stages, set(redo)) & wanted
    lock = None if dry_run else _hold_lock(out)
    try:
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
    for name in sorted(redone):
        for path in next(s for s in stages if s.name == name).outputs:
            if not dry_run:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        if not dry_run:
            _marker(out, name).unlink(missing_ok=True)
    done: set[str] = set()
    for s in stages:
        marker = _marker(out, s.name)
        if s.name in wanted and s.name not in redone and marker.is_file():  # a dry run shows --redo as to run
            recorded = json.loads(marker.read_text())
            if recorded.get("fingerprint") != prints[s.name]:
                raise ConfigError(
                    f"stage {s.name} in '{out}' ran with other settings or inputs; rerun it with `--redo {s.name}` "
                    "(which also redoes the stages after it) or give another --out"
                )
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
                raise RuntimeError(f"stage {stage.name}: {exc} (traceback in {log})") from exc
        seconds = time.perf_counter() - t0
        record = {"fingerprint": prints[stage.name], "seconds": round(seconds, 1), "threads": threads}
        record["started"], record["finished"] = started, time.strftime("%Y-%m-%d %H:%M:%S")
        record["commands"] = [" ".join(c) for c in stage.commands]
        _write_json(_marker(out, stage.name), record)
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
