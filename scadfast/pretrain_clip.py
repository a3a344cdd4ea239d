"""Contrastive pretraining of the embedded CLIP (``scadfast-tiny``) on the shapes data set (docs/design.md §3, §8).

    python -m scadfast.pretrain_clip [--n 16000] [--steps 1200] [--time-budget 570] [--out PATH]

The embedded CLIP must know the shapes vocabulary for the GAN to be text-conditional offline. This
module trains the open_clip model ``scadfast-tiny`` from random initialisation with the symmetric
InfoNCE loss of CLIP (learned temperature, AdamW) and writes an open_clip-loadable checkpoint
(``{"state_dict": {name: fp16 tensor}, "meta": {...}}``; ``open_clip.create_model("scadfast-tiny",
pretrained=PATH)`` and ``FrozenCLIP("scadfast-tiny", pretrained=PATH)`` read it).

Training captions
-----------------
Every image carries its five ground-truth attributes. Each time an image is drawn, a fresh caption is
formed by mentioning each optional attribute independently with probability ``--mention-prob``
(the shape is always named), with :func:`scadfast.data.shapes.format_caption` — so the text tower sees
every template of the data set's grammar, not only the one caption stored with the image.

Short captions repeat inside a batch ("a circle" may be drawn for several circles), so "the i-th
caption belongs to the i-th image only" would be false. The loss therefore uses **multi-positive
targets**: image ``i`` and caption ``j`` are a positive pair iff every attribute caption ``j`` names
has the value image ``i`` has. The image→text term is the cross-entropy between row ``i`` of the
softmax over ``logit_scale · cos`` and the uniform distribution over the positives of image ``i``;
the text→image term is the same per column; the loss is their mean (with exactly one positive per
row and column this is the standard CLIP loss).

Patch tokens
------------
The generator's CLIP loss reads the pooled embedding, but GALIP's discriminator reads the *patch
tokens* of a few vision blocks — and the plain CLIP loss never asks those to carry the caption (on the
first shipped weights a linear probe reads shape from them at 0.28–0.42, from the pooled embedding at
0.78). ``--dense-weight W --dense-blocks 2,4`` adds, for each listed block, the same multi-positive
loss on the mean of that block's patch tokens through a linear head (:class:`DenseHeads`; the heads
are dropped after training). ``--init shapes`` (or a path) fine-tunes from existing weights instead
of starting from random ones.

Schedule: linear warm-up then cosine decay of the learning rate, as a function of *progress* =
max(step / steps, elapsed / time_budget); training ends when progress reaches 1, so the schedule
anneals fully whether the step budget or the wall-clock budget runs out first.

The shipped weights
-------------------
``scadfast/assets/scadfast-tiny-shapes.pt`` (fp16, full open_clip vocabulary) is the result of one
run of this module on a GPU; the arguments of that run and its held-out retrieval scores are stored in
the file's ``meta`` and in ``scadfast-tiny-shapes.json`` beside it (README, "Usage", quotes them).
On a small CPU a step of batch 128 takes seconds, so the wall-clock budget ends training long before
the retrieval is useful: retrain on a GPU. The default ``--out`` is the cache directory; pass
``--out scadfast/assets/scadfast-tiny-shapes.pt`` to replace the shipped file.
:func:`scadfast.models.clip.shipped_weights_path` returns it, and ``FrozenCLIP`` maps the tag
``"shapes"`` to it. ``FrozenCLIP("scadfast-tiny", pretrained=None)`` stays a random initialisation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import shapes as shp
from .models.clip import (_OPENAI_MEAN, _OPENAI_STD, SHIPPED_FILE, TINY_NAME, register_tiny_config,
                          resolve_pretrained)

__all__ = [
    "load_shapes_images",
    "attribute_matrix",
    "caption_spec_matrix",
    "positive_mask",
    "multi_positive_clip_loss",
    "retrieval_metrics",
    "pretrain",
    "main",
]

_ATTR_INDEX = {a: {v: i for i, v in enumerate(shp.ATTRIBUTES[a])} for a in shp.ATTRIBUTE_NAMES}


def _mean_std(model, device):
    """The image normalisation of open_clip ``model`` as (1, 3, 1, 1) tensors (OpenAI's when unset)."""
    cfg = model.visual.preprocess_cfg
    return tuple(torch.tensor(cfg.get(key, default), device=device).view(1, 3, 1, 1)
                 for key, default in (("mean", _OPENAI_MEAN), ("std", _OPENAI_STD)))


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def load_shapes_images(path, limit: Optional[int] = None, progress: bool = False):
    """Decode a shapes set into memory: ``(images uint8 (N, 3, H, W), attrs int64 (N, 5), rows)``.

    ``attrs[:, k]`` is the index of attribute ``ATTRIBUTE_NAMES[k]`` in ``ATTRIBUTES``. A plain PIL
    loop (the set is small: 16 000 images of 64 px are 197 MB decoded).
    """
    from PIL import Image

    rows = shp.load_shapes_index(path)
    if limit is not None:
        rows = rows[:limit]
    first = np.asarray(Image.open(rows[0]["file"]).convert("RGB"))
    imgs = np.empty((len(rows),) + first.shape, np.uint8)
    t0 = time.perf_counter()
    for i, row in enumerate(rows):
        imgs[i] = np.asarray(Image.open(row["file"]).convert("RGB"))
        if progress and (i + 1) % 4000 == 0:
            print(f"[pretrain_clip] decoded {i + 1}/{len(rows)} images ({time.perf_counter() - t0:.0f}s)",
                  file=sys.stderr, flush=True)
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), attribute_matrix([r["attrs"] for r in rows]), rows


def attribute_matrix(attrs: Sequence[Dict[str, str]]) -> torch.Tensor:
    """Full attribute dicts → int64 (N, 5) value indices in ``ATTRIBUTE_NAMES`` order."""
    return torch.tensor([[_ATTR_INDEX[a][d[a]] for a in shp.ATTRIBUTE_NAMES] for d in attrs], dtype=torch.long)


def caption_spec_matrix(captions: Sequence[str]) -> torch.Tensor:
    """Captions → int64 (N, 5): the index of each attribute the caption names, ``-1`` where it is free."""
    out = []
    for c in captions:
        spec = shp.parse_caption(c)
        out.append([_ATTR_INDEX[a][spec[a]] if a in spec else -1 for a in shp.ATTRIBUTE_NAMES])
    return torch.tensor(out, dtype=torch.long)


def positive_mask(img_attrs: torch.Tensor, cap_spec: torch.Tensor) -> torch.Tensor:
    """bool (N_img, N_cap): True where caption ``j`` is true of image ``i`` (every named attribute matches)."""
    a = img_attrs[:, None, :]
    s = cap_spec[None, :, :]
    return ((s < 0) | (s == a)).all(dim=-1)


def multi_positive_clip_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor,
                             pos: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with multi-positive targets (module doc). Embeddings must be L2-normalised.

    ``pos`` (B, B) bool must have at least one True per row and per column (the diagonal always is).
    """
    logits = logit_scale * img_emb @ txt_emb.t()
    t = pos.to(logits.dtype)
    li = -(t / t.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    lt = -(t / t.sum(0, keepdim=True) * F.log_softmax(logits, dim=0)).sum(0).mean()
    return 0.5 * (li + lt)


def _random_captions(attrs_idx: torch.Tensor, p: float, rng: np.random.Generator) -> List[str]:
    out = []
    optional = [a for a in shp.ATTRIBUTE_NAMES if a != "shape"]
    for row in attrs_idx.tolist():
        d = {a: shp.ATTRIBUTES[a][v] for a, v in zip(shp.ATTRIBUTE_NAMES, row)}
        mentioned = ["shape"] + [a for a in optional if rng.random() < p]
        out.append(shp.format_caption(d, mentioned))
    return out


def _normalise(imgs_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (imgs_u8.float() / 255.0 - mean) / std


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def retrieval_metrics(model, tokenizer, images_u8: torch.Tensor, attrs_idx: torch.Tensor,
                      captions: Sequence[str], batch_size: int = 256) -> Dict[str, float]:
    """Zero-shot retrieval of a (held-out) shapes set under an open_clip model.

    * ``caption_top1``: over the ``N`` distinct ``captions``, the fraction of images whose
      highest-scoring caption is *true of the image* (every attribute it names matches);
      ``caption_chance`` is the same for a uniformly random caption (mean fraction of true captions).
    * ``attr_<name>``: per attribute, the fraction of images for which, among the captions naming
      only that attribute value (``"a red circle"``-style prompts built with the image's true shape
      for the non-shape attributes), the true value scores highest; chance is 1 / #values.
    """
    model.eval()
    dev = next(model.parameters()).device
    mean, std = _mean_std(model, dev)
    embs = []
    for i in range(0, len(images_u8), batch_size):
        x = _normalise(images_u8[i:i + batch_size].to(dev), mean, std)
        embs.append(F.normalize(model.encode_image(x).float(), dim=-1))
    img = torch.cat(embs)

    def enc(texts):
        out = []
        for i in range(0, len(texts), batch_size):
            out.append(F.normalize(model.encode_text(tokenizer(list(texts[i:i + batch_size])).to(dev)).float(), dim=-1))
        return torch.cat(out)

    caps = sorted(set(captions))
    spec = caption_spec_matrix(caps).to(dev)
    pos = positive_mask(attrs_idx.to(dev), spec)
    best = (img @ enc(caps).t()).argmax(1)
    res = {"num_images": len(img), "num_captions": len(caps),
           "caption_top1": pos[torch.arange(len(img), device=dev), best].float().mean().item(),
           "caption_chance": pos.float().mean().item()}
    # Per-attribute zero-shot classification.
    for k, a in enumerate(shp.ATTRIBUTE_NAMES):
        vals = shp.ATTRIBUTES[a]
        if a == "shape":
            prompts = [shp.format_caption({"shape": v}, ["shape"]) for v in vals]
            scores = img @ enc(prompts).t()
        else:
            # Captions "<value> <true shape>" for each of the 6 shapes; pick the row of the image's shape.
            shapes = shp.ATTRIBUTES["shape"]
            prompts = [shp.format_caption({"shape": s, a: v}, ["shape", a]) for s in shapes for v in vals]
            t = enc(prompts).view(len(shapes), len(vals), -1)
            sh = attrs_idx[:, 0].to(dev)
            scores = torch.einsum("nd,nvd->nv", img, t[sh])
        res[f"attr_{a}"] = (scores.argmax(1) == attrs_idx[:, k].to(dev)).float().mean().item()
    return res


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


class DenseHeads(torch.nn.Module):
    """The patch-token term: per vision block in ``blocks``, the mean of its output patch tokens
    (class token excluded) through a linear head to the joint space, contrasted with the captions by
    :func:`multi_positive_clip_loss`. Forward hooks on the blocks capture the tokens during the
    image forward, so :meth:`loss` must follow ``encode_image`` of the same batch. The heads exist only
    during training (they are not saved); the term makes what the discriminator reads — the patch
    tokens of its feature blocks — carry the caption, shape included.
    """

    def __init__(self, model, blocks: Sequence[int]):
        super().__init__()
        res = model.visual.transformer.resblocks
        self.blocks = sorted(set(int(b) for b in blocks))
        if not self.blocks or self.blocks[0] < 0 or self.blocks[-1] >= len(res):
            raise ValueError(f"dense blocks must lie in [0, {len(res) - 1}], got {list(blocks)}")
        width = model.visual.conv1.out_channels
        embed = model.text_projection.shape[1] if model.text_projection is not None else width
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, embed) for _ in self.blocks)
        batch_first = bool(getattr(model.visual.transformer, "batch_first", True))
        self._tokens: Dict[int, torch.Tensor] = {}

        def hook(i):
            def f(_module, _inp, out):
                self._tokens[i] = out if batch_first else out.transpose(0, 1)
            return f
        self._handles = [res[b].register_forward_hook(hook(b)) for b in self.blocks]

    def loss(self, txt_emb: torch.Tensor, logit_scale: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        terms = []
        for b, head in zip(self.blocks, self.heads):
            pooled = self._tokens.pop(b)[:, 1:].mean(dim=1)
            terms.append(multi_positive_clip_loss(F.normalize(head(pooled), dim=-1), txt_emb, logit_scale, pos))
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._tokens.clear()


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # CLIP practice: no decay on gains, biases, embeddings and the temperature.
        if p.ndim < 2 or "embedding" in n or "logit_scale" in n or n.endswith("class_embedding"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _fmt(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 60:02d}:{s % 60:02d}"


def pretrain(out: str, n: int = shp.PRETRAIN_SET_SIZE, heldout: int = 1000, steps: int = 1200, batch_size: int = 128,
             lr: float = 1e-3, weight_decay: float = 0.1, warmup: float = 0.05, mention_prob: float = 0.5,
             time_budget: float = 570.0, seed: int = 0, data_root: Optional[str] = None,
             device: Optional[str] = None, threads: Optional[int] = None, log_every: int = 10,
             init: Optional[str] = None, dense_weight: float = 0.0, dense_blocks: Sequence[int] = (),
             stream=None) -> Dict[str, object]:
    """Train ``scadfast-tiny`` contrastively on a shapes set and save the fp16 checkpoint to ``out``.

    Data: ``make_shapes_dataset(n=n, seed=seed)`` for training and a disjoint held-out set
    (``n=heldout``, ``seed=seed + 1``) for :func:`retrieval_metrics`, both at the model's image size.
    Returns the metadata written into the checkpoint (arguments, steps done, wall time, held-out
    retrieval). The time budget counts training steps only (not data generation or evaluation).

    ``init`` starts from weights (a checkpoint path, or ``"shapes"`` for the shipped file) instead of
    random initialisation. ``dense_weight > 0`` adds the patch-token term of :class:`DenseHeads`
    for the vision blocks ``dense_blocks`` (module doc, "Patch tokens").
    """
    import open_clip

    stream = stream or sys.stderr
    if threads:
        torch.set_num_threads(int(threads))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    register_tiny_config()
    model = open_clip.create_model(TINY_NAME, pretrained=resolve_pretrained(TINY_NAME, init), device="cpu").to(dev)
    dense = DenseHeads(model, dense_blocks).to(dev) if dense_weight > 0 and dense_blocks else None
    tokenizer = open_clip.get_tokenizer(TINY_NAME)
    size = int(model.visual.image_size[0] if isinstance(model.visual.image_size, (tuple, list)) else model.visual.image_size)

    root = data_root or str(shp.default_cache_dir() / "data")
    t0 = time.perf_counter()
    print(f"[pretrain_clip] shapes data: {n} training + {heldout} held-out images at {size}px under {root}",
          file=stream, flush=True)
    train_dir = shp.make_shapes_dataset(root, n=n, image_size=size, seed=seed)
    held_dir = shp.make_shapes_dataset(root, n=heldout, image_size=size, seed=seed + 1)
    imgs, attrs, _ = load_shapes_images(train_dir, progress=True)
    h_imgs, h_attrs, h_rows = load_shapes_images(held_dir)
    print(f"[pretrain_clip] data ready in {time.perf_counter() - t0:.0f}s", file=stream, flush=True)

    mean, std = _mean_std(model, dev)
    groups = _param_groups(model, weight_decay)
    if dense is not None:
        groups[0]["params"] += list(dense.parameters())
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    perm, cursor = torch.randperm(len(imgs), generator=gen), 0
    max_scale = math.log(100.0)

    model.train()
    t_start = time.perf_counter()
    step, progress, loss_ema, acc_ema = 0, 0.0, None, None
    while progress < 1.0:
        if cursor + batch_size > len(perm):
            perm, cursor = torch.randperm(len(imgs), generator=gen), 0
        idx = perm[cursor:cursor + batch_size]
        cursor += batch_size
        a = attrs[idx]
        caps = _random_captions(a, mention_prob, rng)
        pos = positive_mask(a, caption_spec_matrix(caps)).to(dev)
        x = _normalise(imgs[idx].to(dev), mean, std)
        tok = tokenizer(caps).to(dev)

        frac = min(1.0, max(step / steps, (time.perf_counter() - t_start) / time_budget))
        cur_lr = lr * (frac / warmup if frac < warmup else 0.5 * (1 + math.cos(math.pi * (frac - warmup) / (1 - warmup))))
        for g in opt.param_groups:
            g["lr"] = cur_lr
        ie = F.normalize(model.encode_image(x), dim=-1)
        te = F.normalize(model.encode_text(tok), dim=-1)
        loss = multi_positive_clip_loss(ie, te, model.logit_scale.exp(), pos)
        if dense is not None:
            dense_loss = dense.loss(te, model.logit_scale.exp(), pos)
            loss = loss + dense_weight * dense_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_scale)
            acc = pos[torch.arange(len(idx), device=dev), (ie @ te.t()).argmax(1)].float().mean().item()
        step += 1
        lv = loss.item()
        dv = dense_loss.item() if dense is not None else None
        loss_ema = lv if loss_ema is None else 0.9 * loss_ema + 0.1 * lv
        acc_ema = acc if acc_ema is None else 0.9 * acc_ema + 0.1 * acc
        elapsed = time.perf_counter() - t_start
        progress = max(step / steps, elapsed / time_budget)
        if step % log_every == 0 or progress >= 1.0 or step == 1:
            eta = elapsed / max(progress, 1e-9) - elapsed
            print(f"[pretrain_clip] step {step:5d} ({100 * progress:5.1f}%) | loss {lv:.3f} (ema {loss_ema:.3f}) | "
                  f"{'' if dv is None else f'dense {dv:.3f} | '}batch top1 {acc_ema:.2f} | T {1 / model.logit_scale.exp().item():.3f} | lr {cur_lr:.2e} | "
                  f"elapsed {_fmt(elapsed)} ETA {_fmt(eta)}", file=stream, flush=True)
    train_time = time.perf_counter() - t_start
    if dense is not None:
        dense.remove()

    model.eval()
    ret = retrieval_metrics(model, tokenizer, h_imgs.to(dev), h_attrs, [r["caption"] for r in h_rows])
    print("[pretrain_clip] held-out retrieval: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                           for k, v in ret.items()), file=stream, flush=True)
    meta = {"model": TINY_NAME, "steps": step, "train_seconds": round(train_time, 1), "device": str(dev),
            "threads": torch.get_num_threads(), "shapes_version": shp.SHAPES_VERSION,
            "args": {"n": n, "heldout": heldout, "steps": steps, "batch_size": batch_size, "lr": lr,
                     "weight_decay": weight_decay, "warmup": warmup, "mention_prob": mention_prob,
                     "time_budget": time_budget, "seed": seed, "init": init,
                     "dense_weight": dense_weight, "dense_blocks": list(dense_blocks)},
            "heldout_retrieval": ret, "temperature": 1 / model.logit_scale.exp().item()}
    sd = {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu())
          for k, v in model.state_dict().items()}
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + f".tmp-{os.getpid()}"
    torch.save({"state_dict": sd, "meta": json.loads(json.dumps(meta))}, tmp)
    os.replace(tmp, out)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    print(f"[pretrain_clip] wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB)", file=stream, flush=True)
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scadfast.pretrain_clip", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(shp.default_cache_dir() / SHIPPED_FILE),
                   help="checkpoint to write (the shipped file is scadfast/assets/" + SHIPPED_FILE + ")")
    p.add_argument("--n", type=int, default=shp.PRETRAIN_SET_SIZE, help="training images")
    p.add_argument("--heldout", type=int, default=1000, help="held-out images for the retrieval report")
    p.add_argument("--steps", type=int, default=1200, help="maximum optimisation steps")
    p.add_argument("--time-budget", type=float, default=570.0, help="maximum training wall time in seconds")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the schedule")
    p.add_argument("--mention-prob", type=float, default=0.5,
                   help="probability that a training caption names each optional attribute")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None, help="where the shapes sets are built (default: the cache dir)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--init", default=None,
                   help="start from these weights (a checkpoint path, or 'shapes' for the shipped file)")
    p.add_argument("--dense-weight", type=float, default=0.0,
                   help="weight of the patch-token term (0 = plain CLIP loss)")
    p.add_argument("--dense-blocks", default="2,4",
                   help="vision blocks whose mean patch token the dense term trains (D's feature blocks)")
    a = p.parse_args(argv)
    for name in ("n", "heldout", "steps", "batch_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 <= a.mention_prob <= 1.0:
        p.error("--mention-prob must be in [0, 1]")
    if a.time_budget <= 0:
        p.error("--time-budget must be > 0")
    if a.dense_weight < 0:
        p.error("--dense-weight must be >= 0")
    try:
        dense_blocks = tuple(int(b) for b in a.dense_blocks.split(",") if b.strip())
    except ValueError:
        p.error(f"--dense-blocks must be comma-separated block indices, got {a.dense_blocks!r}")
    pretrain(a.out, n=a.n, heldout=a.heldout, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
             weight_decay=a.weight_decay, warmup=a.warmup, mention_prob=a.mention_prob,
             time_budget=a.time_budget, seed=a.seed, data_root=a.data_root, device=a.device,
             threads=a.threads, log_every=a.log_every, init=a.init, dense_weight=a.dense_weight,
             dense_blocks=dense_blocks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
