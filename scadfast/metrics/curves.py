"""Learning curves: metrics of a training run at snapshots (``--eval-every``, ``--eval-metrics``).

:class:`SnapshotEvaluator` scores a generator on a fixed set of **held-out prompts** — captions of the
shapes grammar that are not training captions, each leaving at least one attribute free — with a
fixed noise vector per column (image ``j`` of every prompt uses noise ``j``), so two snapshots differ
only by the weights. Per snapshot it gives:

* ``alignment`` and ``alignment_per_attribute`` (ground truth from the shipped attribute classifier),
* ``coverage`` of the free attributes with its ``coverage_ideal`` ceiling at this N,
* ``mppd``: mean pairwise cosine distance of each prompt's images in the training CLIP's image
  embedding (the offline fallback backbone of ``evaluate``'s PPD; a diversity number for the curve),
* ``clip_score``: 100·cos under the training CLIP.

:class:`ReferenceSnapshotEvaluator` gives ``fid``, ``kid`` and ``clip_score`` against a reference set
(COCO-style runs), by ``evaluate``'s caption protocol: one image per caption, the first N captions of
the reference's seeded order, fixed noise per image; the reference statistics are computed (or loaded)
once by the caller. :func:`merged` puts several evaluators into one record.

Evaluation never feeds training: it runs under ``no_grad`` with its own noise generator and never
touches the global RNG, so a run with snapshots is bitwise the run without them.

:func:`append_jsonl` / :func:`read_jsonl` keep one JSON object per snapshot; :func:`plot_curves`
draws one or several runs' curves into a PNG (matplotlib, Agg backend).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Callable, Dict, Iterable, List, Mapping, Sequence

import torch

from ..data import shapes as shp

__all__ = ["HELDOUT_SEED", "heldout_prompts", "SnapshotEvaluator", "ReferenceSnapshotEvaluator", "merged",
           "append_jsonl", "read_jsonl", "plot_curves", "isolated_rng"]

#: Seed of the held-out prompt draw (the shapes training sets use seed 0; prompts that are training
#: captions are excluded whatever the seed).
HELDOUT_SEED = 9_001


def heldout_prompts(n: int, exclude: Iterable[str] = (), seed: int = HELDOUT_SEED) -> List[str]:
    """``n`` distinct shapes captions that are not in ``exclude`` and leave at least one attribute free.

    Drawn from the data set's caption distribution with ``seed``; deterministic.
    """
    if n < 1:
        raise ValueError(f"heldout_prompts: n must be >= 1, got {n}")
    exclude = set(exclude)
    out: List[str] = []
    for p in dict.fromkeys(shp.sample_prompts(max(100 * n, 5000), seed=seed)):
        if p not in exclude and shp.free_attributes(p):
            out.append(p)
            if len(out) == n:
                return out
    raise ValueError(f"heldout_prompts: only {len(out)} held-out prompts found, {n} asked for")


class SnapshotEvaluator:
    """Scores ``generate(z, s) -> images`` on held-out prompts (module doc).

    Args:
        clip: the training :class:`~scadfast.models.clip.FrozenCLIP` (text embeddings, CLIP score, mPPD).
        prompts: the held-out prompts (:func:`heldout_prompts`).
        z_dim: noise size of the generator.
        n_per_prompt: images per prompt (>= 2).
        seed: seed of the fixed noise.
        classifier: the shapes attribute classifier (default: the shipped one).
        batch_size: generation batch.
    """

    def __init__(self, clip, prompts: Sequence[str], z_dim: int, n_per_prompt: int = 16, seed: int = 0,
                 classifier=None, batch_size: int = 64):
        if n_per_prompt < 2:
            raise ValueError(f"SnapshotEvaluator: n_per_prompt must be >= 2, got {n_per_prompt}")
        self.clip, self.prompts = clip, list(prompts)
        self.n, self.batch_size, self.seed = int(n_per_prompt), int(batch_size), int(seed)
        dev = clip.device
        with torch.no_grad():
            self.s = clip.encode_text(clip.tokenize(self.prompts)).float()
        g = torch.Generator().manual_seed(int(seed) + 424_242)
        self.z = torch.randn(self.n, z_dim, generator=g).to(dev)
        if classifier is None:
            from ..shapes_classifier import load, shipped_path

            with isolated_rng(dev, seed):  # building the module draws its (then overwritten) init weights
                classifier = load(shipped_path(), device=dev)
        self.classifier = classifier.eval()

    @torch.no_grad()
    def __call__(self, generate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict:
        with isolated_rng(self.clip.device, self.seed):  # e.g. MS-CLIP-GAN draws its CA noise inside generate
            return self._score(generate)

    def _score(self, generate):
        import torch.nn.functional as F

        from .ppd import mean_pairwise_distance
        from .shapes_truth import ShapesTruthScorer

        t0 = time.perf_counter()
        shapes = ShapesTruthScorer(self.classifier, self.prompts, progress=False)
        text = F.normalize(self.s, dim=-1)
        clip_scores, ppd = [], []
        for i in range(len(self.prompts)):
            imgs = torch.cat([
                generate(self.z[j:j + self.batch_size], self.s[i].expand(min(self.batch_size, self.n - j), -1))
                .float().clamp(-1, 1) for j in range(0, self.n, self.batch_size)])
            shapes.add(i, imgs)
            # One CLIP image pass serves the CLIP score and the mPPD (evaluate's fallback backbone).
            emb = F.normalize(self.clip.image_embed(imgs).float(), dim=-1)
            clip_scores.append(100.0 * float((emb @ text[i]).mean()))
            ppd.append(mean_pairwise_distance(emb, "cosine"))
        r = shapes.result()
        return {
            "alignment": r["alignment"], "alignment_per_attribute": r["alignment_per_attribute"],
            "coverage": r["coverage"], "coverage_ideal": r["coverage_ideal"],
            "coverage_per_attribute": r["coverage_per_attribute"],
            "mppd": sum(ppd) / len(ppd), "mppd_backbone": "training CLIP image embedding (fallback), cosine",
            "clip_score": sum(clip_scores) / len(clip_scores), "n_prompts": len(self.prompts),
            "n_per_prompt": self.n, "eval_seconds": round(time.perf_counter() - t0, 2),
        }


class ReferenceSnapshotEvaluator:
    """Scores ``generate(z, s) -> images`` with ``fid``, ``kid`` (and ``kid_std``) and ``clip_score`` on
    one image per prompt (module doc). Prompts, noise and batching are ``evaluate``'s caption protocol, so
    with the same seed, N and batch size a snapshot is ``evaluate --ref REF --fid-n N`` of those weights.

    Args:
        clip: the training :class:`~scadfast.models.clip.FrozenCLIP` (conditioning, CLIP score).
        prompts: the captions, one generated image each (``Reference.caption_order(seed)[:n]``).
        z_dim: noise size of the generator.
        metrics: a subset of ``("fid", "kid", "clip_score")``.
        extractor: the FID feature extractor (:class:`~scadfast.metrics.fid.InceptionFeatures`), for fid/kid.
        real: the reference :class:`~scadfast.metrics.fid.FeatureSet` (with ``features`` for kid).
        seed: seed of the fixed noise.
        batch_size: generation batch (it also fixes the noise, as ``evaluate --batch-size``).
    """

    METRICS = ("fid", "kid", "clip_score")

    def __init__(self, clip, prompts: Sequence[str], z_dim: int, metrics: Sequence[str], extractor=None, real=None,
                 seed: int = 0, batch_size: int = 64):
        from .clip_score import CLIPScorer, encode_prompts
        from .reference import protocol_noise

        self.metrics = [m for m in metrics if m in self.METRICS]
        if len(prompts) < 2 or not self.metrics:
            raise ValueError(f"ReferenceSnapshotEvaluator: needs >= 2 prompts and one of {self.METRICS}")
        if {"fid", "kid"} & set(self.metrics) and (extractor is None or real is None):
            raise ValueError("ReferenceSnapshotEvaluator: fid and kid need the extractor and the reference statistics")
        if "kid" in self.metrics and real.features is None:
            raise ValueError("ReferenceSnapshotEvaluator: kid needs the reference features, not mu/sigma only")
        self.clip, self.prompts, self.extractor, self.real = clip, list(prompts), extractor, real
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.s = encode_prompts(clip, self.prompts)
        self.z = torch.cat(list(protocol_noise(len(self.prompts), z_dim, seed, self.batch_size))).to(clip.device)
        self.scorer = None
        if "clip_score" in self.metrics:
            label = f"training CLIP {clip.name}:{clip.pretrained}"
            self.scorer = CLIPScorer(clip, self.prompts, label, progress=False, text=self.s)

    @torch.no_grad()
    def __call__(self, generate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict:
        with isolated_rng(self.clip.device, self.seed):
            return self._score(generate)

    def _score(self, generate):
        from . import fid as fid_lib
        from .kid import kernel_inception_distance

        t0 = time.perf_counter()
        n, bs = len(self.prompts), self.batch_size
        if self.scorer is not None:
            self.scorer.reset()

        def images():
            for i in range(0, n, bs):
                x = generate(self.z[i:i + bs], self.s[i:i + bs]).float().clamp(-1, 1)
                if self.scorer is not None:
                    self.scorer.add(x, torch.arange(i, i + len(x)))
                yield x

        out = {}
        if self.extractor is not None:
            keep = "kid" in self.metrics
            fake = fid_lib.collect_features(images(), self.extractor, n, progress=False, keep=keep)
            if "fid" in self.metrics:
                out["fid"] = fid_lib.frechet_distance(self.real.mu, self.real.sigma, fake.mu, fake.sigma)
            if keep:
                dev = getattr(self.extractor, "device", "cpu")
                r = kernel_inception_distance(torch.from_numpy(fake.features).to(dev),
                                              torch.from_numpy(self.real.features).to(dev))
                out.update(kid=r["kid"], kid_std=r["kid_std"])
            out["n_real"] = self.real.n if self.real.n >= 0 else None
        else:
            for _ in images():
                pass
        if self.scorer is not None:
            out["clip_score"] = self.scorer.result()["clip_score"]
        return {**out, "n_images": n, "eval_seconds": round(time.perf_counter() - t0, 2)}


def merged(evaluators: Sequence[Callable]) -> Callable:
    """One evaluator from several: each one's record in turn, merged (``eval_seconds`` summed)."""
    def run(generate):
        rec, secs = {}, 0.0
        for e in evaluators:
            r = e(generate)
            secs += r.get("eval_seconds", 0.0)
            rec.update(r)
        rec["eval_seconds"] = round(secs, 2)
        return rec
    return run


@contextlib.contextmanager
def isolated_rng(device, seed: int):
    """Run the block with the global RNG forked (restored on exit) and seeded with ``seed``: evaluation
    and sample grids leave the training random streams exactly where they were."""
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def append_jsonl(path: str, record: Mapping) -> None:
    """Append one JSON line and flush it to disk (a crash loses at most the line being written)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str) -> List[dict]:
    """The records of a JSONL file; a torn last line (a kill mid-write) is ignored."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


_PANELS = (("alignment", "alignment (all named attributes)"), ("shape", "shape alignment"),
           ("coverage", "coverage of free attributes"), ("mppd", "mPPD (CLIP fallback, cosine)"),
           ("clip_score", "CLIP score"), ("fid", "FID"), ("kid", "KID"))


def _value(rec: Mapping, key: str):
    if key in rec:
        return rec[key]
    return rec.get("alignment_per_attribute", {}).get(key)


def plot_curves(runs: Mapping[str, Sequence[Mapping]], path: str, title: str = "") -> str:
    """Draw each run's snapshot records (label → records with ``step``) into one PNG; returns ``path``.

    One panel per metric the records hold (a COCO-style run's records have ``fid`` but no ``alignment``).
    Several records per step (seeds) are drawn as their mean with a min–max band. The coverage panel
    shows the ideal coverage at this N as a dashed line. More than 10 runs take the 20 colours of
    ``tab20`` in order (a dark and a light shade of one hue for runs 1–2, 3–4, …: list an ablation's
    pairs next to each other), and more than 6 put the legend beside the panels rather than on one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, name) for k, name in _PANELS if any(_value(r, k) is not None for recs in runs.values() for r in recs)]
    panels = panels or list(_PANELS[:1])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.4), squeeze=False)
    axes = list(axes[0])
    colors = plt.get_cmap("tab20").colors if len(runs) > 10 else [None] * len(runs)
    legend_beside = len(runs) > 6
    for i, (label, recs) in enumerate(runs.items()):
        for ax, (key, name) in zip(axes, panels):
            by_step: Dict[int, List[float]] = {}
            for r in recs:
                v = _value(r, key)
                if v is not None:
                    by_step.setdefault(int(r["step"]), []).append(float(v))
            if not by_step:
                continue
            steps = sorted(by_step)
            mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
            line, = ax.plot(steps, mean, marker="o", ms=2.5, label=label, color=colors[i % len(colors)])
            if any(len(by_step[s]) > 1 for s in steps):
                ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                                color=line.get_color(), alpha=0.2)
    for ax, (key, name) in zip(axes, panels):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key in ("alignment", "shape", "coverage"):
            ax.set_ylim(0, 1)
    ideal = [r["coverage_ideal"] for recs in runs.values() for r in recs if r.get("coverage_ideal") is not None]
    if ideal and "coverage" in dict(panels):
        axes[[k for k, _ in panels].index("coverage")].axhline(sum(ideal) / len(ideal), ls="--", color="gray", lw=1,
                                                                label="ceiling at this N")
    if legend_beside:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    else:
        axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight" if legend_beside else None)  # keep the legend in the PNG
    plt.close(fig)
    return path
