"""Advisory locks on a batch output folder: one run owns it, and a second run is refused with the owner's name.

Lock files live in DIR/.locks/ and hold a JSON record of their owner (pid, host, start time, worker, command):

    worker-I.lock   held (flock, exclusive) by worker I for its whole run, so two processes never do the same share
                    of the work; a worker also refuses to start while a worker of a run with another worker count
                    holds its own lock (those two runs would split the chunks differently)
    setup.lock      held briefly around every read-compare-write of DIR/run.json, the first commit and the manifest
                    merge, so two runs started at the same moment cannot both pass the settings check

The kernel drops a flock when its process dies (kill -9 included), so a stale lock file never blocks a later run; the
file itself is left in place (removing it would race with a process that has just opened it). Locks are advisory:
programs that do not take them (a `cp` into the folder) are not held off.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOCKS = ".locks"


class FolderBusy(ValueError):
    """Another process holds the lock; the message names it."""


def owner_record(worker: str) -> dict[str, Any]:
    """Who holds a lock: written into the lock file so a refused run can name its owner."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "worker": worker,
        "command": " ".join(sys.argv)[:300],
    }


def describe(record: dict[str, Any]) -> str:
    if not record:
        return "another process (its lock file names no owner yet)"
    return (
        f"pid {record.get('pid')} on host {record.get('host')} (worker {record.get('worker')}, started "
        f"{record.get('started')}: {record.get('command')})"
    )


def read_owner(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


class FileLock:
    """An exclusive flock on `path`, held until `release` (or the process ends), with the owner's record inside."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self, owner: dict[str, Any], blocking: bool = False) -> bool:
        """True once held; False (non-blocking) when another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def is_held(path: Path) -> bool:
    """Whether some process holds the lock at `path` (probed without keeping it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a probe that succeeded
    return False


class RunLock:
    """The worker lock of one process of a run (see the module doc); `release` or the process's end frees it."""

    def __init__(self, root: Path, index: int, count: int, name: str):
        self.root, self.index, self.count = root, index, count
        self.owner = owner_record(name) | {"count": count}
        self.worker = FileLock(root / LOCKS / f"worker-{index}.lock")

    def acquire(self) -> None:
        if not self.worker.acquire(self.owner):
            raise FolderBusy(
                f"{self.root} is in use by {describe(read_owner(self.worker.path))}: two runs never write into one "
                f"folder at once; wait for it to finish (or stop it), or use another --output folder "
                f"(lock file {self.worker.path})"
            )
        for path in sorted((self.root / LOCKS).glob("worker-*.lock")):
            if path == self.worker.path:
                continue
            record = read_owner(path)
            if record.get("count", self.count) != self.count and is_held(path):
                self.release()
                raise FolderBusy(
                    f"{self.root} is in use by {describe(record)}, a run with {record.get('count')} worker(s) "
                    f"(this one has {self.count}); wait for it to finish, or use another --output folder "
                    f"(lock file {path})"
                )

    def release(self) -> None:
        self.worker.release()


@contextlib.contextmanager
def setup_lock(root: Path, worker: str = "") -> Iterator[None]:
    """The short exclusive section around run.json and the manifest (waits for the other holder: it is brief)."""
    lock = FileLock(root / LOCKS / "setup.lock")
    lock.acquire(owner_record(worker), blocking=True)
    try:
        yield
    finally:
        lock.release()
