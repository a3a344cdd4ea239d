"""The reference (real) set of FID / KID / precision-recall, and the captions it supplies as prompts.

``evaluate --ref X`` takes either a plain image folder (images only, as before) or a data spec of
:mod:`scadfast.data.sources` that carries captions (``coco:ROOT``, ``coco:ANN.json[,IMAGES]``,
``folder:PATH``, ``wds:PATTERN``, ``shapes[:...]``). With captions, the generated set follows the
papers' protocol (GALIP, DF-GAN; 30,000 images for COCO val2014): **one image per caption**, the
captions taken in a seeded random order (:meth:`Reference.caption_order`) and the first N used.

Every real image is counted once (COCO lists each image with about five captions) and resized by
:data:`scadfast.metrics.features.REFERENCE_RESIZE` to the evaluation size, so folders of mixed
sizes such as raw val2014 are accepted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import numpy as np
import torch

from .features import iter_images, list_image_files

__all__ = ["Reference", "load_reference", "is_data_spec", "protocol_noise"]

_SPEC_KINDS = ("coco", "folder", "wds", "shapes")


def is_data_spec(value: str) -> bool:
    """Does ``value`` name a data source (``coco:...`` etc.) rather than a plain folder?"""
    kind, sep, _ = value.partition(":")
    return kind.lower() in _SPEC_KINDS and (bool(sep) or kind.lower() == "shapes") and not os.path.isdir(value)


@dataclass
class Reference:
    """Unique real images (``read(i)`` → path or encoded bytes, ``identity`` lines for the cache key)
    and, for a caption source, every caption of the set (one per record)."""

    source: str
    n: int
    read: Callable[[int], object]
    identity: Callable[[], Iterator[str]]
    captions: Optional[List[str]] = None

    def iter_batches(self, batch_size: int, size: Optional[int]) -> Iterator[torch.Tensor]:
        return iter_images(self.read, self.n, batch_size, size)

    def key(self, extractor_id: str, size: Optional[int]) -> str:
        """Cache key over the extractor, the resize and every image's identity (path, size, mtime)."""
        h = hashlib.sha1()
        h.update(json.dumps({"extractor": extractor_id, "size": size, "n": self.n}).encode())
        for line in self.identity():
            h.update(line.encode() + b"\n")
        return h.hexdigest()[:20]

    def caption_order(self, seed: int) -> List[str]:
        """All captions in the seeded random order the generated set uses (the first N are taken)."""
        if not self.captions:
            raise ValueError(f"{self.source} has no captions")
        perm = np.random.RandomState(seed).permutation(len(self.captions))
        return [self.captions[i] for i in perm]


def protocol_noise(n: int, z_dim: int, seed: int, batch_size: int) -> Iterator[torch.Tensor]:
    """The fixed noise of the caption protocol (``evaluate``, and train's fid/kid/clip_score snapshots):
    ``n`` vectors, one per generated image, drawn ``batch_size`` at a time (CPU) from one generator seeded
    ``seed + 7,777,777`` — so the same seed, N and batch size give the same images in both."""
    g = torch.Generator().manual_seed(int(seed) + 7_777_777)
    for i in range(0, n, batch_size):
        yield torch.randn(min(batch_size, n - i), z_dim, generator=g)


def _file_identity(files: List[str]) -> Callable[[], Iterator[str]]:
    def lines():
        for f in files:
            st = os.stat(f)
            yield f"{os.path.abspath(f)}:{st.st_size}:{st.st_mtime_ns}"
    return lines


def files_reference(files: List[str], source: str, captions: Optional[List[str]] = None) -> Reference:
    if not files:
        raise ValueError(f"{source}: no real image files")
    return Reference(source, len(files), files.__getitem__, _file_identity(files), captions)


def _prefer_val_split(value: str) -> str:
    """``coco:ROOT`` with several annotation files: the newest ``val`` split (training picks ``train``)."""
    kind, _, rest = value.partition(":")
    if kind.lower() != "coco" or "," in rest or not os.path.isdir(os.path.join(rest, "annotations")):
        return value
    ann_dir = os.path.join(rest, "annotations")
    cands = sorted(f for f in os.listdir(ann_dir) if f.startswith("captions_") and f.endswith(".json"))
    val = [f for f in cands if f.startswith("captions_val")]
    if len(cands) > 1 and val:
        return "coco:" + os.path.join(ann_dir, max(val, key=lambda f: re.sub(r"\D", "", f)))
    return value


def load_reference(value: str, image_size: Optional[int] = None, flag: str = "--ref") -> Reference:
    """A plain image folder (no captions) or a data spec with captions (see the module docstring).
    ``coco:ROOT`` holding several splits uses the newest ``captions_val*.json``. ``flag`` names the
    value in errors."""
    if not is_data_spec(value):
        if not os.path.isdir(value):
            raise FileNotFoundError(f"{flag} {value}: not a folder and not a data spec (coco:ROOT, folder:PATH, "
                                    "wds:PATTERN, shapes[:...])")
        return files_reference(list_image_files(value), f"image folder {value}")
    from ..data.sources import load_records

    rec = load_records(_prefer_val_split(value), image_size=image_size)
    if rec.files is not None:
        files = list(dict.fromkeys(rec.files))  # each image once, in order of first appearance
        return files_reference(files, rec.source, rec.captions)
    shards = [(os.path.abspath(p), os.stat(p)) for p in rec.tar_paths]

    def identity():
        for t, o in zip(rec.tar_index, rec.offsets):
            path, st = shards[int(t)]
            yield f"{path}:{st.st_size}:{st.st_mtime_ns}:{int(o)}"

    return Reference(rec.source, len(rec), rec.read_bytes, identity, rec.captions)
