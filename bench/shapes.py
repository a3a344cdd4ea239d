#!/usr/bin/env python
"""Record the shapes every fused op sees in the real models (issue 10, item 3).

    python bench/shapes.py [--out bench/op_shapes.json] [--clips scadfast-tiny ViT-B-32]
                           [--variants galip scad ...] [--device meta|cpu]

For every variant and every CLIP setup (the embedded ``scadfast-tiny`` at 64 px with the embedded
default's widths and batch, and ``ViT-B-32`` at 224 px with GALIP's widths and batch 64; random CLIP
weights, nothing is downloaded) the model pair is built exactly as the training engine builds it
(:func:`scadfast.variants.build`) and one ``d_loss`` and one ``g_loss`` run in training mode while
hooks record:

``spectral_norm``     every spectral-normalised weight as the matrix its power iteration runs on
                      (rows, cols) — a forward hook on each ``SpectralNorm`` parametrization module,
                      so a weight read twice in a step is counted twice; ``grouped`` says whether
                      :func:`scadfast.ops.spectral_norm_all` updates it in one grouped launch;
``san_logits``        the (h, ω) pair of every call;
``san_d_loss``        (h_real, ω_real, h_fake, ω_fake[, fake_weight]);
``patch_hinge_loss``  every logit map (and its weight) with the ``real`` flag;
``cond_aug``          (s, weight, bias, eps) and the mode.

The function ops are recorded by wrapping them where the model modules look them up (every
``scadfast.*`` module outside ``scadfast.ops`` that holds the op function), so whatever module the
models call them from is covered. Calls are grouped by (phase, op, shapes, options) with a count.

By default the models run on the ``meta`` device: shapes propagate without computing anything, so
ViT-B-32 at batch 64 takes seconds on a small CPU (the ops take their reference path there, which has
the same signature). ``--device cpu`` computes for real (slow at batch 64).

``bench/kernels.py`` reads the result (``bench/op_shapes.json``) for its ``model`` cases.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(HERE, "op_shapes.json")
SCHEMA = "scadfast.bench.op_shapes/1"

# CLIP setups: (open_clip name, pretrained, batch, ngf/ndf). scadfast-tiny: the embedded default of
# `python -m scadfast.train` (batch 16, widths 32, 64 px); ViT-B-32: GALIP's setup (batch 64 per GPU,
# widths 64, 224 px) with random weights.
CLIPS = {
    "scadfast-tiny": {"pretrained": None, "batch": 16, "width": 32},
    "ViT-B-32": {"pretrained": None, "batch": 64, "width": 64},
}
FUNCTION_OPS = ("san_logits", "san_d_loss", "patch_hinge_loss", "cond_aug")


def _shape(t):
    import torch

    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return list(t.shape)
    return repr(t)


class Recorder:
    """Collects op calls of one (variant, clip) model pair."""

    def __init__(self):
        self.phase = None
        self.calls: dict = {}

    def add(self, op: str, shapes: dict, **opts):
        key = (self.phase, op, json.dumps(shapes, sort_keys=True), json.dumps(opts, sort_keys=True))
        if key not in self.calls:
            self.calls[key] = {"phase": self.phase, "op": op, "shapes": shapes, **opts, "count": 0}
        self.calls[key]["count"] += 1

    def rows(self) -> list[dict]:
        return list(self.calls.values())


@contextlib.contextmanager
def _wrap_function_ops(rec: Recorder):
    """Wrap the fused-op functions wherever a scadfast module (outside scadfast.ops) holds them."""
    import scadfast.models  # noqa: F401 - make sure the model modules are importable
    import scadfast.models.galip  # noqa: F401
    import scadfast.models.ms_clip_gan  # noqa: F401
    import scadfast.ops as ops

    originals = {name: getattr(ops, name) for name in FUNCTION_OPS}

    def wrapper(name, fn):
        def rec_call(*args, **kwargs):
            import inspect

            bound = inspect.signature(fn).bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            if name == "san_logits":
                rec.add(name, {"h": _shape(a["h"]), "omega": _shape(a["omega"])}, dtype=str(a["h"].dtype))
            elif name == "san_d_loss":
                rec.add(name, {k: _shape(a[k]) for k in ("h_real", "omega_real", "h_fake", "omega_fake", "fake_weight")},
                        dtype=str(a["h_real"].dtype))
            elif name == "patch_hinge_loss":
                rec.add(name, {"logits": _shape(a["logits"]), "weight": _shape(a["weight"])}, real=bool(a["real"]),
                        dtype=str(a["logits"].dtype))
            elif name == "cond_aug":
                rec.add(name, {k: _shape(a[k]) for k in ("s", "weight", "bias", "eps")}, mode=a["mode"],
                        dtype=str(a["s"].dtype))
            return fn(*args, **kwargs)

        rec_call.__wrapped__ = fn
        return rec_call

    patched = []
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith("scadfast") or mod_name.startswith("scadfast.ops"):
            continue
        for name, fn in originals.items():
            if getattr(mod, name, None) is fn:
                setattr(mod, name, wrapper(name, fn))
                patched.append((mod, name, fn))
    try:
        yield [f"{m.__name__}.{n}" for m, n, _ in patched]
    finally:
        for mod, name, fn in patched:
            setattr(mod, name, fn)


def _sn_hooks(pair, rec: Recorder):
    """Forward hooks on every SpectralNorm parametrization of the pair (G and D)."""
    from scadfast.ops import SpectralNorm

    handles = []
    for owner_name, owner in (("G", pair.G), ("D", pair.D)):
        for mod_name, mod in owner.named_modules():
            sn = None
            if hasattr(mod, "parametrizations") and "weight" in getattr(mod, "parametrizations", {}):
                for p in mod.parametrizations["weight"]:
                    if isinstance(p, SpectralNorm):
                        sn = p
            if sn is None:
                continue
            path = f"{owner_name}.{mod_name}"
            kind = f"{type(mod).__name__}{tuple(mod.parametrizations['weight'].original.shape)}"

            def hook(module, args, output, path=path, kind=kind):
                w = args[0]
                if w.ndim == 1:
                    rows, cols = 1, w.shape[0]
                else:
                    m = module._reshape_weight_to_matrix(w)
                    rows, cols = m.shape
                rec.add("spectral_norm", {"matrix": [int(rows), int(cols)]}, module=path, weight=kind,
                        grouped=bool(getattr(module, "external_update", False)),
                        iterates=bool(module.training), dtype=str(w.dtype))

            handles.append(sn.register_forward_hook(hook))
    return handles


def make_clip(clip_name: str, device: str = "meta"):
    """The frozen CLIP of a setup (random weights), on ``device``."""
    import torch

    from scadfast.models.clip import FrozenCLIP

    torch.manual_seed(0)
    clip = FrozenCLIP(clip_name, pretrained=CLIPS[clip_name]["pretrained"])
    return clip.to(device) if device != "cpu" else clip


def record(variant: str, clip_name: str, device: str = "meta", batch: int | None = None, clip=None) -> dict:
    """Build ``variant`` around ``clip_name`` (or the given ``clip``, already on ``device``) and record
    the op shapes of one d_loss + backward and one g_loss + backward."""
    import torch

    from scadfast import variants

    setup = CLIPS[clip_name]
    b = int(batch or setup["batch"])
    if clip is None:
        clip = make_clip(clip_name, device)
    cfg = variants.get(variant).replace(ngf=setup["width"], ndf=setup["width"])
    torch.manual_seed(0)
    # Built on the CPU (spectral norm's initial power iterations need values), then moved.
    pair = variants.build(cfg, clip, img_size=clip.image_size)
    if device != "cpu":
        pair.to(device)
    pair.train()
    rec = Recorder()
    handles = _sn_hooks(pair, rec)
    dev = torch.device(device)
    size = clip.image_size
    try:
        with _wrap_function_ops(rec) as patched:
            real = torch.randn(b, 3, size, size, device=dev)
            s = torch.randn(b, clip.embed_dim, device=dev)
            z = torch.randn(b, pair.z_dim, device=dev)
            rec.phase = "d_loss"
            loss, _ = pair.d_loss(real, s, z)
            rec.phase = "d_backward"
            loss.backward()
            rec.phase = "g_loss"
            loss, _ = pair.g_loss(s, torch.randn(b, pair.z_dim, device=dev))
            rec.phase = "g_backward"
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    return {
        "variant": variant, "clip": clip_name, "image_size": size, "batch": b, "ngf": cfg.ngf, "ndf": cfg.ndf,
        "grid": clip.grid, "clip_width": clip.width, "embed_dim": clip.embed_dim, "device": device,
        "wrapped": sorted(set(patched)), "calls": rec.rows(),
    }


def run(argv=None) -> int:
    p = argparse.ArgumentParser(description="record the shapes the fused ops see in the real models")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON file (default bench/op_shapes.json)")
    p.add_argument("--clips", nargs="+", default=list(CLIPS), choices=list(CLIPS))
    p.add_argument("--variants", nargs="+", default=None, help="default: every variant")
    p.add_argument("--device", default="meta", choices=["meta", "cpu"],
                   help="meta: shapes only, no compute (default); cpu: compute for real")
    p.add_argument("--batch", type=int, default=None, help="override the batch of every setup")
    args = p.parse_args(argv)

    sys.path.insert(0, ROOT)
    import torch

    from scadfast import variants

    names = args.variants or variants.names()
    models = []
    for clip_name in args.clips:
        clip = make_clip(clip_name, args.device)
        for v in names:
            entry = record(v, clip_name, args.device, args.batch, clip=clip)
            n_sn = len({c["module"] for c in entry["calls"] if c["op"] == "spectral_norm"})
            print(f"{clip_name:14s} {v:12s} B={entry['batch']:3d} {entry['image_size']}px: "
                  f"{sum(c['count'] for c in entry['calls'])} op calls, {len(entry['calls'])} distinct "
                  f"({n_sn} spectral-normalised weights)")
            models.append(entry)
    result = {
        "schema": SCHEMA,
        "generated_by": "python bench/shapes.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "setups": CLIPS,
        "note": "one d_loss + backward and one g_loss + backward per model pair in training mode; "
                "shapes are (rows, cols) for spectral_norm matrices, tensor shapes otherwise",
        "models": models,
    }
    sys.path.insert(0, HERE)
    from common import write_json

    write_json(args.out, result, announce=True)
    return 0


# ---------------------------------------------------------------------------------------------
# Readers (used by bench/kernels.py)


def load(path: str = DEFAULT_OUT) -> dict:
    with open(path) as f:
        data = json.load(f)
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {data.get('schema')!r}, expected {SCHEMA!r}")
    return data


def model_cases(data: dict, op: str, clip: str = "ViT-B-32") -> list[dict]:
    """Distinct call signatures of ``op`` over every variant at ``clip``, each with the variants
    (and phases) that make it, largest first. For ``spectral_norm`` one entry per matrix shape."""
    out: dict = {}
    for m in data["models"]:
        if m["clip"] != clip:
            continue
        for c in m["calls"]:
            if c["op"] != op:
                continue
            if op == "spectral_norm":
                key = json.dumps(c["shapes"]["matrix"])
            else:
                opts = {k: v for k, v in c.items() if k not in ("phase", "op", "shapes", "count", "dtype")}
                key = json.dumps([c["shapes"], opts], sort_keys=True)
            e = out.setdefault(key, {**{k: v for k, v in c.items() if k not in ("phase", "count", "module")},
                                     "variants": [], "phases": [], "modules": []})
            if m["variant"] not in e["variants"]:
                e["variants"].append(m["variant"])
            if c["phase"] not in e["phases"]:
                e["phases"].append(c["phase"])
            if c.get("module") and c["module"] not in e["modules"]:
                e["modules"].append(c["module"])

    def numel(e):
        n = 0
        for s in e["shapes"].values():
            if isinstance(s, list):
                k = 1
                for d in s:
                    k *= d
                n += k
        return n

    return sorted(out.values(), key=lambda e: (-numel(e), json.dumps(e["shapes"], sort_keys=True)))


def sn_weights(data: dict, clip: str = "ViT-B-32", variant_set=("scad", "scad_mi", "scad_dd")) -> list[tuple[str, tuple[int, int]]]:
    """``[(name, (rows, cols))]`` of every distinct SN matrix of the given variants' models at ``clip``
    (default: the SCAD discriminators, docs/design.md §10), named after a module that holds it."""
    rows = []
    for e in model_cases(data, "spectral_norm", clip):
        vs = [v for v in e["variants"] if v in variant_set] if variant_set else e["variants"]
        if not vs:
            continue
        r, c = e["shapes"]["matrix"]
        mod = e["modules"][0] if e["modules"] else "?"
        more = f" (+{len(e['modules']) - 1} more)" if len(e["modules"]) > 1 else ""
        rows.append((f"{mod} {e['weight']}{more} [{','.join(vs)}]", (int(r), int(c))))
    return rows


if __name__ == "__main__":
    sys.exit(run())
