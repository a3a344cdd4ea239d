"""Evaluate a trained checkpoint: FID, CLIP score, PPD/mPPD and the shapes ground-truth metrics (docs/design.md §9).

    python -m scadfast.evaluate --ckpt RUN/ckpt.pt --metrics fid,clip_score,ppd,shapes \\
        [--n-per-prompt N] [--prompts FILE] [--inception-weights PATH] [--dinov2 PATH] \\
        [--eval-clip NAME[:PRETRAINED]] [--out report.json]

Prints a readable report (metric, value, extractor/settings, N) and writes it as JSON (``--out``,
default ``<checkpoint dir>/eval.json``).

* ``clip_score``, ``ppd`` and ``shapes`` share one pass over the prompts: for every prompt,
  ``--n-per-prompt`` images from independent noise (image j uses seed ``--seed + j``, as
  ``scadfast.sample``). Prompts come from ``--prompts`` (one per line) or, by default,
  ``--num-prompts`` distinct captions drawn from the shapes caption distribution.
* ``fid`` generates ``--fid-n`` images, one per caption drawn from the shapes caption
  distribution (or cycled from ``--prompts``), against ``--fid-ref DIR`` (real images) or, for
  a shapes-trained checkpoint, a shapes set of ``--fid-n`` real images. Only the standard Inception
  weights are accepted (see :mod:`scadfast.metrics.fid`); if they are missing the command stops
  before generating anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

METRICS = ("fid", "clip_score", "ppd", "shapes")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scadfast.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint file or run directory")
    p.add_argument("--metrics", default="clip_score,ppd,shapes", help=f"comma-separated subset of {','.join(METRICS)}")
    p.add_argument("--n-per-prompt", type=int, default=32, help="images per prompt (clip_score, ppd, shapes)")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line")
    p.add_argument("--num-prompts", type=int, default=24, help="distinct shapes prompts when --prompts is not given")
    p.add_argument("--seed", type=int, default=0, help="noise seed base (image j uses seed + j); also the prompt draw")
    p.add_argument("--inception-weights", default=None, help="standard Inception-v3 FID weights (.pth)")
    p.add_argument("--fid-n", type=int, default=5000, help="generated images for FID")
    p.add_argument("--fid-ref", default=None, help="folder of real images (or a shapes set) for FID")
    p.add_argument("--dinov2", default=None, help="DINOv2 for PPD: torch hub repo dir or module file (local only)")
    p.add_argument("--dinov2-model", default="dinov2_vits14", help="hub entry point when --dinov2 is a hub dir")
    p.add_argument("--ppd-distance", choices=("cosine", "l2"), default="cosine")
    p.add_argument("--eval-clip", default=None,
                   help="CLIP for clip_score (and the PPD fallback) as NAME[:PRETRAINED], e.g. ViT-B-32:openai or "
                        "scadfast-tiny:shapes (default: the training CLIP)")
    p.add_argument("--clip-pretrained", default=None, help="override the training CLIP weights recorded in the checkpoint")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--cache-dir", default=None, help="default: $SCADFAST_CACHE or ~/.cache/scadfast")
    p.add_argument("--out", default=None, help="report JSON (default <ckpt dir>/eval.json)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def format_report(report: dict) -> str:
    """The human-readable table: one block per metric with its value, settings and N."""
    lines = [f"scadfast evaluation of {report['ckpt']} (step {report.get('step')}, variant {report.get('variant')})"]
    m = report["metrics"]
    if "fid" in m:
        r = m["fid"]
        lines.append(f"  FID          {r['fid']:.3f}   extractor: {r['extractor']} | dim {r['dim']} | "
                     f"N real {r['n_real']}, N generated {r['n_fake']}")
    if "clip_score" in m:
        r = m["clip_score"]
        lines.append(f"  CLIP score   {r['clip_score']:.3f}   CLIP: {r['clip']} | 100·cos | "
                     f"{r['n_prompts']} prompts, N {r['n_images']}")
    if "ppd" in m:
        r = m["ppd"]
        lines.append(f"  mPPD         {r['mppd']:.4f}   backbone: {r['backbone']} | distance {r['distance']} | "
                     f"N {r['n_per_prompt']} per prompt, {r['n_prompts']} prompts")
    if "shapes" in m:
        r = m["shapes"]
        per = ", ".join(f"{k} {v:.3f}" for k, v in r["alignment_per_attribute"].items())
        cov = ", ".join(f"{k} {v:.3f}" for k, v in r["coverage_per_attribute"].items())
        lines.append(f"  shapes alignment {r['alignment']:.4f}   (per attribute: {per})")
        lines.append(f"  shapes coverage  {_fmt(r['coverage'])}   (ideal at this N: {_fmt(r['coverage_ideal'])}; "
                     f"per attribute: {cov}) | N {r['n_per_prompt']} per prompt, {r['n_prompts']} prompts")
        if r.get("classifier_accuracy"):
            acc = ", ".join(f"{k} {v:.3f}" for k, v in r["classifier_accuracy"].items())
            lines.append(f"      attribute classifier held-out accuracy: {acc}")
    return "\n".join(lines)


def _read_prompts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _default_prompts(n: int, seed: int) -> list[str]:
    from .data.shapes import sample_prompts

    return list(dict.fromkeys(sample_prompts(max(50 * n, 1000), seed=seed)))[:n]


def _fid_batches(loaded, prompts: list[str], n: int, seed: int, batch_size: int):
    g = torch.Generator().manual_seed(seed + 7_777_777)
    with torch.no_grad():
        for i in range(0, n, batch_size):
            b = min(batch_size, n - i)
            ps = [prompts[(i + k) % len(prompts)] for k in range(b)]
            z = torch.randn(b, loaded.pair.z_dim, generator=g).to(loaded.device)
            yield loaded.pair.generate(z, loaded.embed(ps)).float().clamp(-1, 1)


def run(a) -> dict:
    from . import runs
    from .data import shapes as shp
    from .metrics import features, fid as fid_lib

    metrics = [m.strip() for m in a.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"--metrics: unknown {unknown or metrics}; choose from {','.join(METRICS)}")
    if a.n_per_prompt < 2 and ("ppd" in metrics or "shapes" in metrics):
        raise ValueError("--n-per-prompt must be >= 2 for ppd and shapes")
    cache_dir = a.cache_dir or str(shp.default_cache_dir())
    progress = not a.quiet
    # Fail fast on missing standard Inception weights, before any generation.
    inception = fid_lib.InceptionFeatures(a.inception_weights, a.device) if "fid" in metrics else None

    loaded = runs.load(a.ckpt, a.device, a.clip_pretrained)  # FrozenCLIP resolves the 'shapes' tag
    train_label = f"training CLIP {loaded.clip.name}:{loaded.state['clip'].get('pretrained')}"
    if a.eval_clip:
        from .metrics.clip_score import load_eval_clip

        eval_clip, eval_label = load_eval_clip(a.eval_clip, loaded.device), f"eval CLIP {a.eval_clip}"
    else:
        eval_clip, eval_label = loaded.clip, train_label
    prompts = _read_prompts(a.prompts) if a.prompts else _default_prompts(a.num_prompts, a.seed)
    if not prompts:
        raise ValueError("no prompts")

    report = {"ckpt": os.path.abspath(a.ckpt), "step": loaded.state.get("step"), "variant": loaded.state.get("variant"),
              "settings": {"n_per_prompt": a.n_per_prompt, "seed": a.seed, "prompts": prompts,
                           "device": str(loaded.device)}, "metrics": {}}
    t0 = time.perf_counter()
    per_prompt = [m for m in metrics if m != "fid"]
    if per_prompt:
        from .metrics.clip_score import CLIPScorer
        from .metrics.ppd import CLIPImageFeatures, DINOv2Features, PPDScorer

        total = len(prompts) * a.n_per_prompt
        scorers = {}
        if "clip_score" in metrics:
            scorers["clip_score"] = CLIPScorer(eval_clip, prompts, eval_label, progress=False)
        if "ppd" in metrics:
            ext = (DINOv2Features(a.dinov2, a.dinov2_model, loaded.device) if a.dinov2
                   else CLIPImageFeatures(eval_clip, eval_label))
            scorers["ppd"] = PPDScorer(ext, a.ppd_distance, a.batch_size, progress=False)
        if "shapes" in metrics:
            from .metrics.shapes_truth import ShapesTruthScorer
            from .shapes_classifier import load_or_train

            clf = load_or_train(cache_dir=cache_dir, device=loaded.device)
            scorers["shapes"] = ShapesTruthScorer(clf, prompts, progress=False)
        bar = features.ProgressLine("evaluate", total, enabled=progress)
        for i, imgs in features.iter_generated(loaded, prompts, a.n_per_prompt, a.seed, a.batch_size):
            if "clip_score" in scorers:
                for j in range(0, len(imgs), a.batch_size):
                    scorers["clip_score"].add(imgs[j:j + a.batch_size], i)
            if "ppd" in scorers:
                scorers["ppd"].add(imgs)
            if "shapes" in scorers:
                scorers["shapes"].add(i, imgs)
            bar.update(len(imgs))
        for k, s in scorers.items():
            report["metrics"][k] = s.result()
    if "fid" in metrics:
        if a.fid_ref:
            real = features.list_image_files(a.fid_ref)
        elif loaded.state.get("data") == "shapes":
            ref_dir = shp.make_shapes_dataset(os.path.join(cache_dir, "data"), n=a.fid_n,
                                              image_size=int(loaded.state["image_size"]), seed=0)
            real = features.list_image_files(str(ref_dir))
        else:
            raise ValueError(f"--fid-ref DIR is needed: the checkpoint was trained on {loaded.state.get('data')!r}")
        fid_prompts = prompts if a.prompts else shp.sample_prompts(a.fid_n, seed=a.seed + 1)
        report["metrics"]["fid"] = _fid_with(
            inception, real, _fid_batches(loaded, fid_prompts, a.fid_n, a.seed, a.batch_size), a, cache_dir, progress)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def _fid_with(ext, real, batches, a, cache_dir, progress) -> dict:
    from .metrics import fid as fid_lib

    mu_r, s_r, n_r = fid_lib.reference_stats(real, ext, cache_dir, a.batch_size, None, progress)
    mu_f, s_f, n_f = fid_lib.feature_stats(batches, ext, a.fid_n, what="fid: generated", progress=progress)
    return {"fid": fid_lib.frechet_distance(mu_r, s_r, mu_f, s_f), "n_real": n_r, "n_fake": n_f,
            "extractor": ext.description, "dim": int(ext.dim)}


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.n_per_prompt < 1 or a.fid_n < 2 or a.num_prompts < 1 or a.batch_size < 1:
        p.error("--n-per-prompt, --num-prompts and --batch-size must be >= 1 and --fid-n >= 2")
    if a.prompts and not os.path.isfile(a.prompts):
        p.error(f"--prompts {a.prompts}: file not found")
    from .checkpoint import CheckpointError
    from .metrics.fid import InceptionWeightsMissing
    from .outputs import unwritable_reason

    out = a.out or os.path.join(os.path.dirname(os.path.abspath(a.ckpt)) if os.path.isfile(a.ckpt) else a.ckpt, "eval.json")
    why = unwritable_reason(out) if (a.out or os.path.isdir(os.path.dirname(out))) else None
    if why:  # before any generation: a report that cannot be written would lose the whole evaluation
        print(f"error: {'--out ' if a.out else 'report '}{out}: cannot write there: {why}", file=sys.stderr)
        return 2
    try:
        report = run(a)
    except (InceptionWeightsMissing, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
