"""Triton kernels for the SAN logits and the SAN discriminator loss (docs/design.md §5.3, §7).

Everything here reduces to two per-row statistics of ``h`` and ``omega`` (both (B, D)):

    s  = ⟨h, ω⟩        (the value of all three logits f_fun = f_dir = f)
    n2 = ‖ω‖²

and the backward of every logit is, with k = s / n2 (k = 0 where ‖ω‖ < eps, as the reference's
``clamp_min(eps)`` on ‖ω‖ gives):

    ∂/∂h = (g_fun + g_f) · ω
    ∂/∂ω = (g_f + g_dir) · h + (g_fun − g_dir) · k · ω

Kernels (one launch each):

* ``_san_logits_fwd_kernel``  one program per block of ``BLOCK_B`` rows, a loop over D in tiles of
  ``BLOCK_D``; writes the three logits (in the promoted input dtype) and ``stats = [s; n2]``
  (shape (2, B), fp32, fp64 for fp64 inputs), which the backward reuses instead of re-reading D.
* ``_san_logits_bwd_kernel``  the same grid; one pass over D writing ∂h and ∂ω.
* ``_san_loss_fwd_kernel``    one grid covering the row blocks of the real pair and then of the fake
  pair; each program writes its partial sums (real hinge+Wasserstein, weighted fake
  hinge+Wasserstein, weight sum) to a partials buffer, then bumps an arrival counter; the **last
  program to arrive** sums the partials in a fixed order and writes the loss. The cross-row
  reduction is therefore done in one launch and is **deterministic** (bitwise reproducible for a
  given shape and block configuration), unlike an fp32 ``atomic_add`` of partials.
* ``_san_loss_bwd_kernel``    the same grid; per row the hinge indicator and the (weighted) mean
  factors give (g_fun, g_dir), then one pass over D writes ∂h and ∂ω of both pairs.

All arithmetic is done in ``ACC`` (fp32, or fp64 for fp64 inputs) right after each load; inputs may
be fp16/bf16/fp32/fp64 and non-contiguous (row and column strides are passed). Gradients are
written contiguous in the dtype of the input they belong to.

Block sizes are chosen by a fixed heuristic (no ``@triton.autotune``): the row sums depend on the
tiling, so a fixed choice keeps results reproducible, and autotuning does not work under the
Triton interpreter that the CPU tests use. The launchers accept ``block_b``/``block_d`` overrides
so tests can force several D tiles, partial row blocks and many programs on small inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, device_ctx, tl_dtype

EPS = 1e-12  # the reference's clamp on ‖ω‖; the kernels compare n2 against EPS²
_MAX_TILE = 4096  # elements of one [BLOCK_B, BLOCK_D] tile (per loaded tensor)
_TARGET_PROGRAMS = 256  # enough row blocks to cover the SMs of one GPU a couple of times
_BLOCK_P = 128  # width of the final deterministic reduction over the partials


# ---------------------------------------------------------------------------------------------
# Kernels: shared jit helpers


@triton.jit
def _row_stats(h_ptr, w_ptr, rows, B, D, s_hb, s_hd, s_wb, s_wd,
               BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """(s, n2) for the rows ``rows`` (masked by ``rows < B``), accumulated in ACC.

    The products are accumulated elementwise in a [BLOCK_B, BLOCK_D] tile and reduced once at the
    end (a tree sum), which is both faster and more accurate than a running scalar sum.
    """
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    acc_s = tl.zeros([BLOCK_B, BLOCK_D], dtype=ACC)
    acc_n = tl.zeros([BLOCK_B, BLOCK_D], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        c = (d0 + cols).to(tl.int64)
        m = rmask[:, None] & (c < D)[None, :]
        hv = tl.load(h_ptr + rows64[:, None] * s_hb + c[None, :] * s_hd, mask=m, other=0.0).to(ACC)
        wv = tl.load(w_ptr + rows64[:, None] * s_wb + c[None, :] * s_wd, mask=m, other=0.0).to(ACC)
        acc_s += hv * wv
        acc_n += wv * wv
    return tl.sum(acc_s, axis=1), tl.sum(acc_n, axis=1)


@triton.jit
def _coef(s, n2, eps2):
    """k = s / n2 where ‖ω‖ ≥ eps, else 0 (the scale ‖ω‖ is clamped there and gets no gradient)."""
    ok = n2 >= eps2
    return tl.where(ok, s / tl.where(ok, n2, 1.0), 0.0)


@triton.jit
def _write_grads(h_ptr, w_ptr, gh_ptr, gw_ptr, rows, B, D, s_hb, s_hd, s_wb, s_wd,
                 a, b, ck, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """gh = a·ω,  gω = b·h + ck·ω  for the rows ``rows``; gh/gω are contiguous (B, D)."""
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    a2 = a[:, None]
    b2 = b[:, None]
    ck2 = ck[:, None]
    for d0 in range(0, D, BLOCK_D):
        c = (d0 + cols).to(tl.int64)
        m = rmask[:, None] & (c < D)[None, :]
        hv = tl.load(h_ptr + rows64[:, None] * s_hb + c[None, :] * s_hd, mask=m, other=0.0).to(ACC)
        wv = tl.load(w_ptr + rows64[:, None] * s_wb + c[None, :] * s_wd, mask=m, other=0.0).to(ACC)
        out = rows64[:, None] * D + c[None, :]
        tl.store(gh_ptr + out, (a2 * wv).to(gh_ptr.dtype.element_ty), mask=m)
        tl.store(gw_ptr + out, (b2 * hv + ck2 * wv).to(gw_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------
# Kernels: san_logits


@triton.jit
def _san_logits_fwd_kernel(h_ptr, w_ptr, ffun_ptr, fdir_ptr, f_ptr, stats_ptr,
                           B, D, s_hb, s_hd, s_wb, s_wd,
                           BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    s, n2 = _row_stats(h_ptr, w_ptr, rows, B, D, s_hb, s_hd, s_wb, s_wd, BLOCK_B, BLOCK_D, ACC)
    m = rows < B
    out_ty = f_ptr.dtype.element_ty
    tl.store(ffun_ptr + rows, s.to(out_ty), mask=m)
    tl.store(fdir_ptr + rows, s.to(out_ty), mask=m)
    tl.store(f_ptr + rows, s.to(out_ty), mask=m)
    tl.store(stats_ptr + rows, s, mask=m)
    tl.store(stats_ptr + B + rows, n2, mask=m)


@triton.jit
def _san_logits_bwd_kernel(gfun_ptr, gdir_ptr, gf_ptr, stats_ptr, h_ptr, w_ptr, gh_ptr, gw_ptr,
                           B, D, s_hb, s_hd, s_wb, s_wd, eps2,
                           BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    m = rows < B
    g_fun = tl.load(gfun_ptr + rows, mask=m, other=0.0).to(ACC)
    g_dir = tl.load(gdir_ptr + rows, mask=m, other=0.0).to(ACC)
    g_f = tl.load(gf_ptr + rows, mask=m, other=0.0).to(ACC)
    s = tl.load(stats_ptr + rows, mask=m, other=0.0).to(ACC)
    n2 = tl.load(stats_ptr + B + rows, mask=m, other=1.0).to(ACC)
    k = _coef(s, n2, eps2)
    _write_grads(h_ptr, w_ptr, gh_ptr, gw_ptr, rows, B, D, s_hb, s_hd, s_wb, s_wd,
                 g_fun + g_f, g_f + g_dir, (g_fun - g_dir) * k, BLOCK_B, BLOCK_D, ACC)


# ---------------------------------------------------------------------------------------------
# Kernels: san_d_loss


@triton.jit
def _san_loss_fwd_kernel(hr_ptr, wr_ptr, hf_ptr, wf_ptr, fw_ptr, stats_r_ptr, stats_f_ptr,
                         part_ptr, count_ptr, loss_ptr, wsum_ptr,
                         Br, Bf, D, s_hrb, s_hrd, s_wrb, s_wrd, s_hfb, s_hfd, s_wfb, s_wfd, s_fw,
                         n_blocks_r, n_prog,
                         HAS_W: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_B)
    zero = tl.sum(tl.zeros([BLOCK_B], ACC), axis=0)
    # partials are laid out (3, n_prog): [real sum, weighted fake sum, weight sum]
    if pid < n_blocks_r:
        rows = pid * BLOCK_B + lanes
        s, n2 = _row_stats(hr_ptr, wr_ptr, rows, Br, D, s_hrb, s_hrd, s_wrb, s_wrd, BLOCK_B, BLOCK_D, ACC)
        m = rows < Br
        tl.store(stats_r_ptr + rows, s, mask=m)
        tl.store(stats_r_ptr + Br + rows, n2, mask=m)
        # relu(1 − f_fun) − f_dir  (both equal s in value)
        term = tl.where(m, tl.maximum(1.0 - s, 0.0) - s, 0.0)
        tl.store(part_ptr + pid, tl.sum(term, axis=0))
        tl.store(part_ptr + n_prog + pid, zero)
        tl.store(part_ptr + 2 * n_prog + pid, zero)
    else:
        rows = (pid - n_blocks_r) * BLOCK_B + lanes
        s, n2 = _row_stats(hf_ptr, wf_ptr, rows, Bf, D, s_hfb, s_hfd, s_wfb, s_wfd, BLOCK_B, BLOCK_D, ACC)
        m = rows < Bf
        tl.store(stats_f_ptr + rows, s, mask=m)
        tl.store(stats_f_ptr + Bf + rows, n2, mask=m)
        if HAS_W:
            wt = tl.load(fw_ptr + rows.to(tl.int64) * s_fw, mask=m, other=0.0).to(ACC)
        else:
            wt = tl.where(m, 1.0, 0.0).to(ACC)
        # w · (relu(1 + f_fun) + f_dir)
        term = tl.where(m, wt * (tl.maximum(1.0 + s, 0.0) + s), 0.0)
        tl.store(part_ptr + pid, zero)
        tl.store(part_ptr + n_prog + pid, tl.sum(term, axis=0))
        tl.store(part_ptr + 2 * n_prog + pid, tl.sum(wt, axis=0))

    # Publish the partials, then count arrivals. The barrier orders every thread's stores before
    # the (release) atomic; the last program's (acquire) atomic makes all partials visible to it.
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel")
    if arrived == n_prog - 1:
        offs = tl.arange(0, BLOCK_P)
        acc_r = tl.zeros([BLOCK_P], dtype=ACC)
        acc_f = tl.zeros([BLOCK_P], dtype=ACC)
        acc_w = tl.zeros([BLOCK_P], dtype=ACC)
        for p0 in range(0, n_prog, BLOCK_P):
            idx = p0 + offs
            pm = idx < n_prog
            acc_r += tl.load(part_ptr + idx, mask=pm, other=0.0, volatile=True)
            acc_f += tl.load(part_ptr + n_prog + idx, mask=pm, other=0.0, volatile=True)
            acc_w += tl.load(part_ptr + 2 * n_prog + idx, mask=pm, other=0.0, volatile=True)
        sum_r = tl.sum(acc_r, axis=0)
        sum_f = tl.sum(acc_f, axis=0)
        w_sum = tl.sum(acc_w, axis=0)
        loss = sum_r / Br + sum_f / tl.where(w_sum > 0, w_sum, 1.0)
        # a non-positive weight sum has no meaning: poison the loss instead of a host sync
        loss = tl.where(w_sum > 0, loss, float("nan"))
        tl.store(loss_ptr, loss)
        tl.store(wsum_ptr, w_sum)


@triton.jit
def _san_loss_bwd_kernel(grad_ptr, hr_ptr, wr_ptr, hf_ptr, wf_ptr, fw_ptr, stats_r_ptr, stats_f_ptr,
                         wsum_ptr, ghr_ptr, gwr_ptr, ghf_ptr, gwf_ptr,
                         Br, Bf, D, s_hrb, s_hrd, s_wrb, s_wrd, s_hfb, s_hfd, s_wfb, s_wfd, s_fw,
                         n_blocks_r, eps2,
                         HAS_W: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                         ACC: tl.constexpr):
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_B)
    G = tl.load(grad_ptr).to(ACC)
    if pid < n_blocks_r:
        rows = pid * BLOCK_B + lanes
        m = rows < Br
        s = tl.load(stats_r_ptr + rows, mask=m, other=0.0)
        n2 = tl.load(stats_r_ptr + Br + rows, mask=m, other=1.0)
        scale = tl.zeros([BLOCK_B], ACC) - G / Br
        g_fun = tl.where(1.0 - s > 0.0, scale, 0.0)
        g_dir = scale
        k = _coef(s, n2, eps2)
        _write_grads(hr_ptr, wr_ptr, ghr_ptr, gwr_ptr, rows, Br, D, s_hrb, s_hrd, s_wrb, s_wrd,
                     g_fun, g_dir, (g_fun - g_dir) * k, BLOCK_B, BLOCK_D, ACC)
    else:
        rows = (pid - n_blocks_r) * BLOCK_B + lanes
        m = rows < Bf
        s = tl.load(stats_f_ptr + rows, mask=m, other=0.0)
        n2 = tl.load(stats_f_ptr + Bf + rows, mask=m, other=1.0)
        w_sum = tl.load(wsum_ptr).to(ACC)
        if HAS_W:
            wt = tl.load(fw_ptr + rows.to(tl.int64) * s_fw, mask=m, other=0.0).to(ACC)
        else:
            wt = tl.where(m, 1.0, 0.0).to(ACC)
        scale = G * wt / w_sum
        g_fun = tl.where(1.0 + s > 0.0, scale, 0.0)
        g_dir = scale
        k = _coef(s, n2, eps2)
        _write_grads(hf_ptr, wf_ptr, ghf_ptr, gwf_ptr, rows, Bf, D, s_hfb, s_hfd, s_wfb, s_wfd,
                     g_fun, g_dir, (g_fun - g_dir) * k, BLOCK_B, BLOCK_D, ACC)


# ---------------------------------------------------------------------------------------------
# Launchers


def _blocks(rows: int, D: int, block_b: int | None, block_d: int | None) -> tuple[int, int]:
    """Heuristic tiling: cover D with tiles of up to 2048 columns, then put as many rows in a
    program as keeps ~_TARGET_PROGRAMS programs and a tile of at most _MAX_TILE elements."""
    if block_d is None:
        block_d = max(16, min(triton.next_power_of_2(max(D, 1)), 2048))
    if block_b is None:
        want = triton.next_power_of_2(max(1, -(-rows // _TARGET_PROGRAMS)))
        block_b = max(1, min(16, want, _MAX_TILE // block_d))
    for name, v in (("block_b", block_b), ("block_d", block_d)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"san kernels: {name} must be a power of two, got {v}")
    return block_b, block_d


def _num_warps(block_b: int, block_d: int) -> int:
    return 8 if block_b * block_d >= 4096 else 4


def san_logits_forward(h: torch.Tensor, omega: torch.Tensor, block_b: int | None = None,
                       block_d: int | None = None):
    """Launch the fused forward. Returns ``(f_fun, f_dir, f, stats)``: three (B,) logits in the
    promoted dtype of ``h``/``omega`` and ``stats`` (2, B) = [⟨h, ω⟩; ‖ω‖²] in fp32 (fp64 for
    fp64 inputs). ``h`` and ``omega`` are (B, D), same device, any strides; validated by the caller."""
    B, D = h.shape
    out_dtype = torch.promote_types(h.dtype, omega.dtype)
    acc = acc_dtype(out_dtype)
    f_fun = h.new_empty((B,), dtype=out_dtype)
    f_dir = h.new_empty((B,), dtype=out_dtype)
    f = h.new_empty((B,), dtype=out_dtype)
    stats = h.new_empty((2, B), dtype=acc)
    bb, bd = _blocks(B, D, block_b, block_d)
    grid = (triton.cdiv(B, bb),)
    with device_ctx(h):
        _san_logits_fwd_kernel[grid](
            h, omega, f_fun, f_dir, f, stats, B, D,
            h.stride(0), h.stride(1), omega.stride(0), omega.stride(1),
            BLOCK_B=bb, BLOCK_D=bd, ACC=tl_dtype(acc), num_warps=_num_warps(bb, bd))
    return f_fun, f_dir, f, stats


def san_logits_backward(g_fun, g_dir, g_f, h, omega, stats, block_b: int | None = None,
                        block_d: int | None = None):
    """Launch the fused backward: ``(grad_h, grad_omega)``, contiguous, in the dtypes of ``h`` and
    ``omega``. ``g_*`` are the (B,) output gradients (any dtype/strides), ``stats`` the forward's."""
    B, D = h.shape
    g_fun, g_dir, g_f = (g.contiguous() for g in (g_fun, g_dir, g_f))
    stats = stats.contiguous()
    acc = stats.dtype
    gh = torch.empty((B, D), dtype=h.dtype, device=h.device)
    gw = torch.empty((B, D), dtype=omega.dtype, device=omega.device)
    bb, bd = _blocks(B, D, block_b, block_d)
    grid = (triton.cdiv(B, bb),)
    with device_ctx(h):
        _san_logits_bwd_kernel[grid](
            g_fun, g_dir, g_f, stats, h, omega, gh, gw, B, D,
            h.stride(0), h.stride(1), omega.stride(0), omega.stride(1), EPS * EPS,
            BLOCK_B=bb, BLOCK_D=bd, ACC=tl_dtype(acc), num_warps=_num_warps(bb, bd))
    return gh, gw


def _loss_grid(Br: int, Bf: int, D: int, block_b, block_d):
    """Row blocks of the real pair come first in the grid, then those of the fake pair."""
    bb, bd = _blocks(Br + Bf, D, block_b, block_d)
    nbr = triton.cdiv(Br, bb)
    return bb, bd, nbr, nbr + triton.cdiv(Bf, bb)


def san_d_loss_forward(h_real, omega_real, h_fake, omega_fake, fake_weight=None,
                       block_b: int | None = None, block_d: int | None = None, block_p: int = _BLOCK_P):
    """Launch the fused SAN loss forward (one kernel, deterministic cross-row reduction).

    Returns ``(loss, stats_r, stats_f, wsum)``: the 0-d loss, the per-row [⟨h, ω⟩; ‖ω‖²] of each
    pair ((2, B_real), (2, B_fake)) and the (1,) sum of the fake weights, all in the accumulation
    dtype (fp64 if any input is fp64, else fp32). A non-positive weight sum gives a NaN loss.
    """
    Br, D = h_real.shape
    Bf = h_fake.shape[0]
    acc = acc_dtype(h_real.dtype, omega_real.dtype, h_fake.dtype, omega_fake.dtype)
    dev = h_real.device
    bb, bd, nbr, n_prog = _loss_grid(Br, Bf, D, block_b, block_d)
    loss = torch.empty((), dtype=acc, device=dev)
    stats_r = torch.empty((2, Br), dtype=acc, device=dev)
    stats_f = torch.empty((2, Bf), dtype=acc, device=dev)
    wsum = torch.empty((1,), dtype=acc, device=dev)
    partials = torch.empty((3, n_prog), dtype=acc, device=dev)
    # a fresh arrival counter per call (one tiny memset): a cached, self-resetting counter would
    # race between streams and break CUDA-graph capture
    counter = torch.zeros((1,), dtype=torch.int32, device=dev)
    has_w = fake_weight is not None
    fw = fake_weight if has_w else wsum  # dummy pointer, never read
    with device_ctx(h_real):
        _san_loss_fwd_kernel[(n_prog,)](
            h_real, omega_real, h_fake, omega_fake, fw, stats_r, stats_f,
            partials, counter, loss, wsum,
            Br, Bf, D, h_real.stride(0), h_real.stride(1), omega_real.stride(0), omega_real.stride(1),
            h_fake.stride(0), h_fake.stride(1), omega_fake.stride(0), omega_fake.stride(1),
            fake_weight.stride(0) if has_w else 0, nbr, n_prog,
            HAS_W=has_w, BLOCK_B=bb, BLOCK_D=bd, BLOCK_P=block_p, ACC=tl_dtype(acc),
            num_warps=_num_warps(bb, bd))
    return loss, stats_r, stats_f, wsum


def san_d_loss_backward(grad, h_real, omega_real, h_fake, omega_fake, fake_weight, stats_r, stats_f, wsum,
                        block_b: int | None = None, block_d: int | None = None):
    """Launch the fused SAN loss backward: ``(grad_h_real, grad_omega_real, grad_h_fake,
    grad_omega_fake)``, contiguous, each in its input's dtype. ``grad`` is the 0-d loss gradient
    (read on the device, no host sync); the rest are the forward's inputs and saved outputs."""
    Br, D = h_real.shape
    Bf = h_fake.shape[0]
    bb, bd, nbr, n_prog = _loss_grid(Br, Bf, D, block_b, block_d)
    ghr = torch.empty((Br, D), dtype=h_real.dtype, device=h_real.device)
    gwr = torch.empty((Br, D), dtype=omega_real.dtype, device=h_real.device)
    ghf = torch.empty((Bf, D), dtype=h_fake.dtype, device=h_real.device)
    gwf = torch.empty((Bf, D), dtype=omega_fake.dtype, device=h_real.device)
    stats_r, stats_f, wsum = stats_r.contiguous(), stats_f.contiguous(), wsum.contiguous()
    grad = grad.reshape(()).to(stats_r.dtype)
    has_w = fake_weight is not None
    fw = fake_weight if has_w else wsum
    with device_ctx(h_real):
        _san_loss_bwd_kernel[(n_prog,)](
            grad, h_real, omega_real, h_fake, omega_fake, fw, stats_r, stats_f, wsum,
            ghr, gwr, ghf, gwf,
            Br, Bf, D, h_real.stride(0), h_real.stride(1), omega_real.stride(0), omega_real.stride(1),
            h_fake.stride(0), h_fake.stride(1), omega_fake.stride(0), omega_fake.stride(1),
            fake_weight.stride(0) if has_w else 0, nbr, EPS * EPS,
            HAS_W=has_w, BLOCK_B=bb, BLOCK_D=bd, ACC=tl_dtype(stats_r.dtype),
            num_warps=_num_warps(bb, bd))
    return ghr, gwr, ghf, gwf
