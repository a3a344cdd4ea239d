"""Crash-safe checkpoints.

A checkpoint is one ``torch.save`` file ``ckpt-{step:08d}.pt`` in the run directory plus a ``ckpt.pt``
copy of the newest one (what ``--resume`` and ``scadfast.sample --ckpt`` read). Every write goes to a
temporary file in the same directory, is flushed and fsync'd, then atomically renamed over the target,
and the directory is fsync'd: a crash or kill at any moment leaves either the old or the new file,
never a torn one. If the disk is full the temporary file is removed and the previous checkpoint stays.
Only the newest ``keep`` numbered checkpoints are kept.
"""

from __future__ import annotations

import errno
import glob
import io
import os
import re

import torch

FORMAT_VERSION = 1
LATEST = "ckpt.pt"
_NUMBERED = re.compile(r"ckpt-(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file and the problem."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (tmp file + flush + fsync + rename + dir fsync)."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise CheckpointError(
                f"no space left on device while writing {path}; the previous checkpoint is intact"
            ) from e
        raise
    _fsync_dir(d)


def save(run_dir: str, state: dict, step: int, keep: int = 3) -> str:
    """Save ``state`` as the checkpoint of ``step``; returns the numbered path."""
    os.makedirs(run_dir, exist_ok=True)
    state = dict(state, format_version=FORMAT_VERSION, step=step)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path = os.path.join(run_dir, f"ckpt-{step:08d}.pt")
    atomic_write_bytes(path, data)
    atomic_write_bytes(os.path.join(run_dir, LATEST), data)
    for old in list_numbered(run_dir)[:-keep] if keep > 0 else []:
        try:
            os.remove(old)
        except OSError:
            pass
    return path


def list_numbered(run_dir: str) -> list[str]:
    paths = [p for p in glob.glob(os.path.join(run_dir, "ckpt-*.pt")) if _NUMBERED.search(p)]
    return sorted(paths)


def load(path: str, map_location="cpu") -> dict:
    """Load a checkpoint file, with errors that say which file and what is wrong with it."""
    if os.path.isdir(path):
        path = os.path.join(path, LATEST)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt and cannot be read ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not a scadfast checkpoint")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {state['format_version']}, newer than this scadfast "
            f"({FORMAT_VERSION}); upgrade scadfast"
        )
    return state


def latest(run_dir: str) -> str | None:
    """The checkpoint ``--resume`` continues from, or None if the run has none."""
    p = os.path.join(run_dir, LATEST)
    if os.path.exists(p):
        return p
    numbered = list_numbered(run_dir)
    return numbered[-1] if numbered else None


def rng_state() -> dict:
    import random

    import numpy as np

    s = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
