"""Environment report for bug reports: ``python -m scadfast.env`` (or ``scadfast-env``).

Prints what decides which code path runs — scadfast and where it was imported from, Python, torch
and the CUDA it was built with, the GPUs torch sees, Triton, whether the extension ``scadfast._C``
loaded and with or without its CUDA kernels (and why not, when it did not), DALI, open_clip — one
``field: value`` line each. ``--json`` prints the same as one JSON object. Nothing here fails: a
missing or broken package is reported as such.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys

from .cli import prog

# Environment variables that change what runs; reported when set.
ENV_VARS = ("CUDA_VISIBLE_DEVICES", "CUDA_HOME", "TRITON_INTERPRET", "SCADFAST_CUDA", "SCADFAST_CACHE",
            "TORCH_CUDA_ARCH_LIST", "OMP_NUM_THREADS")


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip().splitlines()[0]


def _module_version(name: str) -> dict:
    """``{"version": ..., "path": ...}`` of an importable module, or ``{"error": ...}``."""
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # ImportError, or a broken install raising anything else
        return {"error": _error(e)}
    return {"version": str(getattr(mod, "__version__", "unknown")), "path": os.path.dirname(mod.__file__ or "")}


def _git_describe(path: str) -> str | None:
    """``git describe`` of the checkout holding ``path`` (an editable install), or None."""
    if not shutil.which("git"):
        return None
    try:
        r = subprocess.run(["git", "-C", path, "describe", "--always", "--dirty"], capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() or None


def _driver_version() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi``, or None when it is not there."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = r.stdout.strip().splitlines()
    return lines[0].strip() if r.returncode == 0 and lines else None


def _gpus(torch) -> list[dict]:
    """The GPUs torch sees; one ``{"error": ...}`` entry when querying them fails."""
    if not torch.cuda.is_available():
        return []
    try:
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    except Exception as e:  # a driver/runtime mismatch surfaces here
        return [{"error": _error(e)}]
    return [{"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1)}
            for p in props]


def _extension() -> dict:
    from .ops import _impl

    ext = _impl.extension()
    if ext is None:
        return {"loaded": False, "cuda": False, "error": _impl.extension_error()}
    return {"loaded": True, "cuda": _impl.extension_available(cuda=True), "path": getattr(ext, "__file__", None)}


def collect() -> dict:
    """Everything the report prints, as a JSON-serialisable dict."""
    import torch

    from . import __version__

    pkg_dir = os.path.dirname(os.path.abspath(__file__))
    info = {
        "scadfast": __version__,
        "scadfast_path": pkg_dir,
        "scadfast_git": _git_describe(pkg_dir),
        "python": f"{platform.python_version()} ({platform.python_implementation()}) {sys.executable}",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,  # the CUDA torch was built with; None for a CPU-only build
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "gpus": _gpus(torch),
        "nvidia_driver": _driver_version(),
        "triton": _module_version("triton"),
        "kernels": _module_version("scadfast.kernels"),
        "extension": _extension(),
        "dali": _module_version("nvidia.dali"),
        "open_clip": _module_version("open_clip"),
        "numpy": _module_version("numpy"),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }
    info["kernels"].pop("version", None)  # scadfast.kernels has no version of its own: where it is matters
    return info


def _module_line(m: dict) -> str:
    if "error" in m:
        return f"not available ({m['error']})"
    return " ".join(x for x in (m.get("version"), f"({m['path']})" if m.get("path") else None) if x)


def format_report(info: dict) -> str:
    """The text report: one ``field: value`` line per field, in a fixed order."""
    ext = info["extension"]
    if ext["loaded"]:
        ext_line = ("built with CUDA kernels" if ext["cuda"] else "built without CUDA (CPU kernels only)") + (
            f" ({ext['path']})" if ext.get("path") else "")
    else:
        ext_line = f"not loaded ({ext['error']})"
    gpus = info["gpus"]
    rows = [
        ("scadfast", f"{info['scadfast']} ({info['scadfast_path']})"
                     + (f" git {info['scadfast_git']}" if info["scadfast_git"] else "")),
        ("python", info["python"]),
        ("platform", info["platform"]),
        ("torch", info["torch"] + (f", built with CUDA {info['torch_cuda']}" if info["torch_cuda"]
                                   else ", CPU-only build")
         + (f", cuDNN {info['cudnn']}" if info["cudnn"] else "")),
        ("cuda available", "yes" if info["cuda_available"] else "no"),
        ("gpus", "; ".join(f"{i}: {g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)" if "name" in g
                           else f"cannot be queried ({g['error']})" for i, g in enumerate(gpus)) or "none"),
        ("nvidia driver", info["nvidia_driver"] or "not found (no nvidia-smi)"),
        ("triton", _module_line(info["triton"])),
        ("kernels", _module_line(info["kernels"])),
        ("extension", ext_line),
        ("dali", _module_line(info["dali"])),
        ("open_clip", _module_line(info["open_clip"])),
        ("numpy", _module_line(info["numpy"])),
        ("env", " ".join(f"{k}={v}" for k, v in info["env"].items()) or "none set"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=prog("scadfast.env"), description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    a = p.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if a.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
