"""Triton kernels for the spectral-norm power iteration (SPEC §7).

What is computed
----------------
For a weight matrix ``W`` (R × C) and unit vectors ``u`` (R,), ``v`` (C,), ``n_iter`` times::

    u ← W v  / max(‖W v‖,  eps)
    v ← Wᵀ u / max(‖Wᵀ u‖, eps)

in place on ``u`` and ``v`` — the order and the ``F.normalize`` eps rule of
``torch.nn.utils.parametrizations._SpectralNorm._power_method``.

Design
------
The power iteration is memory bound: every half-step reads all of ``W`` once (2·n_iter reads of
``W``) and does 2 flops per element; ``u``/``v`` are tiny. Eager PyTorch issues ~6 launches per
iteration and per weight (``mv``, ``norm``, ``clamp``, ``div``, for each of the two halves) and a
discriminator has tens of spectrally-normalised weights, so at GAN sizes the cost is launch latency,
not bandwidth.

* **One program per weight.** A single program walks ``W`` in ``BLOCK_R × BLOCK_C`` tiles: the
  ``W v`` pass loops over row blocks (inner loop over column tiles, a 2-D fp32 accumulator reduced
  once per row block), the ``Wᵀ u`` pass loops over column blocks (inner loop over row tiles). The raw
  products go to a small fp32 workspace (R + C floats), their squared norm is accumulated in fp32
  registers, and a short second sweep writes the normalised vector to ``u``/``v`` in the buffer's
  dtype. The next half-step reads the *stored* (rounded) vector, as torch does. All ``n_iter``
  iterations run inside the same program, so a weight costs exactly one launch, whatever
  ``n_iter`` is (the 15 initial iterations included). ``tl.debug_barrier()`` orders the global
  stores and loads between the phases (threads of the program read what other threads wrote).
* **Grouped launch.** ``power_iteration_grouped`` updates many weights with one launch: a table of
  int64 rows ``(W, u, v pointers, workspace offset, R, C, C2, strides)`` is read by program ``g``,
  one program per weight, so the weights of a model run in parallel on different SMs. Weights of
  one launch share a dtype (the launcher groups by dtype/device).
* **Strided weights without copies.** The column index may be split as ``c = c1·C2 + c2`` with
  independent strides, so the matrix ``weight.permute(dim, ...).flatten(1)`` of a contiguous
  ``ConvTranspose`` weight (``dim=1``) is read in place; any 2-D strided view works as is.
* **Accumulation** in fp32 for fp16/bf16/fp32 weights (fp64 is not handled here: the op layer
  routes fp64 to the PyTorch path).

Trade-off: one program per weight keeps the launch count minimal and needs no grid-wide
synchronisation (which the Triton interpreter could not emulate: it runs programs one after another),
but a single program only gets one SM's share of bandwidth. For the weights of a GAN discriminator
(≤ a few MB, resident in L2 after the first pass) launch latency dominates and this wins; for one
very large weight (tens of MB) a split-row kernel with a deterministic cross-program reduction
(last-arriving program finalises) would be faster. The grouped launch recovers parallelism across
the weights of a model.

Tile sizes are chosen by a heuristic from the matrix shape (no ``@triton.autotune``: the update is
one launch per step, and autotune does not run under the interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TL_TYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
SUPPORTED_DTYPES = tuple(_TL_TYPES)
_META_COLS = 10  # w_ptr, u_ptr, v_ptr, ws_off, R, C, C2, s_r, s_c1, s_c2


@triton.jit
def _power_iteration_body(
    w_ptr, u_ptr, v_ptr, tu_ptr, tv_ptr,
    R, C, C2, s_r, s_c1, s_c2, n_iter, eps,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rr = tl.arange(0, BLOCK_R)
    cc = tl.arange(0, BLOCK_C)
    for _it in range(n_iter):
        # ---- u ← normalize(W v) -------------------------------------------------------------
        ssq_u = tl.zeros([BLOCK_R], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rows = r0 + rr
            rmask = rows < R
            row_off = rows.to(tl.int64) * s_r
            acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + cc
                cmask = cols < C
                c1 = cols // C2
                col_off = c1.to(tl.int64) * s_c1 + (cols - c1 * C2).to(tl.int64) * s_c2
                w = tl.load(w_ptr + row_off[:, None] + col_off[None, :],
                            mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                vv = tl.load(v_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                acc += w * vv[None, :]
            t = tl.sum(acc, axis=1)
            tl.store(tu_ptr + rows, t, mask=rmask)
            ssq_u += t * t
        denom_u = tl.maximum(tl.sqrt(tl.sum(ssq_u, axis=0)), eps)
        tl.debug_barrier()
        for r0 in range(0, R, BLOCK_R):
            rows = r0 + rr
            rmask = rows < R
            t = tl.load(tu_ptr + rows, mask=rmask, other=0.0)
            tl.store(u_ptr + rows, (t / denom_u).to(u_ptr.dtype.element_ty), mask=rmask)
        tl.debug_barrier()
        # ---- v ← normalize(Wᵀ u) ------------------------------------------------------------
        ssq_v = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cc
            cmask = cols < C
            c1 = cols // C2
            col_off = c1.to(tl.int64) * s_c1 + (cols - c1 * C2).to(tl.int64) * s_c2
            acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                rows = r0 + rr
                rmask = rows < R
                w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * s_r + col_off[None, :],
                            mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                uu = tl.load(u_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
                acc += w * uu[:, None]
            t = tl.sum(acc, axis=0)
            tl.store(tv_ptr + cols, t, mask=cmask)
            ssq_v += t * t
        denom_v = tl.maximum(tl.sqrt(tl.sum(ssq_v, axis=0)), eps)
        tl.debug_barrier()
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cc
            cmask = cols < C
            t = tl.load(tv_ptr + cols, mask=cmask, other=0.0)
            tl.store(v_ptr + cols, (t / denom_v).to(v_ptr.dtype.element_ty), mask=cmask)
        tl.debug_barrier()


@triton.jit
def _power_iteration_kernel(
    w_ptr, u_ptr, v_ptr, ws_ptr,
    R, C, C2, s_r, s_c1, s_c2, n_iter, eps,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    _power_iteration_body(w_ptr, u_ptr, v_ptr, ws_ptr, ws_ptr + R,
                          R, C, C2, s_r, s_c1, s_c2, n_iter, eps, BLOCK_R, BLOCK_C)


@triton.jit
def _power_iteration_grouped_kernel(
    meta_ptr, w0_ptr, u0_ptr, ws_ptr, n_iter, eps,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, META_COLS: tl.constexpr,
):
    # w0_ptr / u0_ptr are the first weight / vector of the group: they only carry the pointer
    # element types (all entries of one launch share them).
    g = tl.program_id(0)
    row = meta_ptr + g * META_COLS
    w_ptr = tl.load(row + 0).to(w0_ptr.dtype, bitcast=True)
    u_ptr = tl.load(row + 1).to(u0_ptr.dtype, bitcast=True)
    v_ptr = tl.load(row + 2).to(u0_ptr.dtype, bitcast=True)
    ws_off = tl.load(row + 3)
    R = tl.load(row + 4)
    C = tl.load(row + 5)
    C2 = tl.load(row + 6)
    s_r = tl.load(row + 7)
    s_c1 = tl.load(row + 8)
    s_c2 = tl.load(row + 9)
    tu_ptr = ws_ptr + ws_off
    _power_iteration_body(w_ptr, u_ptr, v_ptr, tu_ptr, tu_ptr + R,
                          R, C, C2, s_r, s_c1, s_c2, n_iter, eps, BLOCK_R, BLOCK_C)


# ---------------------------------------------------------------------------------------------
# Launchers. Inputs are validated by scadfast.ops.spectral_norm; these only check what the kernel
# itself relies on.


def _blocks(R: int, C: int, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) for an R × C matrix."""
    if interpret:  # the interpreter pays per tile: use big tiles
        return min(64, triton.next_power_of_2(max(R, 1))), min(512, triton.next_power_of_2(max(C, 1))), 4
    block_c = min(256, max(16, triton.next_power_of_2(C)))
    block_r = min(32, max(16, triton.next_power_of_2(R)))
    num_warps = 8 if R * C >= (1 << 16) else 4
    return block_r, block_c, num_warps


def _interpret(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def power_iteration(w_view, u: torch.Tensor, v: torch.Tensor, n_iter: int, eps: float) -> None:
    """In-place power iteration on one weight, one launch.

    ``w_view`` is ``(w, R, C, C2, s_r, s_c1, s_c2)``: the storage tensor and the strided description
    of the matrix (element ``(r, c)`` at ``r·s_r + (c // C2)·s_c1 + (c % C2)·s_c2`` from ``w``'s
    data pointer). ``u`` (R,) and ``v`` (C,) are contiguous and of ``w``'s dtype.
    """
    w, R, C, C2, s_r, s_c1, s_c2 = w_view
    if n_iter <= 0:
        return
    ws = torch.empty(R + C, device=w.device, dtype=torch.float32)
    block_r, block_c, num_warps = _blocks(R, C, _interpret(w))
    _power_iteration_kernel[(1,)](
        w, u, v, ws, R, C, C2, s_r, s_c1, s_c2, n_iter, float(eps),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )


_META_CACHE: dict = {}
_META_CACHE_MAX = 64


def power_iteration_grouped(w_views, us, vs, n_iter: int, eps: float) -> None:
    """In-place power iteration on several weights of ONE dtype and device, one launch for all.

    ``w_views`` as in :func:`power_iteration`. The int64 table of pointers and shapes is cached by
    (pointers, shapes, strides), so steady-state training does not re-upload it.
    """
    if n_iter <= 0 or len(w_views) == 0:
        return
    w0 = w_views[0][0]
    rows, key, ws_total, max_r, max_c = [], [], 0, 1, 1
    for (w, R, C, C2, s_r, s_c1, s_c2), u, v in zip(w_views, us, vs):
        rows.append([w.data_ptr(), u.data_ptr(), v.data_ptr(), ws_total, R, C, C2, s_r, s_c1, s_c2])
        ws_total += R + C
        max_r, max_c = max(max_r, R), max(max_c, C)
    key = (w0.device, tuple(tuple(r) for r in rows))
    meta = _META_CACHE.get(key)
    if meta is None:
        meta = torch.tensor(rows, dtype=torch.int64).to(w0.device)
        if len(_META_CACHE) >= _META_CACHE_MAX:
            _META_CACHE.pop(next(iter(_META_CACHE)))
        _META_CACHE[key] = meta
    ws = torch.empty(ws_total, device=w0.device, dtype=torch.float32)
    block_r, block_c, num_warps = _blocks(max_r, max_c, _interpret(w0))
    _power_iteration_grouped_kernel[(len(rows),)](
        meta, w0, us[0], ws, n_iter, float(eps),
        BLOCK_R=block_r, BLOCK_C=block_c, META_COLS=_META_COLS, num_warps=num_warps,
    )
