"""KID and precision/recall on feature vectors (the same 2048-d Inception pool features as FID).

**KID** (Bińkowski et al. 2018): the squared MMD between generated and real features under the
polynomial kernel ``k(x, y) = (x·y / d + 1)^3``, estimated without bias on ``subsets`` random
subsets of ``subset_size`` samples from each side (drawn without replacement) and averaged; the
spread over subsets is reported as ``kid_std``. Per subset, with kernel matrices K_XX, K_YY, K_XY
of the m generated (X) and m real (Y) samples::

    MMD² = (Σ_{i≠j} K_XX + Σ_{i≠j} K_YY) / (m (m − 1)) − 2 Σ_{i,j} K_XY / m²

These are torch-fidelity's definitions and defaults (100 subsets of 1000, ``rng_seed`` 2020, the
generated set drawn first), so with the same features the value is torch-fidelity's to float
round-off; the tests check that. The subset size shrinks to the smaller set when either has fewer
than ``subset_size`` samples (clean-fid's rule; torch-fidelity refuses instead) and the report says
which size was used.

**Precision / recall** (Kynkäänniemi et al. 2019, k = 3): each sample of a set has a ball of radius
its distance to its k-th nearest neighbour in the same set; precision is the fraction of generated
samples inside at least one real ball, recall the fraction of real samples inside at least one
generated ball. Distances are Euclidean, computed in chunks on the features' device.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

__all__ = ["kernel_inception_distance", "precision_recall", "mmd2_unbiased"]


def _as_features(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2 or t.shape[0] < 2:
        raise ValueError(f"{name}: features must be (N, D) with N >= 2, got {tuple(t.shape)}")
    return t


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, degree: int = 3, gamma: Optional[float] = None,
                  coef0: float = 1.0) -> float:
    """Unbiased MMD² of two equal-sized samples under the polynomial kernel ``(γ x·y + c)^degree``."""
    m = x.shape[0]
    if y.shape[0] != m:
        raise ValueError(f"mmd2_unbiased: both samples need the same size, got {m} and {y.shape[0]}")
    g = 1.0 / x.shape[1] if gamma is None else gamma
    k_xx = (x @ x.T * g + coef0) ** degree
    k_yy = (y @ y.T * g + coef0) ** degree
    k_xy = (x @ y.T * g + coef0) ** degree
    off = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(off - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(fake, real, subsets: int = 100, subset_size: int = 1000, seed: int = 2020,
                              degree: int = 3, gamma: Optional[float] = None, coef0: float = 1.0) -> dict:
    """KID of generated features ``fake`` (N_f, D) against real features ``real`` (N_r, D).

    Returns ``{"kid", "kid_std", "subsets", "subset_size", "n_fake", "n_real"}``. Subset indices come
    from ``numpy.random.RandomState(seed)`` (generated then real, per subset, as torch-fidelity).
    """
    f, r = _as_features(fake, "kid: generated"), _as_features(real, "kid: real")
    if f.shape[1] != r.shape[1]:
        raise ValueError(f"kid: feature dims differ: generated {f.shape[1]}, real {r.shape[1]}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"kid: subsets must be >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    m = min(subset_size, f.shape[0], r.shape[0])
    f, r = f.to(torch.float64), r.to(torch.float64)
    rng = np.random.RandomState(seed)
    vals = np.zeros(subsets)
    for i in range(subsets):
        fi = torch.from_numpy(rng.choice(f.shape[0], m, replace=False)).to(f.device)
        ri = torch.from_numpy(rng.choice(r.shape[0], m, replace=False)).to(r.device)
        vals[i] = mmd2_unbiased(f[fi], r[ri], degree, gamma, coef0)
    return {"kid": float(vals.mean()), "kid_std": float(vals.std()), "subsets": int(subsets), "subset_size": int(m),
            "n_fake": int(f.shape[0]), "n_real": int(r.shape[0])}


def _kth_nn_radius(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of every row of ``x`` to its k-th nearest other row (the row itself is the 0-th)."""
    out = [torch.cdist(x[i:i + chunk], x).kthvalue(k + 1, dim=1).values for i in range(0, x.shape[0], chunk)]
    return torch.cat(out)


def _inside_any_ball(q: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    """For each row of ``q``: is it within ``radii[j]`` of some ``centres[j]``?"""
    out = [(torch.cdist(q[i:i + chunk], centres) <= radii).any(dim=1) for i in range(0, q.shape[0], chunk)]
    return torch.cat(out)


def precision_recall(fake, real, k: int = 3, chunk: int = 1024) -> dict:
    """Improved precision and recall (k-NN manifolds) of generated ``fake`` against ``real`` features.

    Returns ``{"precision", "recall", "k", "n_fake", "n_real"}``. Needs more than ``k`` samples per set.
    """
    f, r = _as_features(fake, "pr: generated"), _as_features(real, "pr: real")
    if f.shape[1] != r.shape[1]:
        raise ValueError(f"pr: feature dims differ: generated {f.shape[1]}, real {r.shape[1]}")
    if k < 1 or min(f.shape[0], r.shape[0]) <= k:
        raise ValueError(f"pr: k must be >= 1 and below each set's size; got k={k}, "
                         f"{f.shape[0]} generated, {r.shape[0]} real")
    f, r = f.to(torch.float64), r.to(torch.float64).to(f.device)
    precision = _inside_any_ball(f, r, _kth_nn_radius(r, k, chunk), chunk).double().mean().item()
    recall = _inside_any_ball(r, f, _kth_nn_radius(f, k, chunk), chunk).double().mean().item()
    return {"precision": float(precision), "recall": float(recall), "k": int(k),
            "n_fake": int(f.shape[0]), "n_real": int(r.shape[0])}
