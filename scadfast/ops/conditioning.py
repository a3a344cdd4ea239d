"""Conditioning augmentation (StackGAN), docs/design.md §6 — reference and fused op.

    c_hat, mu, logvar, kl = cond_aug(s, weight, bias, eps=None, mode="glu")

``a = s @ weight.T + bias`` (``weight`` in ``nn.Linear`` layout); ``mode="glu"``: weight is (4E, d) and
``a = a[:, :2E] * sigmoid(a[:, 2E:])``; ``mode="relu"``: weight is (2E, d) and ``a = relu(a)``. Then
``mu, logvar = a[:, :E], a[:, E:]``, ``c_hat = mu + exp(logvar / 2) * eps`` and
``kl = -0.5 * mean(1 + logvar - mu² - exp(logvar))``.

Fused path (``impl="auto"`` or ``"cuda"``): the linear layer stays one PyTorch matmul (``F.linear``, i.e.
addmm); everything after it — split, GLU/ReLU, reparameterisation and the KL mean — is ONE kernel of the
C++/CUDA extension ``scadfast._C`` (C++ with ``at::parallel_for`` on CPU, CUDA on GPU), and its backward
(gradients wrt ``a`` and ``eps`` from the four output gradients) is ONE kernel too. The kernels are wrapped
as two ``torch.library.custom_op``s in namespace ``scadfast``:

``scadfast::cond_aug(a, eps, mode, backend) -> (c_hat, mu, logvar, kl)``
    fake impl + autograd (backward = ``scadfast::cond_aug_backward``), so it runs under
    ``torch.compile(fullgraph=True)``. ``backend`` is ``"cpu"`` (the C++ kernel) or ``"cuda"``.
``scadfast::cond_aug_backward(a, eps, grad_c_hat, grad_mu, grad_logvar, grad_kl, mode, backend) -> (grad_a, grad_eps)``
    fake impl + autograd written in plain PyTorch (the analytic Hessian-vector products), so the op is
    differentiable twice (``create_graph=True``, gradient penalties) and further (plain autograd from
    there on).

``impl`` (see :mod:`scadfast.ops._impl`): ``"ref"`` the pure-PyTorch reference; ``"auto"`` the extension's
CPU kernel on CPU tensors and its CUDA kernel on CUDA tensors, falling back to the reference with one
``RuntimeWarning`` when the extension (or its CUDA part) is not available; ``"cuda"`` the extension's CUDA
kernel, raising if it is not available or the tensors are not on a CUDA device (the CPU kernel is
``impl="auto"`` on CPU tensors). An empty batch (B = 0) raises: the KL mean is undefined.

Dtypes: float16/bfloat16/float32/float64; all tensors share ``s``'s dtype. Arithmetic is fp32 for the half
types (fp64 for fp64); ``c_hat``, ``mu``, ``logvar`` come back in the input dtype, ``kl`` is a 0-dim fp32
tensor (fp64 for fp64 inputs). The fused path rounds each output once from fp32, whereas the reference
rounds ``mu``/``logvar`` before computing ``c_hat`` and ``kl``, so half-precision results differ from the
reference by a few ulps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._impl import acc_dtype, check_impl, check_same_device, check_tensor, require_extension, resolve_impl

__all__ = ["cond_aug", "cond_aug_ref", "CondAug"]

_OP = "cond_aug"
_FUSED = ("cuda",)
MODES = ("glu", "relu")
_PARTS = {"glu": 4, "relu": 2}


# ---------------------------------------------------------------------------------------------
# Validation


def _validate(s, weight, bias, eps, mode) -> int:
    """Check the arguments; return E."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"{_OP}: mode must be one of {MODES}, got {mode!r}")
    check_tensor(_OP, "s", s, ndim=2)
    check_tensor(_OP, "weight", weight, ndim=2)
    if bias is not None:
        check_tensor(_OP, "bias", bias, ndim=1)
    if eps is not None:
        check_tensor(_OP, "eps", eps, ndim=2)
    check_same_device(_OP, s=s, weight=weight, bias=bias, eps=eps)
    for name, t in (("weight", weight), ("bias", bias), ("eps", eps)):
        if t is not None and t.dtype != s.dtype:
            raise TypeError(f"{_OP}: {name} has dtype {t.dtype} but s has dtype {s.dtype}; they must match")
    B, d = s.shape
    if B == 0:
        raise ValueError(f"{_OP}: s is an empty batch (shape {tuple(s.shape)}); the KL mean needs at least one row")
    rows, d_w = weight.shape
    parts = _PARTS[mode]
    if rows == 0 or rows % parts:
        other = "relu" if mode == "glu" else "glu"
        raise ValueError(
            f"{_OP}: mode={mode!r} needs weight of shape ({parts}E, d) (mode={other!r}: "
            f"({_PARTS[other]}E, d)); got weight of shape {tuple(weight.shape)}, whose {rows} rows are "
            f"not a positive multiple of {parts}"
        )
    if d_w != d:
        raise ValueError(
            f"{_OP}: weight of shape {tuple(weight.shape)} expects d={d_w} input features but s has shape "
            f"{tuple(s.shape)} (d={d})"
        )
    if bias is not None and bias.shape[0] != rows:
        raise ValueError(f"{_OP}: bias must have shape ({rows},) to match weight {tuple(weight.shape)}, "
                         f"got {tuple(bias.shape)}")
    E = rows // parts
    if eps is not None and tuple(eps.shape) != (B, E):
        raise ValueError(f"{_OP}: eps must have shape (B, E) = ({B}, {E}), got {tuple(eps.shape)}")
    return E


# ---------------------------------------------------------------------------------------------
# Reference


def cond_aug_ref(s, weight, bias, eps=None, mode="glu"):
    """Reference: ``(c_hat, mu, logvar, kl)``.

    ``a = s @ weight.T + bias``; ``mode="glu"``: weight is (4E, d), ``a = a[:, :2E] * sigmoid(a[:, 2E:])``;
    ``mode="relu"``: weight is (2E, d), ``a = relu(a)``. ``mu, logvar = a[:, :E], a[:, E:]``;
    ``c_hat = mu + exp(logvar / 2) * eps``; ``kl = -0.5 * mean(1 + logvar - mu² - exp(logvar))``.
    """
    a = F.linear(s, weight, bias)
    a = F.glu(a, dim=1) if mode == "glu" else torch.relu(a)
    E = a.shape[1] // 2
    mu, logvar = a[:, :E], a[:, E:]
    if eps is None:
        eps = torch.randn_like(mu)
    c_hat = mu + torch.exp(0.5 * logvar) * eps
    lv = logvar.float() if logvar.dtype != torch.float64 else logvar
    m = mu.float() if mu.dtype != torch.float64 else mu
    kl = -0.5 * torch.mean(1 + lv - m.pow(2) - lv.exp())
    return c_hat, mu, logvar, kl


# ---------------------------------------------------------------------------------------------
# Custom ops around the extension's kernels: the C++ kernel for backend "cpu", the CUDA kernel for
# backend "cuda" (the extension picks the kernel by the tensors' device; backend must agree with it).


def _extension(op: str, a: torch.Tensor, backend: str):
    if backend != a.device.type:
        raise ValueError(f"{op}: backend={backend!r} does not run tensors on {a.device}")
    return require_extension(op)


@torch.library.custom_op("scadfast::cond_aug", mutates_args=())
def _cond_aug_op(a: torch.Tensor, eps: torch.Tensor, mode: str,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused elementwise part: ``a`` (B, 4E|2E) pre-activation, ``eps`` (B, E) -> (c_hat, mu, logvar, kl)."""
    c_hat, mu, logvar, kl = _extension("scadfast::cond_aug", a, backend).cond_aug_forward(a, eps, mode == "glu")
    return c_hat, mu, logvar, kl


@_cond_aug_op.register_fake
def _cond_aug_fake(a, eps, mode, backend):
    B, E = eps.shape
    kl = a.new_empty((), dtype=acc_dtype(a.dtype))
    return a.new_empty((B, E)), a.new_empty((B, E)), a.new_empty((B, E)), kl


@torch.library.custom_op("scadfast::cond_aug_backward", mutates_args=())
def _cond_aug_backward_op(
    a: torch.Tensor,
    eps: torch.Tensor,
    grad_c_hat: torch.Tensor,
    grad_mu: torch.Tensor,
    grad_logvar: torch.Tensor,
    grad_kl: torch.Tensor,
    mode: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused backward: gradients wrt ``a`` and ``eps`` (recomputes mu/logvar from ``a``)."""
    grad_a, grad_eps = _extension("scadfast::cond_aug_backward", a, backend).cond_aug_backward(
        a, eps, grad_c_hat, grad_mu, grad_logvar, grad_kl, mode == "glu"
    )
    return grad_a, grad_eps


@_cond_aug_backward_op.register_fake
def _cond_aug_backward_fake(a, eps, grad_c_hat, grad_mu, grad_logvar, grad_kl, mode, backend):
    return torch.empty_like(a, memory_format=torch.contiguous_format), torch.empty_like(
        eps, memory_format=torch.contiguous_format
    )


def _cond_aug_setup_context(ctx, inputs, output):
    a, eps, mode, backend = inputs
    ctx.save_for_backward(a, eps)
    ctx.mode, ctx.backend = mode, backend


def _cond_aug_vjp(ctx, grad_c_hat, grad_mu, grad_logvar, grad_kl):
    a, eps = ctx.saved_tensors
    if grad_c_hat is None:
        grad_c_hat = torch.zeros_like(eps)
    if grad_mu is None:
        grad_mu = torch.zeros_like(eps)
    if grad_logvar is None:
        grad_logvar = torch.zeros_like(eps)
    if grad_kl is None:
        grad_kl = a.new_zeros((), dtype=acc_dtype(a.dtype))
    grad_a, grad_eps = _cond_aug_backward_op(
        a, eps, grad_c_hat, grad_mu, grad_logvar, grad_kl, ctx.mode, ctx.backend
    )
    return grad_a, grad_eps, None, None


_cond_aug_op.register_autograd(_cond_aug_vjp, setup_context=_cond_aug_setup_context)


def _cond_aug_backward_setup_context(ctx, inputs, output):
    a, eps, grad_c_hat, grad_mu, grad_logvar, grad_kl, mode, backend = inputs
    ctx.save_for_backward(a, eps, grad_c_hat, grad_mu, grad_logvar, grad_kl)
    ctx.mode = mode


def _cond_aug_backward_vjp(ctx, gg_a, gg_eps):
    """Vector-Jacobian product of the backward op, in plain PyTorch (so it is differentiable again).

    With ``gM = grad_mu + grad_c + k·mu`` and ``gL = grad_lv + grad_c·eps·std/2 - k·(1 - var)/2``
    (``k = grad_kl / (B·E)``, ``std = exp(lv/2)``, ``var = exp(lv)``), the backward returns
    ``grad_a = [gM·∂mu/∂a, gL·∂lv/∂a]`` and ``grad_eps = grad_c·std``. Contracting its outputs with the
    cotangents ``(gg_a, gg_eps)`` gives the scalar ``Φ = Σ gM·P_M + gL·P_L + gg_eps·grad_c·std`` where
    ``P_M = gg_a·∂mu/∂a`` and ``P_L = gg_a·∂lv/∂a``; the returned tensors are the gradients of Φ.
    """
    a, eps, gc, gm, glv, gk = ctx.saved_tensors
    glu = ctx.mode == "glu"
    acc = acc_dtype(a.dtype)
    B, E = eps.shape
    n = float(B * E)
    if gg_a is None:
        gg_a = torch.zeros_like(a)
    if gg_eps is None:
        gg_eps = torch.zeros_like(eps)

    a_, eps_, gc_, gm_, glv_ = (t.to(acc) for t in (a, eps, gc, gm, glv))
    gga, gge = gg_a.to(acc), gg_eps.to(acc)
    k = gk.to(acc).reshape(()) / n

    if glu:
        x_mu, x_lv, g_mu, g_lv = a_.split(E, dim=1)
        gx_mu, gx_lv, gg_mu, gg_lv = gga.split(E, dim=1)
        s_mu, s_lv = torch.sigmoid(g_mu), torch.sigmoid(g_lv)
        ds_mu, ds_lv = s_mu * (1 - s_mu), s_lv * (1 - s_lv)
        mu, lv = x_mu * s_mu, x_lv * s_lv
        p_mu = gx_mu * s_mu + gg_mu * x_mu * ds_mu
        p_lv = gx_lv * s_lv + gg_lv * x_lv * ds_lv
    else:
        x_mu, x_lv = a_.split(E, dim=1)
        gx_mu, gx_lv = gga.split(E, dim=1)
        m_mu, m_lv = (x_mu > 0).to(acc), (x_lv > 0).to(acc)
        mu, lv = x_mu * m_mu, x_lv * m_lv
        p_mu, p_lv = gx_mu * m_mu, gx_lv * m_lv

    std = torch.exp(0.5 * lv)
    var = torch.exp(lv)
    g_M = gm_ + gc_ + k * mu
    g_L = glv_ + 0.5 * gc_ * eps_ * std - 0.5 * k * (1 - var)

    d_gm = p_mu
    d_glv = p_lv
    d_gc = p_mu + 0.5 * eps_ * std * p_lv + gge * std
    d_gk = (mu * p_mu - 0.5 * (1 - var) * p_lv).sum() / n
    d_eps = 0.5 * gc_ * std * p_lv
    # dΦ/dmu and dΦ/dlv through gM, gL and std, then the second derivatives of mu(a), lv(a).
    c_mu = k * p_mu
    c_lv = p_lv * (0.25 * gc_ * eps_ * std + 0.5 * k * var) + 0.5 * gge * gc_ * std
    if glu:
        d_x_mu = c_mu * s_mu + g_M * gg_mu * ds_mu
        d_g_mu = c_mu * x_mu * ds_mu + g_M * ds_mu * (gx_mu + gg_mu * x_mu * (1 - 2 * s_mu))
        d_x_lv = c_lv * s_lv + g_L * gg_lv * ds_lv
        d_g_lv = c_lv * x_lv * ds_lv + g_L * ds_lv * (gx_lv + gg_lv * x_lv * (1 - 2 * s_lv))
        d_a = torch.cat([d_x_mu, d_x_lv, d_g_mu, d_g_lv], dim=1)
    else:
        d_a = torch.cat([c_mu * m_mu, c_lv * m_lv], dim=1)
    return (
        d_a.to(a.dtype),
        d_eps.to(eps.dtype),
        d_gc.to(gc.dtype),
        d_gm.to(gm.dtype),
        d_glv.to(glv.dtype),
        d_gk.to(gk.dtype).reshape(gk.shape),
        None,
        None,
    )


_cond_aug_backward_op.register_autograd(_cond_aug_backward_vjp, setup_context=_cond_aug_backward_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API


def cond_aug(s, weight, bias, eps=None, mode="glu", impl="auto"):
    """Conditioning augmentation: ``(c_hat, mu, logvar, kl)`` for text embeddings ``s`` (B, d).

    Args:
        s: (B, d) float16/bfloat16/float32/float64 sentence embeddings.
        weight: (4E, d) for ``mode="glu"``, (2E, d) for ``mode="relu"`` (``nn.Linear`` layout), s's dtype.
        bias: (4E,) / (2E,) or None.
        eps: (B, E) standard-normal noise, or None to sample it with ``torch.randn_like(mu)`` semantics
            (torch's global RNG, so ``torch.manual_seed`` gives the same noise as the reference).
        mode: ``"glu"`` (StackGAN-v2) or ``"relu"`` (StackGAN-v1).
        impl: ``"auto"``, ``"ref"`` or ``"cuda"`` (see the module docstring).

    Returns:
        ``c_hat``, ``mu``, ``logvar`` of shape (B, E) in s's dtype, and ``kl``, a 0-dim tensor (fp32, or
        fp64 for fp64 inputs). All are differentiable wrt s, weight, bias and eps, twice over.
    """
    E = _validate(s, weight, bias, eps, mode)
    path = resolve_impl(impl, _OP, s, _FUSED, host="cpu", arg="s")
    if path == "ref":
        return cond_aug_ref(s, weight, bias, eps, mode)
    a = F.linear(s, weight, bias)
    if eps is None:
        # Same draw as torch.randn_like(mu) in the reference (mu is a (B, E) tensor of s's dtype).
        eps = torch.randn((s.shape[0], E), dtype=s.dtype, device=s.device)
    c_hat, mu, logvar, kl = _cond_aug_op(a, eps, mode, path)
    return c_hat, mu, logvar, kl


class CondAug(torch.nn.Module):
    """Conditioning augmentation module: ``CondAug(d_in, E, mode)(s, eps=None) -> (c_hat, mu, logvar, kl)``.

    Holds ``fc = nn.Linear(d_in, 4E)`` (glu) or ``nn.Linear(d_in, 2E)`` (relu) and calls :func:`cond_aug`.
    """

    def __init__(self, d_in: int, E: int = 128, mode: str = "glu", impl: str = "auto"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"CondAug: mode must be one of {MODES}, got {mode!r}")
        if E <= 0 or d_in <= 0:
            raise ValueError(f"CondAug: d_in and E must be positive, got d_in={d_in}, E={E}")
        check_impl(impl, "CondAug", ("auto", "ref") + _FUSED)
        self.E, self.mode, self.impl = E, mode, impl
        self.fc = torch.nn.Linear(d_in, _PARTS[mode] * E)

    def forward(self, s, eps=None):
        return cond_aug(s, self.fc.weight, self.fc.bias, eps=eps, mode=self.mode, impl=self.impl)

    def extra_repr(self) -> str:
        return f"d_in={self.fc.in_features}, E={self.E}, mode={self.mode!r}, impl={self.impl!r}"
