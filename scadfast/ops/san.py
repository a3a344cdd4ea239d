"""SAN (slicing adversarial network) logits and discriminator loss, adapted to text (docs/design.md §5.3).

Given the discriminator feature ``h = h(x, c)`` of shape (B, D) and the text direction
``omega = ω(c)`` (B, D), with ``n = ‖ω‖`` and ``ω̂ = ω / n``:

    f_fun = ⟨h·n, sg(ω̂)⟩      trains h (and the scale n)  — the "function" part
    f_dir = ⟨sg(h·n), ω̂⟩      trains the direction ω̂      — the "direction" part
    f     = ⟨h·n, ω̂⟩          what G and the MA-GP see (= ⟨h, ω⟩ in value)

All three have the same value ``s = ⟨h, ω⟩``; they differ only in where gradients flow. With
``k = s / ‖ω‖²`` (so that ``⟨h, ω̂⟩ ω̂ = k ω``):

    f_fun:  ∂h = ω,   ∂ω = k ω            (only through the scale n)
    f_dir:  ∂h = 0,   ∂ω = h − k ω        (the tangential part: ω̂ moves, n does not)
    f:      ∂h = ω,   ∂ω = h

Where ``‖ω‖ < eps`` (1e-12) the scale is clamped (as ``clamp_min(eps)`` in the reference) and gets
no gradient, i.e. ``k = 0`` there.

Implementations (``impl=``, see :mod:`scadfast.ops._impl`):

* ``"ref"``: plain differentiable PyTorch (``san_logits_ref``/``san_d_loss_ref``).
* ``"triton"``: ``torch.library`` custom ops ``scadfast::san_logits`` / ``scadfast::san_d_loss``
  whose forward is one fused Triton kernel and whose backward is a second custom op
  (``scadfast::san_logits_backward`` / ``scadfast::san_d_loss_backward``), again one kernel.
* ``"auto"``: the Triton path on CUDA; on CPU the same custom ops with backend ``"torch"``:
  hand-written forward and backward in PyTorch (no autograd graph of the elementwise steps is built).

Double backward (needed by the MA-GP, docs/design.md §5.5): the backward ops have their own registered
autograd formula written in plain differentiable PyTorch, so ``create_graph=True`` gradients of
the fused ops can be differentiated again (to any order).

Higher-order semantics: the fused paths differentiate the first-order gradient *as a function*
of (h, ω, output grads), i.e. they return the true Jacobian of the gradient field
(``torch.autograd.gradgradcheck`` holds for all three logits and for the loss). For ``f`` — the
logit the MA-GP differentiates — this is identical to the reference. For ``f_fun``/``f_dir`` (and
so the loss) the reference's autograd keeps the detached ω̂ resp. h·n frozen inside the
second-order graph as well, which is not the derivative of its own first-order gradient (the
reference fails gradgradcheck there); first-order values and gradients are identical.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._impl import acc_dtype, check_same_device, check_tensor, kernels, resolve_impl

_EPS = 1e-12
_EPS2 = _EPS * _EPS

__all__ = ["san_logits", "san_d_loss", "san_logits_ref", "san_d_loss_ref"]

_FUSED = ("triton",)


# ---------------------------------------------------------------------------------------------
# Validation


def _check_pair(op, h, omega, hname="h", wname="omega"):
    check_tensor(op, hname, h, ndim=2)
    check_tensor(op, wname, omega, ndim=2)
    check_same_device(op, **{hname: h, wname: omega})
    if h.shape != omega.shape:
        raise ValueError(
            f"{op}: {hname} and {wname} must have the same shape (B, D), "
            f"got {tuple(h.shape)} and {tuple(omega.shape)}"
        )


def _check_loss_inputs(op, h_real, omega_real, h_fake, omega_fake, fake_weight):
    _check_pair(op, h_real, omega_real, "h_real", "omega_real")
    _check_pair(op, h_fake, omega_fake, "h_fake", "omega_fake")
    check_same_device(op, h_real=h_real, h_fake=h_fake, fake_weight=fake_weight)
    if h_real.shape[1] != h_fake.shape[1]:
        raise ValueError(
            f"{op}: real and fake features must have the same width D, "
            f"got h_real {tuple(h_real.shape)} and h_fake {tuple(h_fake.shape)}"
        )
    for name, t in (("h_real", h_real), ("h_fake", h_fake)):
        if t.shape[0] == 0:
            raise ValueError(f"{op}: {name} is an empty batch (shape {tuple(t.shape)}); the loss needs at least one row")
    if fake_weight is not None:
        check_tensor(op, "fake_weight", fake_weight, ndim=1)
        if fake_weight.shape[0] != h_fake.shape[0]:
            raise ValueError(
                f"{op}: fake_weight must have shape (B_fake,) = ({h_fake.shape[0]},), "
                f"got {tuple(fake_weight.shape)}"
            )
        # The sum is only checked where that costs no device sync (CPU, eager); on a GPU, and
        # under torch.compile, a non-positive sum makes the loss NaN instead.
        if fake_weight.device.type == "cpu" and not torch.compiler.is_compiling():
            wsum = float(fake_weight.detach().double().sum())
            if not wsum > 0:
                raise ValueError(f"{op}: fake_weight must have a positive sum, got {wsum}")
            if bool((fake_weight.detach() < 0).any()):
                raise ValueError(f"{op}: fake_weight must be non-negative, got a minimum of "
                                 f"{float(fake_weight.detach().min())}")


# ---------------------------------------------------------------------------------------------
# Reference


def _san_logits_acc(h, omega):
    """The reference logits in the accumulation dtype (fp32, fp64 for fp64 inputs)."""
    acc = acc_dtype(h.dtype, omega.dtype)
    h32, w32 = h.to(acc), omega.to(acc)
    n = w32.norm(dim=1, keepdim=True).clamp_min(_EPS)
    w_hat = w32 / n
    hs = h32 * n
    f_fun = (hs * w_hat.detach()).sum(1)
    f_dir = (hs.detach() * w_hat).sum(1)
    f = (hs * w_hat).sum(1)
    return f_fun, f_dir, f


def san_logits_ref(h: torch.Tensor, omega: torch.Tensor):
    """Reference: (f_fun, f_dir, f), each (B,), computed in fp32 (fp64 for fp64 inputs) and
    returned in the promoted input dtype; autograd sees every step."""
    out_dtype = torch.promote_types(h.dtype, omega.dtype)
    return tuple(t.to(out_dtype) for t in _san_logits_acc(h, omega))


def _wmean(x, w):
    if w is None:
        return x.mean()
    return (x * w).sum() / w.sum()


def san_d_loss_ref(h_real, omega_real, h_fake, omega_fake, fake_weight=None):
    """Reference SAN discriminator loss (a scalar to minimise):

    ``mean relu(1 − f_fun_r) + wmean relu(1 + f_fun_f) − (mean f_dir_r − wmean f_dir_f)``

    with ``wmean x = Σ wᵢxᵢ / Σ wᵢ``. The logits are kept in the accumulation dtype (not rounded
    to a half input dtype) and the loss is fp32 (fp64 if any input is fp64). ``fake_weight`` is
    used as a constant (detached).
    """
    acc = acc_dtype(h_real.dtype, omega_real.dtype, h_fake.dtype, omega_fake.dtype)
    fr, dr, _ = (t.to(acc) for t in _san_logits_acc(h_real, omega_real))
    ff, df, _ = (t.to(acc) for t in _san_logits_acc(h_fake, omega_fake))
    w = None if fake_weight is None else fake_weight.detach().to(acc)
    return torch.relu(1 - fr).mean() + _wmean(torch.relu(1 + ff), w) - (dr.mean() - _wmean(df, w))


# ---------------------------------------------------------------------------------------------
# The op's math in PyTorch (backend "torch") and the double-backward formulas


def _stats_torch(h, omega, acc):
    """[⟨h, ω⟩; ‖ω‖²] of shape (2, B) in ``acc``, without B×D temporaries for fp32/fp64 inputs."""
    h_, w_ = h.to(acc), omega.to(acc)
    s = torch.einsum("bd,bd->b", h_, w_)
    n2 = torch.einsum("bd,bd->b", w_, w_)
    return torch.stack((s, n2))


def _coef(s, n2):
    """k = s / ‖ω‖² where ‖ω‖ ≥ eps, else 0. Differentiable in s and n2 (where the mask holds)."""
    ok = n2 >= _EPS2
    return torch.where(ok, s / torch.where(ok, n2, torch.ones_like(n2)), torch.zeros_like(s))


def _logits_backward_torch(g_fun, g_dir, g_f, h, omega, stats):
    """Hand-written backward of the three logits: (grad_h, grad_omega) in the inputs' dtypes."""
    acc = stats.dtype
    g_fun, g_dir, g_f = g_fun.to(acc), g_dir.to(acc), g_f.to(acc)
    k = _coef(stats[0], stats[1])
    a = (g_fun + g_f).unsqueeze(1)
    b = (g_f + g_dir).unsqueeze(1)
    ck = ((g_fun - g_dir) * k).unsqueeze(1)
    h_, w_ = h.to(acc), omega.to(acc)
    gh = a * w_
    gw = torch.addcmul(ck * w_, b, h_)
    return gh.to(h.dtype), gw.to(omega.dtype)


def _logits_backward_vjp_torch(g_fun, g_dir, g_f, h, omega, Gh, Gw):
    """VJP of ``(g_fun, g_dir, g_f, h, ω) ↦ (gh, gω)`` (the logits backward) at cotangents
    ``(Gh, Gw)``, in plain differentiable PyTorch (so it can be differentiated again).

    With a = g_fun + g_f, b = g_f + g_dir, c = g_fun − g_dir, k = s/n2 (s = ⟨h, ω⟩, n2 = ‖ω‖²):
    gh = a ω, gω = b h + c k ω. Then with p = ⟨Gh, ω⟩, q = ⟨Gω, h⟩, r = ⟨Gω, ω⟩ per row and
    ∂k/∂h = ω/n2, ∂k/∂ω = (h − 2kω)/n2 (zero where ‖ω‖ < eps):

        ∂g_fun = p + k r,  ∂g_dir = q − k r,  ∂g_f = p + q
        ∂h = b Gω + (c r / n2) ω
        ∂ω = a Gh + c k Gω + (c r / n2)(h − 2 k ω)

    Returns (∂g_fun, ∂g_dir, ∂g_f, ∂h, ∂ω) in the accumulation dtype (callers cast).
    """
    acc = acc_dtype(h.dtype, omega.dtype, g_fun.dtype)
    h_, w_ = h.to(acc), omega.to(acc)
    g_fun, g_dir, g_f = g_fun.to(acc), g_dir.to(acc), g_f.to(acc)
    s = (h_ * w_).sum(1)
    n2 = (w_ * w_).sum(1)
    ok = n2 >= _EPS2
    inv_n2 = torch.where(ok, 1.0 / torch.where(ok, n2, torch.ones_like(n2)), torch.zeros_like(n2))
    k = s * inv_n2
    a, b, c = g_fun + g_f, g_f + g_dir, g_fun - g_dir
    zeros = torch.zeros_like(s)
    p = (Gh.to(acc) * w_).sum(1) if Gh is not None else zeros
    q = (Gw.to(acc) * h_).sum(1) if Gw is not None else zeros
    r = (Gw.to(acc) * w_).sum(1) if Gw is not None else zeros
    m = (c * r * inv_n2).unsqueeze(1)
    d_h = m * w_
    d_w = m * (h_ - 2 * k.unsqueeze(1) * w_)
    if Gw is not None:
        d_h = d_h + b.unsqueeze(1) * Gw.to(acc)
        d_w = d_w + (c * k).unsqueeze(1) * Gw.to(acc)
    if Gh is not None:
        d_w = d_w + a.unsqueeze(1) * Gh.to(acc)
    return p + k * r, q - k * r, p + q, d_h, d_w


def _loss_row_grads(grad, stats_r, stats_f, fake_weight, wsum):
    """Per-row (g_fun, g_dir) of the SAN loss for both pairs, given the 0-d loss gradient."""
    acc = stats_r.dtype
    grad = grad.reshape(()).to(acc)
    s_r, s_f = stats_r[0], stats_f[0]
    scale_r = (-grad / s_r.shape[0]).expand_as(s_r)
    gfun_r = torch.where(1 - s_r > 0, scale_r, torch.zeros_like(scale_r))
    w = torch.ones_like(s_f) if fake_weight is None else fake_weight.detach().to(acc)
    scale_f = grad * w / wsum.reshape(()).to(acc)
    gfun_f = torch.where(1 + s_f > 0, scale_f, torch.zeros_like(scale_f))
    return gfun_r, scale_r, gfun_f, scale_f


def _loss_forward_torch(h_real, omega_real, h_fake, omega_fake, fake_weight, acc):
    stats_r = _stats_torch(h_real, omega_real, acc)
    stats_f = _stats_torch(h_fake, omega_fake, acc)
    s_r, s_f = stats_r[0], stats_f[0]
    w = torch.ones_like(s_f) if fake_weight is None else fake_weight.to(acc)
    wsum = w.sum()
    real = (torch.relu(1 - s_r) - s_r).mean()
    fake = (w * (torch.relu(1 + s_f) + s_f)).sum() / torch.where(wsum > 0, wsum, torch.ones_like(wsum))
    loss = torch.where(wsum > 0, real + fake, torch.full_like(wsum, float("nan")))
    return loss, stats_r, stats_f, wsum.reshape(1)


# ---------------------------------------------------------------------------------------------
# Custom ops: san_logits


@torch.library.custom_op("scadfast::san_logits", mutates_args=())
def _san_logits_op(h: torch.Tensor, omega: torch.Tensor, backend: str) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """(f_fun, f_dir, f, stats): logits in the promoted dtype, stats = [⟨h, ω⟩; ‖ω‖²] (2, B)."""
    if backend == "triton" and h.shape[0] > 0:
        return kernels("san").san_logits_forward(h, omega)
    out_dtype = torch.promote_types(h.dtype, omega.dtype)
    stats = _stats_torch(h, omega, acc_dtype(out_dtype))
    s = stats[0].to(out_dtype, copy=True)  # outputs of a custom op must not alias each other
    return s, s.clone(), s.clone(), stats


@_san_logits_op.register_fake
def _san_logits_fake(h, omega, backend):
    out_dtype = torch.promote_types(h.dtype, omega.dtype)
    B = h.shape[0]
    return (h.new_empty((B,), dtype=out_dtype), h.new_empty((B,), dtype=out_dtype),
            h.new_empty((B,), dtype=out_dtype), h.new_empty((2, B), dtype=acc_dtype(out_dtype)))


@torch.library.custom_op("scadfast::san_logits_backward", mutates_args=())
def _san_logits_backward_op(g_fun: torch.Tensor, g_dir: torch.Tensor, g_f: torch.Tensor, h: torch.Tensor,
                            omega: torch.Tensor, stats: torch.Tensor, backend: str) -> tuple[
    torch.Tensor, torch.Tensor
]:
    """(grad_h, grad_omega) of the three logits; see the module docstring for the formulas."""
    if backend == "triton" and h.shape[0] > 0:
        return kernels("san").san_logits_backward(g_fun, g_dir, g_f, h, omega, stats)
    return _logits_backward_torch(g_fun, g_dir, g_f, h, omega, stats)


@_san_logits_backward_op.register_fake
def _san_logits_backward_fake(g_fun, g_dir, g_f, h, omega, stats, backend):
    return torch.empty_like(h, memory_format=torch.contiguous_format), torch.empty_like(
        omega, memory_format=torch.contiguous_format)


def _san_logits_setup_context(ctx, inputs, output):
    h, omega, backend = inputs
    ctx.save_for_backward(h, omega, output[3])
    ctx.backend = backend
    ctx.mark_non_differentiable(output[3])


def _san_logits_vjp(ctx, g_fun, g_dir, g_f, _g_stats):
    h, omega, stats = ctx.saved_tensors
    gh, gw = _san_logits_backward_op(g_fun, g_dir, g_f, h, omega, stats, ctx.backend)
    return gh, gw, None


_san_logits_op.register_autograd(_san_logits_vjp, setup_context=_san_logits_setup_context)


def _san_logits_backward_setup_context(ctx, inputs, output):
    g_fun, g_dir, g_f, h, omega, _stats, _backend = inputs
    ctx.save_for_backward(g_fun, g_dir, g_f, h, omega)


def _san_logits_backward_vjp(ctx, Gh, Gw):
    g_fun, g_dir, g_f, h, omega = ctx.saved_tensors
    d_gfun, d_gdir, d_gf, d_h, d_w = _logits_backward_vjp_torch(g_fun, g_dir, g_f, h, omega, Gh, Gw)
    return (d_gfun.to(g_fun.dtype), d_gdir.to(g_dir.dtype), d_gf.to(g_f.dtype),
            d_h.to(h.dtype), d_w.to(omega.dtype), None, None)


_san_logits_backward_op.register_autograd(_san_logits_backward_vjp, setup_context=_san_logits_backward_setup_context)


# ---------------------------------------------------------------------------------------------
# Custom ops: san_d_loss


@torch.library.custom_op("scadfast::san_d_loss", mutates_args=())
def _san_d_loss_op(h_real: torch.Tensor, omega_real: torch.Tensor, h_fake: torch.Tensor,
                   omega_fake: torch.Tensor, fake_weight: Optional[torch.Tensor], backend: str) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """(loss, stats_real, stats_fake, weight_sum); only the 0-d loss is differentiable."""
    if backend == "triton":
        return kernels("san").san_d_loss_forward(h_real, omega_real, h_fake, omega_fake, fake_weight)
    acc = acc_dtype(h_real.dtype, omega_real.dtype, h_fake.dtype, omega_fake.dtype)
    return _loss_forward_torch(h_real, omega_real, h_fake, omega_fake, fake_weight, acc)


@_san_d_loss_op.register_fake
def _san_d_loss_fake(h_real, omega_real, h_fake, omega_fake, fake_weight, backend):
    acc = acc_dtype(h_real.dtype, omega_real.dtype, h_fake.dtype, omega_fake.dtype)
    return (h_real.new_empty((), dtype=acc), h_real.new_empty((2, h_real.shape[0]), dtype=acc),
            h_real.new_empty((2, h_fake.shape[0]), dtype=acc), h_real.new_empty((1,), dtype=acc))


@torch.library.custom_op("scadfast::san_d_loss_backward", mutates_args=())
def _san_d_loss_backward_op(grad: torch.Tensor, h_real: torch.Tensor, omega_real: torch.Tensor,
                            h_fake: torch.Tensor, omega_fake: torch.Tensor, fake_weight: Optional[torch.Tensor],
                            stats_r: torch.Tensor, stats_f: torch.Tensor, wsum: torch.Tensor,
                            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_h_real, grad_omega_real, grad_h_fake, grad_omega_fake) of the SAN loss."""
    if backend == "triton":
        return kernels("san").san_d_loss_backward(grad, h_real, omega_real, h_fake, omega_fake, fake_weight,
                                                  stats_r, stats_f, wsum)
    gfun_r, gdir_r, gfun_f, gdir_f = _loss_row_grads(grad, stats_r, stats_f, fake_weight, wsum)
    zr, zf = torch.zeros_like(gfun_r), torch.zeros_like(gfun_f)
    ghr, gwr = _logits_backward_torch(gfun_r, gdir_r, zr, h_real, omega_real, stats_r)
    ghf, gwf = _logits_backward_torch(gfun_f, gdir_f, zf, h_fake, omega_fake, stats_f)
    return ghr, gwr, ghf, gwf


@_san_d_loss_backward_op.register_fake
def _san_d_loss_backward_fake(grad, h_real, omega_real, h_fake, omega_fake, fake_weight, stats_r, stats_f, wsum, backend):
    cf = torch.contiguous_format
    return (torch.empty_like(h_real, memory_format=cf), torch.empty_like(omega_real, memory_format=cf),
            torch.empty_like(h_fake, memory_format=cf), torch.empty_like(omega_fake, memory_format=cf))


def _san_d_loss_setup_context(ctx, inputs, output):
    h_real, omega_real, h_fake, omega_fake, fake_weight, backend = inputs
    _loss, stats_r, stats_f, wsum = output
    ctx.save_for_backward(h_real, omega_real, h_fake, omega_fake, fake_weight, stats_r, stats_f, wsum)
    ctx.backend = backend
    ctx.mark_non_differentiable(stats_r, stats_f, wsum)


def _san_d_loss_vjp(ctx, grad, _gs_r, _gs_f, _g_wsum):
    h_real, omega_real, h_fake, omega_fake, fake_weight, stats_r, stats_f, wsum = ctx.saved_tensors
    ghr, gwr, ghf, gwf = _san_d_loss_backward_op(grad, h_real, omega_real, h_fake, omega_fake, fake_weight,
                                                 stats_r, stats_f, wsum, ctx.backend)
    return ghr, gwr, ghf, gwf, None, None  # fake_weight: no gradient by contract


_san_d_loss_op.register_autograd(_san_d_loss_vjp, setup_context=_san_d_loss_setup_context)


def _san_d_loss_backward_setup_context(ctx, inputs, output):
    grad, h_real, omega_real, h_fake, omega_fake, fake_weight, stats_r, stats_f, wsum, _ = inputs
    ctx.save_for_backward(grad, h_real, omega_real, h_fake, omega_fake, fake_weight, stats_r, stats_f, wsum)


def _san_d_loss_backward_vjp(ctx, Ghr, Gwr, Ghf, Gwf):
    grad, h_real, omega_real, h_fake, omega_fake, fake_weight, stats_r, stats_f, wsum = ctx.saved_tensors
    # The per-row factors depend on h, ω only through hinge indicators (derivative 0 a.e.), and
    # on the loss gradient linearly: g = grad · u with u the factors at grad = 1.
    one = torch.ones((), dtype=stats_r.dtype, device=stats_r.device)
    ufun_r, udir_r, ufun_f, udir_f = _loss_row_grads(one, stats_r, stats_f, fake_weight, wsum)
    G = grad.reshape(()).to(stats_r.dtype)
    zr, zf = torch.zeros_like(ufun_r), torch.zeros_like(ufun_f)
    dfun_r, ddir_r, _, dhr, dwr = _logits_backward_vjp_torch(G * ufun_r, G * udir_r, zr, h_real, omega_real, Ghr, Gwr)
    dfun_f, ddir_f, _, dhf, dwf = _logits_backward_vjp_torch(G * ufun_f, G * udir_f, zf, h_fake, omega_fake, Ghf, Gwf)
    d_grad = ((dfun_r * ufun_r).sum() + (ddir_r * udir_r).sum()
              + (dfun_f * ufun_f).sum() + (ddir_f * udir_f).sum())
    return (d_grad.to(grad.dtype).reshape(grad.shape), dhr.to(h_real.dtype), dwr.to(omega_real.dtype),
            dhf.to(h_fake.dtype), dwf.to(omega_fake.dtype), None, None, None, None, None)


_san_d_loss_backward_op.register_autograd(_san_d_loss_backward_vjp, setup_context=_san_d_loss_backward_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API


def san_logits(h: torch.Tensor, omega: torch.Tensor, impl: str = "auto"):
    """SAN logits ``(f_fun, f_dir, f)``, each of shape (B,), in the promoted dtype of the inputs.

    Args:
        h: discriminator features (B, D), float16/bfloat16/float32/float64, any strides.
        omega: text directions ω(c) (B, D), same device (the dtype may differ from ``h``).
        impl: ``"auto"`` | ``"ref"`` | ``"triton"`` (see :mod:`scadfast.ops._impl`).

    All three logits equal ``⟨h, ω⟩`` (accumulated in fp32, fp64 for fp64 inputs); their
    gradients differ as in the module docstring: ``f_fun`` trains h and ‖ω‖, ``f_dir`` trains the
    direction ω̂ only, ``f`` trains both (use it for G's loss and the MA-GP). The fused paths
    support double backward (``create_graph=True``).
    """
    _check_pair("san_logits", h, omega)
    path = resolve_impl(impl, "san_logits", h, _FUSED)
    if path == "ref":
        return san_logits_ref(h, omega)
    f_fun, f_dir, f, _stats = _san_logits_op(h, omega, path)
    return f_fun, f_dir, f


def san_d_loss(h_real: torch.Tensor, omega_real: torch.Tensor, h_fake: torch.Tensor,
               omega_fake: torch.Tensor, fake_weight: torch.Tensor | None = None,
               impl: str = "auto") -> torch.Tensor:
    """SAN discriminator loss (a 0-d tensor to minimise), docs/design.md §5.3:

        mean relu(1 − f_fun_r) + wmean relu(1 + f_fun_f) − (mean f_dir_r − wmean f_dir_f)

    where ``mean`` runs over the B_real rows of (``h_real``, ``omega_real``), ``wmean x =
    Σ wᵢxᵢ / Σ wᵢ`` over the B_fake rows of (``h_fake``, ``omega_fake``) with ``w = fake_weight``
    (shape (B_fake,), default all ones). B_fake may differ from B_real, so fake pairs (x_f, s)
    and mismatched pairs (x_r, s̃) can share one call, e.g. with weights 1 and ½ as in docs/design.md §5.2.

    Args:
        h_real, omega_real: (B_real, D) real-pair features and text directions.
        h_fake, omega_fake: (B_fake, D) fake (and mismatched) pairs; same D and device.
        fake_weight: optional (B_fake,) non-negative weights with a positive sum. It is treated
            as a constant: **no gradient** flows to it. A non-positive sum raises on CPU; on a GPU
            (where checking would need a host sync) and under ``torch.compile`` the loss is NaN.
        impl: ``"auto"`` | ``"ref"`` | ``"triton"``.

    Returns the loss in fp32 (fp64 if any input is fp64); logits are accumulated in that dtype.
    The fused paths compute it in one kernel (deterministic reduction) and its gradient in one
    kernel, and support double backward.
    """
    op = "san_d_loss"
    _check_loss_inputs(op, h_real, omega_real, h_fake, omega_fake, fake_weight)
    path = resolve_impl(impl, op, h_real, _FUSED)
    if path == "ref":
        return san_d_loss_ref(h_real, omega_real, h_fake, omega_fake, fake_weight)
    fw = None if fake_weight is None else fake_weight.detach()
    loss, _sr, _sf, _ws = _san_d_loss_op(h_real, omega_real, h_fake, omega_fake, fw, path)
    return loss
