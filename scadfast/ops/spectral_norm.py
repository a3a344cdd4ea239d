"""Spectral normalisation with a fused power iteration (drop-in for torch's parametrization)."""

from __future__ import annotations

import torch


def spectral_norm(module, name="weight", n_power_iterations=1, eps=1e-12, dim=None, impl="auto"):
    # Interim: torch's own parametrization (the reference); the fused path replaces this.
    return torch.nn.utils.parametrizations.spectral_norm(module, name, n_power_iterations, eps, dim)


def spectral_norm_all(module, n_power_iterations=1, eps=1e-12, impl="auto"):
    for m in list(module.modules()):
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear, torch.nn.ConvTranspose2d)):
            spectral_norm(m, n_power_iterations=n_power_iterations, eps=eps, impl=impl)
    return module
