"""Discriminators of the GALIP family (docs/design.md §5): the CLIP-feature trunk and its heads, the pixel PatchGAN.

All discriminator-side modules of one model pair live in :class:`GALIPDiscriminator`:

``trunk``     :class:`CLIPFeatureTrunk` (§5.1) on the frozen CLIP's multi-block features.
``semantic``  :class:`HingeHead` (§5.2, ``galip``) or :class:`SANHead` (§5.3, ``scad*``).
``fidelity``  :class:`ClipPatchHead` (§5.4, on the trunk map), :class:`PixelPatchGAN` (§5.4, on
              pixels, its own network) or absent.
``q``         :class:`MIHead` (§5.7) on the trunk map, or absent.

Choices the sources leave open [ours] (each is an argument):

* Head kernel sizes for any patch grid g: the first head conv has kernel ``k1 = min(4, g)`` (GALIP:
  4); the hinge head's second conv spans the remaining ``g − k1 + 1`` positions, so there is exactly
  one logit per sample (for g = 7 both kernels are 4, GALIP's head).
* SAN head (§5.3): ω's weight starts as N(0, 1/(d_h·d_txt)) with zero bias, so ‖ω(s)‖ ≈ RMS(s)
  and f = ⟨h, ω⟩ and the MA-GP start small (PyTorch's default init made the p = 6 penalty explode).
  ``h(x, c)`` is the hinge head with its last conv removed — ``flatten(LReLU(
  SN(conv_k1)(concat(trunk, tile(s)))))`` — and ``ω(c) = Linear(s)`` takes the last conv's place,
  so ``d_h = hidden · (g − k1 + 1)²`` (2048 for ViT-B/32 and ``ndf = 64``). The trunk is not
  spectral-normalised unless ``sn_trunk=True``.
* Fidelity heads end in :class:`PatchProjection`: under hinge a plain conv (with bias); under SAN its
  weight is the one global direction ω (no bias, no SN) and the per-patch logits are formed exactly
  as in §5.3 with ω fixed across patches. Hidden convs are spectral-normalised.
* ``clip_patch`` head: SN conv3×3 (trunk → 2·ndf) → LReLU → 1×1 projection: one logit per CLIP patch.
* ``PixelPatchGAN``: every conv spectral-normalised (no batch norm), C64 s2 → C128 s2 → C256 s2 →
  C512 s1 → C1 s1, kernel 4, padding 1, LReLU 0.2 (widths scale with ``ndf / 64``). Output side
  ``((H/8) − 1) − 1``: 224 px → 26×26, 64 px → 6×6.
* MI head: conv3×3 (trunk → 2·ndf) → LReLU → global average pool → Linear → μ (and log σ² when
  learned, clamped to [−10, 10] so the Gaussian likelihood cannot diverge).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import spectral_norm, spectral_norm_all


def _sn(module: nn.Module, enabled: bool, impl: str) -> nn.Module:
    return spectral_norm(module, impl=impl) if enabled else module


class TrunkBlock(nn.Module):
    """``sc(x) + γ·(conv3×3–LReLU–conv3×3–LReLU)(x) [+ β·feat]`` with γ, β learnable scalars initialised to 0."""

    def __init__(self, fin: int, fout: int, add_feature: bool, sn: bool = False, sn_impl: str = "auto"):
        super().__init__()
        self.conv_r = nn.Sequential(
            _sn(nn.Conv2d(fin, fout, 3, 1, 1, bias=False), sn, sn_impl), nn.LeakyReLU(0.2),
            _sn(nn.Conv2d(fout, fout, 3, 1, 1, bias=False), sn, sn_impl), nn.LeakyReLU(0.2),
        )
        self.conv_s = _sn(nn.Conv2d(fin, fout, 1), sn, sn_impl) if fin != fout else None
        self.gamma = nn.Parameter(torch.zeros(1))
        self.beta = nn.Parameter(torch.zeros(1)) if add_feature else None

    def forward(self, x: torch.Tensor, feat: torch.Tensor | None = None) -> torch.Tensor:
        res = self.conv_r(x)
        if self.conv_s is not None:
            x = self.conv_s(x)
        out = x + self.gamma * res
        if self.beta is not None:
            out = out + self.beta * feat
        return out


class CLIPFeatureTrunk(nn.Module):
    """docs/design.md §5.1: (B, n_feats, width, g, g) CLIP features → (B, out_ch, g, g).

    Starts from the first selected CLIP block's map and adds each further one through a gated
    residual block; a last gated block (without a feature input) maps ``width → out_ch``.
    """

    def __init__(self, width: int, n_feats: int, out_ch: int = 512, sn: bool = False, sn_impl: str = "auto"):
        super().__init__()
        if n_feats < 1:
            raise ValueError(f"CLIPFeatureTrunk: n_feats must be >= 1, got {n_feats}")
        self.width, self.n_feats, self.out_ch = width, n_feats, out_ch
        self.blocks = nn.ModuleList([TrunkBlock(width, width, True, sn, sn_impl) for _ in range(n_feats - 1)])
        self.main = TrunkBlock(width, out_ch, False, sn, sn_impl)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.ndim != 5 or feats.shape[1] != self.n_feats or feats.shape[2] != self.width:
            raise ValueError(
                f"CLIPFeatureTrunk: feats must be (B, {self.n_feats}, {self.width}, g, g), got {tuple(feats.shape)}")
        x = feats[:, 0]
        for i, blk in enumerate(self.blocks):
            x = blk(x, feats[:, i + 1])
        return self.main(x)


def _tile_cat(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    if s.ndim != 2 or s.shape[0] != x.shape[0]:
        raise ValueError(f"sentence embedding must be (B={x.shape[0]}, d), got {tuple(s.shape)}")
    return torch.cat([x, s.to(x.dtype)[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])], dim=1)


class HingeHead(nn.Module):
    """docs/design.md §5.2: concat(trunk, tile(s)) → conv_k1 → hidden → LReLU → conv (rest of the map)
    → 1 logit.

    ``forward(x (B, C, g, g), s (B, d)) -> (B,)``.
    """

    def __init__(self, in_ch: int, txt_dim: int, grid: int, hidden: int = 128):
        super().__init__()
        k1 = min(4, grid)
        self.conv1 = nn.Conv2d(in_ch + txt_dim, hidden, k1, 1, 0, bias=False)
        self.conv2 = nn.Conv2d(hidden, 1, grid - k1 + 1, 1, 0, bias=False)

    def forward(self, x, s):
        h = F.leaky_relu(self.conv1(_tile_cat(x, s)), 0.2)
        return self.conv2(h).flatten(1).sum(1)


class SANHead(nn.Module):
    """docs/design.md §5.3: ``h(x, c) = flatten(LReLU(SN(conv_k1)(concat(trunk, tile(s)))))`` (B, d_h) and
    ``ω(c) = W_ω s + b_ω`` (B, d_h), no spectral norm on ω.

    ``forward(x, s) -> (h, omega)``; the logits come from :func:`scadfast.ops.san_logits`.
    """

    def __init__(self, in_ch: int, txt_dim: int, grid: int, hidden: int = 128, sn_impl: str = "auto"):
        super().__init__()
        k1 = min(4, grid)
        self.conv1 = spectral_norm(nn.Conv2d(in_ch + txt_dim, hidden, k1, 1, 0, bias=False), impl=sn_impl)
        self.d_h = hidden * (grid - k1 + 1) ** 2
        self.omega = nn.Linear(txt_dim, self.d_h)
        # [ours] ‖ω(s)‖ starts near RMS(s) (≈ 1 for unit-scale embeddings) rather than PyTorch's
        # default ≈ ‖s‖·sqrt(d_h/(3·d_txt)): f = ⟨h, ω⟩ then starts small, and the MA-GP
        # (‖∇f‖^6) starts near 0 instead of exploding.
        nn.init.normal_(self.omega.weight, std=(self.d_h * txt_dim) ** -0.5)
        nn.init.zeros_(self.omega.bias)

    def forward(self, x, s):
        h = F.leaky_relu(self.conv1(_tile_cat(x, s)), 0.2).flatten(1)
        return h, self.omega(s.to(h.dtype))


class PatchProjection(nn.Module):
    """Last layer of a fidelity head: conv ``in_ch → 1`` with ``kernel``.

    ``loss="hinge"``: a plain conv (with bias, spectral-normalised when ``sn``); ``forward`` gives the
    logit map. ``loss="san"``: the weight is SAN's single global direction ω (no bias, no SN) and
    :meth:`san` gives ``(f_fun, f_dir, f)`` maps with ``n = ‖ω‖``, ``ω̂ = ω/n``:
    ``f_fun = n·conv(h, sg(ω̂))``, ``f_dir = sg(n)·conv(sg(h), ω̂)``, ``f = conv(h, ω)``.
    """

    def __init__(self, in_ch: int, kernel: int, padding: int, loss: str = "hinge", sn: bool = True,
                 sn_impl: str = "auto"):
        super().__init__()
        if loss not in ("hinge", "san"):
            raise ValueError(f"PatchProjection: loss must be 'hinge' or 'san', got {loss!r}")
        self.loss = loss
        self.conv = nn.Conv2d(in_ch, 1, kernel, 1, padding, bias=(loss == "hinge"))
        if loss == "hinge" and sn:
            spectral_norm(self.conv, impl=sn_impl)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv(h)

    def san(self, h: torch.Tensor):
        w = self.conv.weight
        n = w.norm().clamp_min(1e-12)
        w_hat = w / n
        pad = self.conv.padding
        f_fun = n * F.conv2d(h, w_hat.detach(), padding=pad)
        f_dir = n.detach() * F.conv2d(h.detach(), w_hat, padding=pad)
        f = F.conv2d(h, w, padding=pad)
        return f_fun, f_dir, f


class ClipPatchHead(nn.Module):
    """docs/design.md §5.4 ``clip_patch``: unconditional, one logit per CLIP patch from the trunk map."""

    def __init__(self, in_ch: int, hidden: int, loss: str = "hinge", sn_impl: str = "auto"):
        super().__init__()
        self.conv = spectral_norm(nn.Conv2d(in_ch, hidden, 3, 1, 1), impl=sn_impl)
        self.proj = PatchProjection(hidden, 1, 0, loss, sn=True, sn_impl=sn_impl)

    def features(self, x):
        return F.leaky_relu(self.conv(x), 0.2)


class PixelPatchGAN(nn.Module):
    """docs/design.md §5.4 ``pixel_patchgan``: a pix2pix PatchGAN on pixels with spectral norm instead of batch norm.

    ``features(img (B, 3, H, W))`` → (B, 8·ndf, H/8 − 1, W/8 − 1); ``proj`` maps it to the logit map
    (B, 1, H/8 − 2, W/8 − 2): 26×26 at 224 px. No text input.
    """

    def __init__(self, ndf: int = 64, loss: str = "hinge", sn_impl: str = "auto"):
        super().__init__()
        chans = [3, ndf, 2 * ndf, 4 * ndf, 8 * ndf]
        layers = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 4, 2 if i < 3 else 1, 1), nn.LeakyReLU(0.2)]
        # One grouped power-iteration update for the body's four weights per forward.
        self.body = spectral_norm_all(nn.Sequential(*layers), impl=sn_impl, grouped=True)
        self.proj = PatchProjection(8 * ndf, 4, 1, loss, sn=True, sn_impl=sn_impl)

    @staticmethod
    def output_size(size: int) -> int:
        for _ in range(3):
            size = (size + 2 - 4) // 2 + 1
        return size - 2

    def features(self, img):
        if img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(f"PixelPatchGAN: images must be (B, 3, H, W), got {tuple(img.shape)}")
        if min(img.shape[-2:]) < 32:
            raise ValueError(f"PixelPatchGAN: images must be at least 32 px, got {tuple(img.shape[-2:])}")
        return self.body(img)

    def forward(self, img):
        return self.proj(self.features(img))


class MIHead(nn.Module):
    """docs/design.md §5.7 Q(z|x): trunk map → conv3×3 → LReLU → global average pool → Linear → μ
    [, log σ²]."""

    def __init__(self, in_ch: int, hidden: int, z_dim: int, learn_sigma: bool = False):
        super().__init__()
        self.z_dim, self.learn_sigma = z_dim, learn_sigma
        self.conv = nn.Conv2d(in_ch, hidden, 3, 1, 1)
        self.fc = nn.Linear(hidden, z_dim * (2 if learn_sigma else 1))

    def forward(self, x):
        h = F.leaky_relu(self.conv(x), 0.2).mean(dim=(2, 3))
        out = self.fc(h)
        if not self.learn_sigma:
            return out, None
        mu, logvar = out.chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)


def mi_loss(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor | None) -> torch.Tensor:
    """``mean over batch and dims of ½((z − μ)/σ)² + log σ`` (σ = 1 when ``logvar`` is None): the
    Gaussian negative log-likelihood of z under Q(z|x) up to the constant ½ log 2π."""
    z, mu = z.float(), mu.float()
    if logvar is None:
        return 0.5 * (z - mu).square().mean()
    logvar = logvar.float()
    return (0.5 * (z - mu).square() * torch.exp(-logvar) + 0.5 * logvar).mean()


class GALIPDiscriminator(nn.Module):
    """Every discriminator-side module of a GALIP-family pair (see the module doc).

    Args:
        width, n_feats, grid: CLIP vision width, number of feature blocks, patch grid g.
        txt_dim: sentence-embedding size.
        ndf: base width: trunk output ``8·ndf`` (GALIP: 512), head hidden ``2·ndf`` (GALIP: 128),
            PatchGAN C64 = ``ndf``.
        semantic: ``"hinge"`` (§5.2) or ``"san"`` (§5.3).
        fidelity: ``"none"``, ``"clip_patch"`` or ``"pixel_patchgan"``; ``fidelity_loss``: ``"hinge"``
            or ``"san"``.
        mi_dim: > 0 adds the MI head predicting ``mi_dim`` noise dims; ``mi_learn_sigma`` adds log σ².
        sn_trunk: spectral-normalise the trunk too (default off, GALIP's trunk has none).
        sn_impl: ``impl`` for :func:`scadfast.ops.spectral_norm` (fixed when the module is built).
    """

    def __init__(self, width: int, n_feats: int, grid: int, txt_dim: int, ndf: int = 64,
                 semantic: str = "hinge", fidelity: str = "none", fidelity_loss: str = "hinge",
                 mi_dim: int = 0, mi_learn_sigma: bool = False, sn_trunk: bool = False, sn_impl: str = "auto"):
        super().__init__()
        if semantic not in ("hinge", "san"):
            raise ValueError(f"GALIPDiscriminator: semantic (d_loss) must be 'hinge' or 'san', got {semantic!r}")
        if fidelity not in ("none", "clip_patch", "pixel_patchgan"):
            raise ValueError(
                f"GALIPDiscriminator: fidelity must be 'none', 'clip_patch' or 'pixel_patchgan', got {fidelity!r}")
        if fidelity_loss not in ("hinge", "san"):
            raise ValueError(f"GALIPDiscriminator: fidelity_loss must be 'hinge' or 'san', got {fidelity_loss!r}")
        self.semantic_loss, self.fidelity_kind, self.fidelity_loss = semantic, fidelity, fidelity_loss
        trunk_ch, hidden = 8 * ndf, 2 * ndf
        self.trunk = CLIPFeatureTrunk(width, n_feats, trunk_ch, sn=sn_trunk, sn_impl=sn_impl)
        if semantic == "hinge":
            self.semantic = HingeHead(trunk_ch, txt_dim, grid, hidden)
        else:
            self.semantic = SANHead(trunk_ch, txt_dim, grid, hidden, sn_impl=sn_impl)
        if fidelity == "clip_patch":
            self.fidelity = ClipPatchHead(trunk_ch, hidden, fidelity_loss, sn_impl=sn_impl)
        elif fidelity == "pixel_patchgan":
            self.fidelity = PixelPatchGAN(ndf, fidelity_loss, sn_impl=sn_impl)
        else:
            self.fidelity = None
        self.q = MIHead(trunk_ch, hidden, mi_dim, mi_learn_sigma) if mi_dim > 0 else None
