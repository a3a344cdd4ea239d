"""Hinge loss over any logit shape (PatchGAN maps, per-patch or per-sample logits): docs/design.md §5.2 / §5.4.

    loss = mean(relu(1 - x))   real logits
    loss = mean(relu(1 + x))   fake logits

With ``weight`` (broadcastable to the logits) the mean becomes ``Σ w·l / Σ w`` over the broadcast
shape, e.g. a per-sample weight ``(B, 1, 1, 1)`` on a ``(B, 1, H, W)`` map, or a full-shape mask.
The weight is a constant: it never receives a gradient (in every ``impl``, the reference included).
Weights must be non-negative with a positive sum (as ``san_d_loss``'s ``fake_weight``): a CPU weight
that breaks this raises ``ValueError`` in every ``impl``; where the check would cost a device sync (a
GPU weight, under ``torch.compile``) it is not made and a zero sum gives inf/NaN, as the formula does.

Paths (``impl``, see :mod:`scadfast.ops._impl`):

``"ref"``    :func:`patch_hinge_loss_ref`, plain autograd-visible torch.
``"triton"`` the kernels in :mod:`scadfast.kernels.patch_hinge`: forward is one pass over the data
             (one launch for small inputs, else per-program partials plus a one-program
             deterministic finishing reduce — no atomics), backward is one pass, one launch.
``"auto"``   Triton on CUDA; on CPU the same custom ops with backend ``"torch"``: a hand-written
             torch forward and backward (no autograd graph of intermediates is kept).

The fused paths are the custom ops ``scadfast::patch_hinge_loss`` (returns the loss and ``Σ w``, saved
for backward) and ``scadfast::patch_hinge_loss_backward`` (the gradient, contiguous, in the logits'
dtype), with fake implementations for ``torch.compile`` and registered autograd. The backward op has
its own autograd formula (the gradient is linear in the incoming gradient and piecewise constant in the
logits), so double backward — ``gradgradcheck``, gradient penalties through the loss — works.

Dtypes: fp16/bf16/fp32/fp64 logits; accumulation and the loss are fp32 (fp64 for fp64 logits); the
gradient has the logits' dtype. Any layout is accepted without a copy (strided views, expanded
weights).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._impl import acc_dtype, check_same_device, check_tensor, kernels, resolve_impl

__all__ = ["patch_hinge_loss", "patch_hinge_loss_ref"]

_OP = "patch_hinge_loss"
_FUSED = ("triton",)


# ---------------------------------------------------------------------------------------------
# Validation


def _validate(logits, real, weight) -> None:
    check_tensor(_OP, "logits", logits)
    if not isinstance(real, bool):
        raise TypeError(f"{_OP}: real must be a Python bool, got {type(real).__name__}")
    if logits.numel() == 0:
        raise ValueError(f"{_OP}: logits is empty (shape {tuple(logits.shape)}); the mean is undefined")
    if weight is None:
        return
    check_tensor(_OP, "weight", weight)
    check_same_device(_OP, logits=logits, weight=weight)
    try:
        ok = tuple(torch.broadcast_shapes(weight.shape, logits.shape)) == tuple(logits.shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{_OP}: weight of shape {tuple(weight.shape)} is not broadcastable to logits of shape "
            f"{tuple(logits.shape)}"
        )
    # Checked only where it costs no device sync: a plain CPU tensor in eager mode (as san_d_loss).
    if weight.device.type == "cpu" and type(weight) is torch.Tensor and not torch.compiler.is_compiling():
        w = weight.detach()
        wsum = float(w.double().sum())
        if not wsum > 0:
            raise ValueError(f"{_OP}: weight must have a positive sum, got {wsum} (the weighted mean "
                             f"Σw·l/Σw is undefined)")
        if bool((w < 0).any()):
            raise ValueError(f"{_OP}: weight must be non-negative, got a minimum of {float(w.min())}")


# ---------------------------------------------------------------------------------------------
# Reference


def patch_hinge_loss_ref(logits: torch.Tensor, real: bool, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``mean(relu(1 - x))`` for real, ``mean(relu(1 + x))`` for fake; fp32 result for half inputs.

    ``weight`` (broadcastable to ``logits``) turns the mean into ``Σ w·l / Σ w`` over the broadcast shape;
    it is treated as a constant (detached).
    """
    acc = acc_dtype(logits.dtype)
    x = logits.to(acc)
    l = torch.relu(1 - x) if real else torch.relu(1 + x)
    if weight is None:
        return l.mean()
    w = weight.detach().to(acc).expand_as(x)
    return (l * w).sum() / w.sum()


# ---------------------------------------------------------------------------------------------
# The op's math in PyTorch (backend "torch"): hand-written forward / backward (the kernels' math).


def _forward_torch(x: torch.Tensor, w: torch.Tensor | None, real: bool):
    acc = acc_dtype(x.dtype)
    xa = x.to(acc)
    l = torch.relu(1 - xa) if real else torch.relu(1 + xa)
    n = x.numel()
    if w is None:
        return l.mean(), l.new_full((), float(n))
    wa = w.to(acc)
    # Broadcasting repeats every weight element numel(x) / numel(w) times.
    denom = wa.sum() * (n // w.numel())
    return (l * wa).sum() / denom, denom


def _backward_torch(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None, denom: torch.Tensor, real: bool):
    # relu(1 - x) is active where -x > -1, relu(1 + x) where x > -1 (exactly the same sets as
    # 1 ∓ x > 0 in floating point). threshold_backward zeroes where its input is <= the threshold, so
    # NaN logits pass the gradient on as in autograd through relu, and it is one vectorised pass.
    acc = acc_dtype(x.dtype)
    xa = x.to(acc)
    coef = g.to(acc) / denom.to(acc)
    if w is not None:
        coef = coef * w.to(acc)
    if real:
        coef, xa = -coef, torch.neg(xa)
    gx = torch.ops.aten.threshold_backward(coef.expand(x.shape), xa, -1.0)
    return gx.to(x.dtype).contiguous()


def _coef(x: torch.Tensor, w: torch.Tensor | None, denom: torch.Tensor, real: bool) -> torch.Tensor:
    """∂loss/∂x per element for a unit incoming gradient (plain torch, in the accumulation dtype)."""
    xa = x.detach().to(acc_dtype(x.dtype))
    inactive = (1 - xa <= 0) if real else (1 + xa <= 0)
    c = (-1.0 if real else 1.0) / denom.detach().to(xa.dtype)
    if w is not None:
        c = c * w.detach().to(xa.dtype)
    return torch.where(inactive, 0.0, c)


# ---------------------------------------------------------------------------------------------
# Custom ops


@torch.library.custom_op("scadfast::patch_hinge_loss", mutates_args=())
def _patch_hinge_loss_op(logits: torch.Tensor, weight: Optional[torch.Tensor], real: bool,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, Σw) as 0-dim tensors in the accumulation dtype; ``backend`` is "triton" or "torch"."""
    if backend == "triton":
        return kernels("patch_hinge").patch_hinge_forward(logits, weight, real)
    return _forward_torch(logits, weight, real)


@_patch_hinge_loss_op.register_fake
def _patch_hinge_loss_fake(logits, weight, real, backend):
    acc = acc_dtype(logits.dtype)
    return logits.new_empty((), dtype=acc), logits.new_empty((), dtype=acc)


@torch.library.custom_op("scadfast::patch_hinge_loss_backward", mutates_args=())
def _patch_hinge_loss_backward_op(grad: torch.Tensor, logits: torch.Tensor, weight: Optional[torch.Tensor],
                                  denom: torch.Tensor, real: bool, backend: str) -> torch.Tensor:
    """∂loss/∂logits (contiguous, logits' dtype) for the 0-dim incoming gradient ``grad``."""
    if backend == "triton":
        return kernels("patch_hinge").patch_hinge_backward(grad, denom, logits, weight, real)
    return _backward_torch(grad, logits, weight, denom, real)


@_patch_hinge_loss_backward_op.register_fake
def _patch_hinge_loss_backward_fake(grad, logits, weight, denom, real, backend):
    return logits.new_empty(logits.shape)


def _patch_hinge_loss_setup_context(ctx, inputs, output):
    logits, weight, real, backend = inputs
    ctx.real, ctx.backend = real, backend
    ctx.save_for_backward(logits, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _patch_hinge_loss_vjp(ctx, grad_loss, grad_denom):
    logits, weight, denom = ctx.saved_tensors
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    grad_x = _patch_hinge_loss_backward_op(grad_loss, logits, weight, denom, ctx.real, ctx.backend)
    return grad_x, None, None, None


_patch_hinge_loss_op.register_autograd(_patch_hinge_loss_vjp, setup_context=_patch_hinge_loss_setup_context)


def _patch_hinge_loss_backward_setup_context(ctx, inputs, output):
    grad, logits, weight, denom, real, backend = inputs
    ctx.real = real
    ctx.grad_dtype = grad.dtype
    ctx.save_for_backward(logits, weight, denom)


def _patch_hinge_loss_backward_vjp(ctx, gg):
    # grad_x = grad · c(x) with c piecewise constant in x: ∂/∂grad = Σ gg·c(x), ∂/∂x = 0 almost
    # everywhere; weight and Σw are constants. Plain torch, so this is differentiable again.
    logits, weight, denom = ctx.saved_tensors
    if gg is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    c = _coef(logits, weight, denom, ctx.real)
    g_grad = (gg.to(c.dtype) * c).sum().to(ctx.grad_dtype)
    return g_grad, None, None, None, None, None


_patch_hinge_loss_backward_op.register_autograd(_patch_hinge_loss_backward_vjp,
                                                setup_context=_patch_hinge_loss_backward_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API


def patch_hinge_loss(
    logits: torch.Tensor, real: bool, weight: torch.Tensor | None = None, impl: str = "auto"
) -> torch.Tensor:
    """Hinge loss ``mean(relu(1 ∓ logits))`` over all elements, as a 0-dim tensor.

    Args:
        logits: float tensor (fp16/bf16/fp32/fp64) of any non-empty shape and layout, e.g. a PatchGAN
            map ``(B, 1, H, W)`` or per-sample logits ``(B,)``.
        real: ``True`` for logits of real samples (``relu(1 - x)``), ``False`` for fake ones
            (``relu(1 + x)``). Must be a Python ``bool``.
        weight: optional float tensor broadcastable to ``logits.shape``; the loss becomes
            ``Σ w·l / Σ w`` over the broadcast shape. Gets no gradient.
        impl: ``"auto"`` (default), ``"ref"`` or ``"triton"``; see the module docstring.

    Returns:
        the loss, fp32 (fp64 for fp64 logits). Its gradient w.r.t. ``logits`` has the logits' dtype.

    Raises:
        TypeError: non-tensor or non-float ``logits``/``weight``, ``real`` not a bool.
        ValueError: empty ``logits``, ``weight`` not broadcastable to ``logits`` (both shapes named),
            a CPU ``weight`` with a negative entry or a non-positive sum, tensors on different
            devices, unknown ``impl``.
        RuntimeError: ``impl="triton"`` where Triton cannot run.
    """
    _validate(logits, real, weight)
    path = resolve_impl(impl, _OP, logits, _FUSED)
    if path == "ref":
        return patch_hinge_loss_ref(logits, real, weight)
    if weight is not None:
        weight = weight.detach()
    loss, _denom = _patch_hinge_loss_op(logits, weight, real, path)
    return loss
