"""Who may write a run's output directory: one run at a time (a lock file), never another run's
directory unless the user says so (`--overwrite` moves it aside, `--resume` continues it).

The lock is `OUT/.nf4-run.lock`, holding the writer's PID and host, and flock()ed while the run
writes: the kernel releases it when the process ends in any way, so a lock file left by a killed run
is stale and the next run takes it over with a note. Where the file system has no flock, a lock is
stale when its PID runs no process on this host.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".nf4-run.lock"


class RunDirError(ValueError):
    """The output directory is locked by another run, or holds a run we were not told to replace."""


def _holder(out: Path) -> dict:
    """The lock file's {"pid", "host"} ({} when absent or unreadable)."""
    try:
        info = json.loads((out / LOCK_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _describe(holder: dict) -> str:
    return f"PID {holder.get('pid')} on {holder.get('host')}" if holder else "another process"


def _locked_message(out: Path, holder: dict) -> str:
    return (
        f"{out}: another run is writing here ({_describe(holder)}); wait for it to finish, "
        "or choose another --out"
    )


def _try_lock(fd: int, out: Path) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # a file system without flock: the holder's PID decides
        return not _pid_runs(_holder(out))


def _pid_runs(holder: dict) -> bool:
    """Whether the holder may still run: True unless its PID runs no process on this host."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return bool(holder)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


def check_not_locked(out: Path) -> None:
    """RunDirError when a live run holds `out` (an early answer; the real guard is `run_lock`)."""
    try:
        fd = os.open(out / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return
    try:
        if not _try_lock(fd, out):
            raise RunDirError(_locked_message(out, _holder(out)))
    finally:
        os.close(fd)  # closing drops the probe's lock


def is_empty(out: Path) -> bool:
    return not out.exists() or (out.is_dir() and not any(out.iterdir()))


def check_out(out: Path, may_continue: bool, overwrite: bool) -> None:
    """RunDirError unless a run may write `out`: it is empty or absent, or it is the run being
    resumed (`may_continue`), or `overwrite` allows moving it aside. Writes nothing."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out}: the output path exists and is not a directory")
    check_not_locked(out)
    if is_empty(out) or may_continue or overwrite:
        return
    raise RunDirError(
        f"{out}: the output directory is not empty (an earlier run?); pass "
        "--overwrite to move it aside, --resume to continue it, or choose another "
        "--out"
    )


def move_aside(out: Path) -> Path:
    """Rename `out` to the first free sibling `<name>.old-<n>`; returns the new path."""
    n = 1
    while (aside := out.with_name(f"{out.name}.old-{n}")).exists():
        n += 1
    os.rename(out, aside)
    return aside


@contextmanager
def run_lock(out: Path, echo: Callable[[str], None]) -> Iterator[Path]:
    """Hold the lock of `out` (created if absent) for the body. The kernel drops the lock of a
    process that dies, so a lock file naming a dead process is stale: it is taken over, with a note.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd, out):
            os.close(fd)
            raise RunDirError(_locked_message(out, _holder(out)))
        try:  # the file we locked may have been removed by its releasing holder meanwhile
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = _holder(out)
    if stale:
        echo(
            f"note: {path} was left by {_describe(stale)}, which no longer holds it; taking it over"
        )
    os.ftruncate(fd, 0)
    body = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    os.write(fd, (json.dumps(body) + "\n").encode())
    try:
        yield out
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
