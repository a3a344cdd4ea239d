"""Fused ops for GAN training (docs/design.md §7).

    from scadfast.ops import spectral_norm, san_logits, san_d_loss, patch_hinge_loss, cond_aug

Each op has a pure-PyTorch reference (``impl="ref"``, also public as ``<op>_ref``) and a fused
default (``impl="auto"``). See :mod:`scadfast.ops._impl` for the meaning of ``impl`` and for the
wiring that every op module follows. The modules are named after what they hold, not after a
function (``spectral``: spectral normalisation, ``conditioning``: conditioning augmentation, ``san``,
``patch_hinge``), so ``scadfast.ops.<function>`` is always the function.
"""

from .conditioning import CondAug, cond_aug, cond_aug_ref
from .patch_hinge import patch_hinge_loss, patch_hinge_loss_ref
from .san import san_d_loss, san_d_loss_ref, san_logits, san_logits_ref
from .spectral import (
    SpectralNorm, power_iteration_, power_iteration_grouped_, power_iteration_ref, spectral_norm, spectral_norm_all,
)

__all__ = [
    "spectral_norm", "spectral_norm_all", "SpectralNorm",
    "power_iteration_", "power_iteration_grouped_", "power_iteration_ref",
    "san_logits", "san_logits_ref", "san_d_loss", "san_d_loss_ref",
    "patch_hinge_loss", "patch_hinge_loss_ref",
    "cond_aug", "cond_aug_ref", "CondAug",
]
