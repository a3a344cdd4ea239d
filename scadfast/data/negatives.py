"""Edit negatives: mismatched texts that contradict a caption in exactly one attribute (shapes captions).

GALIP's discriminator learns the text condition from mismatched pairs ``(x_r, s̃)`` with ``s̃`` the text
of another sample in the batch (``roll(s, 1)``). Two random shapes captions usually differ in several
attributes at once — most often in colour, the easiest one to see — so the mismatch term can be won
without ever checking the harder ones (shape). An *edit negative* of caption ``c`` is another
**training caption** ``c'`` that names a subset of what ``c`` names, with the same values except for
exactly one attribute: e.g. for "a small red square at the top left" the captions "a red circle",
"a small square at the bottom", "a blue square". It is false for ``c``'s image (``c`` is true, and ``c'``
gives one of ``c``'s named attributes another value), and it can only be told from ``c`` by that one
attribute. The attribute to change is drawn uniformly among those of ``c``'s named attributes that have
at least one edit among the training captions, then the edit uniformly among those — no attribute is
favoured. Captions without any edit keep the rolled text.

Only the training captions are used (their text embeddings are already cached); no image labels,
held-out prompts or classifier are involved. Captions must be in the shapes grammar
(:func:`scadfast.data.shapes.parse_caption`).
"""

from __future__ import annotations

from itertools import combinations
from typing import Sequence

import numpy as np
import torch

from .shapes import ATTRIBUTE_NAMES, ATTRIBUTES, parse_caption


def _key(attrs: dict) -> tuple:
    return tuple(sorted(attrs.items()))


class EditNegatives:
    """Index of the one-attribute edits among ``captions`` (see the module doc).

    ``sample(idx, generator)`` → (B,) int64 caption indices, ``-1`` where caption ``idx[b]`` has no edit.
    Attributes: ``n_with_edit`` (captions with at least one edit), ``per_attribute`` (captions whose edit
    pool contains that attribute).
    """

    def __init__(self, captions: Sequence[str]):
        parsed = []
        for i, c in enumerate(captions):
            try:
                parsed.append(parse_caption(c))
            except ValueError:
                raise ValueError(f"edit negatives need captions in the shapes grammar; caption {i} "
                                 f"({c!r}) is not one (use them with --data shapes...)") from None
        by_key: dict[tuple, list[int]] = {}
        for i, p in enumerate(parsed):
            by_key.setdefault(_key(p), []).append(i)
        self.n = len(captions)
        # CSR: caption i → its attributes with edits (attr_ptr / attr_ids) → each one's edits (cand_ptr / cand).
        attr_ptr, attr_ids, cand_ptr, cand = [0], [], [0], []
        self.per_attribute = {a: 0 for a in ATTRIBUTE_NAMES}
        for p in parsed:
            for a in ATTRIBUTE_NAMES:
                if a not in p:
                    continue
                rest = [k for k in p if k != a]
                found: list[int] = []
                for r in range(len(rest) + 1):
                    for keep in combinations(rest, r):
                        if a != "shape" and "shape" not in keep:
                            continue  # every caption names the shape
                        for v in ATTRIBUTES[a]:
                            if v != p[a]:
                                found += by_key.get(_key({**{k: p[k] for k in keep}, a: v}), [])
                if found:
                    attr_ids.append(ATTRIBUTE_NAMES.index(a))
                    cand += sorted(set(found))
                    cand_ptr.append(len(cand))
                    self.per_attribute[a] += 1
            attr_ptr.append(len(attr_ids))
        self._attr_ptr = np.asarray(attr_ptr, np.int64)
        self._attr_ids = np.asarray(attr_ids, np.int64)
        self._cand_ptr = np.asarray(cand_ptr, np.int64)
        self._cand = np.asarray(cand, np.int64)
        self.n_with_edit = int((np.diff(self._attr_ptr) > 0).sum())

    def edits(self, i: int) -> dict[str, list[int]]:
        """Caption ``i``'s edits by the attribute they change."""
        out = {}
        for j in range(self._attr_ptr[i], self._attr_ptr[i + 1]):
            out[ATTRIBUTE_NAMES[self._attr_ids[j]]] = self._cand[self._cand_ptr[j]:self._cand_ptr[j + 1]].tolist()
        return out

    def sample(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        idx = idx.detach().cpu().long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise IndexError(f"EditNegatives.sample: caption index out of range [0, {self.n})")
        u = torch.rand(idx.shape[0], 2, generator=generator, dtype=torch.float64).numpy()
        lo, hi = self._attr_ptr[idx.numpy()], self._attr_ptr[idx.numpy() + 1]
        out = np.full(idx.shape[0], -1, np.int64)
        has = hi > lo
        j = lo[has] + np.minimum((u[has, 0] * (hi - lo)[has]).astype(np.int64), (hi - lo)[has] - 1)
        c0, c1 = self._cand_ptr[j], self._cand_ptr[j + 1]
        out[has] = self._cand[c0 + np.minimum((u[has, 1] * (c1 - c0)).astype(np.int64), c1 - c0 - 1)]
        return torch.from_numpy(out)
