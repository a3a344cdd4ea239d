"""MS-CLIP-GAN (docs/design.md §6): shapes, losses, gradients, impl parity, KL, overfit — on the real tiny CLIP."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from scadfast.models.clip import FrozenCLIP
from scadfast.models.ms_clip_gan import MSCLIPGAN, alignment_loss, build_ms_clip_gan, stage_sizes
from scadfast.ops import _impl
from scadfast.variants import get

CAPTIONS = ["a small red circle", "a blue square at the top left", "a green triangle", "a small red circle"]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(1234)
    return FrozenCLIP("scadfast-tiny", pretrained=None)


@pytest.fixture(scope="module")
def text(clip):
    with torch.no_grad():
        return clip.encode_text(clip.tokenize(CAPTIONS)).float()


def tiny_cfg(**over):
    kw = dict(ngf=8, ndf=4, ca_dim=16, z_dim=8)
    kw.update(over)
    return get("ms_clip_gan", **kw)


def batch(text, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = text[:B]
    z = torch.randn(B, 8, generator=g)
    real = torch.rand(B, 3, 64, 64, generator=g) * 2 - 1
    return real, s, z


def grads(module):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in module.named_parameters()}


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,expect", [
    (64, ((16, 32, 64), 4, 2)), (256, ((64, 128, 256), 4, 4)), (224, ((56, 112, 224), 7, 3)), (16, ((4, 8, 16), 4, 0)),
])
def test_stage_sizes(size, expect):
    assert stage_sizes(size) == expect


@pytest.mark.parametrize("bad", [15, 18, 8])
def test_stage_sizes_rejects(bad):
    with pytest.raises(ValueError, match="img_size"):
        stage_sizes(bad)


def test_shapes_of_stages_and_heads(clip, text):
    pair = build_ms_clip_gan(tiny_cfg(), clip)
    assert pair.sizes == (16, 32, 64) and pair.z_dim == 8 and pair.d_txt == clip.embed_dim == 128
    real, s, z = batch(text, B=2)
    imgs, (c_hat, mu, logvar, kl) = pair.generate_all(z, s)
    assert [tuple(x.shape) for x in imgs] == [(2, 3, 16, 16), (2, 3, 32, 32), (2, 3, 64, 64)]
    assert c_hat.shape == mu.shape == logvar.shape == (2, 16) and kl.shape == ()
    assert pair.generate(z, s).shape == (2, 3, 64, 64)
    for Di, x in zip(pair.D.stages, imgs):
        f = Di.features(x)
        assert f.shape == (2, 8 * 4, 4, 4)
        assert Di.uncond(f).shape == (2,)
        assert Di.cond(f, mu).shape == (2,)
        a = Di.align(f)
        assert a.shape == (2, 128)
        torch.testing.assert_close(a.norm(dim=1), torch.ones(2))
    # D of one scale refuses images of another scale
    with pytest.raises(ValueError, match="16 px"):
        pair.D.stages[0].features(imgs[1])


def test_sizes_follow_img_size_argument(clip, text):
    pair = build_ms_clip_gan(tiny_cfg(), clip, img_size=112)  # k = 7, like ViT-B/32's 224 / 2
    assert pair.sizes == (28, 56, 112)
    _, s, z = batch(text, B=2)
    imgs, _ = pair.generate_all(z, s)
    assert [x.shape[-1] for x in imgs] == [28, 56, 112]
    assert pair.D.stages[2].features(imgs[2]).shape == (2, 32, 7, 7)


def test_clip_outside_G_and_D(clip):
    pair = build_ms_clip_gan(tiny_cfg(), clip)
    clip_ids = {id(p) for p in clip.parameters()}
    assert clip_ids
    for m in (pair.G, pair.D, pair):
        assert not clip_ids & {id(p) for p in m.parameters()}
    assert not any(k.startswith("clip") for k in pair.state_dict())


def test_one_d_step_and_one_g_step(clip, text):
    pair = build_ms_clip_gan(tiny_cfg(label_smoothing=0.1), clip)
    real, s, z = batch(text)
    opt_d = torch.optim.Adam(pair.D.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(pair.G.parameters(), 2e-4, betas=(0.5, 0.999))
    ld, sd = pair.d_loss(real, s, z)
    opt_d.zero_grad()
    ld.backward()
    opt_d.step()
    lg, sg = pair.g_loss(s, z)
    opt_g.zero_grad()
    lg.backward()
    opt_g.step()
    assert torch.isfinite(ld) and torch.isfinite(lg)
    for st in (sd, sg):
        for k, v in st.items():
            assert isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad, k
            assert torch.isfinite(v), k
    assert {"d_loss", "d0_real", "d2_fake", "d1_mismatch", "d0_uncond", "d2_align"} <= set(sd)
    assert {"g_loss", "kl", "clip_cos", "g0_cond", "g2_uncond", "g1_align"} <= set(sg)
    torch.testing.assert_close(sd["d_loss"], ld.detach())
    torch.testing.assert_close(sg["g_loss"], lg.detach())
    # the per-scale parts add up to the D total
    torch.testing.assert_close(sum(sd[f"d{i}_loss"] for i in range(3)), sd["d_loss"])


@pytest.mark.parametrize("cond_aug,use_uncond", [(True, True), (False, False)])
def test_gradients_reach_every_expected_param(clip, text, cond_aug, use_uncond):
    pair = build_ms_clip_gan(tiny_cfg(cond_aug=cond_aug, use_uncond_loss=use_uncond), clip)
    real, s, z = batch(text)
    uncond = lambda n: "uncond_head" in n  # noqa: E731

    pair.zero_grad(set_to_none=True)
    pair.d_loss(real, s, z)[0].backward()
    for n, p in pair.G.named_parameters():
        assert p.grad is None, f"G.{n} got a gradient from d_loss"
    for n, p in pair.D.named_parameters():
        if uncond(n) and not use_uncond:
            assert p.grad is None, f"D.{n}: unconditional head trained with use_uncond_loss=False"
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"D.{n}"
        # A logit head's bias gets −1 from every real hinge term and +1 from every fake one: while all
        # logits sit inside the margins (at init) these cancel exactly, so only its value is exempt.
        if not n.endswith("_head.bias"):
            assert p.grad.abs().sum() > 0, f"D.{n} got an all-zero gradient"

    pair.zero_grad(set_to_none=True)
    pair.g_loss(s, z)[0].backward()
    for n, p in pair.G.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"G.{n}"
    assert hasattr(pair.G, "ca") == cond_aug and hasattr(pair.G, "proj") != cond_aug
    for p in clip.parameters():
        assert p.grad is None and not p.requires_grad


def assert_auto_matches_ref(pair, real, s, z, rtol=1e-5, atol=1e-5, grad_rtol=1e-4, grad_atol=1e-6):
    """Run d_loss and g_loss (+ backward) with impl="auto" and impl="ref" from the same model state and
    RNG state; losses, stats and every gradient must agree."""
    state = {k: v.clone() for k, v in pair.state_dict().items()}
    out = {}
    for impl in ("auto", "ref"):
        pair.load_state_dict(state)
        pair.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        ld, sd = pair.d_loss(real, s, z, impl=impl)
        ld.backward()
        gd = grads(pair.D)
        pair.zero_grad(set_to_none=True)
        lg, sg = pair.g_loss(s, z, impl=impl)
        lg.backward()
        out[impl] = (ld.detach(), sd, gd, lg.detach(), sg, grads(pair.G))
    a, r = out["auto"], out["ref"]
    torch.testing.assert_close(a[0], r[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(a[3], r[3], rtol=rtol, atol=atol)
    for k in r[1]:
        torch.testing.assert_close(a[1][k], r[1][k], rtol=rtol, atol=atol, msg=k)
    for k in r[4]:
        torch.testing.assert_close(a[4][k], r[4][k], rtol=rtol, atol=atol, msg=k)
    for ga, gr in ((a[2], r[2]), (a[5], r[5])):
        assert ga.keys() == gr.keys()
        for n in gr:
            assert (ga[n] is None) == (gr[n] is None), n
            if gr[n] is not None:
                torch.testing.assert_close(ga[n], gr[n], rtol=grad_rtol, atol=grad_atol, msg=n)


def require_fused_cond_aug(cuda=False):
    """Without the compiled extension cond_aug's impl="auto" quietly runs its reference, and comparing
    "auto" with "ref" would compare the reference with itself: fail instead (as test_cond_aug.py does)."""
    assert _impl.extension_available(), f"scadfast._C is not built: {_impl.extension_error()}"
    if cuda:
        assert _impl.extension_available(cuda=True), "scadfast._C was built without its CUDA kernels"


@pytest.mark.parametrize("ca_mode", ["glu", "relu"])
def test_auto_and_ref_agree(clip, text, ca_mode):
    require_fused_cond_aug()
    pair = build_ms_clip_gan(tiny_cfg(ca_mode=ca_mode, label_smoothing=0.1), clip)
    real, s, z = batch(text, B=4)  # B=4 has a duplicate caption → masked mismatch pair
    assert_auto_matches_ref(pair, real, s, z)


@pytest.mark.gpu
def test_cuda_auto_matches_ref_and_runs_under_bf16_autocast(text):
    require_fused_cond_aug(cuda=True)
    dev = torch.device("cuda")
    torch.manual_seed(1234)
    clip_cuda = FrozenCLIP("scadfast-tiny", pretrained=None, device=dev)
    pair = build_ms_clip_gan(tiny_cfg(ca_mode="glu", label_smoothing=0.1), clip_cuda).to(dev)
    real, s, z = (t.to(dev) for t in batch(text, B=4))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    assert_auto_matches_ref(pair, real, s, z, rtol=1e-4, atol=1e-5, grad_rtol=1e-3, grad_atol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ld, sd = pair.d_loss(real, s, z)
    ld.backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        lg, sg = pair.g_loss(s, z)
    lg.backward()
    assert ld.dtype == lg.dtype == torch.float32
    assert torch.isfinite(ld) and torch.isfinite(lg)
    for n, p in list(pair.G.named_parameters()) + list(pair.D.named_parameters()):
        assert p.grad is None or torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("ca_mode", ["relu", "glu"])
def test_kl_and_reparameterisation_match_the_formula(clip, text, ca_mode):
    pair = build_ms_clip_gan(tiny_cfg(ca_mode=ca_mode), clip)
    _, s, z = batch(text)
    s_n = s / s.norm(dim=1, keepdim=True)
    eps = torch.randn(3, 16)
    c_hat, mu, logvar, kl = pair.G.condition(s_n, eps)
    fc = pair.G.ca.fc
    a = (s_n * math.sqrt(s.shape[1])) @ fc.weight.t() + fc.bias  # CA reads s_n·√d_txt
    a = torch.relu(a) if ca_mode == "relu" else a[:, :32] * torch.sigmoid(a[:, 32:])
    mu_e, lv_e = a[:, :16], a[:, 16:]
    torch.testing.assert_close(mu, mu_e)
    torch.testing.assert_close(logvar, lv_e)
    torch.testing.assert_close(c_hat, mu_e + torch.exp(0.5 * lv_e) * eps)
    kl_e = -0.5 * torch.mean(1 + lv_e - mu_e ** 2 - lv_e.exp())
    torch.testing.assert_close(kl, kl_e)
    # g_loss reports the same KL (it does not depend on ε) and the model normalises s itself
    _, st = pair.g_loss(s * 3.0, z)
    torch.testing.assert_close(st["kl"], kl_e)


def test_text_share_definition_and_what_the_text_carries(clip):
    """text_share = Σ Var_s μ / Σ (Var_s μ + E σ²), checked against a Monte Carlo of ĉ; the text's share
    with the scaled input is far above the unit-norm input's (~0.1%: MS-CLIP-GAN ignored the prompt)."""
    from scadfast.data.shapes import sample_prompts

    caps = list(dict.fromkeys(sample_prompts(400, seed=3)))[:64]
    with torch.no_grad():
        s = clip.encode_text(clip.tokenize(caps)).float()
    torch.manual_seed(0)
    pair = build_ms_clip_gan(tiny_cfg(ca_mode="glu"), clip)
    share = pair.text_share(s)
    # Monte Carlo: ĉ for every caption under many ε; total variance vs the variance of the per-caption means.
    s_n = s / s.norm(dim=1, keepdim=True)
    with torch.no_grad():
        c = torch.stack([pair.G.condition(s_n)[0] for _ in range(400)]).double()  # (R, B, E)
    total = c.reshape(-1, c.shape[-1]).var(0, unbiased=False).sum()
    between = c.mean(0).var(0, unbiased=False).sum()
    assert abs(share - float(between / total)) < 0.02
    unscaled = build_ms_clip_gan(tiny_cfg(ca_mode="glu"), clip)
    unscaled.load_state_dict(pair.state_dict())
    unscaled.G.s_scale = 1.0
    assert unscaled.text_share(s) < share / 5
    assert build_ms_clip_gan(tiny_cfg(cond_aug=False), clip).text_share(s) == 1.0
    with pytest.raises(ValueError, match="text_share"):
        pair.text_share(s[:1])


def test_kl_weight_enters_g_loss(clip, text):
    _, s, z = batch(text)
    losses = {}
    for w in (0.0, 2.0):
        torch.manual_seed(0)
        pair = build_ms_clip_gan(tiny_cfg(kl_weight=w), clip)
        torch.manual_seed(1)
        losses[w] = pair.g_loss(s, z)
    (l0, st0), (l2, st2) = losses[0.0], losses[2.0]
    torch.testing.assert_close(l2 - l0, 2.0 * st2["kl"], rtol=1e-4, atol=1e-5)


def test_without_cond_aug_kl_is_zero(clip, text):
    pair = build_ms_clip_gan(tiny_cfg(cond_aug=False), clip)
    _, s, z = batch(text)
    s_n = s / s.norm(dim=1, keepdim=True)
    c_hat, mu, logvar, kl = pair.G.condition(s_n)
    assert logvar is None and float(kl) == 0.0
    torch.testing.assert_close(c_hat, pair.G.proj(s_n * pair.G.s_scale))  # the same scaled input as CA
    assert c_hat is mu


def test_label_smoothing_shrinks_the_real_margin(clip, text):
    eps_ls = 0.3
    pair = build_ms_clip_gan(tiny_cfg(label_smoothing=eps_ls), clip).eval()  # eval: SN/BN state frozen
    real, s, z = batch(text)
    torch.manual_seed(5)
    _, st = pair.d_loss(real, s, z)
    torch.manual_seed(5)  # same CA noise → the same fakes as inside d_loss
    with torch.no_grad():
        fakes, (_, mu, _, _) = pair.generate_all(z, s)
        for i, (Di, xr, xf) in enumerate(zip(pair.D.stages, pair.real_pyramid(real), fakes)):
            fr, ff = Di.features(xr), Di.features(xf)
            # real margin 1 - ε, fake margin unchanged (one-sided smoothing)
            torch.testing.assert_close(st[f"d{i}_real"], torch.relu(1 - eps_ls - Di.cond(fr, mu)).mean())
            torch.testing.assert_close(st[f"d{i}_fake"], torch.relu(1 + Di.cond(ff, mu)).mean())
            expect_u = torch.relu(1 - eps_ls - Di.uncond(fr)).mean() + torch.relu(1 + Di.uncond(ff)).mean()
            torch.testing.assert_close(st[f"d{i}_uncond"], expect_u)


def test_mismatch_term_skips_identical_captions(clip, text):
    pair = build_ms_clip_gan(tiny_cfg(), clip).eval()
    real, _, z = batch(text, B=3)
    s_same = text[0:1].expand(3, -1).contiguous()  # all captions identical → no mismatched pair
    loss, st = pair.d_loss(real, s_same, z)
    loss.backward()
    assert torch.isfinite(loss)
    for i in range(3):
        assert float(st[f"d{i}_mismatch"]) == 0.0
    for n, p in pair.D.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), n

    # caption 3 equals caption 0: with roll(1), sample 0 is paired with caption 3 → masked out
    real4, s4, z4 = batch(text, B=4)
    _, st4 = pair.d_loss(real4, s4, z4)
    s_n = s4 / s4.norm(dim=1, keepdim=True)
    with torch.no_grad():
        mu = pair.G.condition(s_n)[1]
        Di = pair.D.stages[0]
        lw = Di.cond(Di.features(pair.real_pyramid(real4)[0]), mu.roll(1, 0))
    torch.testing.assert_close(st4["d0_mismatch"], torch.relu(1 + lw[1:]).mean())


def test_alignment_loss_definition():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(3, 5), dim=1)
    txt = F.normalize(torch.randn(3, 5), dim=1)
    tau = 0.1
    logits = img @ txt.t() / tau
    expect = 0.5 * (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.t(), torch.arange(3)))
    torch.testing.assert_close(alignment_loss(img, txt, tau), expect)
    # a perfectly aligned, well separated batch has a lower loss than a shuffled one
    eye = torch.eye(3, 5)
    assert alignment_loss(eye, eye, tau) < alignment_loss(eye, eye.roll(1, 0), tau)
    assert alignment_loss(eye, eye, tau) < 1e-3
    # duplicate captions are positives: pairing image 0 with either copy costs the same
    txt_dup = torch.stack([eye[0], eye[1], eye[0]])
    img_a = torch.stack([eye[0], eye[1], eye[0]])
    l_dup = alignment_loss(img_a, txt_dup, tau)
    assert torch.isfinite(l_dup) and abs(float(l_dup) - math.log(2) * 2 / 3) < 1e-3
    # B = 1: nothing to contrast with
    assert float(alignment_loss(eye[:1], eye[:1], tau)) == 0.0


def test_d_overfits_a_fixed_batch(clip, text):
    pair = build_ms_clip_gan(tiny_cfg(), clip)
    real, s, z = batch(text)
    opt = torch.optim.Adam(pair.D.parameters(), 1e-3, betas=(0.5, 0.999))
    torch.manual_seed(3)

    def hinge(st):  # the adversarial part alone (the alignment term must not carry the decrease)
        return sum(float(st[f"d{i}_{k}"]) for i in range(3) for k in ("real", "fake", "uncond"))

    first = None
    for _ in range(20):
        loss, st = pair.d_loss(real, s, z)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if first is None:
            first = (float(loss.detach()), hinge(st))
    with torch.no_grad():
        loss, st = pair.d_loss(real, s, z)
    last = (float(loss), hinge(st))
    assert last[0] < 0.6 * first[0], (first, last)
    assert last[1] < 0.8 * first[1], (first, last)


def test_perceptual_loss_is_opt_in(clip, text):
    real, s, z = batch(text)
    off = build_ms_clip_gan(tiny_cfg(), clip)
    assert off.perceptual is None and "perceptual" not in off.g_loss(s, z)[1]
    phi = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1))
    on = build_ms_clip_gan(tiny_cfg(), clip, perceptual=phi, perceptual_weight=0.5)
    assert not {id(p) for p in phi.parameters()} & {id(p) for p in on.parameters()}
    assert all(not p.requires_grad for p in phi.parameters())
    with pytest.raises(ValueError, match="real="):
        on.g_loss(s, z)
    loss, st = on.g_loss(s, z, real=real)
    loss.backward()
    assert torch.isfinite(st["perceptual"]) and float(st["perceptual"]) > 0
    assert all(p.grad is None for p in phi.parameters())


def test_batchnorm_discriminator_and_tanh_generator(clip, text):
    pair = build_ms_clip_gan(tiny_cfg(), clip, d_norm="batch", g_tanh=True)
    assert any(isinstance(m, nn.BatchNorm2d) for m in pair.D.modules())
    real, s, z = batch(text)
    assert pair.generate(z, s).abs().max() <= 1.0
    ld, _ = pair.d_loss(real, s, z)
    lg, _ = pair.g_loss(s, z)
    assert torch.isfinite(ld) and torch.isfinite(lg)


def test_real_images_at_another_size_are_resized(clip, text):
    pair = build_ms_clip_gan(tiny_cfg(), clip)
    real, s, z = batch(text)
    big = F.interpolate(real, size=(96, 96), mode="bilinear", align_corners=False)
    pyr = pair.real_pyramid(big)
    assert [tuple(x.shape[-2:]) for x in pyr] == [(16, 16), (32, 32), (64, 64)]
    assert pair.real_pyramid(real)[2] is real
    assert torch.isfinite(pair.d_loss(big, s, z)[0])


def test_clear_errors(clip, text):
    pair = build_ms_clip_gan(tiny_cfg(), clip)
    real, s, z = batch(text)
    with pytest.raises(ValueError, match=r"s must be \(B, 128\)"):
        pair.g_loss(s[:, :64], z)
    with pytest.raises(ValueError, match="z must be"):
        pair.d_loss(real, s, z[:, :4])
    with pytest.raises(ValueError, match="real must be"):
        pair.d_loss(real[:2], s, z)
    with pytest.raises(TypeError, match="real"):
        pair.d_loss(real.long(), s, z)
    with pytest.raises(ValueError, match="impl"):
        pair.g_loss(s, z, impl="fast")
    with pytest.raises(ValueError, match="arch"):
        build_ms_clip_gan(get("galip"), clip)
    with pytest.raises(ValueError, match="d_loss"):
        build_ms_clip_gan(tiny_cfg(d_loss="san"), clip)
    with pytest.raises(ValueError, match="ngf"):
        build_ms_clip_gan(tiny_cfg(ngf=6), clip)
    with pytest.raises(ValueError, match="d_norm"):
        build_ms_clip_gan(tiny_cfg(), clip, d_norm="layer")
    assert isinstance(pair, MSCLIPGAN)
