"""CLIP score (docs/design.md §9): 100 × cosine similarity of image and text embeddings under a named CLIP.

For each image x generated for prompt p: ``100 · cos(E_img(x), E_txt(p))`` with the CLIP's pooled,
projected image embedding and its sentence embedding (:class:`scadfast.models.clip.FrozenCLIP`).
The score is the mean over all images; the per-prompt means are returned too. No clamping at 0 (some
implementations report ``max(100·cos, 0)``; with real CLIPs the difference is nil, with the tiny
embedded one negative cosines do occur and are kept so the mean is unbiased).

Which CLIP: by default the training CLIP recorded in the checkpoint (its score measures what the
generator was optimised for, so it is optimistic); ``--eval-clip NAME[:PRETRAINED]`` names another,
e.g. ``ViT-B-32:openai`` or ``scadfast-tiny:shapes``.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .features import ProgressLine

__all__ = ["parse_clip_spec", "load_eval_clip", "encode_prompts", "CLIPScorer", "clip_score"]


def parse_clip_spec(spec: str) -> Tuple[str, Optional[str]]:
    """``"NAME[:PRETRAINED]"`` → (name, pretrained or None). A path may contain ':' after the first one."""
    if not spec or not isinstance(spec, str):
        raise ValueError(f"CLIP spec must be 'NAME[:PRETRAINED]', got {spec!r}")
    name, _, pre = spec.partition(":")
    if not name:
        raise ValueError(f"CLIP spec {spec!r} has no model name")
    return name, (pre or None)


def load_eval_clip(spec: str, device=None):
    """A :class:`FrozenCLIP` from ``NAME[:PRETRAINED]``; ``scadfast-tiny:shapes`` → the shipped weights."""
    from ..models.clip import FrozenCLIP

    name, pre = parse_clip_spec(spec)
    return FrozenCLIP(name, pretrained=pre, device=device)


@torch.no_grad()
def encode_prompts(clip, prompts: Sequence[str], chunk: int = 256) -> torch.Tensor:
    """The CLIP sentence embeddings (N, d) of ``prompts``, float32, encoded ``chunk`` at a time."""
    tok = clip.tokenize(list(prompts))
    return torch.cat([clip.encode_text(tok[i:i + chunk]).float() for i in range(0, len(tok), chunk)])


class CLIPScorer:
    """Streaming CLIP score: ``add(images, prompt_index)`` per batch, ``result()`` at the end. ``text``: the
    prompts' embeddings when the caller has them (:func:`encode_prompts`)."""

    def __init__(self, clip, prompts: Sequence[str], label: str, progress: bool = True, total: Optional[int] = None,
                 text: Optional[torch.Tensor] = None):
        self.clip, self.prompts, self.label = clip, list(prompts), label
        self.text = F.normalize(encode_prompts(clip, self.prompts) if text is None else text.float(), dim=-1)
        self.progress, self.total = progress, total
        self.reset()

    def reset(self) -> None:
        """Forget the images added so far (the prompts' text embeddings are kept): score another set."""
        self.sums = torch.zeros(len(self.prompts), dtype=torch.float64)
        self.counts = torch.zeros(len(self.prompts), dtype=torch.long)
        self.bar = ProgressLine("clip_score", self.total, enabled=self.progress)

    @torch.no_grad()
    def add(self, images: torch.Tensor, prompt_index) -> None:
        """``images`` (B, 3, H, W) in [-1, 1]; ``prompt_index`` an int or a (B,) tensor of indices."""
        idx = torch.as_tensor(prompt_index, dtype=torch.long).expand(images.shape[0]).cpu()
        img = F.normalize(self.clip.image_embed(images.to(self.clip.device)).float(), dim=-1)
        s = 100.0 * (img * self.text[idx.to(self.text.device)]).sum(-1)
        self.sums.index_add_(0, idx, s.double().cpu())
        self.counts.index_add_(0, idx, torch.ones_like(idx))
        self.bar.update(images.shape[0])

    def result(self) -> dict:
        if int(self.counts.sum()) == 0:
            raise ValueError("CLIPScorer: no images were added")
        seen = self.counts > 0
        per = (self.sums[seen] / self.counts[seen]).tolist()
        return {"clip_score": float(self.sums.sum() / self.counts.sum()), "n_images": int(self.counts.sum()),
                "n_prompts": int(seen.sum()), "clip": self.label,
                "per_prompt": {p: v for p, v in zip([q for q, m in zip(self.prompts, seen.tolist()) if m], per)}}


def clip_score(clip, prompts: Sequence[str], batches: Iterable[Tuple[int, torch.Tensor]], label: str = "",
               progress: bool = True) -> dict:
    """CLIP score of ``(prompt_index, images)`` batches (e.g. :func:`features.iter_generated`)."""
    sc = CLIPScorer(clip, prompts, label or f"{clip.name}:{clip.pretrained}", progress)
    for i, x in batches:
        sc.add(x, i)
    return sc.result()
