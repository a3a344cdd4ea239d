#!/usr/bin/env python
"""What a CLIP tells the GAN about each shapes attribute: linear probes and zero-shot retrieval.

    python bench/clip_probe.py [--clip-pretrained shapes|PATH] [--n 3000] [--fit 2000] [--seed 4242]
                               [--all-blocks] [--text] [--out docs/results/clip-probe-<tag>.json]

GALIP's discriminator reads only the frozen CLIP's patch tokens after ``feature_blocks``, and the
generator's CLIP term reads the pooled image embedding. If an attribute is not linearly readable
from those features, D cannot teach G to draw it. This script renders ``--n`` fresh shapes images
(a seed no training set uses), encodes them with the embedded CLIP (``scadfast-tiny``) and fits one
multinomial logistic-regression probe per attribute on ``--fit`` of them, reporting held-out
accuracy on the rest, for three views:

* ``pooled``: the pooled, projected image embedding (the generator's CLIP loss);
* ``d_mean``: D's feature blocks, each mean-pooled over the patch grid, concatenated;
* ``d_last``: all patch tokens of D's last feature block, flattened.

With ``--all-blocks`` it adds, for every block ``i`` of the vision tower (not only D's), the view
``block<i>``: the patch tokens mean- and max-pooled over the grid (position-invariant, as a shape
readout needs when the object can be anywhere), concatenated — which block, if any, carries shape.

It also reports the zero-shot retrieval of ``scadfast.pretrain_clip.retrieval_metrics`` on the
same images. Nothing here touches GAN training: it measures a CLIP checkpoint.

With ``--text`` it also measures the text side, what the generator is conditioned on: the sentence
embedding ``s`` of every fully specified caption (6·8·3·9·5 = 6,480), and per attribute the share of
s's variance that the attribute's class means explain (between-class over total variance; the five
shares sum to 1 when the embedding is additive in the attributes) and the mean distance between its
class means. An attribute with a small share moves s little, so a generator reading s gets a weak
signal for it (``text_separation`` in the JSON).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from scadfast.data import shapes as shp  # noqa: E402
from scadfast.models.clip import TINY_NAME, FrozenCLIP  # noqa: E402
from scadfast import pretrain_clip as pc  # noqa: E402
from common import write_json  # noqa: E402

SCHEMA = "scadfast.bench.clip_probe/1"
VIEWS = ("pooled", "d_mean", "d_last")


@torch.no_grad()
def encode_views(clip: FrozenCLIP, images_u8: torch.Tensor, batch_size: int = 250) -> dict:
    """uint8 images (N, 3, H, W) → {view: float features (N, dim)} for :data:`VIEWS`."""
    out = {v: [] for v in VIEWS}
    for i in range(0, len(images_u8), batch_size):
        x = images_u8[i:i + batch_size].float() / 127.5 - 1.0
        feats, pooled = clip.image_features(x)
        out["pooled"].append(pooled.float())
        out["d_mean"].append(feats.float().mean(dim=(3, 4)).flatten(1))
        out["d_last"].append(feats[:, -1].float().flatten(1))
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def encode_blocks(clip: FrozenCLIP, images_u8: torch.Tensor, batch_size: int = 250) -> dict:
    """uint8 images → {"block<i>": (N, 2·width) mean ‖ max over the patch grid} for every vision block."""
    keep, clip.feature_blocks = clip.feature_blocks, tuple(range(clip.n_blocks))
    try:
        chunks = [clip.image_features(images_u8[i:i + batch_size].float() / 127.5 - 1.0, pooled=False).float()
                  for i in range(0, len(images_u8), batch_size)]
    finally:
        clip.feature_blocks = keep
    f = torch.cat(chunks)  # (N, n_blocks, width, g, g)
    return {f"block{b}": torch.cat([f[:, b].mean(dim=(2, 3)), f[:, b].amax(dim=(2, 3))], 1) for b in range(f.shape[1])}


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, n_fit: int, l2: float = 1e-3, iters: int = 200) -> float:
    """Held-out accuracy of a multinomial logistic regression fit (L-BFGS) on the first ``n_fit`` rows."""
    xf, yf, xt, yt = x[:n_fit], y[:n_fit], x[n_fit:], y[n_fit:]
    mu, sd = xf.mean(0), xf.std(0).clamp_min(1e-6)
    xf, xt = (xf - mu) / sd, (xt - mu) / sd
    k = int(y.max()) + 1
    w = torch.zeros(x.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xf @ w + b, yf) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xt @ w + b).argmax(1) == yt).float().mean())


@torch.no_grad()
def text_separation(clip: FrozenCLIP, batch_size: int = 512) -> dict:
    """Per attribute, over every fully specified caption's sentence embedding: ``share`` (between-class
    variance of the attribute's class means / total variance) and ``mean_distance`` (mean Euclidean
    distance between two of its class means), with the embeddings' mean norm for scale."""
    names = shp.ATTRIBUTE_NAMES
    combos = list(itertools.product(*(shp.ATTRIBUTES[a] for a in names)))
    caps = [shp.format_caption(dict(zip(names, c)), names) for c in combos]
    s = torch.cat([clip.encode_text(clip.tokenize(caps[i:i + batch_size])).float().cpu()
                   for i in range(0, len(caps), batch_size)])
    centred = s - s.mean(0)
    total = float((centred ** 2).sum(1).mean())
    out = {"n_captions": len(caps), "mean_norm": round(float(s.norm(dim=1).mean()), 4), "attributes": {}}
    for k, a in enumerate(names):
        values = shp.ATTRIBUTES[a]
        label = torch.tensor([values.index(c[k]) for c in combos])
        means = torch.stack([centred[label == v].mean(0) for v in range(len(values))])
        m = len(values)
        out["attributes"][a] = {"share": round(float((means ** 2).sum(1).mean()) / total, 4),
                                "mean_distance": round(float(torch.cdist(means, means).sum()) / (m * (m - 1)), 4),
                                "n_values": m}
    return out


def run(clip_pretrained: str, n: int, n_fit: int, seed: int, data_root: str, iters: int = 200,
        all_blocks: bool = False, text: bool = False) -> dict:
    clip = FrozenCLIP(TINY_NAME, pretrained=clip_pretrained)
    path = shp.make_shapes_dataset(data_root, n=n, image_size=clip.image_size, seed=seed)
    imgs, attrs, rows = pc.load_shapes_images(path)
    t0 = time.perf_counter()
    views = encode_views(clip, imgs)
    if all_blocks:
        views.update(encode_blocks(clip, imgs))
    probes = {v: {a: round(probe_accuracy(x, attrs[:, k], n_fit, iters=iters), 4)
                  for k, a in enumerate(shp.ATTRIBUTE_NAMES)} for v, x in views.items()}
    zero_shot = pc.retrieval_metrics(clip.model, clip.tokenize, imgs[n_fit:], attrs[n_fit:],
                                     [r["caption"] for r in rows[n_fit:]])
    res = {"schema": SCHEMA, "clip": TINY_NAME, "clip_pretrained": clip_pretrained,
           "clip_weights_id": clip.weights_id(), "feature_blocks": list(clip.feature_blocks),
           "n": n, "n_fit": n_fit, "seed": seed, "iters": iters, "probe_heldout_accuracy": probes,
           "zero_shot": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in zero_shot.items()}}
    if text:
        res["text_separation"] = text_separation(clip)
    res.update({"seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(), "command": " ".join(sys.argv)})
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/clip_probe.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--clip-pretrained", default="shapes", help="'shapes' (shipped) or a checkpoint path")
    p.add_argument("--n", type=int, default=3000, help="fresh images rendered")
    p.add_argument("--fit", type=int, default=2000, help="images used to fit the probes (rest: held out)")
    p.add_argument("--seed", type=int, default=4242, help="render seed (no training set uses it)")
    p.add_argument("--data-root", default=None, help="where the images are rendered (default: a temp dir)")
    p.add_argument("--iters", type=int, default=200, help="L-BFGS iterations per probe")
    p.add_argument("--all-blocks", action="store_true",
                   help="also probe every vision block's patch tokens, mean‖max-pooled (views block<i>)")
    p.add_argument("--text", action="store_true",
                   help="also measure how far each attribute moves the sentence embedding G is conditioned on")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON output (default: print only)")
    a = p.parse_args(argv)
    if not 0 < a.fit < a.n:
        p.error(f"--fit must be in (0, --n={a.n}), got {a.fit}")
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        res = run(a.clip_pretrained, a.n, a.fit, a.seed, a.data_root or tmp, a.iters, a.all_blocks, a.text)
    print("probe held-out accuracy (rows: view; columns: " + ", ".join(shp.ATTRIBUTE_NAMES) + ")")
    for v in res["probe_heldout_accuracy"]:
        print(f"  {v:7s} " + "  ".join(f"{res['probe_heldout_accuracy'][v][a]:.3f}" for a in shp.ATTRIBUTE_NAMES))
    print("zero-shot: " + ", ".join(f"{k}={v}" for k, v in res["zero_shot"].items()))
    if "text_separation" in res:
        t = res["text_separation"]
        print(f"sentence embedding of {t['n_captions']} captions (mean norm {t['mean_norm']:.2f}): "
              + ", ".join(f"{a} share {v['share']:.3f} / distance {v['mean_distance']:.2f}"
                          for a, v in t["attributes"].items()))
    if a.out:
        write_json(a.out, res, announce=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
