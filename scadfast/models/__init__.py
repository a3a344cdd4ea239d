"""Models of the GALIP family (docs/design.md §3–§5): the frozen CLIP, the CLIP-aided generator, the
discriminators and the :class:`~scadfast.models.galip.GALIPFamily` model pair; MS-CLIP-GAN (docs/design.md §6)
in :mod:`scadfast.models.ms_clip_gan`.

Submodules are imported lazily so that ``import scadfast.models.clip`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FrozenCLIP": "clip", "register_tiny_config": "clip",
    "TextEmbeddingCache": "text_cache",
    "CLIPAidedGenerator": "generator",
    "GALIPDiscriminator": "discriminator", "PixelPatchGAN": "discriminator",
    "GALIPFamily": "galip",
    "MSCLIPGAN": "ms_clip_gan", "build_ms_clip_gan": "ms_clip_gan",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
