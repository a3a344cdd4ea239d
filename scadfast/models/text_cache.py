"""Disk cache of CLIP sentence embeddings (docs/design.md §3).

The CLIP text tower is frozen, so the sentence embeddings of a fixed caption list are computed once
(batched, without gradients) and stored as a ``.npy`` file that later runs memory-map. The file name
is a hash of everything the values depend on:

* the CLIP model name and its context length,
* the identity of its weights (:meth:`FrozenCLIP.weights_id`: tag, or checkpoint path + mtime +
  size, or a fingerprint of randomly initialised text weights),
* the caption list (SHA-256 of the captions in order, each length-prefixed so the boundary between
  captions is part of the hash),
* a format version.

Writes are atomic (a temporary file in the same directory, then ``os.replace``), so concurrent
processes (e.g. DDP ranks) at worst compute the same embeddings twice and never read a partial file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Sequence

import numpy as np
import torch

_FORMAT = 1


def captions_hash(captions: Sequence[str]) -> str:
    """SHA-256 of a caption list (order-sensitive, unambiguous about caption boundaries)."""
    h = hashlib.sha256()
    h.update(str(len(captions)).encode())
    for c in captions:
        b = c.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


class TextEmbeddingCache:
    """Sentence embeddings of caption lists, computed once per (CLIP, weights, captions) and memory-mapped.

    Args:
        clip: a :class:`~scadfast.models.clip.FrozenCLIP` (anything with ``name``,
            ``context_length``, ``embed_dim``, ``weights_id()``, ``tokenize`` and ``encode_text``).
        cache_dir: directory for the ``.npy`` files (created if missing).
        batch_size: captions per ``encode_text`` call when computing.

    After :meth:`embed`, ``last_hit`` tells whether the result came from disk and ``last_path``
    where it lives.
    """

    def __init__(self, clip, cache_dir: str | os.PathLike, batch_size: int = 256):
        if batch_size < 1:
            raise ValueError(f"TextEmbeddingCache: batch_size must be >= 1, got {batch_size}")
        self.clip = clip
        self.cache_dir = os.fspath(cache_dir)
        self.batch_size = int(batch_size)
        self.last_hit: bool | None = None
        self.last_path: str | None = None

    def key(self, captions: Sequence[str]) -> str:
        """The cache key (hex) of ``captions`` under this CLIP and its current weights."""
        parts = [f"v{_FORMAT}", self.clip.name, str(self.clip.context_length), str(self.clip.embed_dim),
                 self.clip.weights_id(), captions_hash(captions)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def path(self, captions: Sequence[str]) -> str:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in self.clip.name)
        return os.path.join(self.cache_dir, f"{safe}-{self.key(captions)[:40]}.npy")

    def embed(self, captions: Sequence[str]) -> np.memmap:
        """Sentence embeddings of ``captions``: a float32 array (N, embed_dim), memory-mapped.

        Row i belongs to ``captions[i]``. The map is copy-on-write (``mmap_mode="c"``): writing to it
        never changes the file. ``torch.as_tensor(result)`` gives a tensor view.
        """
        if isinstance(captions, str):
            raise TypeError("TextEmbeddingCache.embed: captions must be a list of strings, got a single str")
        captions = list(captions)
        if not all(isinstance(c, str) for c in captions):
            raise TypeError("TextEmbeddingCache.embed: every caption must be a str")
        path = self.path(captions)
        self.last_path = path
        if os.path.exists(path):
            arr = np.load(path, mmap_mode="c")
            if arr.shape == (len(captions), self.clip.embed_dim) and arr.dtype == np.float32:
                self.last_hit = True
                return arr
            # A file under our key with the wrong shape was not written by this code: recompute.
        self.last_hit = False
        emb = self._compute(captions)
        os.makedirs(self.cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".tmp-", suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, emb)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return np.load(path, mmap_mode="c")

    @torch.no_grad()
    def _compute(self, captions: list[str]) -> np.ndarray:
        out = np.empty((len(captions), self.clip.embed_dim), dtype=np.float32)
        for i in range(0, len(captions), self.batch_size):
            tokens = self.clip.tokenize(captions[i:i + self.batch_size])
            out[i:i + len(tokens)] = self.clip.encode_text(tokens).float().cpu().numpy()
        return out
