"""Crash-safe, verified, code-free checkpoints.

A checkpoint is one file ``ckpt-{step:08d}.pt`` in the run directory plus a ``ckpt.pt`` copy of the
newest one (what ``--resume`` and ``scadfast.sample --ckpt`` read). Every write goes to a temporary
file ``.NAME.tmp-PID`` in the same directory, is flushed and fsync'd, then atomically renamed over the
target, and the directory is fsync'd: a crash or kill at any moment leaves either the old or the new
file, never a torn one (a killed save can leave its temporary file behind; :func:`remove_stale_temp`
clears those at the next start). If the disk is full the temporary file is removed and the previous
checkpoint stays. Only the newest ``keep`` numbered checkpoints are kept.

File format (version 2)::

    SCADFAST-CKPT\n
    {"format": 2, "sha256": "<hex digest of the payload>", "bytes": <payload length>}\n
    <payload: a torch.save zip of the state dict>

:func:`load` verifies length and SHA-256 before it unpickles anything (a truncated or bit-flipped file
is refused, naming the file), and unpickles with ``torch.load(weights_only=True)``: a checkpoint may
only hold tensors, numbers, strings, ``None`` and lists/tuples/dicts of them, so a crafted file cannot
run code. Version-1 files (a bare ``torch.save`` zip, no checksum) still load, with the same
restricted unpickler. :func:`newest_intact` finds the newest numbered checkpoint that verifies, which
``--resume`` falls back to when ``ckpt.pt`` is damaged.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import io
import json
import os
import pickle
import re

import torch

FORMAT_VERSION = 2
LATEST = "ckpt.pt"
MAGIC = b"SCADFAST-CKPT\n"
_MAX_HEADER = 4096
_NUMBERED = re.compile(r"ckpt-(\d{8})\.pt$")
_TEMP = re.compile(r"^\..+\.tmp-(\d+)$")


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


def encode(state: dict) -> bytes:
    """The bytes of a version-2 checkpoint file holding ``state`` (magic, checksum header, payload)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    header = json.dumps({"format": FORMAT_VERSION, "sha256": hashlib.sha256(payload).hexdigest(),
                         "bytes": len(payload)}, sort_keys=True).encode()
    return MAGIC + header + b"\n" + payload


def save(run_dir: str, state: dict, step: int, keep: int = 3) -> str:
    """Save ``state`` as the checkpoint of ``step``; returns the numbered path."""
    os.makedirs(run_dir, exist_ok=True)
    state = dict(state, format_version=FORMAT_VERSION, step=step)
    data = encode(state)
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


def _payload(path: str, data: bytes) -> bytes:
    """The verified ``torch.save`` payload of checkpoint bytes ``data`` (version 2 or 1)."""
    if data.startswith(MAGIC):
        end = data.find(b"\n", len(MAGIC), len(MAGIC) + _MAX_HEADER)
        try:
            header = json.loads(data[len(MAGIC):end]) if end > 0 else None
            digest, size = header["sha256"], int(header["bytes"])
        except (ValueError, TypeError, KeyError):
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt: its header is unreadable") from None
        payload = data[end + 1:]
        if len(payload) != size:
            raise CheckpointError(
                f"checkpoint {path} is truncated or corrupt: {len(payload)} payload bytes, the header "
                f"says {size}")
        if hashlib.sha256(payload).hexdigest() != digest:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: SHA-256 checksum mismatch (the file was damaged after "
                f"it was written)")
        return payload
    if data.startswith(b"PK\x03\x04"):  # version 1: a bare torch.save zip without a checksum
        return data
    raise CheckpointError(f"{path} is not a scadfast checkpoint (unknown file signature)")


def _legacy_numpy_globals() -> list:
    """What version-1 checkpoints pickled for numpy's RNG state (a uint32 array): data, not code."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    out = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out.append(dtypes.UInt32DType)
    return out


def load(path: str, map_location="cpu") -> dict:
    """Load a checkpoint file, with errors that say which file and what is wrong with it.

    The checksum is verified before anything is unpickled, and unpickling is restricted to data
    (``weights_only=True``): a file holding any other Python object is refused without running it.
    """
    if os.path.isdir(path):
        path = os.path.join(path, LATEST)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror or e})") from e
    payload = _payload(path, data)
    del data
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            first = str(e).split("\n")
            what = next((ln.strip() for ln in first if "global" in ln.lower()), first[0].strip())
            raise CheckpointError(
                f"{path} is refused: it contains Python objects other than tensors, numbers, strings "
                f"and containers, which a scadfast checkpoint never holds; nothing in it was run "
                f"({what[:200]})") from None
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt and cannot be read ({type(e).__name__}: {e})"
        ) from None
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt and cannot be read ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not a scadfast checkpoint")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {state['format_version']}, newer than this scadfast "
            f"({FORMAT_VERSION}); upgrade scadfast"
        )
    return state


def newest_intact(run_dir: str, map_location="cpu", exclude: tuple = ()) -> tuple[str, dict] | tuple[None, None]:
    """The newest numbered checkpoint of ``run_dir`` that loads and verifies, with its state."""
    for p in reversed(list_numbered(run_dir)):
        if os.path.abspath(p) in {os.path.abspath(x) for x in exclude}:
            continue
        try:
            return p, load(p, map_location=map_location)
        except CheckpointError:
            continue
    return None, None


def remove_stale_temp(*dirs: str) -> list[str]:
    """Remove ``.NAME.tmp-PID`` files that a killed save left in ``dirs``; returns the removed paths.

    Call it only while holding the run directory's lock (no other writer can be mid-save).
    """
    removed = []
    for d in dirs:
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for name in names:
            if _TEMP.match(name):
                p = os.path.join(d, name)
                try:
                    os.remove(p)
                    removed.append(p)
                except OSError:
                    pass
    return removed


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

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # Plain tensors and numbers only (checkpoints are loaded with weights_only=True).
    s = {"torch": torch.get_rng_state(), "python": random.getstate(),
         "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    n = s["numpy"]
    if isinstance(n, dict):
        n = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    np.random.set_state(n)
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
