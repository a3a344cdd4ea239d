"""Differentiable augmentation of the images a CLIP-feature discriminator reads (DiffAugment-style).

A frozen CLIP that was not trained for robustness (the embedded ``scadfast-tiny`` most of all) lets a
generator raise D's logits and the CLIP similarity with small patterns locked to the ViT's patch grid
instead of with content. Shifting every image by a random number of pixels before CLIP reads it —
real and fake alike, in the D step and in the G step, differentiably, so G is trained through the
same shift — makes such grid-locked patterns useless while leaving content (a shape, its colour and
place) readable. Cutout hides a random square.

Policies (``GALIPFamily(augment=...)``, flag ``--augment``): ``"none"``, ``"translation"``,
``"translation,cutout"``. Sizes [ours], chosen for the shapes data whose captions name positions:
translation by up to ``1/16`` of the side per axis (±4 px at 64 px, a quarter of the spacing of the
named regions), filled with the image's border pixels; cutout of a ``1/4``-side square, filled with 0.
Each sample draws its own offsets from the global RNG (so a resumed run continues exactly).
"""

from __future__ import annotations

import torch

POLICIES = ("none", "translation", "translation,cutout")
TRANSLATE = 1 / 16
CUTOUT = 1 / 4


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"augment: policy must be one of {POLICIES}, got {policy!r}")
    return policy


def translate(x: torch.Tensor, ratio: float = TRANSLATE) -> torch.Tensor:
    """Shift each image by integer offsets in ``[-r, r]`` (``r = round(ratio·side)``) per axis,
    replicating the border. Differentiable w.r.t. ``x``."""
    b, _, h, w = x.shape
    rh, rw = max(1, round(ratio * h)), max(1, round(ratio * w))
    dy = torch.randint(-rh, rh + 1, (b, 1, 1), device=x.device)
    dx = torch.randint(-rw, rw + 1, (b, 1, 1), device=x.device)
    ys = (torch.arange(h, device=x.device).view(1, h, 1) - dy).clamp(0, h - 1)  # (b, h, 1)
    xs = (torch.arange(w, device=x.device).view(1, 1, w) - dx).clamp(0, w - 1)  # (b, 1, w)
    idx = (ys * w + xs).view(b, 1, h * w).expand(-1, x.shape[1], -1)
    return x.flatten(2).gather(2, idx).view_as(x)


def cutout(x: torch.Tensor, ratio: float = CUTOUT) -> torch.Tensor:
    """Zero a random ``ratio``-side square (its centre anywhere in the image) in each image."""
    b, _, h, w = x.shape
    ch, cw = max(1, round(ratio * h)), max(1, round(ratio * w))
    cy = torch.randint(0, h, (b, 1, 1), device=x.device)
    cx = torch.randint(0, w, (b, 1, 1), device=x.device)
    yy = torch.arange(h, device=x.device).view(1, h, 1)
    xx = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((yy - cy).abs() <= ch // 2) & ((xx - cx).abs() <= cw // 2)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def augment(x: torch.Tensor, policy: str) -> torch.Tensor:
    """Apply ``policy`` (module doc) to a batch of images (B, C, H, W)."""
    if policy == "none":
        return x
    x = translate(x)
    if policy == "translation,cutout":
        x = cutout(x)
    return x

