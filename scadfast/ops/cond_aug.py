"""Conditioning augmentation (StackGAN), SPEC §6."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def cond_aug(s, weight, bias, eps=None, mode="glu", impl="auto"):
    return cond_aug_ref(s, weight, bias, eps, mode)


class CondAug(torch.nn.Module):
    """Conditioning augmentation module: ``CondAug(d_in, E, mode)(s) -> (c_hat, mu, logvar, kl)``."""

    def __init__(self, d_in: int, E: int = 128, mode: str = "glu", impl: str = "auto"):
        super().__init__()
        self.E, self.mode, self.impl = E, mode, impl
        self.fc = torch.nn.Linear(d_in, (4 if mode == "glu" else 2) * E)

    def forward(self, s, eps=None):
        return cond_aug(s, self.fc.weight, self.fc.bias, eps=eps, mode=self.mode, impl=self.impl)
