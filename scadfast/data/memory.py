"""An in-memory loader: every image decoded once, batches gathered on the device; no DALI.

:class:`MemoryLoader` yields exactly the batches of a :class:`~scadfast.data.dali.DALILoader` over the
same records, seed, batch size and ranks — the same epoch order, sharding, flips, ``len``,
``state_dict`` and resume semantics (all inherited; see :mod:`scadfast.data.dali`) — but it decodes
each image once, up front, with Pillow (shorter side resized to ``S`` with Pillow's antialiased
bilinear filter, centre ``S x S`` crop) and keeps the whole set as ``uint8 (N, 3, S, S)`` on
``cuda:device_id`` (or on the CPU when ``device_id=None``). A batch is then one index gather, a flip
of the flipped samples and ``(x - 127.5) * (1 / 127.5)`` on the device.

When to use it (``--loader memory``):

* the data set fits in memory — the embedded shapes set is 2,000 × 3 × 64 × 64 bytes = 24.6 MB — so
  decoding every epoch again, which DALI does, is wasted work;
* DALI is not installed (a GPU image without its wheels): this loader needs only Pillow and torch.

What differs from DALI: on the shapes set at its native size, nothing — the decoded JPEG pixels and the
normalisation agree bit for bit, so a ``--loader memory`` run is the DALI run (tests train both and
compare the weights). Where images are resized, or in other codecs, Pillow's decoder and resampler are
not DALI's: an image can differ by a few levels of 255 and the run is a run of its own. The order is
always the same, so a checkpoint of either loader resumes with the other.

Memory: every rank holds the whole set (each rank reads a different slice of every epoch's order), so
``max_bytes`` (default 8 GiB) refuses a set that would not fit, naming its size; use DALI for those.
An image Pillow cannot decode is named in a :class:`~scadfast.data.sources.DataWarning` and skipped, as
DALI's loader does: its slots in the epoch order are taken by the next readable records.
"""

from __future__ import annotations

import io
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from .dali import DALILoader
from .sources import RecordSet

__all__ = ["MemoryLoader", "decode_image"]

MAX_BYTES = 8 << 30
_INV_STD = 1 / 127.5  # crop_mirror_normalize's std, applied as DALI does: (x - mean) * (1 / std)


def decode_image(data: bytes, size: int) -> np.ndarray:
    """``uint8 (3, size, size)``: the image decoded to RGB, its shorter side resized to ``size``
    (antialiased bilinear) and the centre ``size x size`` cropped — the geometry of DALI's pipeline."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        if min(w, h) != size:
            scale = size / min(w, h)
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
            w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


class MemoryLoader(DALILoader):
    """Iterable of ``(images (B,3,S,S) float32 in [-1,1], indices (B,) int64)`` batches from images
    decoded once into memory; the interface and the order of :class:`DALILoader` (module docstring).
    Build it with :func:`scadfast.data.make_loader` and ``backend="memory"``."""

    def __init__(self, records: RecordSet, image_size: int, batch_size: int,
                 device_id: Optional[int] = None, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, flip: bool = False, max_bytes: int = MAX_BYTES):
        super().__init__(records, image_size, batch_size, device_id=device_id, rank=rank,
                         world_size=world_size, seed=seed, shuffle=shuffle, flip=flip)
        S = self.image_size
        need = len(records) * 3 * S * S
        if need > max_bytes:
            raise ValueError(f"{records.source}: {len(records)} images at {S} px need {need / 2**30:.1f} GiB "
                             f"in memory, more than the loader's limit of {max_bytes / 2**30:.1f} GiB; "
                             "use --loader dali for this data set")
        pixels = np.zeros((len(records), 3, S, S), np.uint8)
        bad = []
        for i in range(len(records)):
            try:
                pixels[i] = decode_image(records.read_bytes(i), S)
            except Exception as e:  # noqa: BLE001 - any decoder failure: name the file and skip it
                bad.append((i, f"{type(e).__name__}: {e}"))
        if bad:
            self._skip(bad)
        self.device = torch.device("cpu" if device_id is None else f"cuda:{device_id}")
        self.pixels = torch.from_numpy(pixels).to(self.device)

    def load_state_dict(self, state) -> None:
        skipped = set(self.skipped)  # undecodable here stays skipped, whatever the checkpoint says
        super().load_state_dict(state)
        self.skipped |= skipped

    def _epoch_batches(self, epoch: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """``epoch``'s batches from ``self.batch`` on, gathered from the decoded set (the epoch
        bookkeeping is :meth:`DALILoader.__iter__`'s)."""
        B = self.batch_size
        order = torch.from_numpy(self.epoch_order(epoch))
        flips = torch.from_numpy(self.epoch_flips(epoch))
        for k in range(self.batch, len(self)):
            idx = order[k * B:(k + 1) * B]
            images = self.pixels[idx.to(self.device)].float()
            flip = flips[idx].to(self.device)
            if self.flip and bool(flip.any()):
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            yield (images - 127.5) * _INV_STD, idx.clone()  # DALI's arithmetic: equal bits on the CPU

    def __repr__(self) -> str:
        return (f"MemoryLoader({self.records.source}, records={len(self.records)}, "
                f"image_size={self.image_size}, batch_size={self.batch_size}, batches={len(self)}, "
                f"device={self.device}, rank={self.rank}/{self.world_size}, epoch={self.epoch}, "
                f"batch={self.batch})")
