"""Models of the GALIP family (SPEC §3–§5): the frozen CLIP, the CLIP-aided generator, the
discriminators and the :class:`~scadfast.models.galip.GALIPFamily` model pair.

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
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
