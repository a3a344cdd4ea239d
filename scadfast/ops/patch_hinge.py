"""Hinge loss over any logit shape (PatchGAN maps, per-sample logits): SPEC §5.2 / §5.4."""

from __future__ import annotations

import torch


def patch_hinge_loss_ref(logits: torch.Tensor, real: bool, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``mean(relu(1 - x))`` for real, ``mean(relu(1 + x))`` for fake; fp32 result for half inputs.

    ``weight`` (broadcastable to ``logits``) turns the mean into ``Σ w·l / Σ w`` over the broadcast shape.
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(acc)
    l = torch.relu(1 - x) if real else torch.relu(1 + x)
    if weight is None:
        return l.mean()
    w = weight.to(acc).expand_as(x)
    return (l * w).sum() / w.sum()


def patch_hinge_loss(logits, real, weight=None, impl="auto"):
    return patch_hinge_loss_ref(logits, real, weight)
