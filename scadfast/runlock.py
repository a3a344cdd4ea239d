"""An exclusive lock on a run directory, so two ``train`` processes never write into the same ``--out``.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on ``RUN/.lock``; the file holds the holder's pid. The kernel
drops the lock when the holder's file descriptor closes, so it dies with the process (a killed run
never leaves a lock behind: the file may stay, the lock does not). A second process fails at once
with :class:`RunDirLocked`, naming the holder's pid. Within one process the lock is re-entrant
(``Trainer.run`` after ``main`` took it).
"""

from __future__ import annotations

import errno
import fcntl
import os

LOCK_NAME = ".lock"
_held: dict[str, "RunLock"] = {}


class RunDirLocked(RuntimeError):
    """Another process holds the run directory."""


class RunLock:
    def __init__(self, key: str, fd: int, path: str):
        self.key, self.fd, self.path, self.count = key, fd, path, 1

    def release(self) -> None:
        self.count -= 1
        if self.count > 0 or self.fd < 0:
            return
        _held.pop(self.key, None)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def acquire(run_dir: str) -> RunLock:
    """Lock ``run_dir`` (which must exist) for this process; raises :class:`RunDirLocked` if taken."""
    key = os.path.realpath(run_dir)
    if key in _held:
        _held[key].count += 1
        return _held[key]
    path = os.path.join(run_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        try:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
        finally:
            os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunDirLocked(
                f"run directory {run_dir} is in use by another scadfast process (pid {holder}); "
                f"wait for it to finish or choose another --out") from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    lock = _held[key] = RunLock(key, fd, path)
    return lock
