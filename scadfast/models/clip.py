"""The frozen CLIP of the GALIP family (docs/design.md §3): text embeddings, D's image features, G's mapper.

:class:`FrozenCLIP` wraps an ``open_clip`` ViT model and exposes exactly what the generator and the
discriminators need. Every size (image size, patch grid ``g``, vision width, depth, embedding size,
context length) is read from the open_clip model, so the same code runs on the embedded
``scadfast-tiny`` model (64 px, g = 8, width 128, 6 blocks) and on ``ViT-B-32`` (224 px, g = 7,
width 768, 12 blocks).

Block selection for depths other than GALIP's 12 (``feature_blocks``, ``prompt_blocks``)
---------------------------------------------------------------------------------------
GALIP reads D features after blocks {1, 4, 8} (0-indexed) of ViT-B/32's 12 blocks and puts learned
prompts into blocks 1..8. For a ViT with ``n`` blocks, GALIP's block index ``i`` of 12 maps to
``round_half_up(i * (n - 1) / 11)``: the same *relative position* along the stack, with the first
block mapped to the first and the last to the last (so ``n = 12`` reproduces GALIP exactly).
``feature_blocks`` is the sorted set of mapped {1, 4, 8} (duplicates, possible for very shallow
models, are merged). ``prompt_blocks`` is the contiguous range from the mapped 1 to the mapped 8.
Examples: n = 6 → feature_blocks (0, 2, 4), prompt_blocks (0, 1, 2, 3, 4); n = 24 → (2, 8, 17) and
2..17.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..assets import asset_path

TINY_NAME = "scadfast-tiny"

# The embedded default (docs/design.md §3): small enough to train on a 2-core CPU.
TINY_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 6, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}

# GALIP's choices for ViT-B/32 (12 blocks).
_GALIP_DEPTH = 12
_GALIP_FEATURE_BLOCKS = (1, 4, 8)
_GALIP_PROMPT_RANGE = (1, 8)

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

#: The ``pretrained`` tag that names the shipped shapes-pretrained weights of ``scadfast-tiny``.
SHIPPED_TAG = "shapes"
#: File name of those weights in ``scadfast/assets`` (written by ``python -m scadfast.pretrain_clip``).
SHIPPED_FILE = "scadfast-tiny-shapes.pt"


def shipped_weights_path() -> str:
    """Absolute path of the shipped shapes-pretrained ``scadfast-tiny`` weights.

    Raises ``FileNotFoundError`` (saying how to rebuild them) if the file is missing from the install.
    """
    return asset_path(SHIPPED_FILE, rebuild="python -m scadfast.pretrain_clip --out {path}")


def resolve_pretrained(name: str, pretrained: str | None) -> str | None:
    """Map ``pretrained`` to what open_clip accepts: the tag ``"shapes"`` of ``scadfast-tiny`` →
    :func:`shipped_weights_path`; anything else (``None``, a path, an open_clip tag) is returned
    unchanged."""
    if pretrained == SHIPPED_TAG:
        if name != TINY_NAME:
            raise ValueError(f"pretrained={SHIPPED_TAG!r} exists only for {TINY_NAME!r}, not for {name!r}")
        return shipped_weights_path()
    return pretrained


def register_tiny_config() -> str:
    """Register the ``scadfast-tiny`` open_clip model config (idempotent); returns its name.

    ViT with image 64, patch 8 (g = 8), width 128, 6 layers, 4 heads; text transformer with
    context 32, width 128, 4 layers, 4 heads; embedding size 128. Registration goes through
    ``open_clip.add_model_config`` (a JSON file in a temporary directory, read immediately).
    """
    import open_clip

    if TINY_NAME in open_clip.list_models():
        return TINY_NAME
    with tempfile.TemporaryDirectory(prefix="scadfast-openclip-") as d:
        path = os.path.join(d, TINY_NAME + ".json")
        with open(path, "w") as f:
            json.dump(TINY_CONFIG, f)
        open_clip.add_model_config(path)
    if TINY_NAME not in open_clip.list_models():  # pragma: no cover - open_clip API change
        raise RuntimeError(f"could not register the open_clip model config {TINY_NAME!r}")
    return TINY_NAME


def _scale_block(i: int, n_blocks: int) -> int:
    """GALIP block ``i`` of 12 → the block at the same relative position of an ``n_blocks`` stack."""
    if n_blocks == 1:
        return 0
    return int(math.floor(i * (n_blocks - 1) / (_GALIP_DEPTH - 1) + 0.5))


def scaled_feature_blocks(n_blocks: int) -> tuple[int, ...]:
    """D feature blocks for a ViT of depth ``n_blocks`` (GALIP's {1, 4, 8} of 12, see module doc)."""
    return tuple(sorted({_scale_block(i, n_blocks) for i in _GALIP_FEATURE_BLOCKS}))


def scaled_prompt_blocks(n_blocks: int) -> tuple[int, ...]:
    """Mapper prompt blocks for a ViT of depth ``n_blocks`` (GALIP's 1..8 of 12, see module doc)."""
    lo, hi = (_scale_block(i, n_blocks) for i in _GALIP_PROMPT_RANGE)
    return tuple(range(lo, hi + 1))


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


class FrozenCLIP(nn.Module):
    """A frozen open_clip ViT CLIP: sentence embeddings, D features, the generator's mapper.

    Args:
        name: open_clip model name (``"scadfast-tiny"`` — registered on demand —, ``"ViT-B-32"``, …).
        pretrained: ``None`` for random initialisation, an open_clip tag such as ``"openai"`` (may
            download; only when explicitly asked for), the path of a local checkpoint file, or
            ``"shapes"`` (``scadfast-tiny`` only): the weights shipped in ``scadfast/assets``, trained
            contrastively on the embedded shapes data by ``python -m scadfast.pretrain_clip``.
        device: where to put the model (default: CPU).

    The CLIP is frozen: every parameter has ``requires_grad=False`` and the module stays in eval
    mode whatever ``train()`` is called with. It must never be handed to an optimiser; models that
    use it keep it out of their ``parameters()``. Gradients still flow *through* it to its inputs
    (``image_features``, ``image_embed``, ``mapper``), which the generator needs.

    Attributes (all derived from the open_clip config): ``image_size``, ``patch_size``, ``grid``
    (g, patches per side), ``width`` (vision width), ``n_blocks`` (vision depth), ``embed_dim``
    (= d_txt, the joint embedding size), ``context_length``, ``feature_blocks``, ``prompt_blocks``
    (module doc), ``mean``/``std`` (normalisation tuples), ``name``, ``pretrained``.
    """

    def __init__(self, name: str = TINY_NAME, pretrained: str | None = None, device=None):
        super().__init__()
        import open_clip

        if name == TINY_NAME:
            register_tiny_config()
        if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
            raise TypeError(f"FrozenCLIP: pretrained must be None, a tag or a path, got {type(pretrained).__name__}")
        pretrained = os.fspath(pretrained) if pretrained is not None else None
        if pretrained is not None and not os.path.isfile(pretrained):
            pretrained = resolve_pretrained(name, pretrained)
        kwargs = {}
        if pretrained is not None and not os.path.isfile(pretrained):
            tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
            if not tag_cfg:
                raise ValueError(
                    f"FrozenCLIP: pretrained={pretrained!r} is neither a file nor a known open_clip tag for "
                    f"{name!r} (tags: {open_clip.list_pretrained_tags_by_model(name)})")
            if tag_cfg.get("quick_gelu", False):  # e.g. OpenAI weights were trained with QuickGELU
                kwargs["force_quick_gelu"] = True
        model = open_clip.create_model(name, pretrained=pretrained, device="cpu", **kwargs)
        visual = getattr(model, "visual", None)
        if visual is None or not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise ValueError(f"FrozenCLIP: {name!r} is not an open_clip ViT CLIP (needs visual.conv1/transformer)")
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError(f"FrozenCLIP: {name!r} uses attentional pooling, which is not supported")
        if not hasattr(model, "encode_text"):  # pragma: no cover
            raise ValueError(f"FrozenCLIP: {name!r} has no text tower")
        self.model = model
        self.name = name
        self.pretrained = pretrained

        ih, iw = _pair(visual.image_size)
        ph, pw = _pair(visual.patch_size)
        if ih != iw or ph != pw:
            raise ValueError(f"FrozenCLIP: only square images/patches are supported, got {visual.image_size}/{visual.patch_size}")
        self.image_size = ih
        self.patch_size = ph
        self.grid = ih // ph
        self.width = int(visual.transformer.width)
        self.n_blocks = len(visual.transformer.resblocks)
        self.embed_dim = int(visual.output_dim)
        self.context_length = int(model.context_length)
        self.feature_blocks = scaled_feature_blocks(self.n_blocks)
        self.prompt_blocks = scaled_prompt_blocks(self.n_blocks)
        pp = getattr(visual, "preprocess_cfg", None) or {}
        self.mean = tuple(float(v) for v in pp.get("mean", _OPENAI_MEAN))
        self.std = tuple(float(v) for v in pp.get("std", _OPENAI_STD))
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

        self._tokenizer = open_clip.get_tokenizer(name)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)
        if device is not None:
            self.to(device)

    # -- frozen-module plumbing -------------------------------------------------------------------
    def train(self, mode: bool = True) -> "FrozenCLIP":
        """No-op: the frozen CLIP always stays in eval mode (no dropout, no patch dropout)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self._mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype

    def weights_id(self) -> str:
        """Identity of the loaded weights, for cache keys.

        ``tag:<tag>`` for an open_clip tag; ``file:<abs path>:<mtime_ns>:<size>`` for a checkpoint;
        ``random:<sha1 of the text-tower weights>`` for a random initialisation (two random CLIPs
        share a key only if their text towers are bit-identical).
        """
        p = self.pretrained
        if p is None:
            import hashlib

            h = hashlib.sha1()
            for k, v in self.model.state_dict().items():
                if k.startswith("visual."):
                    continue
                h.update(k.encode())
                h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            return "random:" + h.hexdigest()
        if os.path.isfile(p):
            st = os.stat(p)
            return f"file:{os.path.abspath(p)}:{st.st_mtime_ns}:{st.st_size}"
        return f"tag:{p}"

    # -- text -------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Captions → (N, context_length) int64 token ids (on CPU), truncated to the context length."""
        if isinstance(texts, str):
            raise TypeError("FrozenCLIP.tokenize: texts must be a list of strings, got a single str")
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("FrozenCLIP.tokenize: every caption must be a str")
        return self._tokenizer(texts, context_length=self.context_length).long()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, context_length) token ids → sentence embedding s (B, embed_dim).

        s is the end-of-text token after ``ln_final`` and ``text_projection`` (GALIP), not normalised.
        """
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"FrozenCLIP.encode_text: tokens must be (B, L) integer ids, got {tuple(tokens.shape)} {tokens.dtype}")
        return self.model.encode_text(tokens.to(self.device).long(), normalize=False)

    # -- image ------------------------------------------------------------------------------------
    def to_clip_input(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) → CLIP input (B, 3, image_size, image_size).

        Resizes (bicubic, antialiased when shrinking) only when the size differs, maps to [0, 1]
        with (x + 1) / 2 and normalises with ``mean``/``std``. Differentiable.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"FrozenCLIP: images must be (B, 3, H, W), got {tuple(x.shape)}")
        if x.shape[-2:] != (self.image_size, self.image_size):
            shrink = x.shape[-1] > self.image_size or x.shape[-2] > self.image_size
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                              align_corners=False, antialias=shrink)
        x = (x + 1) * 0.5
        return (x - self._mean.to(x.dtype)) / self._std.to(x.dtype)

    def _embed_tokens(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """(B, g*g, width) patch tokens → class token prepended, positional embedding, ln_pre."""
        v = self.model.visual
        cls = v.class_embedding.to(patch_tokens.dtype).view(1, 1, -1).expand(patch_tokens.shape[0], -1, -1)
        x = torch.cat([cls, patch_tokens], dim=1)
        x = x + v.positional_embedding.to(x.dtype)
        return v.ln_pre(x)

    def _blocks(self):
        return self.model.visual.transformer.resblocks

    @property
    def _batch_first(self) -> bool:
        return bool(getattr(self.model.visual.transformer, "batch_first", True))

    def _to_grid(self, tokens_nld: torch.Tensor) -> torch.Tensor:
        """(B, 1 + g*g, width) → patch tokens as a map (B, width, g, g)."""
        b = tokens_nld.shape[0]
        return tokens_nld[:, 1:].transpose(1, 2).reshape(b, self.width, self.grid, self.grid)

    def image_features(self, x: torch.Tensor, pooled: bool = True):
        """Images in [-1, 1] → (feats (B, len(feature_blocks), width, g, g), emb (B, embed_dim)).

        ``feats`` are the patch tokens after each block in ``feature_blocks`` (D's input); ``emb``
        is the pooled image embedding after ``ln_post`` and ``proj`` (the generator's CLIP loss).
        With ``pooled=False`` only ``feats`` is returned and the blocks after the last feature block
        are not run (the discriminator step needs no embedding).
        """
        v = self.model.visual
        xin = self.to_clip_input(x).to(self.dtype)
        t = v.conv1(xin)  # (B, width, g, g)
        t = self._embed_tokens(t.flatten(2).transpose(1, 2))
        bf = self._batch_first
        if not bf:
            t = t.transpose(0, 1)
        feats = []
        last = max(self.feature_blocks)
        for i, blk in enumerate(self._blocks()):
            t = blk(t)
            if i in self.feature_blocks:
                feats.append(self._to_grid(t if bf else t.transpose(0, 1)))
            if not pooled and i == last:
                return torch.stack(feats, dim=1)
        if not bf:
            t = t.transpose(0, 1)
        pooled, _ = v._pool(t)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return torch.stack(feats, dim=1), pooled

    def image_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → pooled, projected CLIP image embedding (B, embed_dim), not normalised."""
        return self.model.visual(self.to_clip_input(x).to(self.dtype))

    def mapper(self, feat1: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """The generator's frozen CLIP mapper (docs/design.md §4.2).

        ``feat1`` (B, width, g, g) is used as the patch tokens (in place of ``conv1``'s output):
        prepend the class token, add the positional embedding, ``ln_pre``; then every block runs,
        and for the i-th block of ``prompt_blocks`` the prompt token ``prompts[:, i]`` is appended
        before the block and dropped after it. Returns the patch tokens (B, width, g, g) — no
        ``ln_post``/``proj``. Gradients flow to ``feat1`` and ``prompts``; CLIP weights are frozen.
        """
        b = feat1.shape[0]
        if feat1.shape[1:] != (self.width, self.grid, self.grid):
            raise ValueError(
                f"FrozenCLIP.mapper: feat1 must be (B, {self.width}, {self.grid}, {self.grid}), got {tuple(feat1.shape)}")
        np_ = len(self.prompt_blocks)
        if prompts.shape != (b, np_, self.width):
            raise ValueError(
                f"FrozenCLIP.mapper: prompts must be (B={b}, {np_}, {self.width}), got {tuple(prompts.shape)}")
        t = self._embed_tokens(feat1.to(self.dtype).flatten(2).transpose(1, 2))
        prompts = prompts.to(t.dtype)
        bf = self._batch_first
        if not bf:
            t, prompts = t.transpose(0, 1), prompts.transpose(0, 1)
        seq_dim = 1 if bf else 0
        k = 0
        for i, blk in enumerate(self._blocks()):
            if i in self.prompt_blocks:
                p = prompts[:, k:k + 1] if bf else prompts[k:k + 1]
                k += 1
                t = blk(torch.cat([t, p], dim=seq_dim))
                t = t.narrow(seq_dim, 0, t.shape[seq_dim] - 1)
            else:
                t = blk(t)
        if not bf:
            t = t.transpose(0, 1)
        return self._to_grid(t)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, pretrained={self.pretrained!r}, image_size={self.image_size}, "
                f"grid={self.grid}, width={self.width}, n_blocks={self.n_blocks}, embed_dim={self.embed_dim}, "
                f"feature_blocks={self.feature_blocks}, prompt_blocks={self.prompt_blocks}")
