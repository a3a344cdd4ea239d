"""Differentiable augmentation before CLIP (scadfast.models.augment): exact shifts, cutout, gradients."""

import pytest
import torch

from scadfast import variants
from scadfast.models import augment as aug


def test_translate_is_an_exact_integer_shift_with_replicated_border():
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float64).view(2, 3, 16, 16)
    torch.manual_seed(0)
    y = aug.translate(x, ratio=1 / 8)
    r = 2
    for b in range(2):
        hits = []
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                ys = (torch.arange(16) - dy).clamp(0, 15)
                xs = (torch.arange(16) - dx).clamp(0, 15)
                if torch.equal(y[b], x[b][:, ys][:, :, xs]):
                    hits.append((dy, dx))
        assert len(hits) == 1  # exactly one offset within the range explains the output
    # Over many draws every offset in [-r, r] occurs and nothing else does.
    torch.manual_seed(1)
    z = torch.zeros(400, 1, 16, 16)
    z[:, :, 8, 8] = 1
    pos = aug.translate(z, ratio=1 / 8).flatten(1).argmax(1)
    dys, dxs = pos // 16 - 8, pos % 16 - 8
    assert set(dys.tolist()) == set(range(-r, r + 1)) == set(dxs.tolist())


def test_cutout_zeroes_one_square_and_gradients_flow():
    torch.manual_seed(0)
    x = torch.ones(8, 3, 64, 64, requires_grad=True)
    y = aug.cutout(x)
    zeros = (y[:, 0] == 0).flatten(1).sum(1)
    assert ((zeros > 0) & (zeros <= 17 * 17)).all()
    assert torch.equal(y[:, 0] == 0, y[:, 2] == 0)  # the same square in every channel
    y.sum().backward()
    assert torch.equal(x.grad, (y.detach() != 0).float())
    x2 = torch.randn(4, 3, 32, 32, requires_grad=True)
    aug.augment(x2, "translation").square().sum().backward()
    assert x2.grad.abs().sum() > 0
    assert aug.augment(x2, "none") is x2


def test_policy_is_checked_and_the_pair_trains_through_it(clip):
    with pytest.raises(ValueError, match="augment"):
        aug.check_policy("flip")
    torch.manual_seed(0)
    pair = variants.build(variants.get("scad_dd", ngf=8, ndf=8, augment="translation,cutout"), clip)
    real, s, z = torch.rand(2, 3, 64, 64) * 2 - 1, torch.randn(2, 128), torch.randn(2, 100)
    fake = pair.make_fake(z, s)
    d, _ = pair.d_loss(real, s, z, fake=fake)
    d.backward()
    g, _ = pair.g_loss(s, z, fake=fake)
    g.backward()
    assert torch.isfinite(d) and torch.isfinite(g)
    assert pair.G.to_rgb.weight.grad.abs().sum() > 0
