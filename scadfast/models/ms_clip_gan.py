"""MS-CLIP-GAN: a StackGAN++-style three-stage text-to-image GAN with CLIP conditioning (docs/design.md §6).

Build it with :func:`build_ms_clip_gan` ``(cfg, clip)``; the result follows the GANPair contract of
:mod:`scadfast.variants` (``G``, ``D``, ``z_dim``, ``generate``, ``d_loss``, ``g_loss``).

Data flow
---------
``s`` (B, d_txt) is a frozen-CLIP sentence embedding; the model L2-normalises it itself (callers may
pass raw embeddings). Sizes come from ``clip.image_size`` (or ``img_size=``): with final size S the
three stages produce S/4, S/2 and S pixels (16/32/64 for the embedded 64 px CLIP, 64/128/256 for a
256 px setup, 56/112/224 for ViT-B/32).

Conditioning augmentation [StackGAN]
    ``(ĉ, μ, log σ², KL) = cond_aug(ŝ, W, b, eps, mode=cfg.ca_mode)`` — the fused op
    :func:`scadfast.ops.cond_aug` (``mode="relu"``: v1, ``"glu"``: v2), ``ĉ = μ + exp(½ log σ²) ⊙ ε``,
    ``KL = −½·mean(1 + log σ² − μ² − exp(log σ²))``. With ``cfg.cond_aug=False`` a plain
    ``Linear(d_txt → E)`` gives ``ĉ = μ`` and ``KL = 0``.

Generator (``pair.G``)
    G0: ``[ĉ ‖ z]`` → Linear → (C0, k, k) → nearest-×2 up-blocks (conv3×3, BN, GLU) → S/4 feature map
    with ``ngf`` channels. G1 and G2 each tile ``ĉ`` over the previous feature map, join it
    (conv3×3, BN, GLU), apply two residual blocks and one up-block (channels halve: ``ngf/2``,
    ``ngf/4``). Every stage has its own conv3×3 → RGB head. Outputs are unbounded by default
    (docs/design.md §4: clamp to [-1, 1] only when saving); ``g_tanh=True`` adds the StackGAN++ tanh.

Discriminators (``pair.D``, one per scale)
    Trunk: conv4×4 stride-2 down-blocks (LeakyReLU 0.2) from the stage size to k×k, then a conv3×3 to
    ``8·ndf`` channels; spectrally normalised (``d_norm="spectral"``, the default, via
    :func:`scadfast.ops.spectral_norm`) or batch-normalised like StackGAN++ (``d_norm="batch"``).
    Heads, each giving one logit per sample (B,):

    * unconditional: conv k×k → 1 on the trunk map;
    * conditional: tile **μ** (the deterministic CA mean, *not* the sample ĉ — as in StackGAN/StackGAN++,
      so D judges the text, not CA noise) over the trunk map, concat, conv3×3 + LeakyReLU,
      conv k×k → 1;
    * alignment: global-average-pooled trunk features → Linear → d_txt, L2-normalised; the score of a
      pair is the cosine with ŝ.

Losses (sums over the three scales)
    Hinge terms use the fused :func:`scadfast.ops.patch_hinge_loss`. ``x̃``-mismatched pairs use
    ``μ̃ = roll(μ, 1)``; pairs whose captions are identical (cosine of the text embeddings > 1 − 1e-4,
    common with templated captions) are masked out of the mismatch term (``weight=`` of the op).
    Label smoothing ε = ``cfg.label_smoothing`` is one-sided and, for a hinge, shrinks the real margin
    from 1 to ``1 − ε``: real terms are ``relu(1 − ε − x)``, fakes keep ``relu(1 + x)``.

    D, per scale: ``relu(1−ε−D_c(x_r, μ)) + ½[relu(1+D_c(x_f, μ)) + relu(1+D_c(x_r, μ̃))]``
    ``+ [cfg.use_uncond_loss]·(relu(1−ε−D_u(x_r)) + relu(1+D_u(x_f)))`` ``+ align_weight·L_align(x_r)``.

    G: ``Σ_scales [−mean D_c(x_f, μ) − [use_uncond]·mean D_u(x_f) + align_weight·L_align(x_f)]``
    ``+ cfg.kl_weight·KL + cfg.clip_weight·mean(1 − cos(clip.image_embed(x_f^{(2)}), ŝ))``
    ``+ perceptual_weight·L_perc`` (only when a feature network is given, see below).

    ``L_align`` is a symmetric batch contrastive (InfoNCE) loss on the alignment head: the B×B matrix
    of cosines between image projections and texts, divided by ``align_temperature``, cross-entropy
    towards the matching caption(s) in both directions (rows and columns); duplicate captions count as
    positives. D learns it on real pairs only; G is pushed to make its fakes align. With B = 1 it is 0.

    ``μ`` for D is computed by the generator's CA under ``no_grad`` in ``d_loss``; in ``g_loss`` it
    keeps its graph, so the conditional heads also train the CA (as in StackGAN++).

Perceptual loss
    Off by default (``perceptual=None``): no VGG weights ship with scadfast. Pass a frozen feature
    network ``perceptual(x) -> Tensor`` (images in [-1, 1]) to :func:`build_ms_clip_gan`; ``g_loss``
    then needs ``real=`` and adds ``mean((φ(x_f^{(2)}) − φ(x_r))²)``. The network is put in eval mode,
    frozen, and kept out of ``G``/``D``.

Training-loop knobs
    ``cfg.n_critic`` (D steps per G step), ``cfg.lr_d`` / ``cfg.lr_g`` and ``cfg.betas`` are read by the
    training engine, not here. ``cfg.gp_weight`` (MA-GP) does not apply to this architecture and is
    ignored (the preset sets it to 0).

``impl``: ``"auto"`` runs the fused ops (cond_aug, patch_hinge_loss), ``"ref"`` their references.
Spectral norm's path is fixed when the model is built (``sn_impl=``); its power iteration has no
gradient, so it does not change the losses' values or gradients.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from scadfast.ops import CondAug, cond_aug, patch_hinge_loss, spectral_norm
from scadfast.ops._impl import acc_dtype, check_tensor, warn_once

from .generator import SharedRef

__all__ = [
    "MSCLIPGAN", "MSGenerator", "MSDiscriminator", "StageDiscriminator", "build_ms_clip_gan",
    "stage_sizes", "alignment_loss",
]

_MODEL_IMPLS = ("auto", "ref")
_DUP_COS = 1.0 - 1e-4  # text cosines above this count as the same caption


def stage_sizes(img_size: int) -> tuple[tuple[int, int, int], int, int]:
    """``((S/4, S/2, S), k, n_up)`` for final size ``S``.

    ``k`` is the base spatial size of G0's first feature map and of every D trunk's output
    (``S/4`` halved while it stays an even number ≥ 8, so 4 for 64/256 px, 7 for 224 px) and ``n_up``
    the number of ×2 up-blocks of G0 (``S/4 = k·2^n_up``).
    """
    if not isinstance(img_size, int) or isinstance(img_size, bool):
        raise TypeError(f"ms_clip_gan: img_size must be an int, got {type(img_size).__name__}")
    if img_size < 16 or img_size % 4:
        raise ValueError(f"ms_clip_gan: img_size must be a multiple of 4 and >= 16, got {img_size}")
    base, n_up = img_size // 4, 0
    while base % 2 == 0 and base // 2 >= 4:
        base //= 2
        n_up += 1
    return (img_size // 4, img_size // 2, img_size), base, n_up


def _normalize(s: torch.Tensor) -> torch.Tensor:
    return F.normalize(s, dim=1, eps=1e-8)


def _same_caption(s_n: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: pairs of normalised text embeddings that are the same caption."""
    with torch.no_grad():
        return (s_n.float() @ s_n.float().t()) > _DUP_COS


def alignment_loss(img_n: torch.Tensor, s_n: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised image projections ``img_n`` and texts ``s_n`` (B, d).

    ``logits = img_n @ s_nᵀ / temperature``; the target of row i (and of column i) is uniform over the
    captions identical to caption i (itself included). Returns a scalar in fp32 (fp64 for fp64 inputs).
    """
    acc = acc_dtype(img_n.dtype)
    logits = img_n.to(acc) @ s_n.to(acc).t() / temperature
    same = _same_caption(s_n).to(acc)
    target = same / same.sum(1, keepdim=True)  # symmetric matrix, rows sum to 1
    l_i2t = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    l_t2i = -(target * F.log_softmax(logits, dim=0)).sum(0).mean()
    return 0.5 * (l_i2t + l_t2i)


# ---------------------------------------------------------------------------------------------
# Generator


def _up_block(c_in: int, c_out: int) -> nn.Sequential:
    """Nearest ×2, conv3×3 → 2·c_out, BN, GLU (StackGAN++ upBlock)."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(c_in, 2 * c_out, 3, 1, 1, bias=False),
        nn.BatchNorm2d(2 * c_out),
        nn.GLU(dim=1),
    )


def _join_block(c_in: int, c_out: int) -> nn.Sequential:
    """conv3×3 → 2·c_out, BN, GLU (same size)."""
    return nn.Sequential(nn.Conv2d(c_in, 2 * c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * c_out), nn.GLU(dim=1))


class _ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, 2 * c, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * c), nn.GLU(dim=1),
            nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c),
        )

    def forward(self, x):
        return x + self.body(x)


class _InitStage(nn.Module):
    """G0: ``[ĉ ‖ z]`` → (c0, k, k) → ``n_up`` up-blocks → (ngf, S/4, S/4)."""

    def __init__(self, in_dim: int, ngf: int, k: int, n_up: int):
        super().__init__()
        self.k, self.c0 = k, ngf * 2 ** n_up
        self.fc = nn.Sequential(
            nn.Linear(in_dim, 2 * self.c0 * k * k, bias=False), nn.BatchNorm1d(2 * self.c0 * k * k), nn.GLU(dim=1)
        )
        self.up = nn.Sequential(*[_up_block(ngf * 2 ** (n_up - i), ngf * 2 ** (n_up - i - 1)) for i in range(n_up)])

    def forward(self, cz):
        return self.up(self.fc(cz).view(cz.shape[0], self.c0, self.k, self.k))


class _NextStage(nn.Module):
    """G1/G2: join tiled ĉ, two residual blocks, one up-block: (c, H, W) → (c/2, 2H, 2W)."""

    def __init__(self, c: int, cond_dim: int, n_res: int = 2):
        super().__init__()
        self.join = _join_block(c + cond_dim, c)
        self.res = nn.Sequential(*[_ResBlock(c) for _ in range(n_res)])
        self.up = _up_block(c, c // 2)

    def forward(self, h, c):
        c = c.to(h.dtype)[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])
        return self.up(self.res(self.join(torch.cat([h, c], dim=1))))


class MSGenerator(nn.Module):
    """Conditioning augmentation + G0/G1/G2 with one RGB head per stage.

    ``condition(s_n, eps, impl)`` → ``(ĉ, μ, log σ² | None, KL)``; ``forward(z, ĉ)`` → list of the
    three stage images ``[(B,3,S/4,S/4), (B,3,S/2,S/2), (B,3,S,S)]``.
    """

    def __init__(self, d_txt: int, z_dim: int, ca_dim: int, ca_mode: str, use_cond_aug: bool, ngf: int,
                 img_size: int, tanh: bool = False):
        super().__init__()
        if ngf < 4 or ngf % 4:
            raise ValueError(f"ms_clip_gan: cfg.ngf must be a positive multiple of 4, got {ngf}")
        if ca_mode not in ("glu", "relu"):
            raise ValueError(f"ms_clip_gan: cfg.ca_mode must be 'glu' or 'relu', got {ca_mode!r}")
        self.sizes, k, n_up = stage_sizes(img_size)
        self.d_txt, self.z_dim, self.ca_dim, self.ca_mode = d_txt, z_dim, ca_dim, ca_mode
        self.use_cond_aug, self.tanh = use_cond_aug, tanh
        # [ours] CA reads s_n·√d_txt (unit RMS per dimension) rather than the unit-norm s_n: with
        # entries ~1/√d_txt, μ = Linear(s_n) at default init has ~1/√d_txt the scale of σ ≈ 1, and the
        # text explains well under 1% of ĉ's variance (see MSCLIPGAN.text_share).
        self.s_scale = math.sqrt(d_txt)
        if use_cond_aug:
            self.ca = CondAug(d_txt, ca_dim, mode=ca_mode)
        else:
            self.proj = nn.Linear(d_txt, ca_dim)
        self.stage0 = _InitStage(ca_dim + z_dim, ngf, k, n_up)
        self.stage1 = _NextStage(ngf, ca_dim)
        self.stage2 = _NextStage(ngf // 2, ca_dim)
        self.to_rgb = nn.ModuleList([nn.Conv2d(c, 3, 3, 1, 1) for c in (ngf, ngf // 2, ngf // 4)])

    def condition(self, s_n: torch.Tensor, eps: torch.Tensor | None = None, impl: str = "auto"):
        """``(ĉ, μ, log σ², KL)`` for normalised text ``s_n``; ``log σ²`` is None without CA.

        ``eps`` (B, E) is the reparameterisation noise; drawn with ``torch.randn`` when None (drawn
        here, not inside the op, so every ``impl`` sees the same noise for the same RNG state).
        """
        s_in = s_n * self.s_scale
        if not self.use_cond_aug:
            mu = self.proj(s_in)
            return mu, mu, None, mu.new_zeros((), dtype=torch.float32)
        if eps is None:
            eps = torch.randn(s_n.shape[0], self.ca_dim, device=s_n.device, dtype=s_n.dtype)
        fc = self.ca.fc
        return cond_aug(s_in, fc.weight, fc.bias, eps=eps, mode=self.ca_mode, impl=impl)

    def forward(self, z: torch.Tensor, c_hat: torch.Tensor) -> list[torch.Tensor]:
        h0 = self.stage0(torch.cat([c_hat.to(z.dtype), z], dim=1))
        h1 = self.stage1(h0, c_hat)
        h2 = self.stage2(h1, c_hat)
        imgs = [rgb(h) for rgb, h in zip(self.to_rgb, (h0, h1, h2))]
        return [torch.tanh(x) for x in imgs] if self.tanh else imgs


# ---------------------------------------------------------------------------------------------
# Discriminators


class StageDiscriminator(nn.Module):
    """One scale's D: shared trunk + unconditional, conditional (μ) and alignment heads.

    ``features(x)`` → trunk map (B, 8·ndf, k, k); ``uncond(f)``, ``cond(f, mu)`` → logits (B,);
    ``align(f)`` → L2-normalised image projection (B, d_txt).
    """

    def __init__(self, size: int, k: int, ndf: int, cond_dim: int, d_txt: int, norm: str):
        super().__init__()
        n_down = int(round(math.log2(size // k)))
        if k * 2 ** n_down != size:
            raise ValueError(f"ms_clip_gan: stage size {size} is not {k}·2^n")
        self.size, self.k, self.channels = size, k, 8 * ndf
        layers: list[nn.Module] = []
        c_in = 3
        for j in range(n_down):
            c_out = ndf * min(2 ** j, 8)
            layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=norm != "batch" or j == 0))
            if norm == "batch" and j > 0:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2))
            c_in = c_out
        layers.append(nn.Conv2d(c_in, self.channels, 3, 1, 1, bias=norm != "batch" or n_down == 0))
        if norm == "batch" and n_down > 0:
            layers.append(nn.BatchNorm2d(self.channels))
        layers.append(nn.LeakyReLU(0.2))
        self.trunk = nn.Sequential(*layers)
        self.uncond_head = nn.Conv2d(self.channels, 1, k)
        self.cond_join = nn.Sequential(nn.Conv2d(self.channels + cond_dim, self.channels, 3, 1, 1), nn.LeakyReLU(0.2))
        self.cond_head = nn.Conv2d(self.channels, 1, k)
        self.align_proj = nn.Linear(self.channels, d_txt)

    def features(self, x):
        if x.shape[-2:] != (self.size, self.size):
            raise ValueError(
                f"ms_clip_gan: D for {self.size} px got images of shape {tuple(x.shape)}"
            )
        return self.trunk(x)

    def uncond(self, f):
        return self.uncond_head(f).flatten(1).squeeze(1)

    def cond(self, f, mu):
        m = mu.to(f.dtype)[:, :, None, None].expand(-1, -1, f.shape[2], f.shape[3])
        return self.cond_head(self.cond_join(torch.cat([f, m], dim=1))).flatten(1).squeeze(1)

    def align(self, f):
        return _normalize(self.align_proj(f.mean(dim=(2, 3))))


class MSDiscriminator(nn.Module):
    """D0/D1/D2 (``self.stages``), one :class:`StageDiscriminator` per generator scale."""

    def __init__(self, sizes: Sequence[int], k: int, ndf: int, cond_dim: int, d_txt: int, norm: str = "spectral",
                 sn_impl: str = "auto"):
        super().__init__()
        if norm not in ("spectral", "batch", "none"):
            raise ValueError(f"ms_clip_gan: d_norm must be 'spectral', 'batch' or 'none', got {norm!r}")
        if ndf < 1:
            raise ValueError(f"ms_clip_gan: cfg.ndf must be >= 1, got {ndf}")
        self.stages = nn.ModuleList([StageDiscriminator(s, k, ndf, cond_dim, d_txt, norm) for s in sizes])
        if norm == "spectral":
            for m in list(self.modules()):
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    spectral_norm(m, impl=sn_impl)


# ---------------------------------------------------------------------------------------------
# The pair


class MSCLIPGAN(nn.Module):
    """MS-CLIP-GAN model pair (GANPair contract of :mod:`scadfast.variants`).

    Submodules: ``G`` (:class:`MSGenerator`) and ``D`` (:class:`MSDiscriminator`). The frozen
    ``clip`` (and the optional ``perceptual`` network) are held outside the module tree, through a
    :class:`~scadfast.models.generator.SharedRef` as in the GALIP family: they are not in
    ``parameters()``/``state_dict()``, ``.to()`` does not move them and a deep copy shares them.
    """

    def __init__(self, cfg, clip, img_size: int | None = None, d_norm: str = "spectral", g_tanh: bool = False,
                 align_weight: float = 1.0, align_temperature: float = 0.1,
                 perceptual: nn.Module | None = None, perceptual_weight: float = 1.0, sn_impl: str = "auto"):
        super().__init__()
        if getattr(cfg, "arch", "ms_clip_gan") != "ms_clip_gan":
            raise ValueError(f"build_ms_clip_gan: cfg.arch must be 'ms_clip_gan', got {cfg.arch!r}")
        if cfg.d_loss != "hinge":
            raise ValueError(f"ms_clip_gan: only cfg.d_loss='hinge' is supported, got {cfg.d_loss!r}")
        if cfg.fidelity != "none" or cfg.mi_weight:
            raise ValueError(
                "ms_clip_gan: cfg.fidelity and cfg.mi_weight belong to the GALIP family; "
                f"got fidelity={cfg.fidelity!r}, mi_weight={cfg.mi_weight}"
            )
        if not 0.0 <= cfg.label_smoothing < 1.0:
            raise ValueError(f"ms_clip_gan: cfg.label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
        if align_temperature <= 0:
            raise ValueError(f"ms_clip_gan: align_temperature must be > 0, got {align_temperature}")
        if cfg.gp_weight:
            warn_once("ms_clip_gan.gp", "ms_clip_gan: cfg.gp_weight (MA-GP) does not apply to MS-CLIP-GAN; ignored")
        if img_size is None:
            img_size = int(clip.image_size)
        self.cfg = cfg
        self._clip = SharedRef(clip)
        self.d_txt = int(clip.embed_dim)
        self.z_dim = int(cfg.z_dim)
        self.img_size = img_size
        self.sizes, k, _ = stage_sizes(img_size)
        self.align_weight, self.align_temperature = float(align_weight), float(align_temperature)
        self.G = MSGenerator(self.d_txt, self.z_dim, cfg.ca_dim, cfg.ca_mode, cfg.cond_aug, cfg.ngf, img_size, g_tanh)
        self.D = MSDiscriminator(self.sizes, k, cfg.ndf, cfg.ca_dim, self.d_txt, d_norm, sn_impl)
        if perceptual is not None:
            perceptual.eval().requires_grad_(False)
        self._perceptual = SharedRef(perceptual)
        self.perceptual_weight = float(perceptual_weight)

    @property
    def clip(self):
        return self._clip.obj

    @property
    def perceptual(self):
        return self._perceptual.obj

    # -- input checks --------------------------------------------------------------------------

    def _check(self, op, s=None, z=None, real=None, impl="auto"):
        if impl not in _MODEL_IMPLS:
            raise ValueError(f"{op}: impl={impl!r} is not one of {_MODEL_IMPLS}")
        B = None
        if s is not None:
            check_tensor(op, "s", s, ndim=2)
            if s.shape[1] != self.d_txt:
                raise ValueError(f"{op}: s must be (B, {self.d_txt}) (CLIP embed_dim), got {tuple(s.shape)}")
            B = s.shape[0]
        if z is not None:
            check_tensor(op, "z", z, ndim=2)
            if z.shape[1] != self.z_dim or (B is not None and z.shape[0] != B):
                raise ValueError(f"{op}: z must be (B={B}, {self.z_dim}), got {tuple(z.shape)}")
        if real is not None:
            check_tensor(op, "real", real, ndim=4)
            if real.shape[1] != 3 or (B is not None and real.shape[0] != B):
                raise ValueError(f"{op}: real must be (B={B}, 3, H, W), got {tuple(real.shape)}")

    # -- generation ----------------------------------------------------------------------------

    def generate_all(self, z, s, eps=None, impl="auto"):
        """All three stages and the condition: ``([x0, x1, x2], (ĉ, μ, log σ², KL))``.

        ``x_i`` is (B, 3, S_i, S_i) for ``S_i`` in ``self.sizes``; ``eps`` as in
        :meth:`MSGenerator.condition`.
        """
        self._check("MSCLIPGAN.generate", s=s, z=z, impl=impl)
        cond = self.G.condition(_normalize(s), eps, impl)
        return self.G(z, cond[0]), cond

    def generate(self, z, s, eps=None, impl="auto"):
        """Final-stage image (B, 3, S, S), unbounded unless built with ``g_tanh=True``."""
        return self.generate_all(z, s, eps, impl)[0][-1]

    @torch.no_grad()
    def text_share(self, s: torch.Tensor) -> float:
        """The share of ĉ's variance that the text explains, over the captions ``s`` (B, d_txt) and the
        CA noise: ``Σ_d Var_s(μ_d) / Σ_d (Var_s(μ_d) + E_s[σ_d²])`` (1 without CA, → 0 when ĉ is noise).

        By the law of total variance ``Var(ĉ_d) = Var_s(μ_d) + E_s[σ_d²]``; the first term is what
        the prompt decides. Pass many distinct captions' embeddings (B ≥ 2).
        """
        if s.ndim != 2 or s.shape[0] < 2:
            raise ValueError(f"text_share: need (B >= 2, d_txt) caption embeddings, got {tuple(s.shape)}")
        _, mu, logvar, _ = self.G.condition(_normalize(s.float()), torch.zeros(s.shape[0], self.cfg.ca_dim, device=s.device))
        between = mu.double().var(0, unbiased=False).sum()
        within = logvar.double().exp().mean(0).sum() if logvar is not None else 0.0
        return float(between / (between + within))

    def make_fake(self, z, s, impl="auto"):
        """One iteration's fakes with G's graph, ``(images, condition)`` as :meth:`generate_all`
        returns them, to hand to :meth:`d_loss` (used detached) and then :meth:`g_loss`."""
        return self.generate_all(z, s, None, impl)

    def real_pyramid(self, real):
        """``real`` resized (antialiased bilinear) to the three stage sizes; same-size levels pass through."""
        out = []
        for size in self.sizes:
            if real.shape[-2:] == (size, size):
                out.append(real)
            else:
                out.append(F.interpolate(real, size=(size, size), mode="bilinear", align_corners=False, antialias=True))
        return out

    # -- losses --------------------------------------------------------------------------------

    def d_loss(self, real, s, z, impl="auto", fake=None):
        """Discriminator loss (see the module docstring) and detached stats.

        ``real`` (B, 3, H, W) in [-1, 1] at any size (resized per scale), ``s`` (B, d_txt), ``z``
        (B, z_dim). Fakes and μ come from ``fake`` (:meth:`make_fake`, used detached) or from G under
        ``no_grad``; G receives no gradient.
        """
        self._check("MSCLIPGAN.d_loss", s=s, z=z, real=real, impl=impl)
        cfg = self.cfg
        s_n = _normalize(s)
        with torch.no_grad():
            if fake is None:
                c_hat, mu, _, _ = self.G.condition(s_n, None, impl)
                fakes = self.G(z, c_hat)
            else:
                fakes, mu = [x.detach() for x in fake[0]], fake[1][1]
        mu = mu.detach()
        mu_wrong = mu.roll(1, 0)
        # Mismatched pairs (x_r, μ̃): drop those whose rolled caption equals the own caption.
        mis_w = (~_same_caption(s_n).roll(1, 1).diagonal()).float()
        any_mis = (mis_w.sum() > 0).float()
        mis_w = mis_w + (1.0 - any_mis)  # all duplicates: any weights (finite), term multiplied by 0
        eps_ls = float(cfg.label_smoothing)
        total = real.new_zeros((), dtype=torch.float32)
        stats = {}
        for i, (Di, xr, xf) in enumerate(zip(self.D.stages, self.real_pyramid(real), fakes)):
            fr, ff = Di.features(xr), Di.features(xf.detach())
            lr, lf, lw = Di.cond(fr, mu), Di.cond(ff, mu), Di.cond(fr, mu_wrong)
            l_real = patch_hinge_loss(lr + eps_ls, True, impl=impl)
            l_fake = patch_hinge_loss(lf, False, impl=impl)
            l_mis = patch_hinge_loss(lw, False, weight=mis_w, impl=impl) * any_mis
            loss_i = l_real + 0.5 * (l_fake + l_mis)
            if cfg.use_uncond_loss:
                ur, uf = Di.uncond(fr), Di.uncond(ff)
                l_ur = patch_hinge_loss(ur + eps_ls, True, impl=impl)
                l_uf = patch_hinge_loss(uf, False, impl=impl)
                loss_i = loss_i + l_ur + l_uf
                stats[f"d{i}_uncond"] = (l_ur + l_uf).detach()
            if self.align_weight:
                img_n = Di.align(fr)
                l_al = alignment_loss(img_n, s_n, self.align_temperature)
                loss_i = loss_i + self.align_weight * l_al
                stats[f"d{i}_align"] = l_al.detach()
                stats[f"d{i}_align_cos_real"] = (img_n.float() * s_n.float()).sum(1).mean().detach()
            stats[f"d{i}_real"] = l_real.detach()
            stats[f"d{i}_fake"] = l_fake.detach()
            stats[f"d{i}_mismatch"] = l_mis.detach()
            stats[f"d{i}_logit_real"] = lr.detach().float().mean()
            stats[f"d{i}_logit_fake"] = lf.detach().float().mean()
            stats[f"d{i}_loss"] = loss_i.detach()
            total = total + loss_i
        stats["d_loss"] = total.detach()
        return total, stats

    def g_loss(self, s, z, impl="auto", real=None, fake=None):
        """Generator loss (see the module docstring) and detached stats.

        ``real`` is needed only when a perceptual network was given; ``fake`` as in :meth:`d_loss`
        (with its graph). Gradients also reach D's parameters; the training engine steps only G's
        optimiser (and may freeze D meanwhile).
        """
        self._check("MSCLIPGAN.g_loss", s=s, z=z, real=real, impl=impl)
        cfg = self.cfg
        s_n = _normalize(s)
        fakes, (c_hat, mu, _, kl) = fake if fake is not None else self.generate_all(z, s, None, impl)
        total = s.new_zeros((), dtype=torch.float32)
        stats = {}
        for i, (Di, xf) in enumerate(zip(self.D.stages, fakes)):
            ff = Di.features(xf)
            adv = -Di.cond(ff, mu).float().mean()
            stats[f"g{i}_cond"] = adv.detach()
            if cfg.use_uncond_loss:
                u = -Di.uncond(ff).float().mean()
                stats[f"g{i}_uncond"] = u.detach()
                adv = adv + u
            if self.align_weight:
                l_al = alignment_loss(Di.align(ff), s_n, self.align_temperature)
                stats[f"g{i}_align"] = l_al.detach()
                adv = adv + self.align_weight * l_al
            total = total + adv
        kl = kl.float()
        stats["kl"] = kl.detach()
        if cfg.cond_aug and cfg.kl_weight:
            total = total + cfg.kl_weight * kl
        if cfg.clip_weight:
            emb = _normalize(self.clip.image_embed(fakes[-1]).float())
            cos = (emb * s_n.float()).sum(1)
            total = total + cfg.clip_weight * (1.0 - cos).mean()
            stats["clip_cos"] = cos.mean().detach()
        if self.perceptual is not None and self.perceptual_weight:
            if real is None:
                raise ValueError("MSCLIPGAN.g_loss: a perceptual network was given, so real= images are required")
            target = self.real_pyramid(real)[-1]
            with torch.no_grad():
                phi_r = self.perceptual(target)
            l_p = (self.perceptual(fakes[-1]).float() - phi_r.float()).pow(2).mean()
            total = total + self.perceptual_weight * l_p
            stats["perceptual"] = l_p.detach()
        stats["g_loss"] = total.detach()
        return total, stats


def build_ms_clip_gan(cfg, clip, **kwargs) -> MSCLIPGAN:
    """Build the MS-CLIP-GAN pair for ``cfg`` (a :class:`scadfast.variants.VariantConfig` with
    ``arch="ms_clip_gan"``) around a frozen CLIP (``image_size``, ``embed_dim``, ``image_embed``).

    Keyword options (not VariantConfig fields): ``img_size`` (final size, default
    ``clip.image_size``), ``d_norm`` ("spectral" | "batch" | "none"), ``g_tanh`` (False),
    ``align_weight`` (1.0), ``align_temperature`` (0.1), ``perceptual`` (None = off) and
    ``perceptual_weight`` (1.0), ``sn_impl`` (impl of the spectral-norm power iteration).
    """
    return MSCLIPGAN(cfg, clip, **kwargs)
