"""Evaluate a trained checkpoint: FID / zFID, KID, precision-recall, CLIP score, PPD/mPPD and the shapes
ground-truth metrics (docs/design.md §9).

    python -m scadfast.evaluate --ckpt RUN/ckpt.pt --metrics fid,kid,pr,clip_score,ppd,shapes \\
        [--ref coco:ROOT | --ref DIR] [--ref-stats FILE.npz] [--save-stats FILE.npz] [--fid-n N] \\
        [--n-per-prompt N] [--prompts FILE] [--inception-weights PATH] [--dinov2 PATH] \\
        [--eval-clip NAME[:PRETRAINED]] [--out report.json]

Prints a readable report (metric, value, extractor/settings, N) and writes it as JSON (``--out``,
default ``<checkpoint dir>/eval.json``).

* ``fid``, ``zfid``, ``kid`` and ``pr`` share one generated set of ``--fid-n`` images and one
  reference set. **Caption protocol** (GALIP, DF-GAN): with ``--ref`` a data spec that has captions
  (``coco:ROOT``, ``folder:PATH``, ``wds:PATTERN``, ...) and no ``--prompts``, the prompts are the
  reference set's own captions, one image per caption, in a seeded random order (default N: 30,000,
  at most the number of captions); ``clip_score`` is then computed on those same images, each
  against its caption. Otherwise the generated images use captions drawn from the shapes caption
  distribution (or cycled from ``--prompts``). Every real image is counted once and resized to
  ``--ref-size`` (default: the checkpoint's image size) with PIL bicubic, the whole image, so mixed
  sizes (raw val2014) are accepted. ``--ref-stats`` uses precomputed statistics (``mu``/``sigma``
  as pytorch-fid, DF-GAN and GALIP publish them) instead of reading images; ``--save-stats`` writes
  them. A shapes-trained checkpoint without ``--ref`` is compared with a shapes set of ``--fid-n``
  real images. ``zfid`` is the same number as ``fid`` for a model evaluated on a set it was not
  trained on (the SCAD paper's zFID30k: trained on CC12M, COCO captions and statistics); it refuses a
  reference that is the training data. Only the standard Inception weights are accepted (see
  :mod:`scadfast.metrics.fid`); if they are missing the command stops before generating anything.
* ``clip_score`` (outside the caption protocol), ``ppd`` and ``shapes`` share one pass over the
  prompts: for every prompt, ``--n-per-prompt`` images from independent noise (image j uses seed
  ``--seed + j``, as ``scadfast.sample``). Prompts come from ``--prompts`` (one per line), the first
  ``--num-prompts`` captions of the caption protocol's order, or ``--num-prompts`` distinct captions
  drawn from the shapes caption distribution.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from .cli import prog

METRICS = ("fid", "zfid", "kid", "pr", "clip_score", "ppd", "shapes")
IMAGE_METRICS = ("fid", "zfid", "kid", "pr")  # one generated set against one reference set
PAPER_N = 30_000  # generated images of the caption protocol (GALIP / DF-GAN on COCO val2014)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("scadfast.evaluate"), description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint file or run directory")
    p.add_argument("--metrics", default="clip_score,ppd,shapes", help=f"comma-separated subset of {','.join(METRICS)}")
    p.add_argument("--n-per-prompt", type=int, default=32, help="images per prompt (clip_score, ppd, shapes)")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line")
    p.add_argument("--num-prompts", type=int, default=24, help="distinct shapes prompts when --prompts is not given")
    p.add_argument("--seed", type=int, default=0, help="noise seed base (image j uses seed + j); also the prompt draw")
    p.add_argument("--inception-weights", default=None, help="standard Inception-v3 FID weights (.pth)")
    p.add_argument("--fid-n", type=int, default=None,
                   help=f"generated images for fid/zfid/kid/pr (default: one per caption, at most {PAPER_N}, with a "
                        "caption --ref; else 5000)")
    p.add_argument("--ref", "--fid-ref", dest="ref", default=None,
                   help="reference set for fid/zfid/kid/pr: a data spec with captions (coco:ROOT, coco:ANN.json[,IMAGES], "
                        "folder:PATH, wds:PATTERN, shapes[:...]) whose captions become the prompts, or a plain image folder")
    p.add_argument("--ref-size", type=int, default=None,
                   help="resize every real image to N x N (PIL bicubic, whole image); default the checkpoint's image "
                        "size; 0 = no resize (images must then share one size)")
    p.add_argument("--ref-stats", default=None,
                   help="precomputed reference statistics .npz (mu, sigma; features too for kid/pr) instead of "
                        "reading the real images")
    p.add_argument("--save-stats", default=None, help="write the reference statistics (with the features when "
                                                      "kid/pr ran) to this .npz")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID: random subsets averaged")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID: samples per subset and side")
    p.add_argument("--pr-k", type=int, default=3, help="precision/recall: k of the k-NN radii")
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
    heads = {
        "fid": lambda r: f"{r.get('label', 'FID'):<12} {r['fid']:.3f}   extractor: {r['extractor']} | dim {r['dim']}",
        "zfid": lambda r: f"{r.get('label', 'zFID'):<12} {r['fid']:.3f}   extractor: {r['extractor']} | dim {r['dim']}",
        "kid": lambda r: (f"KID          {r['kid']:.5f} ± {r['kid_std']:.5f}   {r['subsets']} subsets of "
                          f"{r['subset_size']} | polynomial kernel degree 3"),
        "pr": lambda r: f"precision    {r['precision']:.4f}   recall {r['recall']:.4f}   k-NN manifolds, k {r['k']}",
    }
    for key, head in heads.items():  # the image metrics: one generated set against one reference set
        if key in m:
            r = m[key]
            lines.append(f"  {head(r)} | N real {r['n_real']}, N generated {r['n_fake']}")
            ref = r.get("reference")
            if ref:
                lines.append(f"      reference: {ref.get('source', '?')} | resize: {ref.get('resize', '?')}"
                             + (f" | statistics {ref['stats_file']}" if ref.get("stats_file") else ""))
    if "clip_score" in m:
        r = m["clip_score"]
        lines.append(f"  CLIP score   {r['clip_score']:.3f}   CLIP: {r['clip']} | 100·cos | "
                     f"{r['n_prompts']} prompts, N {r['n_images']}" + (f" | {r['protocol']}" if r.get("protocol") else ""))
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


def _stream_batches(loaded, prompts: list[str], n: int, seed: int, batch_size: int):
    """``n`` images, image i for prompt ``i mod len(prompts)``: yields (prompt indices, images in [-1, 1])."""
    from .metrics.reference import protocol_noise

    with torch.no_grad():
        for i, z in zip(range(0, n, batch_size), protocol_noise(n, loaded.pair.z_dim, seed, batch_size)):
            idx = [(i + k) % len(prompts) for k in range(len(z))]
            z = z.to(loaded.device)
            yield idx, loaded.pair.generate(z, loaded.embed([prompts[j] for j in idx])).float().clamp(-1, 1)


def _same_source(a: str, b: str) -> bool:
    """Do two data specs / folders name the same data set (kind and resolved path)?"""
    from .data.sources import parse_data_spec
    from .metrics.reference import is_data_spec

    def norm(v):
        d = parse_data_spec(v) if is_data_spec(v) else parse_data_spec(f"folder:{v}")
        return d.kind, os.path.realpath(d.path) if d.path else None

    try:
        return norm(a) == norm(b)
    except ValueError:
        return False


def _reference_set(a, loaded, metrics, n_img, cache_dir):
    """The :class:`Reference` the image metrics compare with (``None``: only ``--ref-stats``); checked
    before anything is generated."""
    from .data import shapes as shp
    from .metrics.features import list_image_files
    from .metrics.reference import files_reference, load_reference

    train_data = loaded.state.get("data")
    if "zfid" in metrics:
        if not (a.ref or a.ref_stats):
            raise ValueError("--metrics zfid needs the evaluation set: --ref (e.g. coco:ROOT) and/or --ref-stats")
        if a.ref and train_data and _same_source(str(train_data), a.ref):
            raise ValueError(f"--metrics zfid: the checkpoint was trained on {train_data}, the reference set itself; "
                             "that is plain FID (--metrics fid)")
    if a.ref:
        return load_reference(a.ref, int(loaded.state["image_size"]))
    if a.ref_stats:
        return None
    if train_data == "shapes":
        ref_dir = shp.make_shapes_dataset(os.path.join(cache_dir, "data"), n=n_img,
                                          image_size=int(loaded.state["image_size"]), seed=0)
        return files_reference(list_image_files(str(ref_dir)), f"shapes set {ref_dir}")
    raise ValueError(f"--ref is needed for {','.join(m for m in metrics if m in IMAGE_METRICS)}: the checkpoint was "
                     f"trained on {train_data!r}")


def run(a) -> dict:
    from . import runs
    from .data import shapes as shp
    from .metrics import features, fid as fid_lib

    metrics = [m.strip() for m in a.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"--metrics: unknown {unknown or metrics}; choose from {','.join(METRICS)}")
    if "fid" in metrics and "zfid" in metrics:
        raise ValueError("--metrics: fid and zfid are the same number (zfid names FID on a set the model was not "
                         "trained on); ask for one")
    if a.n_per_prompt < 2 and ("ppd" in metrics or "shapes" in metrics):
        raise ValueError("--n-per-prompt must be >= 2 for ppd and shapes")
    cache_dir = a.cache_dir or str(shp.default_cache_dir())
    progress = not a.quiet
    image_metrics = [m for m in metrics if m in IMAGE_METRICS]
    keep = "kid" in metrics or "pr" in metrics
    # Fail fast on missing standard Inception weights, before any generation.
    inception = fid_lib.InceptionFeatures(a.inception_weights, a.device) if image_metrics else None

    loaded = runs.load(a.ckpt, a.device, a.clip_pretrained)  # FrozenCLIP resolves the 'shapes' tag
    train_label = f"training CLIP {loaded.clip.name}:{loaded.state['clip'].get('pretrained')}"
    if a.eval_clip:
        from .metrics.clip_score import load_eval_clip

        eval_clip, eval_label = load_eval_clip(a.eval_clip, loaded.device), f"eval CLIP {a.eval_clip}"
    else:
        eval_clip, eval_label = loaded.clip, train_label
    ref = None
    if image_metrics or (a.ref and not a.prompts):
        ref = _reference_set(a, loaded, metrics, a.fid_n or 5000, cache_dir)
    caption_mode = ref is not None and bool(ref.captions) and not a.prompts
    captions = ref.caption_order(a.seed) if caption_mode else None
    if a.prompts:
        prompts = _read_prompts(a.prompts)
    elif caption_mode:
        prompts = captions[:a.num_prompts]
    else:
        prompts = _default_prompts(a.num_prompts, a.seed)
    if not prompts:
        raise ValueError("no prompts")
    if "zfid" in metrics and not (caption_mode or a.prompts):
        raise ValueError("--metrics zfid needs the evaluation set's captions as prompts: --ref with captions "
                         "(e.g. coco:ROOT) or --prompts FILE")
    n_img = a.fid_n or (min(PAPER_N, len(captions)) if caption_mode else 5000)
    if caption_mode and image_metrics and n_img < 2:
        raise ValueError(f"{ref.source}: a single caption; fid/kid/pr need at least 2 generated images")

    report = {"ckpt": os.path.abspath(a.ckpt), "step": loaded.state.get("step"), "variant": loaded.state.get("variant"),
              "settings": {"n_per_prompt": a.n_per_prompt, "seed": a.seed, "prompts": prompts,
                           "device": str(loaded.device)}, "metrics": {}}
    t0 = time.perf_counter()
    stream_clip = caption_mode and "clip_score" in metrics  # CLIP score on the one-image-per-caption set
    per_prompt = [m for m in metrics if m in ("ppd", "shapes") or (m == "clip_score" and not stream_clip)]
    if per_prompt:
        from .metrics.clip_score import CLIPScorer
        from .metrics.ppd import CLIPImageFeatures, DINOv2Features, PPDScorer

        total = len(prompts) * a.n_per_prompt
        scorers = {}
        if "clip_score" in per_prompt:
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
    if image_metrics or stream_clip:
        if caption_mode:
            stream_prompts = captions[:n_img]
            report["settings"]["image_prompts"] = {
                "from": f"captions of {ref.source}, seeded order (seed {a.seed}), one image per caption "
                        "(cycled when --fid-n exceeds them)",
                "n": n_img, "prompts": stream_prompts}
        else:
            stream_prompts = prompts if a.prompts else shp.sample_prompts(n_img, seed=a.seed + 1)
        real = None
        if image_metrics:  # the reference before the generated set: a bad image or file stops it early
            real = _reference_features(a, ref, inception, keep, int(loaded.state["image_size"]), cache_dir, progress)
        scorer = None
        if stream_clip:
            from .metrics.clip_score import CLIPScorer

            scorer = CLIPScorer(eval_clip, stream_prompts, eval_label, progress=False)

        def images():
            for idx, x in _stream_batches(loaded, stream_prompts, n_img, a.seed, a.batch_size):
                if scorer is not None:
                    scorer.add(x, torch.tensor(idx))
                yield x

        if image_metrics:
            fake = fid_lib.collect_features(images(), inception, n_img, "fid: generated", progress, keep)
            report["metrics"].update(_image_metric_results(a, metrics, real, fake, inception))
        else:
            for _ in images():
                pass
        if scorer is not None:
            r = scorer.result()
            r.pop("per_prompt")  # one image per caption: the per-caption means are single images
            r["protocol"] = "one image per caption of the reference set"
            report["metrics"]["clip_score"] = r
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def _reference_features(a, ref, inception, keep, image_size, cache_dir, progress):
    from .metrics import fid as fid_lib

    size = image_size if a.ref_size is None else (a.ref_size or None)
    real = fid_lib.reference_or_stats(ref, inception, a.ref_stats, keep, cache_dir=cache_dir, batch_size=a.batch_size,
                                      size=size, progress=progress)
    if a.save_stats:
        fid_lib.save_stats(a.save_stats, real)
    return real


def _image_metric_results(a, metrics, real, fake, inception) -> dict:
    from .metrics import fid as fid_lib
    from .metrics.kid import kernel_inception_distance, precision_recall

    n_real = real.n if real.n >= 0 else None  # published statistics may not record their N
    dev = getattr(inception, "device", "cpu")
    common = {"n_real": n_real, "n_fake": fake.n, "extractor": inception.description, "dim": int(inception.dim)}
    out = {}
    for key in ("fid", "zfid"):
        if key in metrics:
            name = "zFID" if key == "zfid" else "FID"
            label = f"{name}{fake.n // 1000}k" if fake.n % 1000 == 0 else name
            out[key] = {"fid": fid_lib.frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma), "label": label,
                        "reference": dict(real.meta), **common}
    if "kid" in metrics:
        out["kid"] = {**kernel_inception_distance(torch.from_numpy(fake.features).to(dev),
                                                torch.from_numpy(real.features).to(dev), a.kid_subsets, a.kid_subset_size),
                      "extractor": inception.description}
    if "pr" in metrics:
        out["pr"] = {**precision_recall(torch.from_numpy(fake.features).to(dev),
                                       torch.from_numpy(real.features).to(dev), a.pr_k), "extractor": inception.description}
    return out


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.n_per_prompt < 1 or (a.fid_n is not None and a.fid_n < 2) or a.num_prompts < 1 or a.batch_size < 1:
        p.error("--n-per-prompt, --num-prompts and --batch-size must be >= 1 and --fid-n >= 2")
    if a.ref_size is not None and a.ref_size < 0:
        p.error(f"--ref-size must be >= 0 (0: no resize), got {a.ref_size}")
    if a.kid_subsets < 1 or a.kid_subset_size < 2 or a.pr_k < 1:
        p.error("--kid-subsets and --pr-k must be >= 1 and --kid-subset-size >= 2")
    if a.ref_stats and not os.path.isfile(a.ref_stats):
        p.error(f"--ref-stats {a.ref_stats}: file not found")
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
    why = unwritable_reason(a.save_stats) if a.save_stats else None
    if why:
        print(f"error: --save-stats {a.save_stats}: cannot write there: {why}", file=sys.stderr)
        return 2
    try:
        report = run(a)
    except (InceptionWeightsMissing, CheckpointError, ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
