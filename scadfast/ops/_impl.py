"""Shared plumbing for the fused ops: ``impl=`` resolution and input validation.

Every op in :mod:`scadfast.ops` takes ``impl``:

``"auto"``   the fused path for the tensors' device: Triton (or the CUDA extension) on a GPU,
             the best fused CPU path (hand-written forward/backward, or the C++ extension) on CPU.
``"ref"``    the pure-PyTorch reference; autograd sees every operation (this is the contract the
             fused paths are tested against).
``"triton"`` the Triton kernel. On CPU tensors this needs ``TRITON_INTERPRET=1`` (set before any
             kernel module is imported) and is meant for tests only: the interpreter is slow.
``"cuda"``   the C++/CUDA extension ``scadfast._C`` (only ops that have one).

An explicitly requested backend that cannot run raises; ``"auto"`` never raises for a missing
backend, it picks the next best path (warning once if the extension failed to build).
"""

from __future__ import annotations

import os
import warnings
from typing import Iterable

import torch

IMPLS = ("auto", "ref", "triton", "cuda")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def triton_interpret() -> bool:
    """True when the Triton interpreter is on (kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_OK: bool | None = None  # memo (a plain global, which torch.compile traces as a constant)


def triton_importable() -> bool:
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_OK = True
        except Exception:  # pragma: no cover - depends on the install
            _TRITON_OK = False
    return _TRITON_OK


def triton_runs_on(t: torch.Tensor) -> bool:
    """Can a Triton kernel run on this tensor's device here?"""
    if not triton_importable():
        return False
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and triton_interpret()


def check_impl(impl: str, op: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if not isinstance(impl, str) or impl not in allowed:
        raise ValueError(f"{op}: impl={impl!r} is not one of {allowed}")


def resolve_impl(impl: str, op: str, t: torch.Tensor, fused: Iterable[str] = ("triton",)) -> str:
    """Map the user's ``impl`` to the path that will run: ``ref``, ``triton``, ``cuda`` or ``cpu``.

    ``fused`` lists the fused backends this op has (in order of preference on GPU).
    ``cpu`` means the op's fused CPU path (the custom op with its hand-written backward).
    """
    fused = tuple(fused)
    check_impl(impl, op, ("auto", "ref") + fused)
    if impl == "ref":
        return "ref"
    if impl == "auto":
        if t.device.type == "cuda":
            for backend in fused:
                if backend == "triton" and triton_importable():
                    return "triton"
                if backend == "cuda" and extension_available(cuda=True):
                    return "cuda"
            return "ref"
        if t.device.type == "cpu":
            return "cpu"
        return "ref"
    if impl == "triton":
        if not triton_runs_on(t):
            where = "a CUDA tensor" if triton_importable() else "triton installed"
            raise RuntimeError(
                f"{op}: impl='triton' needs {where}; got a tensor on {t.device} "
                f"(for CPU tests set TRITON_INTERPRET=1 before importing scadfast)"
            )
        return "triton"
    if impl == "cuda":
        if not extension_available(cuda=t.device.type == "cuda"):
            raise RuntimeError(
                f"{op}: impl='cuda' needs the compiled extension scadfast._C"
                + (" with CUDA kernels" if t.device.type == "cuda" else "")
                + f" ({extension_error() or 'not built'}); reinstall with `pip install -e .`"
            )
        return "cuda"
    raise AssertionError(impl)  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# The C++/CUDA extension


_EXTENSION: tuple | None = None  # memo of (module or None, error or None); a plain global for torch.compile


def _load_extension():
    global _EXTENSION
    if _EXTENSION is None:
        try:
            from scadfast import _C  # type: ignore[attr-defined]

            _EXTENSION = (_C, None)
        except Exception as e:  # ImportError, or an ABI mismatch raising OSError/RuntimeError
            _EXTENSION = (None, f"{type(e).__name__}: {e}")
    return _EXTENSION


def extension():
    """The compiled module ``scadfast._C`` or None."""
    return _load_extension()[0]


def extension_error() -> str | None:
    return _load_extension()[1]


def extension_available(cuda: bool = False) -> bool:
    ext = extension()
    if ext is None:
        return False
    return bool(getattr(ext, "has_cuda", lambda: False)()) if cuda else True


_warned: set[str] = set()


def warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# Validation helpers: every message names the op, the argument and what was wrong.


def check_tensor(op: str, name: str, t, ndim: int | tuple[int, ...] | None = None, floating: bool = True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
        )
    if ndim is not None:
        ok = (t.ndim in ndim) if isinstance(ndim, tuple) else (t.ndim == ndim)
        if not ok:
            raise ValueError(f"{op}: {name} must have {ndim} dims, got shape {tuple(t.shape)}")
    return t


def check_same_device(op: str, **tensors) -> None:
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise ValueError(f"{op}: tensors are on different devices: {devs}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half types, the input dtype otherwise (fp64 stays fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
