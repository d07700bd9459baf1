"""One writer per run: an exclusive lock file, ``RUN/.winnow.lock``, held by a writing step.

A step takes the lock *before it reads its inputs* and holds it until its manifest entry is written,
so two ingests of different inputs into one run can no longer both exit 0 with one input silently gone.
The file (created with O_EXCL, so exactly one creator wins) holds JSON: ``pid``, ``host``, ``step``,
``since``, ``heartbeat`` and ``job``. A thread rewrites ``heartbeat`` every ``HEARTBEAT_S`` seconds.

A second writer exits 2 (``UserError``) naming the holder. A lock whose holder is gone is taken over
with a warning: on the same host when its pid no longer exists; on any host when its heartbeat is
older than ``STALE_S`` (a holder on another machine that stopped beating for 2 minutes is dead or
cut off; a live one beats every 10 s, so it is never mistaken for dead).

One lock per *job*: the ranks of one torchrun job share it. ``job_id()`` is the same string in every
rank (``TORCHELASTIC_RUN_ID``, else ``MASTER_ADDR:MASTER_PORT``); rank 0 (or a process outside
torchrun) takes the lock and the other ranks wait until the lock file names their job, refusing if
another job holds it. Only the lock owner removes it.

Taking the lock also tidies the run (``RunDir.tidy``): temporary files (``.NAME.tmp-PID``) that
writers killed mid-write left behind (only those whose pid is gone, so a live rank's file is never
touched), shard files without a commit record, and shards beyond their plan.

Any step can be wrapped (ingest, model and contrast passes, scoring stages, selection, and the
trainer once it lands): the CLI's ``_run_step`` and the recipe runner call :func:`run_lock` around
``step.run``; a step that runs outside them can use the same context manager.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from winnow.core.store import RunDir, UserError, atomic_write_json, pid_alive, warn

LOCK = ".winnow.lock"
HEARTBEAT_S = 10.0
STALE_S = 120.0
RANK_WAIT_S = 120.0  # how long a non-zero rank waits for rank 0 to take its job's lock


def job_id() -> str | None:
    """An id shared by every rank of one distributed job (None outside torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun:{run_id}"
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    return f"master:{addr}:{port}" if addr and port else None


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def read_lock(path: Path) -> dict[str, Any] | None:
    """The holder recorded in a lock file; {} when it exists but cannot be read (being written)."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe(holder: dict[str, Any]) -> str:
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, step {holder.get('step', '?')}, "
        f"since {when}"
    )


def holder_gone(holder: dict[str, Any], now: float | None = None) -> bool:
    now = time.time() if now is None else now
    beat = holder.get("heartbeat")
    if not isinstance(beat, (int, float)) or now - beat > STALE_S:
        return True
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid)


def _try_create(path: Path, info: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _take_over(path: Path, holder: dict[str, Any]) -> None:
    # Rename first: of two processes taking over at once, only one rename succeeds.
    grave = path.with_name(f"{LOCK}.dead-{os.getpid()}")
    try:
        os.replace(path, grave)
    except FileNotFoundError:
        return
    if read_lock(grave) != holder:  # someone else took over in between: put theirs back
        os.replace(grave, path)
        return
    warn(f"{path}: taking over the lock of a writer that is gone ({describe(holder)})")
    grave.unlink(missing_ok=True)


def acquire(run: RunDir, step: str) -> dict[str, Any]:
    """Take the run's lock for ``step`` (or, on a non-zero rank, check that our job holds it)."""
    path = run.root / LOCK
    now = time.time()
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "step": step,
        "since": now,
        "heartbeat": now,
        "job": job_id(),
    }
    if info["job"] is not None and _rank() != 0:
        return _join(path, info)
    for _ in range(50):
        if _try_create(path, info):
            run.tidy()
            return info
        holder = read_lock(path)
        if holder is None:
            continue
        if holder == {}:  # half-written by a creator that is writing right now, or garbage
            if time.time() - _mtime(path) > STALE_S:
                _take_over(path, holder)
            else:
                time.sleep(0.1)
            continue
        if holder_gone(holder):
            _take_over(path, holder)
            continue
        raise UserError(
            f"{run.root} is being written by another winnow process ({describe(holder)}); wait for it "
            f"to finish, or if it is gone, delete {path}"
        )
    raise UserError(f"could not take the lock {path}; delete it if no winnow process is writing this run")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def _join(path: Path, info: dict[str, Any]) -> dict[str, Any]:
    deadline = time.time() + RANK_WAIT_S
    while time.time() < deadline:
        holder = read_lock(path)
        if holder and holder.get("job") == info["job"]:
            return holder
        if holder and not holder_gone(holder):
            raise UserError(f"{path.parent} is being written by another job ({describe(holder)})")
        time.sleep(0.2)
    raise UserError(f"rank {_rank()}: rank 0 of job {info['job']} did not take the lock {path}")


def release(run: RunDir, info: dict[str, Any]) -> None:
    path = run.root / LOCK
    holder = read_lock(path)
    if holder and holder.get("pid") == info["pid"] and holder.get("host") == info["host"]:
        path.unlink(missing_ok=True)


class _Heartbeat(threading.Thread):
    def __init__(self, run: RunDir, info: dict[str, Any]):
        super().__init__(daemon=True, name="winnow-lock-heartbeat")
        self.path, self.info, self.stop = run.root / LOCK, info, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            holder = read_lock(self.path)
            if not holder or holder.get("pid") != self.info["pid"]:
                return  # taken over (we were presumed dead): never write over the new holder
            self.info["heartbeat"] = time.time()
            atomic_write_json(self.path, self.info)


@contextmanager
def run_lock(run: RunDir, step: str) -> Iterator[dict[str, Any]]:
    """Hold the run's writer lock for the duration of the block (see the module docstring)."""
    info = acquire(run, step)
    owner = job_id() is None or _rank() == 0  # other ranks only checked that their job holds it
    beat = _Heartbeat(run, info) if owner else None
    if beat:
        beat.start()
    try:
        yield info
    finally:
        if beat:
            beat.stop.set()
            beat.join(timeout=5)
            release(run, info)
