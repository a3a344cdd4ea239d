"""Shapes ground-truth metrics (docs/design.md §9): text alignment and per-prompt coverage of free attributes.

An attribute classifier (:mod:`scadfast.shapes_classifier`) reads the five attributes of every
generated image. For prompts of the shapes grammar (:func:`scadfast.data.shapes.parse_caption`):

**Alignment** (a). ``alignment`` = the fraction of generated images whose predicted attributes match
*every* attribute the prompt specifies (pooled over all images of all prompts).
``alignment_per_attribute[a]`` = the fraction of images, among those whose prompt specifies ``a``,
whose predicted ``a`` is the specified value.

**Coverage** (b). For a prompt p, a free attribute a (one p does not mention) with K_a values and
the N images of p, let q_{p,a} be the empirical distribution of the predicted values of a. Under the
data distribution a is uniform, u_a = 1/K_a (and independent of the other free attributes). Define

    TV(p, a)  = ½ Σ_v |q_{p,a}(v) − 1/K_a|                  (total variation, in [0, 1 − 1/K_a])
    c(p, a)   = 1 − TV(p, a) / (1 − 1/K_a)                   (in [0, 1])
    coverage(p) = mean of c(p, a) over the free attributes of p
    coverage  = mean of coverage(p) over the prompts with at least one free attribute.

c = 1 means the predicted values are exactly uniform; c = 0 means every image has the same value
(a collapsed generator: the TV distance of a point mass to uniform is the maximum 1 − 1/K_a).
Because q is estimated from N samples, even a perfect generator scores below 1;
``coverage_ideal`` is the expected coverage of N exact i.i.d. uniform draws for the same prompts
(Monte Carlo, 2000 trials, fixed seed), the ceiling to compare with. Coverage looks at each free
attribute's marginal, not at their joint distribution.

Both numbers inherit the classifier's errors; its held-out accuracy per attribute is reported with
the result (``classifier_accuracy``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..data import shapes as shp
from .features import ProgressLine

__all__ = ["coverage_of_counts", "ideal_coverage", "ShapesTruthScorer", "render_prompt_images"]

_IDX = {a: {v: i for i, v in enumerate(shp.ATTRIBUTES[a])} for a in shp.ATTRIBUTE_NAMES}
_K = {a: len(shp.ATTRIBUTES[a]) for a in shp.ATTRIBUTE_NAMES}


def coverage_of_counts(counts: np.ndarray) -> float:
    """c = 1 − TV(q, uniform) / (1 − 1/K) for a vector of K value counts (module doc)."""
    counts = np.asarray(counts, np.float64)
    k = counts.shape[-1]
    if k < 2:
        raise ValueError(f"coverage_of_counts: need at least 2 values, got {k}")
    q = counts / counts.sum(-1, keepdims=True)
    tv = 0.5 * np.abs(q - 1.0 / k).sum(-1)
    return np.clip(1.0 - tv / (1.0 - 1.0 / k), 0.0, 1.0)


def ideal_coverage(free: Sequence[Sequence[str]], n: int, trials: int = 2000, seed: int = 0) -> float:
    """Expected ``coverage`` of ``n`` exact uniform samples per prompt, for prompts whose free
    attributes are ``free`` (one list per prompt; prompts with none are skipped)."""
    rng = np.random.default_rng(seed)
    per_k: Dict[int, float] = {}
    vals = []
    for f in free:
        if not f:
            continue
        cs = []
        for a in f:
            k = _K[a]
            if k not in per_k:
                per_k[k] = float(coverage_of_counts(rng.multinomial(n, [1.0 / k] * k, size=trials)).mean())
            cs.append(per_k[k])
        vals.append(float(np.mean(cs)))
    return float(np.mean(vals)) if vals else float("nan")


def render_prompt_images(caption: str, n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """``n`` real shapes images for ``caption`` from the ground-truth sampler (float, [-1, 1]).

    Attributes from :func:`sample_prompt_attrs` (free ones uniform), rendered with nuisance jitter —
    what a perfect generator would produce. Used to validate the metric.
    """
    rng = np.random.default_rng(seed)
    attrs = shp.sample_prompt_attrs(caption, n, rng)
    imgs = np.stack([shp.render(a, size, rng) for a in attrs])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class ShapesTruthScorer:
    """Streaming shapes metrics over prompts: ``add(prompt_index, images)`` then ``result()``.

    Images of one prompt may arrive in several calls; only per-prompt value counts are kept.
    Raises ``ValueError`` naming the prompt if a prompt is not in the shapes grammar.
    """

    def __init__(self, classifier, prompts: Sequence[str], batch_size: int = 256, progress: bool = True,
                 total: Optional[int] = None):
        self.clf = classifier
        self.prompts = list(prompts)
        self.spec = []
        for p in self.prompts:
            try:
                self.spec.append(shp.parse_caption(p))
            except ValueError as e:
                raise ValueError(f"shapes metrics need prompts of the shapes grammar: {e}") from None
        self.free = [[a for a in shp.ATTRIBUTE_NAMES if a not in s] for s in self.spec]
        self.counts = np.zeros((len(self.prompts), len(shp.ATTRIBUTE_NAMES), max(_K.values())), np.int64)
        self.n_img = np.zeros(len(self.prompts), np.int64)
        self.n_all_match = np.zeros(len(self.prompts), np.int64)
        self.batch_size = batch_size
        self.bar = ProgressLine("shapes", total, enabled=progress)

    @torch.no_grad()
    def add(self, prompt_index: int, images: torch.Tensor) -> None:
        dev = next(self.clf.parameters()).device
        preds = torch.cat([self.clf.predict(images[i:i + self.batch_size].to(dev)).cpu()
                           for i in range(0, len(images), self.batch_size)]).numpy()
        spec = self.spec[prompt_index]
        match = np.ones(len(preds), bool)
        for k, a in enumerate(shp.ATTRIBUTE_NAMES):
            self.counts[prompt_index, k] += np.bincount(preds[:, k], minlength=self.counts.shape[2])
            if a in spec:
                match &= preds[:, k] == _IDX[a][spec[a]]
        self.n_img[prompt_index] += len(preds)
        self.n_all_match[prompt_index] += int(match.sum())
        self.bar.update(len(preds))

    def result(self) -> dict:
        seen = self.n_img > 0
        if not seen.any():
            raise ValueError("ShapesTruthScorer: no images were added")
        per_attr = {}
        for k, a in enumerate(shp.ATTRIBUTE_NAMES):
            hit = tot = 0
            for p, s in enumerate(self.spec):
                if seen[p] and a in s:
                    hit += int(self.counts[p, k, _IDX[a][s[a]]])
                    tot += int(self.n_img[p])
            if tot:
                per_attr[a] = hit / tot
        cov_prompt: List[Optional[float]] = []
        cov_attr: Dict[str, List[float]] = {a: [] for a in shp.ATTRIBUTE_NAMES}
        for p in range(len(self.prompts)):
            if not seen[p] or not self.free[p]:
                cov_prompt.append(None)
                continue
            cs = []
            for a in self.free[p]:
                k = shp.ATTRIBUTE_NAMES.index(a)
                c = float(coverage_of_counts(self.counts[p, k, :_K[a]]))
                cs.append(c)
                cov_attr[a].append(c)
            cov_prompt.append(float(np.mean(cs)))
        covs = [c for c in cov_prompt if c is not None]
        n = sorted(set(self.n_img[seen].tolist()))
        meta = getattr(self.clf, "meta", {}) or {}
        return {
            "alignment": float(self.n_all_match[seen].sum() / self.n_img[seen].sum()),
            "alignment_per_attribute": per_attr,
            "coverage": float(np.mean(covs)) if covs else float("nan"),
            "coverage_ideal": ideal_coverage([f for f, s in zip(self.free, seen) if s], int(n[0])) if covs and len(n) == 1 else float("nan"),
            "coverage_per_attribute": {a: float(np.mean(v)) for a, v in cov_attr.items() if v},
            "coverage_definition": "mean over prompts and free attributes of 1 - TV(pred, uniform) / (1 - 1/K)",
            "n_prompts": int(seen.sum()), "n_prompts_with_free": len(covs), "n_per_prompt": n[0] if len(n) == 1 else n,
            "per_prompt": [{"prompt": p, "alignment": float(self.n_all_match[i] / self.n_img[i]), "coverage": cov_prompt[i]}
                           for i, p in enumerate(self.prompts) if seen[i]],
            "classifier_accuracy": meta.get("heldout", {}).get("accuracy"),
        }
