"""Variants: named presets of orthogonal switches (docs/design.md §2).

A variant is a :class:`VariantConfig`; every field is also a CLI flag of ``scadfast.train``
(``--d-loss``, ``--fidelity``, ``--mi-weight``, ``--cond-aug/--no-cond-aug``, …), so a user can build
any other split. ``build(cfg, clip)`` returns a :class:`GANPair`.

The contract every built model pair follows (the training engine only uses this):

``pair.G`` / ``pair.D``
    ``nn.Module`` holding every trainable generator-side / discriminator-side parameter (D includes
    its heads, the MI head Q and any PatchGAN). The frozen CLIP is never a submodule of either.
``pair.z_dim``
    noise size.
``pair.generate(z, s) -> image``
    (B, 3, H, W), unbounded (clamp to [-1, 1] only for saving/evaluating).
``pair.make_fake(z, s, impl="auto") -> fake``
    One training iteration's fakes, with G's graph (an image tensor, or whatever the pair's losses
    take as ``fake=``): the engine generates once per iteration, as GALIP does.
``pair.d_loss(real, s, z, impl="auto", fake=None) -> (loss, stats)``
    ``real`` images in [-1, 1] (B, 3, H, W); ``s`` sentence embeddings (B, d_txt); ``z`` (B, z_dim).
    Uses ``fake`` detached, or generates the fakes from ``z`` without G gradients. ``stats`` maps
    names to detached scalars.
``pair.g_loss(s, z, impl="auto", fake=None) -> (loss, stats)``
    Trains G through ``fake`` (the same object ``d_loss`` got), or generates from ``z``.
``impl``
    ``"auto"`` uses the fused ops, ``"ref"`` switches every op to its reference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass
class VariantConfig:
    name: str
    # --- GALIP family (docs/design.md §4, §5) ---
    d_loss: str = "hinge"  # "hinge" | "san" (semantic head loss)
    fidelity: str = "none"  # "none" | "clip_patch" | "pixel_patchgan"
    fidelity_loss: str = "hinge"  # "hinge" | "san" (pixel_patchgan only: SAN with one global ω)
    mi_weight: float = 0.0  # λ_MI; > 0 adds the Q(z|x) head (docs/design.md §5.7)
    mi_learn_sigma: bool = False
    clip_weight: float = 4.0  # λ_clip of the generator's CLIP-similarity term
    gp_weight: float = 2.0  # MA-GP k
    gp_power: float = 6.0  # MA-GP p
    gp_every: int = 1  # lazy regularisation: penalty every N D steps, scaled by N
    augment: str = "none"  # DiffAugment-style policy before CLIP reads images (models/augment.py)
    edit_negatives: float = 0.0  # share of D's mismatched texts that are one-attribute caption edits (data/negatives.py)
    z_dim: int = 100
    ngf: int = 64  # generator base width
    ndf: int = 64  # discriminator base width
    # --- MS-CLIP-GAN (docs/design.md §6) ---
    arch: str = "galip"  # "galip" | "ms_clip_gan"
    cond_aug: bool = False
    ca_mode: str = "glu"  # "glu" (v2) | "relu" (v1)
    ca_dim: int = 128  # E
    kl_weight: float = 1.0
    n_critic: int = 1  # D steps per G step
    label_smoothing: float = 0.0  # real target 1 - label_smoothing (MS-CLIP-GAN hinge: margin)
    use_uncond_loss: bool = True
    # --- optimisation (docs/design.md §5.8) ---
    lr_g: float = 1e-4
    lr_d: float = 4e-4
    betas: tuple = (0.0, 0.9)
    d_grad_clip: float = 0.0  # clip D's gradient to this total norm before its Adam step (0 = off)

    def replace(self, **changes) -> "VariantConfig":
        return dataclasses.replace(self, **changes)


_PRESETS = {
    "galip": VariantConfig("galip", d_loss="hinge", fidelity="none"),
    "scad": VariantConfig("scad", d_loss="san", fidelity="clip_patch"),
    "scad_mi": VariantConfig("scad_mi", d_loss="san", fidelity="clip_patch", mi_weight=1.0),
    "scad_dd": VariantConfig("scad_dd", d_loss="san", fidelity="pixel_patchgan"),
    "ms_clip_gan": VariantConfig(
        "ms_clip_gan", arch="ms_clip_gan", d_loss="hinge", cond_aug=True, ca_mode="glu", kl_weight=1.0,
        clip_weight=1.0, gp_weight=0.0, lr_g=2e-4, lr_d=2e-4, betas=(0.5, 0.999),
    ),
}


def names() -> list[str]:
    return list(_PRESETS)


def get(name: str, **overrides) -> VariantConfig:
    if name not in _PRESETS:
        raise ValueError(f"unknown variant {name!r}; choose one of {names()}")
    return _PRESETS[name].replace(**overrides)


@runtime_checkable
class GANPair(Protocol):
    """Structural type of a built model pair (see the module docstring for the contract)."""

    G: object
    D: object
    z_dim: int

    def generate(self, z, s): ...

    def make_fake(self, z, s, impl="auto"): ...

    def d_loss(self, real, s, z, impl="auto", fake=None): ...

    def g_loss(self, s, z, impl="auto", fake=None): ...


def build(cfg: VariantConfig, clip, img_size: int | None = None, **kwargs) -> GANPair:
    """Build the model pair of ``cfg`` around the frozen ``clip``; dispatches on ``cfg.arch``.

    ``"galip"`` → :class:`scadfast.models.galip.GALIPFamily` (``galip``, ``scad``, ``scad_mi``,
    ``scad_dd`` and any switch combination); ``"ms_clip_gan"`` →
    :func:`scadfast.models.ms_clip_gan.build_ms_clip_gan` (imported lazily). ``img_size`` (default:
    the CLIP image size) and ``kwargs`` (e.g. ``sn_impl``) go to the builder, which rejects keywords
    it does not know with a ``TypeError``.
    """
    if not isinstance(cfg, VariantConfig):
        raise TypeError(f"build: cfg must be a VariantConfig, got {type(cfg).__name__}")
    if cfg.arch == "galip":
        from .models.galip import GALIPFamily

        return GALIPFamily(cfg, clip, img_size=img_size, **kwargs)
    if cfg.arch == "ms_clip_gan":
        from .models.ms_clip_gan import build_ms_clip_gan

        return build_ms_clip_gan(cfg, clip, img_size=img_size, **kwargs)
    raise ValueError(f"build: unknown cfg.arch {cfg.arch!r}; expected 'galip' or 'ms_clip_gan'")
