"""Fused ops for GAN training (SPEC §7).

    from scadfast.ops import spectral_norm, san_logits, san_d_loss, patch_hinge_loss, cond_aug

Each op has a pure-PyTorch reference (``impl="ref"``) and a fused default (``impl="auto"``).
See :mod:`scadfast.ops._impl` for the meaning of ``impl``.
"""

from .cond_aug import CondAug, cond_aug, cond_aug_ref
from .patch_hinge import patch_hinge_loss, patch_hinge_loss_ref
from .san import san_d_loss, san_d_loss_ref, san_logits, san_logits_ref
from .spectral_norm import power_iteration_, power_iteration_grouped_, spectral_norm, spectral_norm_all

__all__ = [
    "spectral_norm", "spectral_norm_all", "power_iteration_", "power_iteration_grouped_",
    "san_logits", "san_logits_ref", "san_d_loss", "san_d_loss_ref",
    "patch_hinge_loss", "patch_hinge_loss_ref",
    "cond_aug", "cond_aug_ref", "CondAug",
]
