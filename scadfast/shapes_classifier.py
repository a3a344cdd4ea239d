"""The shapes ground-truth attribute classifier (docs/design.md §9): a small CNN with one softmax head per attribute.

    python -m scadfast.shapes_classifier [--n 16000] [--epochs 10] [--device cuda]

The shapes metrics (:mod:`scadfast.metrics.shapes_truth`) read the attributes of generated images
with this classifier. It is trained on a shapes set (``make_shapes_dataset``) and evaluated on a
disjoint held-out set (another seed); its per-attribute held-out accuracy is stored with the weights.

:func:`load_or_train` returns a ready classifier: the shipped weights
(``scadfast/assets/shapes-classifier.pt``) when the requested data parameters are the ones they were
trained with, else a cached model under ``<cache dir>/shapes_classifier/<key>.pt`` where the key
names every data and training parameter, else it trains one and caches it.

Architecture (input: images in [-1, 1], (B, 3, H, W), resized to 64 px when H, W differ): a
full-resolution conv3×3 stem (24 channels; small shapes are only ~8 px wide, so the first layer
must not subsample), four stride-2 conv3×3 stages (32, 64, 96, 96 channels: 64 → 4 px), each conv
followed by BatchNorm + ReLU, the 4×4 map flattened (it keeps *where* the shape is, which the
position head needs), Linear → 128, ReLU, and five linear heads with 6, 8, 3, 9, 5 outputs
(``ATTRIBUTES`` order). ~0.36 M parameters (0.7 MB in fp16).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .assets import asset_path
from .data import shapes as shp

__all__ = ["ShapesClassifier", "CLASSIFIER_VERSION", "SHIPPED_FILE", "DEFAULT_PARAMS", "cache_key",
           "train_classifier", "evaluate_classifier", "load_or_train", "load", "main"]

#: Bump when the architecture or the training recipe changes (part of the cache key).
CLASSIFIER_VERSION = 2
SHIPPED_FILE = "shapes-classifier.pt"
#: Data/training parameters of the shipped classifier (and the defaults of :func:`load_or_train`).
DEFAULT_PARAMS = {"n": shp.PRETRAIN_SET_SIZE, "image_size": 64, "seed": 0, "epochs": 10, "batch_size": 128, "lr": 2e-3}
_INPUT = 64


class ShapesClassifier(nn.Module):
    """CNN attribute classifier. ``forward(x)`` → ``{attribute: logits (B, #values)}``.

    ``x``: float images in [-1, 1], (B, 3, H, W); resized (bilinear, antialiased) to 64 px if needed.
    """

    def __init__(self, width: int = 32, hidden: int = 128):
        super().__init__()
        stem = 24
        chans = [stem, width, 2 * width, 3 * width, 3 * width]
        layers = [nn.Conv2d(3, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True)]
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.trunk = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * 4 * 4, hidden), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({a: nn.Linear(hidden, len(shp.ATTRIBUTES[a])) for a in shp.ATTRIBUTE_NAMES})

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"ShapesClassifier: images must be (B, 3, H, W), got {tuple(x.shape)}")
        x = x.float()
        if x.shape[-2:] != (_INPUT, _INPUT):
            x = F.interpolate(x, size=(_INPUT, _INPUT), mode="bilinear", align_corners=False,
                              antialias=bool(x.shape[-1] > _INPUT or x.shape[-2] > _INPUT))
        h = self.fc(self.trunk(x))
        return {a: head(h) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """int64 (B, 5): the predicted value index of each attribute (``ATTRIBUTE_NAMES`` order)."""
        out = self(x)
        return torch.stack([out[a].argmax(1) for a in shp.ATTRIBUTE_NAMES], dim=1)


def cache_key(n: int, image_size: int, seed: int, epochs: int, batch_size: int, lr: float) -> str:
    """File stem naming every parameter that determines a trained classifier."""
    return (f"clf-v{CLASSIFIER_VERSION}-shapes-v{shp.SHAPES_VERSION}-n{n}-{image_size}px-seed{seed}"
            f"-ep{epochs}-bs{batch_size}-lr{lr:g}")


def _to_unit(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1.0


@torch.no_grad()
def evaluate_classifier(model: ShapesClassifier, images_u8: torch.Tensor, attrs: torch.Tensor,
                        batch_size: int = 512) -> Dict[str, float]:
    """Accuracy per attribute (and ``all``: every attribute right) on uint8 images with known attributes."""
    model.eval()
    dev = next(model.parameters()).device
    preds = torch.cat([model.predict(_to_unit(images_u8[i:i + batch_size].to(dev))).cpu()
                       for i in range(0, len(images_u8), batch_size)])
    ok = preds == attrs
    res = {a: ok[:, k].float().mean().item() for k, a in enumerate(shp.ATTRIBUTE_NAMES)}
    res["all"] = ok.all(1).float().mean().item()
    return res


def train_classifier(n: int = DEFAULT_PARAMS["n"], image_size: int = DEFAULT_PARAMS["image_size"],
                     seed: int = DEFAULT_PARAMS["seed"], epochs: int = DEFAULT_PARAMS["epochs"],
                     batch_size: int = DEFAULT_PARAMS["batch_size"], lr: float = DEFAULT_PARAMS["lr"],
                     heldout: int = 2000, data_root: Optional[str] = None, device: Optional[str] = None,
                     stream=None):
    """Train a classifier on ``make_shapes_dataset(n, image_size, seed)``; returns ``(model, meta)``.

    Adam, one-cycle cosine learning rate, mean cross-entropy over the five heads. Light augmentation
    that keeps every attribute (Gaussian pixel noise, brightness/contrast jitter of ±10 %) so the
    classifier does not depend on JPEG statistics of the training set. ``meta`` holds the parameters
    and the accuracy on a held-out set (``seed + 1000``, ``heldout`` images).
    """
    from .pretrain_clip import load_shapes_images

    stream = stream or sys.stderr
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    root = data_root or str(shp.default_cache_dir() / "data")
    print(f"[shapes_classifier] data: {n} training images ({image_size}px, seed {seed}) + {heldout} held out",
          file=stream, flush=True)
    imgs, attrs, _ = load_shapes_images(shp.make_shapes_dataset(root, n=n, image_size=image_size, seed=seed))
    h_imgs, h_attrs, _ = load_shapes_images(shp.make_shapes_dataset(root, n=heldout, image_size=image_size,
                                                                    seed=seed + 1000))
    torch.manual_seed(seed)
    model = ShapesClassifier().to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = max(1, n // batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    t0, step = time.perf_counter(), 0
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            x = _to_unit(imgs[idx].to(dev))
            y = attrs[idx].to(dev)
            g = torch.rand(x.shape[0], 1, 1, 1, device=dev)
            x = x * (0.9 + 0.2 * g) + 0.1 * (torch.rand_like(g) - 0.5)
            x = x + 0.04 * torch.rand_like(g) * torch.randn_like(x)
            out = model(x)
            loss = sum(F.cross_entropy(out[a], y[:, k]) for k, a in enumerate(shp.ATTRIBUTE_NAMES)) / len(out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0 or step == total:
                el = time.perf_counter() - t0
                print(f"[shapes_classifier] epoch {ep + 1}/{epochs} step {step}/{total} | loss {loss.item():.4f} | "
                      f"elapsed {el:.0f}s ETA {el / step * (total - step):.0f}s", file=stream, flush=True)
    acc = evaluate_classifier(model, h_imgs, h_attrs)
    print("[shapes_classifier] held-out accuracy: " + ", ".join(f"{k}={v:.4f}" for k, v in acc.items()),
          file=stream, flush=True)
    meta = {"version": CLASSIFIER_VERSION, "shapes_version": shp.SHAPES_VERSION,
            "params": {"n": n, "image_size": image_size, "seed": seed, "epochs": epochs,
                       "batch_size": batch_size, "lr": lr},
            "heldout": {"n": heldout, "seed": seed + 1000, "accuracy": acc},
            "train_seconds": round(time.perf_counter() - t0, 1), "device": str(dev)}
    return model.eval(), meta


def save(model: ShapesClassifier, meta: dict, path: str, half: bool = True) -> str:
    """Write ``{"state_dict", "meta"}`` atomically (fp16 weights when ``half``)."""
    sd = {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu())
          for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save({"state_dict": sd, "meta": meta}, tmp)
    os.replace(tmp, path)
    return path


def load(path: str, device=None) -> ShapesClassifier:
    """Load a saved classifier (eval mode, fp32); its metadata is on ``model.meta``."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or "state_dict" not in ck:
        raise ValueError(f"{path} is not a scadfast shapes classifier file (no 'state_dict')")
    meta = ck.get("meta", {})
    if meta.get("version") != CLASSIFIER_VERSION:
        raise ValueError(f"{path}: classifier version {meta.get('version')} != {CLASSIFIER_VERSION}; retrain it")
    model = ShapesClassifier()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ck["state_dict"].items()})
    model.meta = meta
    return model.to(device or "cpu").eval()


def shipped_path() -> str:
    """The shipped classifier in ``scadfast/assets``; ``FileNotFoundError`` (saying how to rebuild it)
    if it is missing from the install."""
    return asset_path(SHIPPED_FILE, rebuild="python -m scadfast.shapes_classifier --out {path}")


def load_or_train(n: int = DEFAULT_PARAMS["n"], image_size: int = DEFAULT_PARAMS["image_size"],
                  seed: int = DEFAULT_PARAMS["seed"], epochs: int = DEFAULT_PARAMS["epochs"],
                  batch_size: int = DEFAULT_PARAMS["batch_size"], lr: float = DEFAULT_PARAMS["lr"],
                  cache_dir: Optional[str] = None, device=None, use_shipped: bool = True) -> ShapesClassifier:
    """The classifier for these data/training parameters: shipped → cached → trained (then cached).

    ``cache_dir`` defaults to ``default_cache_dir()``; the file is
    ``<cache_dir>/shapes_classifier/<cache_key(...)>.pt``. The shipped weights are used only when the
    parameters equal the ones they were trained with (their ``meta``).
    """
    params = {"n": n, "image_size": image_size, "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr}
    shipped = asset_path(SHIPPED_FILE)
    if use_shipped and os.path.isfile(shipped):
        m = load(shipped, device)
        if m.meta.get("params") == params and m.meta.get("shapes_version") == shp.SHAPES_VERSION:
            return m
    root = Path(cache_dir) if cache_dir else shp.default_cache_dir()
    path = root / "shapes_classifier" / (cache_key(**params) + ".pt")
    if path.is_file():
        return load(str(path), device)
    model, meta = train_classifier(**params, data_root=str(root / "data"), device=str(device) if device else None)
    save(model, meta, str(path))
    return load(str(path), device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scadfast.shapes_classifier", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for k, v in DEFAULT_PARAMS.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    p.add_argument("--heldout", type=int, default=2000)
    p.add_argument("--device", default=None)
    p.add_argument("--cache-dir", default=None, help="default: $SCADFAST_CACHE or ~/.cache/scadfast")
    p.add_argument("--data-root", default=None, help="where the shapes sets are built (default: <cache dir>/data)")
    p.add_argument("--out", default=None, help="also write the weights here (e.g. scadfast/assets/shapes-classifier.pt)")
    a = p.parse_args(argv)
    params = {k: getattr(a, k) for k in DEFAULT_PARAMS}
    root = Path(a.cache_dir) if a.cache_dir else shp.default_cache_dir()
    model, meta = train_classifier(**params, heldout=a.heldout,
                                   data_root=a.data_root or str(root / "data"), device=a.device)
    path = root / "shapes_classifier" / (cache_key(**params) + ".pt")
    save(model, meta, str(path))
    print(f"[shapes_classifier] cached {path}", file=sys.stderr)
    if a.out:
        save(model, meta, a.out)
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump(meta, f, indent=1)
        print(f"[shapes_classifier] wrote {a.out} ({os.path.getsize(a.out) / 1024:.0f} KiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
