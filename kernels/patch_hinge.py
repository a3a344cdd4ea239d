"""Triton kernels of the patch hinge loss (``scadfast.ops.patch_hinge_loss``, docs/design.md §5.2, §5.4, §7).

With ``s = -1`` for real logits and ``s = +1`` for fake ones, ``l = relu(1 + s·x)`` and an optional
weight ``w`` broadcast to ``x``'s shape (``w ≡ 1`` without one)::

    loss  = Σ w·l / Σ w                              (Σ w = N, the element count, without a weight)
    ∂x    = g · s · [not 1 + s·x <= 0] · w / Σ w     (g = the incoming gradient of the scalar loss)

Forward: one pass over the data, deterministic (no atomics)
    ``_hinge_fwd_kernel`` runs P programs. Each walks the flat element range grid-stride in
    ``BLOCK``-element chunks and keeps ``Σ w·l`` and ``Σ w`` in BLOCK-wide fp32 registers (fp64 for
    fp64 input), reduced once at the end. With ``P == 1`` (inputs up to ``SMALL_N`` elements on a
    GPU, e.g. every PatchGAN map of a training batch) that program also divides and writes the
    loss and ``Σ w``: a single launch. With ``P > 1`` every program writes its two partials and
    ``_hinge_finish_kernel`` (one program) sums the ≤ ``MAX_PARTIALS`` partials in a fixed order: a
    second, tiny launch instead of fp32 atomics, so the loss is bitwise reproducible for a given
    shape and device. ``Σ w`` is returned too: the backward needs it and must not re-reduce.
Backward: one pass, one kernel
    ``_hinge_bwd_kernel``: one program per ``BLOCK`` elements reads x (and w), reads ``g`` and ``Σ w``
    from device memory (no host sync), writes ∂x contiguous in x's dtype. The formula multiplies in
    the same order as autograd through the reference, so gradients agree to the last bit up to the
    value of ``Σ w``.

Layout: no copies for strided inputs. A tensor (x, or w expanded to x's shape, broadcast dims then
have stride 0) is described by its coalesced layout: size-1 dims dropped, adjacent dims merged when
``stride[d] == stride[d+1]·size[d+1]``. Contiguous x, a full-shape weight or a scalar weight become
one dim; a per-sample weight ``(B,1,1,1)`` becomes two (B, rest) with strides (1, 0). Up to 4
coalesced dims are indexed in the kernel (div/mod of the flat index, compiled out for rank 1); a
rarer layout needing more is copied to a contiguous tensor first. Offsets switch to int64 when the
element count or the largest offset reaches 2³¹.

Precision: values are loaded in their storage dtype and converted to the accumulation dtype (fp32,
fp64 for fp64 x) before any arithmetic; the loss and ``Σ w`` are returned in that dtype. NaN logits
give a NaN loss (``maximum`` propagates NaN, as ``torch.relu`` does) and, like autograd through
``relu`` (whose backward zeroes only where the output is ``<= 0``), pass the gradient on there.

These launchers take tensors that the op layer (``scadfast/ops/patch_hinge.py``) has validated.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, device_ctx, tl_dtype

MAX_PARTIALS = 1024  # upper bound on forward programs (the finish kernel reduces them in one block)
_INT32_LIMIT = 2**31


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _strided_offsets(idx, S1, S2, S3, T0, T1, T2, T3, RANK: tl.constexpr):
    """Memory offsets of flat row-major indices ``idx`` over a coalesced layout.

    The layout is right-aligned in 4 slots: sizes (S0, S1, S2, S3) and strides (T0..T3), slot 3
    innermost; a rank-r layout uses the last r slots (S0 is implied by the element count).
    """
    if RANK == 1:
        off = idx * T3
    else:
        off = (idx % S3) * T3
        rest = idx // S3
        if RANK == 2:
            off += rest * T2
        else:
            off += (rest % S2) * T2
            rest = rest // S2
            if RANK == 3:
                off += rest * T1
            else:
                off += (rest % S1) * T1 + (rest // S1) * T0
    return off


@triton.jit
def _hinge_fwd_kernel(
    x_ptr, w_ptr, part_ptr, loss_ptr, denom_ptr, N,
    XS1, XS2, XS3, XT0, XT1, XT2, XT3,
    WS1, WS2, WS3, WT0, WT1, WT2, WT3,
    SIGN: tl.constexpr, HAS_W: tl.constexpr, XRANK: tl.constexpr, WRANK: tl.constexpr,
    ACC: tl.constexpr, INT64: tl.constexpr, FINISH: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    acc_l = tl.zeros([BLOCK], ACC)
    acc_w = tl.zeros([BLOCK], ACC)
    for start in range(pid * BLOCK, N, nprog * BLOCK):
        if INT64:
            idx = start.to(tl.int64) + lanes
        else:
            idx = start + lanes
        mask = idx < N
        xo = _strided_offsets(idx, XS1, XS2, XS3, XT0, XT1, XT2, XT3, XRANK)
        # Masked lanes load x = -SIGN, whose hinge is exactly 0.
        x = tl.load(x_ptr + xo, mask=mask, other=-SIGN).to(ACC)
        l = tl.maximum(1.0 + SIGN * x, 0.0, propagate_nan=tl.PropagateNan.ALL)
        if HAS_W:
            wo = _strided_offsets(idx, WS1, WS2, WS3, WT0, WT1, WT2, WT3, WRANK)
            w = tl.load(w_ptr + wo, mask=mask, other=0.0).to(ACC)
            acc_l += l * w
            acc_w += w
        else:
            acc_l += l
    s_l = tl.sum(acc_l, axis=0)
    if FINISH:
        if HAS_W:
            denom = tl.sum(acc_w, axis=0)
        else:
            denom = tl.zeros([], ACC) + N
        tl.store(loss_ptr, s_l / denom)
        tl.store(denom_ptr, denom)
    else:
        tl.store(part_ptr + pid, s_l)
        if HAS_W:
            tl.store(part_ptr + nprog + pid, tl.sum(acc_w, axis=0))


@triton.jit
def _hinge_finish_kernel(
    part_ptr, loss_ptr, denom_ptr, P, N,
    HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
):
    offs = tl.arange(0, BLOCK_P)
    m = offs < P
    s_l = tl.sum(tl.load(part_ptr + offs, mask=m, other=0.0).to(ACC), axis=0)
    if HAS_W:
        denom = tl.sum(tl.load(part_ptr + P + offs, mask=m, other=0.0).to(ACC), axis=0)
    else:
        denom = tl.zeros([], ACC) + N
    tl.store(loss_ptr, s_l / denom)
    tl.store(denom_ptr, denom)


@triton.jit
def _hinge_bwd_kernel(
    g_ptr, denom_ptr, x_ptr, w_ptr, gx_ptr, N,
    XS1, XS2, XS3, XT0, XT1, XT2, XT3,
    WS1, WS2, WS3, WT0, WT1, WT2, WT3,
    SIGN: tl.constexpr, HAS_W: tl.constexpr, XRANK: tl.constexpr, WRANK: tl.constexpr,
    ACC: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    coef = tl.load(g_ptr).to(ACC) / tl.load(denom_ptr).to(ACC)
    xo = _strided_offsets(idx, XS1, XS2, XS3, XT0, XT1, XT2, XT3, XRANK)
    x = tl.load(x_ptr + xo, mask=mask, other=0.0).to(ACC)
    if HAS_W:
        wo = _strided_offsets(idx, WS1, WS2, WS3, WT0, WT1, WT2, WT3, WRANK)
        w = tl.load(w_ptr + wo, mask=mask, other=0.0).to(ACC)
        gl = coef * w
    else:
        gl = coef + tl.zeros([BLOCK], ACC)
    # Written as "not (… <= 0)" so that a NaN logit passes the gradient on, as autograd's
    # threshold_backward through relu does.
    inactive = (1.0 + SIGN * x) <= 0.0
    gx = tl.where(inactive, 0.0, gl * SIGN)
    tl.store(gx_ptr + idx, gx.to(gx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Layout helpers


def coalesce(shape, strides) -> list[tuple[int, int]]:
    """Coalesced ``[(size, stride), ...]`` (outermost first) of a strided view, at least one entry."""
    dims = [(int(s), int(st)) for s, st in zip(shape, strides) if s != 1]
    if not dims:
        return [(1, 0)]
    out = [dims[-1]]
    for size, stride in reversed(dims[:-1]):
        in_size, in_stride = out[0]
        if stride == in_stride * in_size:
            out[0] = (size * in_size, in_stride)
        else:
            out.insert(0, (size, stride))
    return out


def _layout(t: torch.Tensor):
    """(rank, [S1, S2, S3], [T0, T1, T2, T3], max_offset) of ``t``, or None if rank > 4."""
    dims = coalesce(t.shape, t.stride())
    if len(dims) > 4:
        return None
    rank = len(dims)
    dims = [(1, 0)] * (4 - rank) + dims
    sizes = [s for s, _ in dims]
    strides = [st for _, st in dims]
    max_off = sum((s - 1) * st for s, st in dims)
    return rank, sizes[1:], strides, max_off


def _prepare(x: torch.Tensor, w: torch.Tensor | None):
    """Layouts of x and of w broadcast to x's shape (copying only layouts of rank > 4)."""
    xl = _layout(x)
    if xl is None:
        x = x.contiguous()
        xl = _layout(x)
    if w is None:
        wl = (1, [1, 1, 1], [0, 0, 0, 0], 0)
    else:
        w = w.expand(x.shape)
        wl = _layout(w)
        if wl is None:
            w = w.contiguous()
            wl = _layout(w)
    return x, w, xl, wl


def _layout_args(xl, wl):
    return (*xl[1], *xl[2], *wl[1], *wl[2])


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


SMALL_N = 1 << 16  # up to this many elements the forward is a single program (one launch)


def _fwd_config(n: int, device: torch.device):
    """(BLOCK, programs, num_warps) of the forward pass.

    Inputs up to ``SMALL_N`` elements (every PatchGAN map of a training batch) use one program:
    more programs finish the device work sooner only by about the cost of a launch, and the
    finishing launch they need costs more host time than that. Larger inputs use 4096-element
    chunks over up to 4 programs per SM, which is what streams at full bandwidth.
    """
    if device.type == "cuda":
        if n <= SMALL_N:
            return 2048, 1, 16
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 4096, min(triton.cdiv(n, 4096), MAX_PARTIALS, 4 * _sm_count(index)), 16
    # The Triton interpreter pays per program instance: keep the grid tiny (but more
    # than one program for a few thousand elements, so both reduction paths are exercised).
    return 1024, min(triton.cdiv(n, 1024), 4), 4


def _bwd_config(device: torch.device):
    """(BLOCK, num_warps) of the backward pass (one 1024-element block per program, 4 warps)."""
    return 1024, 4


# ---------------------------------------------------------------------------------------------
# Launchers


def patch_hinge_forward(
    x: torch.Tensor, w: torch.Tensor | None, real: bool, *, block: int | None = None, programs: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, Σw)`` as 0-dim tensors in the accumulation dtype (fp32; fp64 for fp64 ``x``).

    ``x``: non-empty float tensor, any layout. ``w``: None or a float tensor broadcastable to
    ``x.shape`` on the same device. ``block``/``programs`` override the launch configuration
    (tests use them to reach the multi-program path on small inputs).
    """
    n = x.numel()
    acc = acc_dtype(x.dtype)
    x, w, xl, wl = _prepare(x, w)
    d_block, d_prog, warps = _fwd_config(n, x.device)
    if block is None:
        block, p = d_block, d_prog
    else:
        if block <= 0 or block & (block - 1):
            raise ValueError(f"patch_hinge_forward: block must be a power of two, got {block}")
        p = min(triton.cdiv(n, block), MAX_PARTIALS)
    if programs is not None:
        p = programs
    if not 1 <= p <= MAX_PARTIALS:
        raise ValueError(f"patch_hinge_forward: programs must be in [1, {MAX_PARTIALS}], got {p}")
    int64 = n >= _INT32_LIMIT or max(xl[3], wl[3]) >= _INT32_LIMIT
    loss = torch.empty((), dtype=acc, device=x.device)
    denom = torch.empty((), dtype=acc, device=x.device)
    has_w = w is not None
    part = loss if p == 1 else torch.empty((2 if has_w else 1) * p, dtype=acc, device=x.device)
    sign = -1.0 if real else 1.0
    with device_ctx(x):
        _hinge_fwd_kernel[(p,)](
            x, w if has_w else x, part, loss, denom, n, *_layout_args(xl, wl),
            SIGN=sign, HAS_W=has_w, XRANK=xl[0], WRANK=wl[0], ACC=tl_dtype(acc),
            INT64=int64, FINISH=p == 1, BLOCK=block, num_warps=warps,
        )
        if p > 1:
            _hinge_finish_kernel[(1,)](
                part, loss, denom, p, n,
                HAS_W=has_w, ACC=tl_dtype(acc), BLOCK_P=max(16, triton.next_power_of_2(p)), num_warps=4,
            )
    return loss, denom


def patch_hinge_backward(
    grad: torch.Tensor, denom: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None, real: bool,
    *, block: int | None = None,
) -> torch.Tensor:
    """∂loss/∂x (contiguous, x's dtype and shape) given the 0-dim ``grad`` of the loss and ``Σw``."""
    n = x.numel()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x, w, xl, wl = _prepare(x, w)
    d_block, warps = _bwd_config(x.device)
    block = block or d_block
    if block <= 0 or block & (block - 1):
        raise ValueError(f"patch_hinge_backward: block must be a power of two, got {block}")
    int64 = n >= _INT32_LIMIT or max(xl[3], wl[3]) >= _INT32_LIMIT
    has_w = w is not None
    with device_ctx(x):
        _hinge_bwd_kernel[(triton.cdiv(n, block),)](
            grad, denom, x, w if has_w else x, out, n, *_layout_args(xl, wl),
            SIGN=-1.0 if real else 1.0, HAS_W=has_w, XRANK=xl[0], WRANK=wl[0],
            ACC=tl_dtype(acc_dtype(x.dtype)), INT64=int64, BLOCK=block, num_warps=warps,
        )
    return out
