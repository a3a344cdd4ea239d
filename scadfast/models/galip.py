"""The GALIP family as a model pair (docs/design.md §4–§5): ``galip``, ``scad``, ``scad_mi``, ``scad_dd`` and any
combination of their switches (``d_loss``, ``fidelity``, ``fidelity_loss``, ``mi_weight``, ``gp_*``).

:class:`GALIPFamily` follows the GANPair contract of :mod:`scadfast.variants`.

Discriminator loss (minimised; ``s̃ = roll(s, 1)`` — the text of another sample; when captions repeat
inside a batch some "mismatched" pairs actually match, as in GALIP — unless the caller passes ``s_mis``,
e.g. the trainer's edit negatives, :mod:`scadfast.data.negatives`):

* semantic, hinge (§5.2): ``relu(1 − D(x_r,s)) + ½[relu(1 + D(x_f,s)) + relu(1 + D(x_r,s̃))]``;
* semantic, SAN (§5.3): ``san_d_loss`` with the real pairs as "real" and the fake pairs and the
  mismatched pairs (equal numbers, so each gets weight ½) as "fake";
* fidelity (§5.4, unconditional, no mismatched pairs): ``mean relu(1 − l_r) + mean relu(1 + l_f)``
  over all patches, or its SAN form ``… − (mean f_dir_r − mean f_dir_f)``, weight 1 [ours];
* MA-GP (§5.5): ``k · mean_b ‖[∇_F f(x_r,s), ∇_s f(x_r,s)]_b‖₂^p`` with F the CLIP features D reads,
  f the semantic logit (hinge logit, or SAN's ``f``), ``create_graph=True`` so it trains D. With
  ``gp_every = N > 1`` it is computed on every N-th call of :meth:`GALIPFamily.d_loss` (counter
  ``d_steps``, the first call included) and multiplied by N; under ``torch.no_grad()`` it is
  skipped (it needs autograd). The norm is computed as
  ``(Σ g²)^(p/2)``, equal to ``‖g‖^p`` but smooth at 0;
* MI (§5.7): ``λ_MI · L_MI(z, Q(trunk(F(x_f))))`` trains Q and the trunk.

Generator loss (§5.6): ``−E f(x_f,s) − λ_clip · E cos(E_img(x_f), s)`` + fidelity term
(``−mean`` of the fake patch logits / SAN ``f``) + ``λ_MI · L_MI``.

Efficiency: real, fake and mismatched pairs go through the trunk and heads in one batched pass
(real and fake CLIP features are concatenated), so spectral norm runs one power iteration per
step. The real CLIP features are computed without grad; only on penalty steps are F and s marked
``requires_grad`` for the MA-GP.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import SpectralNorm, patch_hinge_loss, san_d_loss, san_logits
from ..ops._impl import acc_dtype
from .augment import augment, check_policy
from .discriminator import GALIPDiscriminator, mi_loss
from .generator import CLIPAidedGenerator, SharedRef


class GALIPFamily(nn.Module):
    """A CLIP-aided generator and a CLIP-feature discriminator configured by a VariantConfig.

    Args:
        cfg: :class:`scadfast.variants.VariantConfig` with ``arch == "galip"``.
        clip: the :class:`~scadfast.models.clip.FrozenCLIP` (shared, never a submodule).
        img_size: image size (default ``clip.image_size``).
        sn_impl: ``impl`` of every spectral norm in D (a parametrization attached when D is built).
            The ``impl`` argument of :meth:`d_loss` / :meth:`g_loss` selects the loss ops
            (``san_logits``, ``san_d_loss``, ``patch_hinge_loss``); ``impl="ref"`` additionally
            switches every spectral norm of D to its reference power iteration for that call.
        sn_trunk: spectral-normalise D's trunk too (default off).

    Attributes ``G``, ``D``, ``z_dim``, ``cfg``, ``d_steps`` (calls of ``d_loss`` so far).
    """

    def __init__(self, cfg, clip, img_size: int | None = None, sn_impl: str = "auto", sn_trunk: bool = False):
        super().__init__()
        if getattr(cfg, "arch", "galip") != "galip":
            raise ValueError(f"GALIPFamily: cfg.arch must be 'galip', got {cfg.arch!r}")
        if cfg.gp_every < 1:
            raise ValueError(f"GALIPFamily: gp_every must be >= 1, got {cfg.gp_every}")
        if cfg.mi_weight < 0:
            raise ValueError(f"GALIPFamily: mi_weight must be >= 0, got {cfg.mi_weight}")
        self.cfg = cfg
        self.augment = check_policy(getattr(cfg, "augment", "none"))
        self._clip = SharedRef(clip)
        self.z_dim = int(cfg.z_dim)
        self.G = CLIPAidedGenerator(clip, z_dim=cfg.z_dim, ngf=cfg.ngf, img_size=img_size)
        self.img_size = self.G.img_size
        self.D = GALIPDiscriminator(
            clip.width, len(clip.feature_blocks), clip.grid, clip.embed_dim, ndf=cfg.ndf,
            semantic=cfg.d_loss, fidelity=cfg.fidelity, fidelity_loss=cfg.fidelity_loss,
            mi_dim=cfg.z_dim if cfg.mi_weight > 0 else 0, mi_learn_sigma=cfg.mi_learn_sigma,
            sn_trunk=sn_trunk, sn_impl=sn_impl,
        )
        self.d_steps = 0

    @property
    def clip(self):
        return self._clip.obj

    def generate(self, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """(B, z_dim), (B, d_txt) → images (B, 3, img_size, img_size), unbounded."""
        return self.G(z, s)

    def make_fake(self, z: torch.Tensor, s: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        """The fakes of one training iteration, with G's graph, to hand to :meth:`d_loss` (which
        detaches them) and then to :meth:`g_loss` — one G forward per iteration, as GALIP trains."""
        return self.G(z, s)

    @contextlib.contextmanager
    def _sn_impl(self, impl: str):
        """With ``impl="ref"``, run D's spectral norms with the reference power iteration."""
        if impl != "ref":
            yield
            return
        sns = [m for m in self.D.modules() if isinstance(m, SpectralNorm)]
        old = [m.impl for m in sns]
        for m in sns:
            m.impl = "ref"
        try:
            yield
        finally:
            for m, o in zip(sns, old):
                m.impl = o

    # -- pieces -----------------------------------------------------------------------------------
    def _semantic(self, t: torch.Tensor, s: torch.Tensor, impl: str):
        """Semantic head on trunk maps: hinge → (logit, None); SAN → ((h, ω), f)."""
        if self.D.semantic_loss == "hinge":
            out = self.D.semantic(t, s)
            return out, out
        h, w = self.D.semantic(t, s)
        return (h, w), san_logits(h, w, impl=impl)[2]

    def _fidelity_features(self, t: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        fid = self.D.fidelity
        return fid.features(t) if self.D.fidelity_kind == "clip_patch" else fid.features(images)

    def _fidelity_d(self, feat_r, feat_f, impl):
        proj = self.D.fidelity.proj
        if self.D.fidelity_loss == "hinge":
            lr, lf = proj(feat_r), proj(feat_f)
            loss = patch_hinge_loss(lr, True, impl=impl) + patch_hinge_loss(lf, False, impl=impl)
            return loss, lr.detach().float().mean(), lf.detach().float().mean()
        fr, dr, _ = proj.san(feat_r)
        ff, df, _ = proj.san(feat_f)
        loss = (patch_hinge_loss(fr, True, impl=impl) + patch_hinge_loss(ff, False, impl=impl)
                - (dr.float().mean() - df.float().mean()))
        return loss, fr.detach().float().mean(), ff.detach().float().mean()

    def _fidelity_g(self, feat_f):
        proj = self.D.fidelity.proj
        logits = proj(feat_f) if self.D.fidelity_loss == "hinge" else proj.san(feat_f)[2]
        return -logits.float().mean()

    def ma_gp(self, f_real: torch.Tensor, feats_real: torch.Tensor, s_real: torch.Tensor) -> torch.Tensor:
        """MA-GP (§5.5) of the real logits w.r.t. the CLIP features and the sentence embedding."""
        acc = acc_dtype(f_real.dtype)  # fp32 for half types
        gf, gs = torch.autograd.grad(f_real.to(acc).sum(), (feats_real, s_real), create_graph=True)
        sq = gf.to(acc).flatten(1).square().sum(1) + gs.to(acc).flatten(1).square().sum(1)
        return self.cfg.gp_weight * sq.pow(self.cfg.gp_power / 2).mean()

    # -- losses -----------------------------------------------------------------------------------
    def d_loss(self, real: torch.Tensor, s: torch.Tensor, z: torch.Tensor, impl: str = "auto",
               fake: torch.Tensor | None = None, s_mis: torch.Tensor | None = None):
        """Discriminator loss (module doc). ``real`` (B, 3, H, W) in [-1, 1]; ``s`` (B, d_txt); ``z`` (B, z_dim).

        ``fake``: this iteration's :meth:`make_fake` output (used detached); generated from ``z``
        without gradients when None. ``s_mis`` (B, d_txt): the mismatched texts paired with the real
        images (default GALIP's ``roll(s, 1)``; the trainer's ``--edit-negatives`` passes edits).
        Returns ``(loss, stats)``; ``stats`` holds detached scalar tensors.
        """
        if s_mis is not None and s_mis.shape != s.shape:
            raise ValueError(f"d_loss: s_mis must have s's shape {tuple(s.shape)}, got {tuple(s_mis.shape)}")
        with self._sn_impl(impl):
            return self._d_loss(real, s, z, impl, fake, s_mis)

    def g_loss(self, s: torch.Tensor, z: torch.Tensor, impl: str = "auto", fake: torch.Tensor | None = None):
        """Generator loss (module doc); ``fake`` as in :meth:`d_loss` but with its graph (G is
        trained through it), generated from ``z`` when None. Returns ``(loss, stats)``."""
        with self._sn_impl(impl):
            return self._g_loss(s, z, impl, fake)

    def _d_loss(self, real, s, z, impl, fake, s_mis=None):
        cfg, clip, D = self.cfg, self.clip, self.D
        b = real.shape[0]
        if s.shape[0] != b or z.shape[0] != b:
            raise ValueError(f"d_loss: real, s and z must share the batch size, got {real.shape[0]}, {s.shape[0]}, {z.shape[0]}")
        with torch.no_grad():
            fake = self.G(z, s) if fake is None else fake.detach()
            # Real and fake through CLIP in one batch; D reads only the feature blocks.
            images = augment(torch.cat([real.to(fake.dtype), fake]), self.augment)
            feats = clip.image_features(images, pooled=False)
            feats_r, feats_f = feats[:b], feats[b:]
        s = s.detach()
        # The penalty differentiates D's output, so it is skipped when autograd is off (evaluation).
        do_gp = cfg.gp_weight > 0 and self.d_steps % cfg.gp_every == 0 and torch.is_grad_enabled()
        self.d_steps += 1
        s_r = s
        if do_gp:
            feats_r = feats_r.detach().requires_grad_(True)
            s_r = s.clone().requires_grad_(True)
        s_mis = torch.roll(s, 1, dims=0) if s_mis is None else s_mis.detach().to(s.dtype)

        t = D.trunk(torch.cat([feats_r, feats_f.to(feats_r.dtype)], dim=0))
        t_r, t_f = t[:b], t[b:]
        sem, f = self._semantic(torch.cat([t_r, t_f, t_r], dim=0), torch.cat([s_r, s, s_mis], dim=0), impl)
        f_r, f_f, f_m = f[:b], f[b:2 * b], f[2 * b:]
        if D.semantic_loss == "hinge":
            l_sem = patch_hinge_loss(f_r, True, impl=impl) + 0.5 * (
                patch_hinge_loss(f_f, False, impl=impl) + patch_hinge_loss(f_m, False, impl=impl))
        else:
            h, w = sem
            l_sem = san_d_loss(h[:b], w[:b], h[b:], w[b:], impl=impl)
        loss = l_sem.float()
        stats = {"d_sem": l_sem.detach().float(), "d_real": f_r.detach().float().mean(),
                 "d_fake": f_f.detach().float().mean(), "d_mismatch": f_m.detach().float().mean()}

        if D.fidelity is not None:
            feat = self._fidelity_features(t, images)
            l_fid, lr, lf = self._fidelity_d(feat[:b], feat[b:], impl)
            loss = loss + l_fid
            stats.update(d_fid=l_fid.detach().float(), d_fid_real=lr, d_fid_fake=lf)
        if D.q is not None:
            mu, logvar = D.q(t_f)
            l_mi = mi_loss(z, mu, logvar)
            loss = loss + cfg.mi_weight * l_mi
            stats["d_mi"] = l_mi.detach()
        if do_gp:
            gp = self.ma_gp(f_r, feats_r, s_r)
            loss = loss + cfg.gp_every * gp
            stats["d_gp"] = gp.detach()
        stats["d_loss"] = loss.detach()
        return loss, stats

    def _g_loss(self, s, z, impl, fake):
        cfg, clip, D = self.cfg, self.clip, self.D
        if fake is None:
            fake = self.G(z, s)
        fake = augment(fake, self.augment)  # G is trained through the same augmentation D sees
        feats, emb = clip.image_features(fake)
        t = D.trunk(feats)
        _, f = self._semantic(t, s, impl)
        l_adv = -f.float().mean()
        cos = F.cosine_similarity(emb.float(), s.float(), dim=1).mean()
        loss = l_adv - cfg.clip_weight * cos
        stats = {"g_adv": l_adv.detach(), "g_clip_cos": cos.detach()}
        if D.fidelity is not None:
            l_fid = self._fidelity_g(self._fidelity_features(t, fake))
            loss = loss + l_fid
            stats["g_fid"] = l_fid.detach()
        if D.q is not None:
            mu, logvar = D.q(t)
            l_mi = mi_loss(z, mu, logvar)
            loss = loss + cfg.mi_weight * l_mi
            stats["g_mi"] = l_mi.detach()
        stats["g_loss"] = loss.detach()
        return loss, stats
