"""Disk cache of CLIP sentence embeddings (docs/design.md §3).

The CLIP text tower is frozen, so the sentence embeddings of a fixed caption list are computed once
(batched, without gradients) and stored as a ``.npy`` file that later runs memory-map. The file name
is a hash of everything the values depend on:

* the CLIP model name and its context length,
* the identity of its weights (:meth:`FrozenCLIP.weights_id`: tag, or checkpoint path + mtime +
  size, or a fingerprint of randomly initialised text weights),
* the caption list (SHA-256 of the captions in order, each length-prefixed so the boundary between
  captions is part of the hash),
* a format version,
* the storage dtype, when it is not the default float32 (``dtype="float16"`` halves the file; the
  default's file names are those of earlier versions).

Writes are atomic (a temporary file in the same directory, then ``os.replace``), so concurrent
processes at worst compute the same embeddings twice and never read a partial file. Under
``torch.distributed`` (``rank``/``world_size``/``sync`` of :meth:`TextEmbeddingCache.embed`) the
one-time encoding is split: each rank encodes its slice of the captions into a part file, rank 0
assembles the parts into the cache file, the others wait; the cache directory must then be one file
system that every rank sees. Slices are cut at multiples of ``batch_size``, so every caption is
encoded in the same batch as in a single process and the file is the same.

Training keeps the (memory-mapped) table on the host and copies only each batch's rows to the device
(:func:`gather_rows`): device memory does not grow with the number of captions, and the ranks of a
node share one copy of the file in the page cache.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Callable, Optional, Sequence

import numpy as np
import torch

_FORMAT = 1
DTYPES = {"float32": np.float32, "float16": np.float16}
_COPY_ROWS = 1 << 16  # rows per chunk when assembling part files


class EmbeddingCacheError(RuntimeError):
    """The split encoding could not be completed (e.g. a cache directory that not every rank sees)."""


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

    After :meth:`embed`, ``last_hit`` tells whether the result came from disk, ``last_path``
    where it lives and ``last_encoded`` how many captions this process encoded.
    """

    def __init__(self, clip, cache_dir: str | os.PathLike, batch_size: int = 256):
        if batch_size < 1:
            raise ValueError(f"TextEmbeddingCache: batch_size must be >= 1, got {batch_size}")
        self.clip = clip
        self.cache_dir = os.fspath(cache_dir)
        self.batch_size = int(batch_size)
        self.last_hit: bool | None = None
        self.last_path: str | None = None
        self.last_encoded = 0

    def key(self, captions: Sequence[str], dtype: str = "float32") -> str:
        """The cache key (hex) of ``captions`` under this CLIP and its current weights."""
        parts = [f"v{_FORMAT}", self.clip.name, str(self.clip.context_length), str(self.clip.embed_dim),
                 self.clip.weights_id(), captions_hash(captions)]
        if dtype != "float32":
            parts.append(f"dtype={dtype}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def path(self, captions: Sequence[str], dtype: str = "float32") -> str:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in self.clip.name)
        return os.path.join(self.cache_dir, f"{safe}-{self.key(captions, dtype)[:40]}.npy")

    def embed(self, captions: Sequence[str], *, dtype: str = "float32", rank: int = 0, world_size: int = 1,
              sync: Optional[Callable[[bool], bool]] = None) -> np.memmap:
        """Sentence embeddings of ``captions``: an array (N, embed_dim) of ``dtype`` (``"float32"``,
        default, or ``"float16"``), memory-mapped.

        Row i belongs to ``captions[i]``. The map is copy-on-write (``mmap_mode="c"``): writing to it
        never changes the file. ``torch.as_tensor(result)`` gives a tensor view.

        With ``world_size > 1`` every rank must call this with the same captions, its ``rank`` and
        ``sync``: a collective ``sync(flag) -> bool`` that is true iff ``flag`` is true on every rank
        (:func:`scadfast.distributed.all_true`). The encoding is then split across the ranks.
        """
        if isinstance(captions, str):
            raise TypeError("TextEmbeddingCache.embed: captions must be a list of strings, got a single str")
        captions = list(captions)
        if not all(isinstance(c, str) for c in captions):
            raise TypeError("TextEmbeddingCache.embed: every caption must be a str")
        if dtype not in DTYPES:
            raise ValueError(f"TextEmbeddingCache.embed: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"TextEmbeddingCache.embed: rank={rank} must be in [0, world_size={world_size})")
        if world_size > 1 and sync is None:
            raise ValueError("TextEmbeddingCache.embed: world_size > 1 needs sync (a collective all-true)")
        if sync is None:
            sync = bool
        path = self.path(captions, dtype)
        self.last_path = path
        self.last_encoded = 0
        arr = self._load(path, len(captions), dtype)
        if sync(arr is not None):  # every rank must agree, or some would wait for the others forever
            self.last_hit = True
            return arr
        del arr
        self.last_hit = False
        os.makedirs(self.cache_dir, exist_ok=True)
        if world_size == 1:
            self._write(path, captions, 0, len(captions), dtype)
        else:
            self._embed_split(path, captions, dtype, rank, world_size, sync)
        return np.load(path, mmap_mode="c")

    def _load(self, path: str, n: int, dtype: str) -> np.memmap | None:
        if not os.path.exists(path):
            return None
        try:
            arr = np.load(path, mmap_mode="c")
        except (OSError, ValueError):
            return None
        if arr.shape == (n, self.clip.embed_dim) and arr.dtype == DTYPES[dtype]:
            return arr
        return None  # a file under our key with the wrong shape was not written by this code: recompute

    def slice_of(self, n: int, rank: int, world_size: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` that ``rank`` encodes: whole batches of ``batch_size``, split evenly."""
        batches = -(-n // self.batch_size)
        lo = (rank * batches // world_size) * self.batch_size
        hi = min(((rank + 1) * batches // world_size) * self.batch_size, n)
        return lo, max(lo, hi)

    def _part_path(self, path: str, rank: int, world_size: int) -> str:
        return f"{path[:-4]}.part-{rank:05d}-of-{world_size:05d}.npy"

    def _embed_split(self, path: str, captions: list[str], dtype: str, rank: int, world_size: int, sync) -> None:
        lo, hi = self.slice_of(len(captions), rank, world_size)
        error = None
        try:
            self._write(self._part_path(path, rank, world_size), captions, lo, hi, dtype)
        except Exception as e:  # noqa: BLE001 - reported after the collective, so no rank hangs
            error = e
        if not sync(error is None):
            if error is not None:
                raise error
            raise EmbeddingCacheError("another rank failed to encode its slice of the captions (see its error)")
        if rank == 0:
            parts = [self._part_path(path, r, world_size) for r in range(world_size)]
            missing = [r for r, p in enumerate(parts) if not os.path.exists(p)]
            try:
                if missing:
                    raise EmbeddingCacheError(
                        f"rank 0 cannot see the embedding parts of rank(s) {missing[:8]} in {self.cache_dir}: "
                        "the cache directory must be one file system that every rank sees (shared by all nodes)")
                self._assemble(path, parts, len(captions), dtype)
            except Exception as e:  # noqa: BLE001
                error = e
        if not sync(error is None):
            if error is not None:
                raise error
            raise EmbeddingCacheError(f"rank 0 could not assemble the caption embeddings in {self.cache_dir} "
                                      "(see its error)")
        if not sync(os.path.exists(path)):
            raise EmbeddingCacheError(
                f"not every rank sees {path}: the cache directory must be one file system that every rank "
                "sees (shared by all nodes)")

    def _assemble(self, path: str, parts: list[str], n: int, dtype: str) -> None:
        def fill(out):
            row = 0
            for p in parts:
                part = np.load(p, mmap_mode="r")
                for i in range(0, len(part), _COPY_ROWS):
                    chunk = part[i:i + _COPY_ROWS]
                    out[row:row + len(chunk)] = chunk
                    row += len(chunk)
                del part
            if row != n:
                raise EmbeddingCacheError(f"the embedding parts hold {row} rows, expected {n}")

        self._atomic_npy(path, (n, self.clip.embed_dim), DTYPES[dtype], fill)
        for p in parts:
            try:
                os.unlink(p)
            except OSError:
                pass

    def _write(self, path: str, captions: list[str], lo: int, hi: int, dtype: str) -> None:
        """Encode ``captions[lo:hi]`` (batches aligned to multiples of ``batch_size``) into ``path``."""
        self._atomic_npy(path, (hi - lo, self.clip.embed_dim), DTYPES[dtype],
                         lambda out: self._compute(captions, lo, hi, out))

    def _atomic_npy(self, path: str, shape: tuple, dtype, fill) -> None:
        """Write a ``.npy`` of ``shape``/``dtype`` whose rows ``fill(array)`` sets, streaming through a
        memory map (host memory does not hold the array), then fsync and rename into place."""
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".npy")
        os.close(fd)
        try:
            if shape[0] == 0:
                out = np.empty(shape, dtype)
                fill(out)
                np.save(tmp, out)
            else:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
                fill(out)
                out.flush()
                del out
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @torch.no_grad()
    def _compute(self, captions: list[str], lo: int, hi: int, out: np.ndarray) -> None:
        for i in range(lo, hi, self.batch_size):
            tokens = self.clip.tokenize(captions[i:min(i + self.batch_size, hi)])
            out[i - lo:i - lo + len(tokens)] = self.clip.encode_text(tokens).float().cpu().numpy()
            self.last_encoded += len(tokens)


def gather_rows(table: torch.Tensor, idx: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Rows ``idx`` of a host-side embedding ``table`` (e.g. the memory-mapped cache) as float32 on
    ``device``.

    Only the ``len(idx)`` rows are read and copied: on a GPU through pinned memory with a
    non-blocking copy, and a float16 table is widened to float32 on the device (after the copy).
    """
    if table.device.type != "cpu":
        raise ValueError(f"gather_rows: the table must stay on the host, got one on {table.device}")
    device = torch.device(device)
    idx = idx.to("cpu", torch.int64)
    if device.type == "cuda":
        rows = torch.empty((idx.numel(), table.shape[1]), dtype=table.dtype, pin_memory=True)
        torch.index_select(table, 0, idx, out=rows)
        return rows.to(device, non_blocking=True).float()
    return table.index_select(0, idx).to(device).float()
