"""Shared bits of the command-line entry points."""

from __future__ import annotations

import os
import sys


def prog(module: str) -> str:
    """The command name that ``--help`` and usage lines show: the name the user typed.

    ``module`` is the dotted module name (``"scadfast.train"``). Run as the installed console script
    ``scadfast-train`` (``sys.argv[0]`` ends in ``scadfast-train``, or ``scadfast-train.exe`` on
    Windows) this returns ``"scadfast-train"``; run any other way (``python -m scadfast.train``, or
    ``main()`` called from Python) it returns ``"python -m scadfast.train"``.
    """
    script = "scadfast-" + module.rsplit(".", 1)[-1].replace("_", "-")
    typed = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    stem, ext = os.path.splitext(typed)
    if ext.lower() == ".exe":
        typed = stem
    return script if typed == script else f"python -m {module}"
