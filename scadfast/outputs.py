"""Check that an output path can be written *before* the expensive work that produces it."""

from __future__ import annotations

import os
import tempfile


def unwritable_reason(path: str, directory: bool = False) -> str | None:
    """Why ``path`` (a file, or with ``directory=True`` a directory to write into) cannot be
    written, or ``None`` if it can. Missing parent directories are fine when they can be created.
    The check creates and removes a temporary file, so it also catches read-only file systems."""
    p = os.path.abspath(path)
    if directory:
        if os.path.exists(p) and not os.path.isdir(p):
            return "it is a file, not a directory"
        target = p
    else:
        if os.path.isdir(p):
            return "it is a directory"
        target = os.path.dirname(p)
    d = target
    while not os.path.exists(d):
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    if not os.path.isdir(d):
        return f"{d} is a file, not a directory"
    try:
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".scadfast-write-check-")
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        return f"{d} is not writable ({e.strerror or e})"
    return None
