"""Triton kernels for the spectral-norm power iteration (docs/design.md §7).

What is computed
----------------
For a weight matrix ``W`` (R × C) and unit vectors ``u`` (R,), ``v`` (C,), ``n_iter`` times::

    u ← W v  / max(‖W v‖,  eps)
    v ← Wᵀ u / max(‖Wᵀ u‖, eps)

in place on ``u`` and ``v`` — the order and the ``F.normalize`` eps rule of
``torch.nn.utils.parametrizations._SpectralNorm._power_method``.

Design
------
The power iteration is memory bound (2 flops per element of ``W`` per half-step; ``u``/``v`` are
tiny). Eager PyTorch issues ~8 launches per iteration and per weight (``mv``, ``norm``, ``clamp``,
``div``, for each half) and a discriminator has tens of spectrally-normalised weights, so at GAN
sizes launch latency dominates; for big weights, bandwidth does.

One launch per iteration covers both half-steps, split over row blocks of ``W``:

* program ``p`` owns ``BLOCK_R`` rows. It computes ``t = W[rows, :] v`` (sweep over column tiles,
  2-D fp32 accumulator reduced once), stores the raw ``t`` to an fp32 workspace and adds ``‖t‖²``
  to a per-weight scalar; then it sweeps the *same* rows again (now L2-resident) and atomically adds
  ``W[rows, :]ᵀ t`` into a per-weight fp32 vector ``s``. By linearity
  ``s = Wᵀ (W v) = ‖W v‖ · Wᵀ u`` once every program is done — no grid-wide barrier needed.
* the last program to finish (an atomic ticket per weight) finalises: ``d_u = max(‖t‖, eps)``,
  ``u = t / d_u``, ``s' = s / d_u`` (= ``Wᵀ u``), ``v = s' / max(‖s'‖, eps)``, written in the
  buffers' dtype.
* **Grouped launch**: the programs of all weights of a model form one grid. A cached int32 table
  maps program → (weight, first row), an int64 table holds each weight's pointers, shape, strides
  and workspace offset; so ONE launch per iteration updates every SN weight of a discriminator.
  Weights of one launch share a dtype (the launcher groups by dtype and device).
* ``W`` is read through its two strides (any 2-D strided view, no copy); fp16/bf16/fp32 are
  accumulated in fp32 (fp64 is routed to the PyTorch path by ``scadfast.ops``). The workspace is
  one zero-filled fp32 buffer per call (a memset), holding ``t``, ``s``, ``‖t‖²`` and the ticket.

Trade-offs: ``W`` is read once from DRAM and once from L2 per iteration, with ``C·R/BLOCK_R``
fp32 atomic adds on ``s`` (so ``v`` is not bit-reproducible run to run: the order of the atomic adds
varies; differences are at the fp32 rounding level). The algebra differs from torch's in
rounding only: ``Wᵀu`` is formed as ``Wᵀ(Wv)/‖Wv‖`` in fp32, so ``u`` is not rounded to the
buffer dtype before it is used (slightly *more* accurate than torch's fp16/bf16 path). ``n_iter``
iterations are ``n_iter`` launches (the default ``n_iter = 1`` is one launch; the 15 initial
iterations happen once, at construction). A single-program-per-weight design (all iterations in
one program) was tried first and rejected: one SM cannot stream ``W`` at anything near the
device's bandwidth, so it was several times slower than eager for discriminator-sized weights.

Tile sizes: ``BLOCK_R = 16`` rows per program (enough programs to fill the GPU for R ≥ 2k, and the
atomics stay at 1/16 of the elements), ``BLOCK_C = 256``. No ``@triton.autotune``: it does not run
under the interpreter, and the kernel is one launch per step. Under the interpreter (CPU tests)
larger tiles are used, since it pays per tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import device_ctx

_META_COLS = 8  # w_ptr, u_ptr, v_ptr, ws_off, R, C, s_r, s_c


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _power_step(
    w_ptr, u_ptr, v_ptr, ws_ptr, tick_ptr,
    R, C, s_r, s_c, row0, n_blocks, eps,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One power iteration, the part of the row block starting at ``row0`` (see module docstring).

    Workspace (fp32, zero-filled): ``[0, R)`` raw t = W v, ``[R, R + C)`` s = Wᵀ t, ``R + C`` ‖t‖².
    ``tick_ptr``: int32 ticket counter of this weight (zero-filled).
    """
    rr = tl.arange(0, BLOCK_R)
    cc = tl.arange(0, BLOCK_C)
    rows = row0 + rr
    rmask = rows < R
    row_off = rows.to(tl.int64) * s_r
    # ---- t = W[rows, :] v ---------------------------------------------------------------------
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cc
        cmask = cols < C
        w = tl.load(w_ptr + row_off[:, None] + cols.to(tl.int64)[None, :] * s_c,
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        vv = tl.load(v_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        acc += w * vv[None, :]
    t = tl.sum(acc, axis=1)
    tl.store(ws_ptr + rows, t, mask=rmask)
    tl.atomic_add(ws_ptr + R + C, tl.sum(t * t, axis=0))
    # ---- s += W[rows, :]ᵀ t -------------------------------------------------------------------
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cc
        cmask = cols < C
        w = tl.load(w_ptr + row_off[:, None] + cols.to(tl.int64)[None, :] * s_c,
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        tl.atomic_add(ws_ptr + R + cols, tl.sum(w * t[:, None], axis=0), mask=cmask)
    # ---- the last program of this weight finalises ---------------------------------------------
    tl.debug_barrier()  # every thread's adds are issued before the ticket is taken
    ticket = tl.atomic_add(tick_ptr, 1)  # acq_rel, gpu scope
    if ticket == n_blocks - 1:
        ssq_t = tl.atomic_add(ws_ptr + R + C, 0.0)  # read through L2
        denom_u = tl.maximum(tl.sqrt(ssq_t), eps)
        for r0 in range(0, R, BLOCK_C):
            r = r0 + cc
            m = r < R
            x = tl.load(ws_ptr + r, mask=m, other=0.0, cache_modifier=".cg")
            tl.store(u_ptr + r, (x / denom_u).to(u_ptr.dtype.element_ty), mask=m)
        ssq_s = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cc
            m = cols < C
            x = tl.load(ws_ptr + R + cols, mask=m, other=0.0, cache_modifier=".cg") / denom_u
            ssq_s += x * x
        denom_v = tl.maximum(tl.sqrt(tl.sum(ssq_s, axis=0)), eps)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cc
            m = cols < C
            x = tl.load(ws_ptr + R + cols, mask=m, other=0.0, cache_modifier=".cg") / denom_u
            tl.store(v_ptr + cols, (x / denom_v).to(v_ptr.dtype.element_ty), mask=m)


@triton.jit
def _power_step_kernel(
    w_ptr, u_ptr, v_ptr, ws_ptr, tick_ptr, R, C, s_r, s_c, eps,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    _power_step(w_ptr, u_ptr, v_ptr, ws_ptr, tick_ptr, R, C, s_r, s_c, pid * BLOCK_R,
                tl.num_programs(0), eps, BLOCK_R, BLOCK_C)


@triton.jit
def _power_step_grouped_kernel(
    meta_ptr, prog_ptr, w0_ptr, u0_ptr, ws_ptr, tick_ptr, eps,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, META_COLS: tl.constexpr,
):
    # w0_ptr / u0_ptr: the group's first weight / vector; they only carry the element types.
    pid = tl.program_id(0)
    g = tl.load(prog_ptr + 3 * pid)
    row0 = tl.load(prog_ptr + 3 * pid + 1)
    n_blocks = tl.load(prog_ptr + 3 * pid + 2)
    row = meta_ptr + g * META_COLS
    w_ptr = tl.load(row + 0).to(w0_ptr.dtype, bitcast=True)
    u_ptr = tl.load(row + 1).to(u0_ptr.dtype, bitcast=True)
    v_ptr = tl.load(row + 2).to(u0_ptr.dtype, bitcast=True)
    ws_off = tl.load(row + 3)
    R = tl.load(row + 4).to(tl.int32)
    C = tl.load(row + 5).to(tl.int32)
    s_r = tl.load(row + 6)
    s_c = tl.load(row + 7)
    _power_step(w_ptr, u_ptr, v_ptr, ws_ptr + ws_off, tick_ptr + g, R, C, s_r, s_c, row0,
                n_blocks, eps, BLOCK_R, BLOCK_C)


# ---------------------------------------------------------------------------------------------
# Launchers. Inputs are validated by scadfast.ops.spectral; these only rely on: 2-D ``w``
# of fp16/bf16/fp32, contiguous 1-D ``u`` (R,) and ``v`` (C,) of ``w``'s dtype, same device.


def _blocks(t: torch.Tensor) -> tuple[int, int]:
    if t.device.type == "cpu":  # the Triton interpreter pays per tile: big tiles
        return 64, 512
    return 16, 256


def power_iteration(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n_iter: int, eps: float) -> None:
    """In-place power iteration on one weight: one launch per iteration (plus one memset)."""
    if n_iter <= 0:
        return
    R, C = w.shape
    block_r, block_c = _blocks(w)
    n_blocks = max(triton.cdiv(R, block_r), 1)
    width = R + C + 2  # t, s, ‖t‖², ticket (as int32 bits)
    ws = torch.zeros(n_iter, width, device=w.device, dtype=torch.float32)
    with device_ctx(w):
        for i in range(n_iter):
            wsi = ws[i]
            _power_step_kernel[(n_blocks,)](
                w, u, v, wsi, wsi[R + C + 1:].view(torch.int32), R, C, w.stride(0), w.stride(1), float(eps),
                BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
            )


_TABLE_CACHE: dict = {}
_TABLE_CACHE_MAX = 64


def _tables(ws, us, vs, block_r):
    """(meta int64 [G, 8], programs int32 [P, 3], workspace size) for a group, cached by pointers,
    shapes and strides (so steady-state training uploads nothing)."""
    key = (ws[0].device, block_r) + tuple(
        (w.data_ptr(), u.data_ptr(), v.data_ptr(), *w.shape, *w.stride()) for w, u, v in zip(ws, us, vs))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        return hit
    meta, progs, off = [], [], 0
    for g, (w, u, v) in enumerate(zip(ws, us, vs)):
        R, C = w.shape
        meta.append([w.data_ptr(), u.data_ptr(), v.data_ptr(), off, R, C, w.stride(0), w.stride(1)])
        n_blocks = max(triton.cdiv(R, block_r), 1)
        progs.extend([g, b * block_r, n_blocks] for b in range(n_blocks))
        off += R + C + 1
    dev = ws[0].device
    out = (torch.tensor(meta, dtype=torch.int64).to(dev), torch.tensor(progs, dtype=torch.int32).to(dev),
           len(progs), off)
    if len(_TABLE_CACHE) >= _TABLE_CACHE_MAX:
        _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))
    _TABLE_CACHE[key] = out
    return out


def power_iteration_grouped(ws, us, vs, n_iter: int, eps: float) -> None:
    """In-place power iteration on several weights of ONE dtype and device: one launch per
    iteration for all of them (plus one memset)."""
    if n_iter <= 0 or len(ws) == 0:
        return
    block_r, block_c = _blocks(ws[0])
    meta, progs, n_progs, ws_size = _tables(ws, us, vs, block_r)
    G = len(ws)
    width = ws_size + G  # fp32 workspaces, then one int32 ticket per weight
    work = torch.zeros(n_iter, width, device=ws[0].device, dtype=torch.float32)
    with device_ctx(ws[0]):
        for i in range(n_iter):
            wi = work[i]
            _power_step_grouped_kernel[(n_progs,)](
                meta, progs, ws[0], us[0], wi, wi[ws_size:].view(torch.int32), float(eps),
                BLOCK_R=block_r, BLOCK_C=block_c, META_COLS=_META_COLS, num_warps=4,
            )
