"""CLIP-aided generator, GALIP/SCAD discriminators and the GALIPFamily losses on the tiny CLIP (CPU)."""

import copy
import time

import pytest
import torch

from scadfast import variants
from scadfast.models.clip import FrozenCLIP
from scadfast.models.discriminator import PixelPatchGAN, mi_loss
from scadfast.models.galip import GALIPFamily
from scadfast.models.generator import CLIPAidedGenerator, up_schedule

VARIANTS = ["galip", "scad", "scad_mi", "scad_dd"]
B = 2


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures one_thread, clip: conftest.py


def _cfg(name, **kw):
    return variants.get(name, ngf=8, ndf=8, **kw)


def _pair(clip, name, seed=0, **kw):
    torch.manual_seed(seed)
    return variants.build(_cfg(name, **kw), clip)


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    real = torch.rand(B, 3, 64, 64, generator=g) * 2 - 1
    s = torch.randn(B, 128, generator=g)
    z = torch.randn(B, 100, generator=g)
    return real, s, z


def _zero_grads(*modules):
    for m in modules:
        for p in m.parameters():
            p.grad = None


# Parameters whose gradient is exactly zero at initialisation by construction:
# G's text-affine MLPs start as the identity (zero last layer → no gradient into the first layer),
# D's trunk residual convs sit behind gates γ = 0; the bias of an unconditional hinge patch head
# gets −mean(1) from real and +mean(1) from fake patches while every margin is active (sum 0).
def _structurally_zero(name):
    return (".gamma.0." in name or ".beta.0." in name) or ".conv_r." in name or name == "fidelity.proj.conv.bias"


def test_up_schedule_matches_galip():
    sizes, chans = up_schedule(7, 224, 64)
    assert sizes == [14, 28, 56, 112, 224] and chans == [512, 512, 512, 256, 128, 64]
    assert up_schedule(8, 64, 64) == ([16, 32, 64], [512, 256, 128, 64])
    assert up_schedule(7, 256, 32)[0] == [14, 28, 56, 112, 224, 256]  # never more than ×2; last step to the final size
    assert up_schedule(8, 8, 64) == ([], [64])


def test_pixel_patchgan_output_size():
    assert PixelPatchGAN.output_size(224) == 26 and PixelPatchGAN.output_size(64) == 6
    net = PixelPatchGAN(ndf=2)
    assert net(torch.zeros(1, 3, 224, 224)).shape == (1, 1, 26, 26)
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 6, 6)


def test_generator_keeps_clip_out(clip):
    G = CLIPAidedGenerator(clip, z_dim=100, ngf=8)
    clip_ids = {id(p) for p in clip.parameters()}
    assert not any(id(p) in clip_ids for p in G.parameters())
    assert not any(k.startswith(("clip", "_clip")) for k in G.state_dict())
    assert copy.deepcopy(G).clip is clip  # an EMA copy shares the frozen CLIP
    with pytest.raises(ValueError, match="z must be"):
        G(torch.zeros(2, 99), torch.zeros(2, 128))
    with pytest.raises(ValueError, match="s must be"):
        G(torch.zeros(2, 100), torch.zeros(3, 128))


def test_mi_loss_values():
    z, mu = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.0, 0.0]])
    assert mi_loss(z, mu, None).item() == pytest.approx(0.5)
    lv = torch.full((1, 2), 2 * torch.log(torch.tensor(2.0)).item())  # σ = 2
    assert mi_loss(z, mu, lv).item() == pytest.approx(0.5 * 0.25 + torch.log(torch.tensor(2.0)).item(), rel=1e-6)


def test_build_dispatch_and_validation(clip):
    with pytest.raises(ValueError, match="unknown cfg.arch"):
        variants.build(_cfg("galip", arch="nope"), clip)
    with pytest.raises(ValueError, match="fidelity must be"):
        variants.build(_cfg("galip", fidelity="pixels"), clip)
    with pytest.raises(ValueError, match="semantic"):
        variants.build(_cfg("galip", d_loss="wgan"), clip)
    with pytest.raises(TypeError):
        variants.build({"name": "galip"}, clip)


@pytest.mark.parametrize("name", VARIANTS)
def test_shapes_steps_and_grads(clip, name):
    pair = _pair(clip, name)
    assert isinstance(pair, GALIPFamily) and isinstance(pair, variants.GANPair)
    real, s, z = _batch()
    img = pair.generate(z, s)
    assert img.shape == (B, 3, 64, 64) and torch.isfinite(img).all()
    D = pair.D
    feats, _ = clip.image_features(img)
    t = D.trunk(feats)
    assert t.shape == (B, 64, 8, 8)  # 8·ndf channels on the 8×8 CLIP grid
    if pair.cfg.d_loss == "hinge":
        assert D.semantic(t, s).shape == (B,)
    else:
        h, w = D.semantic(t, s)
        assert h.shape == w.shape == (B, 16 * 5 * 5)  # 2·ndf · (g − 3)²
    if pair.cfg.fidelity == "clip_patch":
        assert D.fidelity.proj(D.fidelity.features(t)).shape == (B, 1, 8, 8)
    elif pair.cfg.fidelity == "pixel_patchgan":
        assert D.fidelity(img).shape == (B, 1, 6, 6)
    assert (D.q is not None) == (name == "scad_mi")

    # One D step: finite, every D parameter gets a gradient, no CLIP parameter does, G gets none.
    loss, stats = pair.d_loss(real, s, z)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(v.ndim == 0 and not v.requires_grad and torch.isfinite(v) for v in stats.values())
    assert "d_gp" in stats and ("d_fid" in stats) == (pair.cfg.fidelity != "none") and ("d_mi" in stats) == (name == "scad_mi")
    loss.backward()
    for n, p in D.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        if not _structurally_zero(n):
            assert p.grad.abs().sum() > 0, n
    assert all(p.grad is None for p in pair.G.parameters())
    assert all(p.grad is None for p in clip.parameters())
    opt = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.0, 0.9))
    opt.step()

    # One G step.
    _zero_grads(pair.G, D)
    gl, gstats = pair.g_loss(s, z)
    assert gl.ndim == 0 and torch.isfinite(gl) and all(not v.requires_grad for v in gstats.values())
    gl.backward()
    for n, p in pair.G.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        if not _structurally_zero(n):
            assert p.grad.abs().sum() > 0, n
    assert all(p.grad is None for p in clip.parameters())
    if D.q is not None:  # the MI term reaches G
        assert D.q.fc.weight.grad is not None


def _grads(module):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in module.named_parameters()}


@pytest.mark.parametrize("name", VARIANTS)
def test_fused_matches_reference(clip, name):
    """impl='auto' (fused ops, fused spectral norm) vs impl='ref' (reference ops and spectral norm):
    same D and G losses, same gradients for every parameter, MA-GP (double backward) included."""
    fused = _pair(clip, name)
    torch.manual_seed(0)
    ref = GALIPFamily(_cfg(name), clip, sn_impl="ref")
    ref.load_state_dict(fused.state_dict())
    real, s, z = _batch()
    out = {}
    for key, pair, impl in (("auto", fused, "auto"), ("ref", ref, "ref")):
        dl, dstats = pair.d_loss(real, s, z, impl=impl)
        dl.backward()
        dgrads = _grads(pair.D)
        _zero_grads(pair.G, pair.D)
        gl, _ = pair.g_loss(s, z, impl=impl)
        gl.backward()
        out[key] = (dl.detach(), dstats, dgrads, gl.detach(), _grads(pair.G))
    a, r = out["auto"], out["ref"]
    torch.testing.assert_close(a[0], r[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a[1]["d_gp"], r[1]["d_gp"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(a[3], r[3], rtol=1e-4, atol=1e-5)
    for n in a[2]:
        torch.testing.assert_close(a[2][n], r[2][n], rtol=1e-3, atol=1e-6, msg=f"D grad {n}")
    for n in a[4]:
        torch.testing.assert_close(a[4][n], r[4][n], rtol=1e-3, atol=1e-6, msg=f"G grad {n}")


@pytest.mark.parametrize("name", ["galip", "scad"])
def test_ma_gp_fused_vs_reference_and_definition(clip, name):
    """The penalty alone: value and D gradients agree between the fused and reference ops, and its
    value matches the definition k·mean‖[∇_F f, ∇_s f]‖^p computed by finite differences."""
    pair = _pair(clip, name)
    real, s, _ = _batch()
    with torch.no_grad():
        feats, _ = clip.image_features(real)

    def logits(F_, s_, impl):
        t = pair.D.trunk(F_)
        return pair._semantic(t, s_, impl)[1]

    pair.eval()  # freeze the spectral-norm power iteration so repeated forwards are identical
    res = {}
    for impl in ("auto", "ref"):
        _zero_grads(pair.D)
        F_ = feats.clone().requires_grad_(True)
        s_ = s.clone().requires_grad_(True)
        gp = pair.ma_gp(logits(F_, s_, impl), F_, s_)
        gp.backward()
        res[impl] = (gp.detach(), _grads(pair.D))
    torch.testing.assert_close(res["auto"][0], res["ref"][0], rtol=1e-4, atol=1e-8)
    for n, g in res["auto"][1].items():
        torch.testing.assert_close(g, res["ref"][1][n], rtol=1e-3, atol=1e-7, msg=n)
    assert res["auto"][0] > 0

    # Definition check in float64: directional finite difference of f along the gradient.
    pair.double()
    F64, s64 = feats.double().requires_grad_(True), s.double().requires_grad_(True)
    f = logits(F64, s64, "ref")
    gF, gs = torch.autograd.grad(f.sum(), (F64, s64))
    norms = torch.cat([gF.flatten(1), gs.flatten(1)], 1).norm(dim=1)
    eps = 1e-6
    with torch.no_grad():
        u = torch.cat([gF.flatten(1), gs.flatten(1)], 1) / norms[:, None]
        uF, us = u[:, :gF[0].numel()].view_as(gF), u[:, gF[0].numel():]
        fd = (logits(F64 + eps * uF, s64 + eps * us, "ref") - logits(F64 - eps * uF, s64 - eps * us, "ref")) / (2 * eps)
    torch.testing.assert_close(fd, norms, rtol=1e-5, atol=1e-9)
    F64b, s64b = feats.double().requires_grad_(True), s.double().requires_grad_(True)
    gp64 = pair.ma_gp(logits(F64b, s64b, "ref"), F64b, s64b)
    k, p = pair.cfg.gp_weight, pair.cfg.gp_power
    torch.testing.assert_close(gp64, k * (norms ** p).mean(), rtol=1e-9, atol=1e-12)
    pair.float()


def test_gp_every_lazy_regularisation(clip):
    pair = _pair(clip, "galip", gp_every=2)
    real, s, z = _batch()
    _, st0 = pair.d_loss(real, s, z)
    _, st1 = pair.d_loss(real, s, z)
    _, st2 = pair.d_loss(real, s, z)
    with torch.no_grad():  # no autograd → no penalty (evaluation)
        _, st4 = pair.d_loss(real, s, z)
    assert "d_gp" not in st4 and pair.d_steps == 4
    assert "d_gp" in st0 and "d_gp" not in st1 and "d_gp" in st2
    # On penalty steps the penalty enters the loss multiplied by gp_every.
    pair2 = _pair(clip, "galip")
    pair2.load_state_dict(pair.state_dict())
    pair.d_steps = pair2.d_steps = 0
    l2, s2 = pair.d_loss(real, s, z)
    l1, s1 = pair2.d_loss(real, s, z)
    torch.testing.assert_close(l2 - l1, s1["d_gp"], rtol=1e-4, atol=1e-7)


def test_no_gp_when_weight_zero(clip):
    pair = _pair(clip, "scad", gp_weight=0.0)
    real, s, z = _batch()
    loss, stats = pair.d_loss(real, s, z)
    assert "d_gp" not in stats and torch.isfinite(loss)


def test_switch_combinations(clip):
    """Switches are orthogonal: hinge + pixel PatchGAN with SAN fidelity, SAN + clip_patch SAN + learned σ."""
    for kw in (dict(d_loss="hinge", fidelity="pixel_patchgan", fidelity_loss="san"),
               dict(d_loss="san", fidelity="clip_patch", fidelity_loss="san", mi_weight=0.5, mi_learn_sigma=True)):
        pair = _pair(clip, "galip", **kw)
        real, s, z = _batch()
        loss, stats = pair.d_loss(real, s, z)
        loss.backward()
        assert torch.isfinite(loss) and "d_fid" in stats
        w = pair.D.fidelity.proj.conv.weight
        assert w.grad is not None and w.grad.abs().sum() > 0  # SAN direction ω of the fidelity head trains
        gl, gstats = pair.g_loss(s, z)
        assert torch.isfinite(gl)


@pytest.mark.parametrize("name", VARIANTS)
def test_short_overfit_reduces_d_loss(clip, name):
    pair = _pair(clip, name)
    real, s, z = _batch()
    opt = torch.optim.Adam(pair.D.parameters(), lr=pair.cfg.lr_d, betas=pair.cfg.betas)
    losses = []
    for _ in range(24):
        opt.zero_grad(set_to_none=True)
        loss, _ = pair.d_loss(real, s, z)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, losses


def _count(m):
    return sum(p.numel() for p in m.parameters())


def test_vit_b32_shapes_and_parameter_counts():
    """ViT-B-32 (random weights; no download), 224 px, batch 1: GALIP's configuration (~12 s)."""
    t0 = time.time()
    torch.manual_seed(0)
    clip = FrozenCLIP("ViT-B-32")
    assert (clip.image_size, clip.grid, clip.width, clip.n_blocks, clip.embed_dim) == (224, 7, 768, 12, 512)
    assert clip.feature_blocks == (1, 4, 8) and clip.prompt_blocks == tuple(range(1, 9))
    s, z = torch.randn(1, 512), torch.randn(1, 100)
    print(f"\nCLIP ViT-B-32: {_count(clip) / 1e6:.2f} M params (frozen)")
    for name in VARIANTS:
        torch.manual_seed(0)
        pair = variants.build(variants.get(name), clip)
        with torch.no_grad():
            img = pair.generate(z, s)
            feats, emb = clip.image_features(img)
            t = pair.D.trunk(feats)
        assert img.shape == (1, 3, 224, 224) and feats.shape == (1, 3, 768, 7, 7) and t.shape == (1, 512, 7, 7)
        if pair.cfg.d_loss == "san":
            assert pair.D.semantic.d_h == 2048
        if pair.cfg.fidelity == "pixel_patchgan":
            with torch.no_grad():
                assert pair.D.fidelity(img).shape == (1, 1, 26, 26)
        parts = {n: _count(m) for n, m in pair.D.named_children()}
        print(f"{name}: G {_count(pair.G) / 1e6:.2f} M, D {_count(pair.D) / 1e6:.2f} M "
              f"({', '.join(f'{k} {v / 1e6:.3f} M' for k, v in parts.items())})")
    print(f"ViT-B-32 test took {time.time() - t0:.1f} s")


def test_ref_impl_switches_spectral_norm_for_the_call(clip):
    from scadfast.ops import SpectralNorm

    pair = _pair(clip, "scad_dd")
    sns = [m for m in pair.D.modules() if isinstance(m, SpectralNorm)]
    assert len(sns) >= 6 and all(m.impl == "auto" for m in sns)
    seen = []
    orig = pair._semantic

    def spy(*a, **k):
        seen.append({m.impl for m in sns})
        return orig(*a, **k)

    pair._semantic = spy
    real, s, z = _batch()
    pair.d_loss(real, s, z, impl="ref")
    pair.g_loss(s, z, impl="ref")
    assert seen == [{"ref"}, {"ref"}] and all(m.impl == "auto" for m in sns)


def test_build_dispatches_ms_clip_gan(clip):
    pair = variants.build(variants.get("ms_clip_gan"), clip, img_size=64)
    assert not isinstance(pair, GALIPFamily) and isinstance(pair, variants.GANPair)


@pytest.mark.parametrize("name", ["scad_mi", "scad_dd", "ms_clip_gan"])
def test_fakes_generated_once_per_iteration_equal_the_separate_passes(clip, name):
    """Training generates each iteration's fakes once (make_fake) and hands them to d_loss (detached)
    and g_loss (with G's graph), as GALIP does: the losses and gradients equal those of d_loss/g_loss
    generating the same fakes themselves (same z, and for MS-CLIP-GAN the same CA noise)."""
    torch.manual_seed(0)
    pair = variants.build(variants.get(name, ngf=8, ndf=8), clip)
    pair.G.eval()  # MS-CLIP-GAN's BatchNorm: the same statistics in every pass
    real, s, z = _batch()
    d_state = copy.deepcopy(pair.D.state_dict())  # spectral norm's u/v advance in every training forward

    def run(reuse):
        pair.D.load_state_dict(d_state)
        _zero_grads(pair.G, pair.D)
        torch.manual_seed(5)
        fake = pair.make_fake(z, s) if reuse else None
        dl, _ = pair.d_loss(real, s, z, fake=fake)
        dl.backward()
        assert all(p.grad is None or not p.grad.abs().sum() for p in pair.G.parameters())  # D step: no G grads
        gd = _grads(pair.D)
        _zero_grads(pair.G, pair.D)
        if not reuse:
            torch.manual_seed(5)  # g_loss draws the CA noise again
        gl, _ = pair.g_loss(s, z, fake=fake)
        gl.backward()
        return dl.detach(), gl.detach(), gd, _grads(pair.G)

    d1, g1, gd1, gg1 = run(True)
    d2, g2, gd2, gg2 = run(False)
    torch.testing.assert_close(d1, d2)
    torch.testing.assert_close(g1, g2)
    for a, b in ((gd1, gd2), (gg1, gg2)):
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] is None) == (b[k] is None), k
            if a[k] is not None:
                torch.testing.assert_close(a[k], b[k], msg=k)
    assert any(v is not None and v.abs().sum() > 0 for v in gg1.values())


@pytest.mark.parametrize("name", ["scad_mi", "scad_dd"])
def test_channels_last_pair_computes_the_same_losses_and_gradients(clip, name):
    """`train --channels-last` (the default) only changes the conv weights' memory order."""
    pair = _pair(clip, name)
    pair_cl = copy.deepcopy(pair).to(memory_format=torch.channels_last)
    convs = [p for p in pair_cl.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    real, s, z = _batch()
    for p in (pair, pair_cl):
        _zero_grads(p.G, p.D)
        torch.manual_seed(3)
        d, _ = p.d_loss(real, s, z)
        g, _ = p.g_loss(s, z)
        (d + g).backward()
        p.losses = (d.item(), g.item())
    assert pair_cl.losses == pytest.approx(pair.losses, rel=1e-4, abs=1e-5)
    for (n, a), b in zip(pair.named_parameters(), pair_cl.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=n)
