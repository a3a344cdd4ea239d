"""Helpers shared by the Triton launchers of ``scadfast.kernels``.

The launchers take tensors that the op layer (``scadfast.ops``) has validated; these helpers give
them the same device handling and the same accumulation dtype as the op layer.
"""

from __future__ import annotations

import contextlib

import torch
import triton.language as tl

from scadfast.ops._impl import acc_dtype

__all__ = ["acc_dtype", "device_ctx", "tl_dtype"]

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


def device_ctx(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device), a no-op off CUDA."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a torch float dtype (the ``ACC`` constexpr of the kernels)."""
    return _TL_DTYPES[dtype]
