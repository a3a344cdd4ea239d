"""NVIDIA DALI loading: decode, resize, crop, (flip) and normalise, on the GPU or the CPU.

:func:`scadfast.data.make_loader` (:mod:`scadfast.data.loader`) indexes a data spec
(:mod:`scadfast.data.sources`) and returns a :class:`DALILoader`, an iterable of ``(images, indices)``
batches:

* ``images``: ``float32`` ``(B, 3, S, S)`` in ``[-1, 1]`` (``(x - 127.5) / 127.5`` of the 8-bit RGB
  pixels), on ``cuda:device_id`` when ``device_id`` is an int (JPEG decoding with
  ``device="mixed"`` — nvJPEG / the hardware decoder — and resize/crop/normalise on the GPU), on
  the CPU when ``device_id=None`` (the same pipeline, all operators on the CPU).
* ``indices``: ``int64`` ``(B,)`` on the CPU, the record index of every sample; look captions up in
  ``loader.captions`` (and the shapes ground truth in ``loader.attrs``) or in a caption-embedding
  cache, outside DALI.

Image geometry: the shorter side is resized to ``S`` (antialiased linear), then the centre
``S x S`` is cropped. Horizontal flipping (``flip=True``) mirrors a pseudo-random half of the
samples; it is **off by default** and must stay off for the shapes set, whose captions name
left/right positions.

Epochs, sharding, resuming. The order of an epoch is fully determined by ``(seed, epoch)``:

1. ``perm = numpy.random.default_rng([seed, epoch]).permutation(N)`` (identity if
   ``shuffle=False``);
2. rank ``r`` of ``world_size`` takes the contiguous slice ``perm[r*P : r*P + len(self)*B]`` with
   ``P = N // world_size`` — the shards of one epoch are disjoint, every rank gets the same number
   of batches, and the last partial batch (and the ``N % world_size`` remainder) is dropped, so
   every batch has the static shape ``(B, 3, S, S)``;
3. whether a sample is flipped is ``numpy.random.default_rng([seed, epoch, 1]).random(N)[index]
   < 0.5``, so flips do not depend on how many batches were read before.

For files (shapes, COCO, folder), step 2 is done by ``fn.readers.file(files=..., labels=...,
shard_id=rank, num_shards=world_size)`` on the epoch's list, laid out so that DALI's contiguous
sharding gives exactly those slices; the reader is named (``reader_name``) so the iterator knows
where the epoch ends. Webdataset shards are read through their index of member offsets (DALI's
``wds2idx`` format, built once and cached on disk: :mod:`scadfast.data.wds_index`), with
``fn.external_source`` feeding the same decoder, because DALI's webdataset reader only shuffles
through a buffer and cannot reproduce an epoch's order or start in its middle.

Undecodable images: a file that passed the indexing check but that DALI cannot decode (e.g. a JPEG
with valid markers and a corrupt body) is found by decoding the failing batch's files with Pillow,
named in a :class:`~scadfast.data.sources.DataWarning` and skipped from then on: its slot in the
epoch order is taken by the next readable record of the same rank's order (so shapes stay static),
and the skipped set is part of ``state_dict`` (an exact resume). If DALI fails and Pillow reads every
candidate, :class:`DataDecodeError` names them. ``check_images="decode"`` at indexing catches such
files up front.

Resuming: ``loader.state_dict()`` records ``(epoch, batch)`` — the number of batches of the epoch
already *handed out*. ``load_state_dict`` (or :meth:`DALILoader.set_epoch` with
``batch=k``) makes the next iteration start at batch ``k`` of that epoch: the pipeline is built on
the epoch's order minus its first ``k`` batches, so the remaining batches are exactly those an
uninterrupted run would have produced. A pipeline is built per epoch (tens of milliseconds).
"""

from __future__ import annotations

import warnings
from contextlib import closing
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from .image_check import _pil_decode_error
from .sources import DataWarning, RecordSet

__all__ = ["DALILoader", "DataDecodeError"]


class DataDecodeError(RuntimeError):
    """DALI could not decode an image and the culprit could not be identified and skipped."""

_READER_NAME = "Reader"


def _dali():
    try:
        import nvidia.dali as dali  # noqa: F401
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "scadfast.data.dali needs NVIDIA DALI: pip install nvidia-dali-cuda130 "
            "(or the build for your CUDA), or load without it: --loader memory (make_loader(..., "
            f"backend='memory')) for a data set that fits in memory; import failed: {e}"
        ) from None
    return fn, pipeline_def, types, DALIGenericIterator, LastBatchPolicy


def _build_pipeline(*, files, labels, source, rank, world_size, image_size, decode_device,
                    batch_size, num_threads, device_id, seed, prefetch_queue_depth):
    fn, pipeline_def, types, _, _ = _dali()

    @pipeline_def(enable_conditionals=False)
    def pipe():
        if files is not None:
            encoded, label = fn.readers.file(
                files=files, labels=labels, shard_id=rank, num_shards=world_size,
                random_shuffle=False, pad_last_batch=False, name=_READER_NAME,
            )
        else:
            encoded, label = fn.external_source(
                source=source, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT32],
                ndim=[1, 1],
            )
        images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
        images = fn.resize(images, resize_shorter=image_size, antialias=True,
                           interp_type=types.INTERP_LINEAR)
        label = label[0]
        # label = 2 * record index + flip bit (see the module docstring).
        mirror = label % 2
        index = label // 2
        images = fn.crop_mirror_normalize(
            images, crop=(image_size, image_size), mirror=mirror, dtype=types.FLOAT,
            output_layout="CHW", mean=[127.5] * 3, std=[127.5] * 3,
        )
        return images, index

    p = pipe(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
             prefetch_queue_depth=prefetch_queue_depth)
    p.build()
    return p


class _TarBatches:
    """Batch-mode ``external_source`` input for webdataset records: (encoded images, labels)."""

    def __init__(self, records: RecordSet, order: np.ndarray, labels: np.ndarray, batch_size: int):
        self.records, self.order, self.labels, self.batch_size = records, order, labels, batch_size
        self._files: Dict[int, object] = {}
        self._pos = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self._pos + self.batch_size > len(self.order):
            self.close()
            raise StopIteration
        sl = slice(self._pos, self._pos + self.batch_size)
        self._pos += self.batch_size
        images = [self._read(int(i)) for i in self.order[sl]]
        labels = [np.array([v], np.int32) for v in self.labels[sl]]
        return images, labels

    def _read(self, i: int) -> np.ndarray:
        rec = self.records
        shard = int(rec.tar_index[i])
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(rec.tar_paths[shard], "rb")
        f.seek(int(rec.offsets[i]))
        data = f.read(int(rec.sizes[i]))
        if len(data) != int(rec.sizes[i]):
            raise OSError(f"{rec.source}: short read for {rec.keys[i]} (shard changed since indexing?)")
        return np.frombuffer(data, dtype=np.uint8)

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"make_loader: {name} must be an int >= {lo}, got {value!r}")
    return int(value)


class DALILoader:
    """Iterable of ``(images (B,3,S,S) float32 in [-1,1], indices (B,) int64)`` batches.

    Build it with :func:`make_loader`. ``len(loader)`` is the number of batches one epoch yields on
    this rank; iterating runs the current epoch (from ``loader.batch`` on) and then advances
    ``loader.epoch``. ``captions``/``attrs``/``records`` map the indices back to the data. See the
    module docstring for the exact order, sharding and resume semantics.
    """

    def __init__(self, records: RecordSet, image_size: int, batch_size: int,
                 device_id: Optional[int] = None, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, flip: bool = False, num_threads: int = 2,
                 prefetch_queue_depth: int = 2):
        if not isinstance(records, RecordSet):
            raise TypeError(f"DALILoader: records must be a RecordSet, got {type(records).__name__}")
        self.image_size = _check_int("image_size", image_size, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"make_loader: rank={rank} must be < world_size={world_size}")
        self.seed = _check_int("seed", seed, 0)
        self.num_threads = _check_int("num_threads", num_threads, 1)
        self.prefetch_queue_depth = _check_int("prefetch_queue_depth", prefetch_queue_depth, 1)
        if device_id is not None:
            device_id = _check_int("device_id", device_id, 0)
            if not torch.cuda.is_available() or device_id >= torch.cuda.device_count():
                raise RuntimeError(
                    f"make_loader: device_id={device_id} but "
                    f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} CUDA device(s) "
                    "are visible; use device_id=None to decode on the CPU"
                )
        if len(records) >= 2**30:
            raise ValueError(f"{records.source}: {len(records)} records exceed the 2**30 limit of "
                             "the int32 record labels")
        self.device_id = device_id
        self.shuffle = bool(shuffle)
        self.flip = bool(flip)
        if self.flip and records.kind == "shapes":
            raise ValueError("make_loader: flip=True on the shapes set would contradict captions "
                             "that name left/right positions; keep flip=False")
        self.records = records
        self._per_rank = len(records) // self.world_size
        self._num_batches = self._per_rank // self.batch_size
        if self._num_batches == 0:
            raise ValueError(
                f"{records.source}: {len(records)} records give no full batch of {batch_size} "
                f"per rank with world_size={world_size} (need >= {batch_size * world_size})"
            )
        self.epoch = 0
        self.batch = 0
        self.skipped: set = set()  # record indices DALI could not decode (see the module docstring)

    # -- mapping back to the data ---------------------------------------------------------------

    @property
    def captions(self) -> List[str]:
        """Caption of every record (index with the ``indices`` a batch yields)."""
        return self.records.captions

    @property
    def attrs(self) -> Optional[List[Dict[str, str]]]:
        """Shapes ground-truth attributes of every record (``None`` for other sources)."""
        return self.records.attrs

    @property
    def num_records(self) -> int:
        return len(self.records)

    def __len__(self) -> int:
        return self._num_batches

    # -- order ----------------------------------------------------------------------------------

    def epoch_order(self, epoch: int, rank: Optional[int] = None) -> np.ndarray:
        """Record indices this ``rank`` (default: ours) reads in ``epoch``, in order (``len*B``)."""
        rank = self.rank if rank is None else rank
        n = len(self.records)
        perm = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                else np.arange(n))
        start = rank * self._per_rank
        order = perm[start: start + self._num_batches * self.batch_size]
        if self.skipped:
            order = _substitute(order, self.skipped)
        return order

    def epoch_flips(self, epoch: int) -> np.ndarray:
        """Per-record flip decisions of ``epoch`` (all ``False`` unless ``flip=True``)."""
        n = len(self.records)
        if not self.flip:
            return np.zeros(n, dtype=bool)
        return np.random.default_rng([self.seed, epoch, 1]).random(n) < 0.5

    # -- state ----------------------------------------------------------------------------------

    def set_epoch(self, epoch: int, batch: int = 0) -> None:
        """Make the next iteration run ``epoch`` starting at its batch ``batch`` (0-based)."""
        epoch = _check_int("epoch", epoch, 0)
        batch = _check_int("batch", batch, 0)
        if batch > len(self):
            raise ValueError(f"set_epoch: batch={batch} > {len(self)} batches per epoch")
        self.epoch, self.batch = epoch, batch

    def state_dict(self) -> Dict[str, int]:
        """Position for checkpointing: ``epoch``, ``batch`` (batches handed out) and the layout."""
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed,
                "num_records": len(self.records), "batch_size": self.batch_size,
                "world_size": self.world_size, "shuffle": int(self.shuffle),
                "skipped": sorted(int(i) for i in self.skipped)}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Resume at ``state``'s position; the order-defining settings must match."""
        have = self.state_dict()
        for key in ("seed", "num_records", "batch_size", "world_size", "shuffle"):
            if key in state and int(state[key]) != have[key]:
                raise ValueError(f"load_state_dict: {key}={state[key]} in the checkpoint but "
                                 f"{have[key]} in this loader; the epoch order would differ")
        self.skipped = {int(i) for i in state.get("skipped", ())}
        self.set_epoch(int(state["epoch"]), int(state["batch"]))

    # -- iteration ------------------------------------------------------------------------------

    def _make_iterator(self, epoch: int, skip: int):
        _, _, _, DALIGenericIterator, LastBatchPolicy = _dali()
        B, W = self.batch_size, self.world_size
        flips = self.epoch_flips(epoch)
        decode_device = "cpu" if self.device_id is None else "mixed"
        common = dict(image_size=self.image_size, decode_device=decode_device, batch_size=B,
                      num_threads=self.num_threads, device_id=self.device_id,
                      seed=self.seed + 7919 * epoch, prefetch_queue_depth=self.prefetch_queue_depth)
        if self.records.files is not None:
            # Every rank's remaining slice, concatenated: equal lengths, so DALI's contiguous
            # sharding (shard_id=rank, num_shards=world_size) hands rank r exactly its slice.
            order = np.concatenate([self.epoch_order(epoch, r)[skip * B:] for r in range(W)])
            labels = (2 * order + flips[order]).astype(np.int64).tolist()
            files = [self.records.files[i] for i in order]
            pipe = _build_pipeline(files=files, labels=labels, source=None, rank=self.rank,
                                   world_size=W, **common)
            it = DALIGenericIterator(pipe, ["images", "index"], reader_name=_READER_NAME,
                                     last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)
            closer = None
        else:
            order = self.epoch_order(epoch)[skip * B:]
            labels = 2 * order + flips[order]
            source = _TarBatches(self.records, order, labels, B)
            pipe = _build_pipeline(files=None, labels=None, source=source, rank=0, world_size=1,
                                   **common)
            it = DALIGenericIterator(pipe, ["images", "index"],
                                     last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)
            closer = source
        return pipe, it, closer

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """The current epoch from batch ``self.batch`` on, then advance to the next epoch (one
        finished already is skipped). ``self.batch`` counts the batches handed out."""
        if self.batch >= len(self):
            self.epoch, self.batch = self.epoch + 1, 0
        epoch = self.epoch
        with closing(self._epoch_batches(epoch)) as batches:  # an abandoned epoch releases its pipeline now
            for images, indices in batches:
                self.batch += 1
                yield images, indices
        if self.batch != len(self):  # pragma: no cover - the loaders' contract
            raise RuntimeError(f"epoch {epoch} ended after {self.batch} of {len(self)} batches")
        self.epoch, self.batch = epoch + 1, 0

    def _epoch_batches(self, epoch: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """``epoch``'s batches from ``self.batch`` on, decoded by DALI (rebuilt past an undecodable
        image, which is then skipped)."""
        while True:
            pipe, it, closer = self._make_iterator(epoch, self.batch)
            try:
                for out in it:
                    data = out[0]
                    images = data["images"]
                    indices = data["index"].reshape(-1).to(torch.int64)
                    if images.shape[0] != self.batch_size:  # pragma: no cover - DALI contract
                        raise RuntimeError(f"DALI returned a batch of {images.shape[0]}, "
                                           f"expected {self.batch_size}")
                    yield images, indices
                break
            except RuntimeError as e:
                if "decoders.image" not in str(e) and "decod" not in str(e).lower():
                    raise
                self._skip_undecodable(epoch, str(e))  # raises DataDecodeError if nothing to skip
            finally:
                if closer is not None:
                    closer.close()
                del it
                del pipe

    def _skip_undecodable(self, epoch: int, error: str) -> None:
        """After a DALI decoding error at batch ``self.batch``: find the undecodable files among the
        batches DALI may have been decoding (Pillow), warn naming them and skip them from now on."""
        B = self.batch_size
        window = self.epoch_order(epoch)[self.batch * B:(self.batch + self.prefetch_queue_depth + 1) * B]
        bad = []
        for i in dict.fromkeys(int(i) for i in window):
            try:
                why = _pil_decode_error(self.records.read_bytes(i))
            except OSError as e:
                why = f"unreadable ({e.strerror or e})"
            if why is not None:
                bad.append((i, why))
        first = next((ln.strip() for ln in error.splitlines() if "failure" in ln or "rror" in ln), "")
        if not bad:
            shown = ", ".join(self.records.keys[int(i)] for i in window[:B])
            raise DataDecodeError(f"{self.records.source}: DALI failed to decode an image of epoch {epoch}, "
                                  f"batch {self.batch} ({first}); Pillow reads all of them: {shown}") from None
        self._skip(bad, " (run with --check-images to find all such files up front)")

    def _skip(self, bad: List[Tuple[int, str]], hint: str = "") -> None:
        """Skip the records ``bad`` ((index, why) pairs) from now on, with a warning naming them; raise
        :class:`DataDecodeError` when too few readable records would be left for this rank."""
        keys = self.records.keys
        if len(self.skipped) + len(bad) >= self._per_rank:
            raise DataDecodeError(f"{self.records.source}: too many undecodable images to continue "
                                  f"({', '.join(keys[i] for i, _ in bad[:5])})") from None
        self.skipped.update(i for i, _ in bad)
        warnings.warn(f"{self.records.source}: skipped {len(bad)} image(s) that cannot be decoded: "
                      + "; ".join(f"{keys[i]} ({why})" for i, why in bad[:5]) + hint, DataWarning, stacklevel=3)

    def __repr__(self) -> str:
        where = "cpu" if self.device_id is None else f"cuda:{self.device_id}"
        return (f"DALILoader({self.records.source}, records={len(self.records)}, "
                f"image_size={self.image_size}, batch_size={self.batch_size}, batches={len(self)}, "
                f"device={where}, rank={self.rank}/{self.world_size}, epoch={self.epoch}, "
                f"batch={self.batch})")


def _substitute(order: np.ndarray, skipped: set) -> np.ndarray:
    """``order`` with every skipped record replaced by the next non-skipped one of ``order``
    (cyclically), so the batch count and shapes stay as they were."""
    bad = np.isin(order, np.fromiter(skipped, dtype=np.int64, count=len(skipped)))
    if not bad.any():
        return order
    good = np.flatnonzero(~bad)
    if good.size == 0:
        raise DataDecodeError("every record of this rank's epoch order is undecodable")
    out = order.copy()
    pos = np.flatnonzero(bad)
    nxt = np.searchsorted(good, pos) % good.size
    out[pos] = order[good[nxt]]
    return out
