"""Streaming plumbing shared by the metrics: image sources, feature statistics, progress output.

Every metric consumes images **batch by batch** — never a list of all images — as float tensors in
[-1, 1], shape (B, 3, H, W). Sources:

* :func:`iter_image_files` / :func:`iter_images` — image files on disk (a shapes set, a folder) or encoded
  bytes (webdataset members), decoded with PIL and optionally resized by :data:`REFERENCE_RESIZE`;
* :func:`iter_generated` — a trained generator (``Loaded`` from :mod:`scadfast.runs`) on a list
  of prompts, with reproducible per-image noise.

:class:`RunningMoments` accumulates the mean and covariance of feature vectors in float64 without
keeping the features (what FID needs).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["ProgressLine", "RunningMoments", "iter_images", "iter_image_files", "list_image_files", "iter_generated",
           "decode_rgb", "default_device", "IMAGE_EXTENSIONS", "REFERENCE_RESIZE"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ProgressLine:
    """``[metric] what: done/total (rate/s, ETA)`` lines on stderr, at most every ``every`` seconds."""

    def __init__(self, what: str, total: Optional[int], enabled: bool = True, every: float = 5.0, stream=None):
        self.what, self.total, self.enabled, self.every = what, total, enabled, every
        self.stream = stream or sys.stderr
        self.t0 = self.last = time.perf_counter()
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every or (self.total is not None and self.done >= self.total)):
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            tot = f"/{self.total}" if self.total is not None else ""
            eta = f", ETA {(self.total - self.done) / max(rate, 1e-9):.0f}s" if self.total is not None else ""
            print(f"[{self.what}] {self.done}{tot} images ({rate:.1f}/s{eta})", file=self.stream, flush=True)


class RunningMoments:
    """Streaming mean and (unbiased) covariance of D-dimensional features, accumulated in float64.

    ``update(feats)`` takes (B, D) features (torch or numpy); ``mean()`` (D,), ``cov()`` (D, D). Sums
    are accumulated on the features' device (float64 matmul on the GPU when there is one).
    """

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"RunningMoments: dim must be >= 1, got {dim}")
        self.dim = dim
        self.n = 0
        self._sum = None
        self._outer = None

    def update(self, feats) -> None:
        f = torch.as_tensor(feats)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"RunningMoments: features must be (B, {self.dim}), got {tuple(f.shape)}")
        f = f.detach().to(torch.float64)
        if self._sum is None:
            self._sum = torch.zeros(self.dim, dtype=torch.float64, device=f.device)
            self._outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=f.device)
        f = f.to(self._sum.device)
        self._sum += f.sum(0)
        self._outer += f.t() @ f
        self.n += f.shape[0]

    def mean(self) -> np.ndarray:
        if self.n < 1:
            raise ValueError("RunningMoments: no features were added")
        return (self._sum / self.n).cpu().numpy()

    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"RunningMoments: a covariance needs at least 2 samples, got {self.n}")
        mu = self._sum / self.n
        c = (self._outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        c = 0.5 * (c + c.t())
        return c.cpu().numpy()


def list_image_files(path: str) -> List[str]:
    """Sorted image files under ``path`` (recursive), or the files of a shapes set's captions index."""
    from ..data import shapes as shp

    if os.path.isfile(os.path.join(path, shp.CAPTIONS_FILE)):
        return [r["file"] for r in shp.load_shapes_index(path)]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder not found: {path}")
    out = []
    for root, _, files in os.walk(path):
        out += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not out:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
    return sorted(out)


#: The one resize applied to real images for FID/KID/precision-recall (documented in the README).
REFERENCE_RESIZE = ("PIL bicubic (antialiased, the filter clean-fid uses) of the whole RGB image to size×size "
                    "(aspect ratio not kept, no crop), 8-bit result")


def decode_rgb(item, size: Optional[int] = None) -> np.ndarray:
    """A file path or encoded bytes → (H, W, 3) uint8 RGB, resized by :data:`REFERENCE_RESIZE` if ``size``."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else item) as im:
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return np.asarray(im)


def iter_images(read: Callable[[int], object], n: int, batch_size: int = 64,
                size: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Decode items ``read(0) .. read(n-1)`` (paths or encoded bytes) in batches → float (B, 3, H, W) in [-1, 1].

    Images of one batch must share a size unless ``size`` is given (then each is resized to
    ``size``×``size`` by :data:`REFERENCE_RESIZE`).
    """
    if batch_size < 1:
        raise ValueError(f"iter_images: batch_size must be >= 1, got {batch_size}")
    for i in range(0, n, batch_size):
        arrs = [decode_rgb(read(j), size) for j in range(i, min(i + batch_size, n))]
        shapes = {a.shape for a in arrs}
        if len(shapes) > 1:
            raise ValueError(f"real images of different sizes {sorted(shapes)[:3]} in one batch: give a resize "
                             "size (evaluate --ref-size N)")
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float()
        yield x / 127.5 - 1.0


def iter_image_files(files: Sequence[str], batch_size: int = 64, size: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Decode ``files`` in batches → float (B, 3, H, W) in [-1, 1] (RGB); see :func:`iter_images`."""
    return iter_images(files.__getitem__, len(files), batch_size, size)


def iter_generated(loaded, prompts: Sequence[str], n_per_prompt: int, seed: int = 0,
                   batch_size: int = 64) -> Iterator[tuple]:
    """For each prompt, yield ``(prompt_index, images (n_per_prompt, 3, H, W) in [-1, 1])``.

    Noise for image ``j`` of every prompt comes from ``torch.Generator().manual_seed(seed + j)``
    (as in :func:`scadfast.sample.noise`), so all prompts see the same independent z's and any image
    can be regenerated. Generation runs in batches of ``batch_size`` on the model's device.
    """
    from ..sample import noise

    if n_per_prompt < 1:
        raise ValueError(f"iter_generated: n_per_prompt must be >= 1, got {n_per_prompt}")
    z = noise(n_per_prompt, loaded.pair.z_dim, seed).to(loaded.device)
    with torch.no_grad():
        for p0 in range(0, len(prompts), 256):
            s_all = loaded.embed(list(prompts[p0:p0 + 256]))
            for k, s in enumerate(s_all):
                imgs = []
                for i in range(0, n_per_prompt, batch_size):
                    zb = z[i:i + batch_size]
                    imgs.append(loaded.pair.generate(zb, s.expand(zb.shape[0], -1)).float().clamp(-1, 1))
                yield p0 + k, torch.cat(imgs)


def batched(it: Iterable[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Apply ``fn`` to chunks of at most ``batch_size`` of every tensor of ``it``."""
    for x in it:
        for i in range(0, len(x), batch_size):
            yield fn(x[i:i + batch_size])
