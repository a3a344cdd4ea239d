"""Shared plumbing of the fused ops: ``impl=`` resolution, the kernel modules, validation.

Every op module in :mod:`scadfast.ops` is wired the same way, and reads in the same order:

1. validation of the public arguments (one error line naming the op, the argument and the problem);
2. the reference ``<op>_ref``: plain PyTorch, autograd sees every operation;
3. the op's math in PyTorch (the ``"torch"`` backend, also used by the double-backward formulas);
4. the ``torch.library`` custom ops ``scadfast::<op>`` and ``scadfast::<op>_backward``, each with a
   fake implementation and registered autograd; the backward op's autograd is written in plain
   differentiable PyTorch, so the fused paths are differentiable twice (the MA-GP) and further;
   every custom op takes ``backend: str`` (the value :func:`resolve_impl` returned) and calls the
   launcher of that backend: ``scadfast.kernels.<module>`` for ``"triton"`` (:func:`kernels`), the
   extension ``scadfast._C`` for ``"cpu"``/``"cuda"`` (:func:`require_extension`), its own PyTorch
   math for ``"torch"``;
5. the public function: validate, ``path = resolve_impl(...)``, then the reference or the custom op
   (called through its Python object).

Eager calls go through the custom ops too. A bypass for plain eager calls (an
``autograd.Function`` around the same forward and backward) would save only the custom op's
host-side dispatch, some tens of microseconds per forward and backward, nothing under
``torch.compile``; and deciding when it is safe needs private torch APIs (dispatch and function
modes, fake tensors).

Every op takes ``impl``:

``"auto"``   the fused path for the tensors' device: Triton (or the CUDA extension) on a GPU; off the
             GPU the op's host path (see ``host`` in :func:`resolve_impl`).
``"ref"``    the pure-PyTorch reference; autograd sees every operation (this is the contract the
             fused paths are tested against).
``"triton"`` the Triton kernel. On CPU tensors this needs ``TRITON_INTERPRET=1`` (set before any
             kernel module is imported) and is meant for tests only: the interpreter is slow.
``"cuda"``   the C++/CUDA extension ``scadfast._C`` (only ops that have one).

An explicitly requested backend that cannot run raises; ``"auto"`` never raises for a missing
backend, it takes the reference instead (warning once).
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Iterable

import torch

IMPLS = ("auto", "ref", "triton", "cuda")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The paths resolve_impl returns (the ``backend`` argument of every custom op, except "ref"):
#   "ref"    the reference (no custom op);
#   "torch"  the custom op with its forward and backward written in PyTorch (runs on any device);
#   "cpu"    the custom op with the extension's C++ CPU kernel;
#   "triton" the custom op with the Triton kernels;
#   "cuda"   the custom op with the extension's CUDA kernel.
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.float64: "float64"}


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Accumulation dtype of inputs of ``dtypes``: fp64 if any is fp64, else fp32 (half types too).

    The one definition used by the ops, their Triton launchers and the models' losses.
    """
    return torch.float64 if torch.float64 in dtypes else torch.float32


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


def kernels(name: str):
    """The Triton launcher module ``scadfast.kernels.<name>``, imported on first use (it needs Triton)."""
    return importlib.import_module(f"scadfast.kernels.{name}")


def check_impl(impl: str, op: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if not isinstance(impl, str) or impl not in allowed:
        raise ValueError(f"{op}: impl={impl!r} is not one of {allowed}")


def _dtype_list(dtypes) -> str:
    names = [_DTYPE_NAMES.get(d, str(d)) for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def resolve_impl(impl: str, op: str, t: torch.Tensor, fused: Iterable[str] = ("triton",), *,
                 host: str = "torch", kernel_dtypes: Iterable[torch.dtype] | None = None,
                 arg: str = "the input") -> str:
    """Map the user's ``impl`` to the path that will run: ``"ref"`` or a custom-op backend.

    ``fused``: the GPU backends of the op (``"triton"``, ``"cuda"``), in order of preference.
    ``host``: the op's path under ``impl="auto"`` on CPU tensors: ``"torch"`` (its forward and
    backward in PyTorch) or ``"cpu"`` (the extension's C++ kernel; the reference, with one warning,
    when the extension is missing). ``kernel_dtypes``: the dtypes the Triton kernel takes; other
    dtypes run the ``"torch"`` path under ``"auto"`` and raise under ``impl="triton"``. ``arg``
    names ``t`` in error messages.
    """
    fused = tuple(fused)
    check_impl(impl, op, ("auto", "ref") + fused)
    if impl == "ref":
        return "ref"
    if impl == "auto":
        if t.device.type == "cuda":
            for backend in fused:
                if backend == "triton" and triton_importable():
                    if kernel_dtypes is not None and t.dtype not in tuple(kernel_dtypes):
                        return "torch"
                    return "triton"
                if backend == "cuda" and extension_available(cuda=True):
                    return "cuda"
            missing = ("Triton is not importable" if "triton" in fused else
                       f"the CUDA kernels of scadfast._C are not available "
                       f"({extension_error() or 'built without CUDA kernels'})")
            warn_once(f"{op}:no-gpu-backend",
                      f"{op}: {missing}; using the PyTorch reference on {t.device}. "
                      + ("Install triton." if "triton" in fused else
                         "Rebuild with a CUDA toolkit: `CUDA_HOME=... pip install --no-build-isolation -e .`"))
            return "ref"
        if t.device.type == "cpu":
            if host == "torch":
                return "torch"
            if extension_available():
                return "cpu"
            warn_once(f"{op}:no-extension",
                      f"{op}: the C++ extension scadfast._C is not available ({extension_error()}); "
                      "using the PyTorch reference. Rebuild with `pip install --no-build-isolation -e .`")
            return "ref"
        return "ref"
    if impl == "triton":
        if not triton_runs_on(t):
            where = "a CUDA tensor" if triton_importable() else "triton installed"
            raise RuntimeError(
                f"{op}: impl='triton' needs {where}; got a tensor on {t.device} "
                f"(for CPU tests set TRITON_INTERPRET=1 before importing scadfast)"
            )
        if kernel_dtypes is not None and t.dtype not in tuple(kernel_dtypes):
            raise TypeError(f"{op}: impl='triton' supports {_dtype_list(kernel_dtypes)} inputs, got {t.dtype}")
        return "triton"
    if impl == "cuda":
        if not extension_available(cuda=t.device.type == "cuda"):
            raise RuntimeError(
                f"{op}: impl='cuda' needs the compiled extension scadfast._C"
                + (" with CUDA kernels" if t.device.type == "cuda" else "")
                + f" ({extension_error() or 'not built'}); reinstall with `pip install -e .`"
            )
        if t.device.type != "cuda":
            raise RuntimeError(f"{op}: impl='cuda' needs CUDA tensors, got {arg} on {t.device}; use "
                               "impl='auto' for the CPU path")
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


def require_extension(op: str):
    """The compiled module ``scadfast._C`` (the launcher of the C++/CUDA kernels), or a RuntimeError."""
    ext = extension()
    if ext is None:
        raise RuntimeError(f"{op} needs the compiled extension scadfast._C ({extension_error()}); "
                           "reinstall with `pip install --no-build-isolation -e .`")
    return ext


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

