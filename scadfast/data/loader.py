"""``make_loader``: a data spec to the loader that reads it — NVIDIA DALI's (:mod:`scadfast.data.dali`,
the default) or the in-memory one (:mod:`scadfast.data.memory`). Neither imports DALI until a DALI
pipeline is built."""

from __future__ import annotations

from typing import Optional, Union

from .dali import DALILoader, _check_int
from .memory import MemoryLoader
from .sources import DataSpec, RecordSet, load_records

__all__ = ["BACKENDS", "make_loader"]

BACKENDS = ("dali", "memory")


def make_loader(
    spec: Union[str, DataSpec, RecordSet],
    image_size: int,
    batch_size: int,
    device_id: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    *,
    shuffle: bool = True,
    flip: bool = False,
    num_threads: int = 2,
    prefetch_queue_depth: int = 2,
    check_images: str = "header",
    index: Optional[dict] = None,
    backend: str = "dali",
) -> DALILoader:
    """A :class:`DALILoader` over ``spec`` (a data spec string, :class:`DataSpec` or an already
    indexed :class:`RecordSet`); with ``backend="memory"`` a
    :class:`~scadfast.data.memory.MemoryLoader` (the same batches' order, every image decoded once
    into memory, no DALI needed).

    ``device_id``: CUDA device for decoding and augmentation (``backend="memory"``: that holds the
    decoded set), or ``None`` for the CPU.
    ``rank``/``world_size``: this process's shard (DDP). ``seed``: epoch order and flips.
    ``check_images``: the indexing-time image check (see :mod:`scadfast.data.sources`).
    ``index``: options of the webdataset shard index (``cache_dir``, ``sync``, ``verbose``; see
    :func:`scadfast.data.wds_index.index_shards`); ``rank``/``world_size`` are passed to it, so the
    ranks share the indexing of uncached shards.
    """
    image_size = _check_int("image_size", image_size, 1)
    if backend not in BACKENDS:
        raise ValueError(f"make_loader: backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(spec, RecordSet):
        records = spec
    else:
        index = {"rank": rank, "world_size": world_size, **(index or {})}
        records = load_records(spec, image_size=image_size, check_images=check_images, index=index)
    if backend == "memory":
        return MemoryLoader(records, image_size, batch_size, device_id=device_id, rank=rank,
                            world_size=world_size, seed=seed, shuffle=shuffle, flip=flip)
    return DALILoader(records, image_size, batch_size, device_id=device_id, rank=rank,
                      world_size=world_size, seed=seed, shuffle=shuffle, flip=flip,
                      num_threads=num_threads, prefetch_queue_depth=prefetch_queue_depth)

