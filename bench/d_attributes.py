"""Which attributes does a trained discriminator check? (the learning issue's diagnostic)

    python bench/d_attributes.py CKPT|RUN_DIR [...] [--n 256] [--seed 7] [--out JSON]

The generator can only learn an attribute its conditional discriminator checks. For ``--n`` fresh
real renders of the shapes data (the data's own sampler and renderer, on a seed no training set uses),
each caption the data would write for it is paired with *edits*: the same caption with one named
attribute changed to another value (so the edit is false for the image). A discriminator that checks
attribute ``a`` scores the true caption above its ``a``-edit. Reported per attribute: how often it does
(pairwise accuracy, chance 0.5) and the mean logit gap ``f(x, s) − f(x, s_edit)``, on the real renders
and on the checkpoint's own generated images for the same captions (what G's gradient sees).

Works for the GALIP family (``galip``, ``scad*``: the semantic logit ``f(x, s)``). Evaluation only:
nothing here feeds training.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scadfast import runs  # noqa: E402
from scadfast.data import shapes as shp  # noqa: E402
from common import checkpoint_diagnostic  # noqa: E402

RENDER_SEED_OFFSET = 7_000_000  # far from the data set's and the classifier's render seeds


def edited_captions(n: int, seed: int):
    """``n`` (attrs, caption, {attribute: edited caption}) triples, the data's own caption sampler."""
    rng = np.random.default_rng(RENDER_SEED_OFFSET + seed)
    out = []
    for _ in range(n):
        attrs, mentioned = shp.sample_attrs(rng)
        edits = {}
        for a in mentioned:
            others = [v for v in shp.ATTRIBUTES[a] if v != attrs[a]]
            edits[a] = shp.format_caption({**attrs, a: others[int(rng.integers(len(others)))]}, mentioned)
        out.append((attrs, shp.format_caption(attrs, mentioned), edits))
    return out, rng


@torch.no_grad()
def d_logits(loaded, images: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The semantic logit f(x, s) of the checkpoint's D, (B,)."""
    pair = loaded.pair
    feats = loaded.clip.image_features(images.to(loaded.device), pooled=False)
    t = pair.D.trunk(feats)
    return pair._semantic(t, s.to(t.dtype), "ref")[1].float().flatten()


@torch.no_grad()
def score(ckpt: str, n: int = 256, seed: int = 7) -> dict:
    loaded = runs.load(ckpt, "cpu")
    if getattr(loaded.pair.cfg, "arch", "galip") != "galip":
        raise SystemExit(f"{ckpt}: d_attributes reads the GALIP family's semantic logit; this is {loaded.pair.cfg.arch}")
    items, rng = edited_captions(n, seed)
    size = int(loaded.state["image_size"])
    real = torch.stack([torch.from_numpy(shp.render(a, size, rng)).permute(2, 0, 1) for a, _, _ in items])
    real = real.float() / 127.5 - 1.0
    captions = [c for _, c, _ in items]
    s = loaded.embed(captions)
    # The checkpoint's own images of the same captions (one per caption, fixed noise).
    z = torch.randn(n, loaded.pair.z_dim, generator=torch.Generator().manual_seed(seed))
    fake = loaded.pair.G(z, s).clamp(-1, 1)
    # Each attribute's edited captions, embedded once for both image sets.
    edits = {}
    for a in shp.ATTRIBUTE_NAMES:
        rows = [i for i, (_, _, e) in enumerate(items) if a in e]
        if rows:
            edits[a] = (rows, loaded.embed([items[i][2][a] for i in rows]))
    res = {"checkpoint": ckpt, "step": int(loaded.state.get("step", -1)), "n": n, "chance": 0.5}
    for name, images in (("real", real), ("generated", fake)):
        f_true = d_logits(loaded, images, s)
        per = {}
        for a, (rows, s_edit) in edits.items():
            gap = f_true[rows] - d_logits(loaded, images[rows], s_edit)
            per[a] = {"pairs": len(rows), "accuracy": (gap > 0).float().mean().item(),
                      "mean_gap": gap.mean().item()}
        res[name] = per
        res[f"{name}_mean_logit"] = f_true.mean().item()
    return res


def _report(r: dict) -> None:
    print(f"{r['checkpoint']} (step {r['step']}): D prefers the true caption over a one-attribute edit "
          f"(chance 0.5), real | generated:")
    for attr in r["real"]:
        re, ge = r["real"][attr], r["generated"][attr]
        print(f"  {attr:10s} {re['accuracy']:.3f} (gap {re['mean_gap']:+.3f}) | {ge['accuracy']:.3f} "
              f"(gap {ge['mean_gap']:+.3f})  [{re['pairs']} pairs]")


def main(argv=None) -> int:
    def add_args(p):
        p.add_argument("--n", type=int, default=256, help="real renders (and generated images), one caption each")
        p.add_argument("--seed", type=int, default=7)

    return checkpoint_diagnostic(argv, __doc__, lambda c, a: score(c, a.n, a.seed), _report,
                                 "scadfast.bench.d_attributes/1", add_args)


if __name__ == "__main__":
    sys.exit(main())
