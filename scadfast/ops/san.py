"""SAN (slicing adversarial network) logits and discriminator loss, adapted to text (SPEC §5.3).

Given the discriminator feature ``h = h(x, c)`` of shape (B, D) and the text direction
``omega = ω(c)`` (B, D), with ``n = ‖ω‖`` and ``ω̂ = ω / n``:

    f_fun = ⟨h·n, sg(ω̂)⟩      trains h (and the scale n)  — the "function" part
    f_dir = ⟨sg(h·n), ω̂⟩      trains the direction ω̂      — the "direction" part
    f     = ⟨h·n, ω̂⟩          what G and the MA-GP see (= ⟨h, ω⟩ in value)

All three have the same value; they differ only in where gradients flow.
"""

from __future__ import annotations

import torch

from ._impl import check_same_device, check_tensor

_EPS = 1e-12


def _check(op, h, omega):
    check_tensor(op, "h", h, ndim=2)
    check_tensor(op, "omega", omega, ndim=2)
    check_same_device(op, h=h, omega=omega)
    if h.shape != omega.shape:
        raise ValueError(f"{op}: h and omega must have the same shape (B, D), got {tuple(h.shape)} and {tuple(omega.shape)}")


def san_logits_ref(h: torch.Tensor, omega: torch.Tensor):
    """Reference: (f_fun, f_dir, f), each (B,), computed in fp32 (fp64 for fp64 inputs)."""
    out_dtype = torch.promote_types(h.dtype, omega.dtype)
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    h32, w32 = h.to(acc), omega.to(acc)
    n = w32.norm(dim=1, keepdim=True).clamp_min(_EPS)
    w_hat = w32 / n
    hs = h32 * n
    f_fun = (hs * w_hat.detach()).sum(1)
    f_dir = (hs.detach() * w_hat).sum(1)
    f = (hs * w_hat).sum(1)
    return f_fun.to(out_dtype), f_dir.to(out_dtype), f.to(out_dtype)


def _wmean(x, w):
    if w is None:
        return x.mean()
    return (x * w).sum() / w.sum()


def san_d_loss_ref(h_real, omega_real, h_fake, omega_fake, fake_weight=None):
    """Reference SAN discriminator loss (a scalar to minimise):

    ``mean relu(1 − f_fun_r) + wmean relu(1 + f_fun_f) − (mean f_dir_r − wmean f_dir_f)``
    """
    fr, dr, _ = san_logits_ref(h_real, omega_real)
    ff, df, _ = san_logits_ref(h_fake, omega_fake)
    w = None if fake_weight is None else fake_weight.to(ff.dtype if ff.dtype == torch.float64 else torch.float32)
    fr, dr, ff, df = (t.float() if t.dtype != torch.float64 else t for t in (fr, dr, ff, df))
    return (torch.relu(1 - fr).mean() + _wmean(torch.relu(1 + ff), w) - (dr.mean() - _wmean(df, w)))


# Public API; the fused paths replace this routing (owned by the SAN-op work).
def san_logits(h, omega, impl="auto"):
    _check("san_logits", h, omega)
    return san_logits_ref(h, omega)


def san_d_loss(h_real, omega_real, h_fake, omega_fake, fake_weight=None, impl="auto"):
    _check("san_d_loss", h_real, omega_real)
    _check("san_d_loss", h_fake, omega_fake)
    return san_d_loss_ref(h_real, omega_real, h_fake, omega_fake, fake_weight)
