"""Fréchet Inception Distance in the standard 2048-d Inception-v3 pool space (docs/design.md §6, §9).

FID = ‖μ_r − μ_g‖² + tr Σ_r + tr Σ_g − 2 tr (Σ_r Σ_g)^{1/2}, with (μ, Σ) the mean and covariance of
the **2048-d pool3 features of the standard Inception-v3 weights** (the TensorFlow 2015-12-05 graph
used by the original TTUR FID code, as ported by ``torch-fidelity``, whose
``FeatureExtractorInceptionV3`` is used here). No other network and no logit space is ever
substituted: if the standard weights are not on disk, :func:`find_inception_weights` raises
:class:`InceptionWeightsMissing` with the file name, the URL it is published at and where to put it.

Images enter as float tensors in [-1, 1]; they are quantised to uint8 (as if saved to PNG) and
torch-fidelity resizes them to 299 px with its TF1-compatible bilinear filter.

Reference statistics of real data are cached as ``<cache>/fid_stats/<key>.npz`` where the key
hashes the extractor identity (weights hash), the resize and the list of images (paths, sizes,
mtimes); :func:`save_stats` / :func:`load_stats` read and write the same ``.npz`` layout, which
also accepts published statistics holding only ``mu`` and ``sigma`` (pytorch-fid, DF-GAN, GALIP).

The matrix square root uses a symmetric eigen-formulation (no scipy needed):
tr (Σ_1 Σ_2)^{1/2} = Σ_i sqrt(λ_i(A Σ_2 A)) with A = Σ_1^{1/2} from ``eigh`` — A Σ_2 A is symmetric
PSD and similar to Σ_1 Σ_2, so its eigenvalues are the same; negative round-off is clipped to 0.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np
import torch

from .features import REFERENCE_RESIZE, ProgressLine, RunningMoments, default_device

__all__ = ["INCEPTION_FILE", "INCEPTION_URL", "INCEPTION_SHA256_PREFIX", "InceptionWeightsMissing",
           "frechet_distance", "find_inception_weights", "InceptionFeatures", "FeatureSet", "collect_features",
           "feature_stats", "save_stats", "load_stats", "reference_features", "reference_or_stats", "reference_stats",
           "compute_fid"]

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
#: torch.hub convention: the file name carries the first hex digits of the file's SHA-256.
INCEPTION_SHA256_PREFIX = "6726825d"


class InceptionWeightsMissing(FileNotFoundError):
    """The standard Inception-v3 weights are not available locally (the message says how to get them)."""


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (float64, symmetric eigen form).

    Raises ``ValueError`` if the shapes disagree or a covariance is not square/symmetric.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes disagree: mu1 {mu1.shape}, sigma1 {s1.shape}, "
                         f"mu2 {mu2.shape}, sigma2 {s2.shape}")
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if not np.allclose(s, s.T, rtol=1e-6, atol=1e-8 * max(1.0, float(np.abs(s).max()))):
            raise ValueError(f"frechet_distance: {name} is not symmetric")
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
    w, v = np.linalg.eigh(s1)
    a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = a @ s2 @ a
    lam = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_covmean = float(np.sqrt(np.clip(lam, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def _sha256_prefix(path: str, n: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def find_inception_weights(path: Optional[str] = None) -> str:
    """Path of the standard Inception-v3 weights, verified by their SHA-256 prefix.

    ``path`` (e.g. ``--inception-weights``) if given, else torch-fidelity's download location
    ``<torch.hub.get_dir()>/checkpoints/INCEPTION_FILE``. Never downloads. Raises
    :class:`InceptionWeightsMissing` when absent and ``ValueError`` when the file is not the standard
    weights (wrong hash).
    """
    cand = path or os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
    if not os.path.isfile(cand):
        where = f"--inception-weights {path}" if path else f"torch-fidelity's cache ({cand})"
        raise InceptionWeightsMissing(
            f"FID needs the standard Inception-v3 weights ({INCEPTION_FILE}, 2048-d pool features) and they are "
            f"not at {where}. Download {INCEPTION_URL} on a machine with network access and pass its path with "
            f"--inception-weights PATH (or put it at {os.path.join(torch.hub.get_dir(), 'checkpoints', INCEPTION_FILE)}). "
            "scadfast never substitutes another network for FID.")
    got = _sha256_prefix(cand, len(INCEPTION_SHA256_PREFIX))
    if got != INCEPTION_SHA256_PREFIX:
        raise ValueError(f"{cand} is not the standard Inception-v3 FID weights (SHA-256 starts with {got}, "
                         f"expected {INCEPTION_SHA256_PREFIX}: {INCEPTION_FILE})")
    return cand


class InceptionFeatures:
    """Standard FID feature extractor: torch-fidelity's ``FeatureExtractorInceptionV3``, 2048-d pool3.

    ``extractor(x)`` maps float images in [-1, 1] (B, 3, H, W) to float32 (B, 2048). Attributes:
    ``dim`` (2048), ``id`` (cache key part), ``description`` (for reports).
    """

    dim = 2048

    def __init__(self, weights_path: Optional[str] = None, device=None):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError("FID needs torch-fidelity: pip install torch-fidelity (scadfast[metrics])") from e
        path = find_inception_weights(weights_path)
        self.device = torch.device(device) if device is not None else default_device()
        self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                 feature_extractor_weights_path=path).to(self.device).eval()
        self.id = f"inception-v3-compat:{INCEPTION_SHA256_PREFIX}:pool3-2048"
        self.description = (f"Inception-v3 (torch-fidelity FeatureExtractorInceptionV3, standard TF 2015-12-05 "
                            f"weights {os.path.basename(path)}), 2048-d pool3 features, uint8 input resized to 299 px")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        u8 = ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).to(self.device)
        (feats,) = self.model(u8)
        return feats.float()


@dataclass
class FeatureSet:
    """Feature statistics of an image set: mean ``mu`` (D,), covariance ``sigma`` (D, D), count ``n``;
    ``features`` (n, D) float32 only when KID / precision-recall need them; ``meta`` what produced them."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: Optional[np.ndarray] = None
    meta: dict = field(default_factory=dict)


def collect_features(batches: Iterable[torch.Tensor], extractor, total: Optional[int] = None, what: str = "fid",
                     progress: bool = True, keep: bool = False) -> FeatureSet:
    """Stream image batches through ``extractor``: moments always, the features themselves if ``keep``."""
    mom = RunningMoments(extractor.dim)
    kept = []
    bar = ProgressLine(what, total, enabled=progress)
    for x in batches:
        f = extractor(x)
        mom.update(f)
        if keep:
            kept.append(f.detach().float().cpu().numpy())
        bar.update(len(x))
    return FeatureSet(mom.mean(), mom.cov(), mom.n, np.concatenate(kept) if keep else None)


def feature_stats(batches: Iterable[torch.Tensor], extractor, total: Optional[int] = None,
                  what: str = "fid", progress: bool = True) -> Tuple[np.ndarray, np.ndarray, int]:
    """Stream image batches through ``extractor`` → (mu (D,), sigma (D, D), number of images)."""
    fs = collect_features(batches, extractor, total, what, progress)
    return fs.mu, fs.sigma, fs.n


def save_stats(path: str, fs: FeatureSet) -> str:
    """Write ``fs`` as ``.npz`` (atomically): ``mu``, ``sigma`` (the keys pytorch-fid, DF-GAN and GALIP
    use), ``n``, ``meta`` (JSON: extractor, resize, source) and ``features`` when present."""
    arrays = {"mu": fs.mu, "sigma": fs.sigma, "n": np.int64(fs.n), "meta": np.array(json.dumps(fs.meta))}
    if fs.features is not None:
        arrays["features"] = fs.features.astype(np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_stats(path: str, dim: int, extractor_id: Optional[str] = None) -> FeatureSet:
    """Reference statistics from ``.npz``: ours (:func:`save_stats`) or a published one with ``mu`` and
    ``sigma`` only (pytorch-fid / DF-GAN / GALIP). Raises ``ValueError`` naming the problem when the
    file lacks them, their shapes are not ``dim``, or it records a different extractor."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics {path}: file not found")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"reference statistics {path}: not a readable .npz ({e})") from None
    with z:
        if "mu" not in z or "sigma" not in z:
            raise ValueError(f"reference statistics {path}: needs arrays 'mu' and 'sigma', has {sorted(z.files)}")
        mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
        meta = json.loads(str(z["meta"])) if "meta" in z else {}
        n = int(z["n"]) if "n" in z else None
        feats = z["features"] if "features" in z else None
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(f"reference statistics {path}: mu {mu.shape} / sigma {sigma.shape} do not match the "
                         f"{dim}-d features of the extractor")
    if extractor_id and meta.get("extractor") and meta["extractor"] != extractor_id:
        raise ValueError(f"reference statistics {path} were computed with {meta['extractor']}, not {extractor_id}")
    if feats is not None and feats.shape[1:] != (dim,):
        raise ValueError(f"reference statistics {path}: features {feats.shape} are not {dim}-d")
    meta.setdefault("stats_file", os.path.abspath(path))
    return FeatureSet(mu, sigma, n if n is not None else -1, feats, meta)


def reference_features(ref, extractor, cache_dir: Optional[str] = None, batch_size: int = 64,
                       size: Optional[int] = None, progress: bool = True, keep: bool = False) -> FeatureSet:
    """Statistics (and, if ``keep``, features) of a :class:`scadfast.metrics.reference.Reference`, cached
    as ``cache_dir/fid_stats/<key>.npz``; the key covers the extractor id, the resize ``size`` and every
    image's identity (path, size, mtime), so changed data or a different extractor never reuse stale
    statistics. A cached file without features is recomputed when ``keep`` asks for them."""
    path = None
    if cache_dir is not None:
        path = os.path.join(cache_dir, "fid_stats", ref.key(extractor.id, size) + ".npz")
        if os.path.isfile(path):
            fs = load_stats(path, extractor.dim, extractor.id)
            if fs.meta.get("extractor") == extractor.id and (fs.features is not None or not keep):
                return fs
    fs = collect_features(ref.iter_batches(batch_size, size), extractor, ref.n, what="fid: real",
                          progress=progress, keep=keep)
    fs.meta = {"extractor": extractor.id, "source": ref.source,
               "resize": f"{REFERENCE_RESIZE}, {size} px" if size else "none (images used at their size)"}
    if path is not None:
        save_stats(path, fs)
    return fs


def reference_or_stats(ref, extractor, stats_path: Optional[str] = None, keep: bool = False,
                       flags: Tuple[str, str] = ("--ref-stats", "--ref"), **kw) -> FeatureSet:
    """The reference side of FID / KID / precision-recall: precomputed statistics from ``stats_path``
    (:func:`load_stats`; ``ref`` only names the source) or :func:`reference_features` of ``ref`` (``kw``:
    its ``cache_dir``, ``batch_size``, ``size``, ``progress``). ``keep``: the features are needed, and a
    mu/sigma-only file is refused with a ``ValueError`` naming ``flags`` (the statistics flag, the
    reference flag)."""
    if not stats_path:
        return reference_features(ref, extractor, keep=keep, **kw)
    real = load_stats(stats_path, extractor.dim, extractor.id)
    if keep and real.features is None:
        raise ValueError(f"{flags[0]} {stats_path} holds mu/sigma only; kid and pr need the reference features: "
                         f"compute them from {flags[1]} (scadfast.evaluate --save-stats keeps them)")
    real.meta.setdefault("source", ref.source if ref is not None else "precomputed statistics")
    real.meta.setdefault("resize", "unknown (precomputed statistics)")
    return real


def reference_stats(files: Sequence[str], extractor, cache_dir: Optional[str] = None, batch_size: int = 64,
                    size: Optional[int] = None, progress: bool = True) -> Tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, n) of real image ``files`` under ``extractor``, cached (see :func:`reference_features`)."""
    from .reference import files_reference

    fs = reference_features(files_reference(list(files), "real image files"), extractor, cache_dir, batch_size,
                            size, progress)
    return fs.mu, fs.sigma, fs.n


def compute_fid(real_files: Sequence[str], fake_batches: Iterable[torch.Tensor], *, n_fake: Optional[int] = None,
                inception_weights: Optional[str] = None, cache_dir: Optional[str] = None, batch_size: int = 64,
                device=None, progress: bool = True, _test_only_extractor=None) -> dict:
    """FID between real image files and a stream of generated batches (float, [-1, 1]).

    Returns ``{"fid", "n_real", "n_fake", "extractor", "dim"}``. The extractor is always the standard
    Inception-v3 (:class:`InceptionFeatures`); ``_test_only_extractor`` exists **only** so the test
    suite can run the pipeline with a tiny random network — results computed with it are not FIDs,
    and the command line never sets it.
    """
    ext = _test_only_extractor if _test_only_extractor is not None else InceptionFeatures(inception_weights, device)
    mu_r, s_r, n_r = reference_stats(list(real_files), ext, cache_dir, batch_size, None, progress)
    mu_f, s_f, n_f = feature_stats(fake_batches, ext, n_fake, what="fid: generated", progress=progress)
    return {"fid": frechet_distance(mu_r, s_r, mu_f, s_f), "n_real": n_r, "n_fake": n_f,
            "extractor": ext.description, "dim": int(ext.dim)}
