"""Edit negatives (scadfast/data/negatives.py) and their wiring into the GALIP family's D loss."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from scadfast import train
from scadfast.data import shapes as shp
from scadfast.data.negatives import EditNegatives


def _captions(n=600, seed=0):
    rng = np.random.default_rng(seed)
    return [shp.format_caption(*shp.sample_attrs(rng)) for _ in range(n)]


def test_every_edit_contradicts_exactly_one_named_attribute_and_names_no_more():
    caps = _captions()
    neg = EditNegatives(caps)
    assert neg.n_with_edit > 0.9 * len(caps)
    drawn = neg.sample(torch.arange(len(caps)).repeat(4), torch.Generator().manual_seed(0))
    changed = collections.Counter()
    for i, j in zip(torch.arange(len(caps)).repeat(4).tolist(), drawn.tolist()):
        if j < 0:
            assert not neg.edits(i)
            continue
        p, q = shp.parse_caption(caps[i]), shp.parse_caption(caps[j])
        assert set(q) <= set(p), (caps[i], caps[j])
        diff = [a for a in q if q[a] != p[a]]
        assert len(diff) == 1, (caps[i], caps[j])
        changed[diff[0]] += 1
    # Every attribute is edited somewhere; shape (named by every caption) is not the only one.
    assert set(changed) == set(shp.ATTRIBUTE_NAMES), changed
    assert changed["shape"] < 0.6 * sum(changed.values())


def test_attribute_is_drawn_uniformly_among_those_with_edits():
    caps = ["a small red square at the top left", "a red circle", "a blue square", "a large square",
            "a square at the bottom", "a blue circle", "a red square"]
    neg = EditNegatives(caps)
    assert set(neg.edits(0)) == {"shape", "color", "size", "position"}
    assert neg.edits(0)["shape"] == [1]
    drawn = neg.sample(torch.zeros(4000, dtype=torch.long), torch.Generator().manual_seed(1)).tolist()
    counts = collections.Counter(drawn)
    assert set(counts) == {1, 2, 3, 4}  # "a blue circle" contradicts two attributes; "a red square" none
    assert all(abs(c / 4000 - 0.25) < 0.04 for c in counts.values()), counts
    # Same generator seed, same draws (a resumed run draws what the uninterrupted one drew).
    again = neg.sample(torch.zeros(4000, dtype=torch.long), torch.Generator().manual_seed(1)).tolist()
    assert again == drawn


def test_caption_without_edits_gets_minus_one_and_bad_input_is_named():
    neg = EditNegatives(["a red square", "a red square"])
    assert neg.sample(torch.tensor([0, 1]), torch.Generator()).tolist() == [-1, -1]
    with pytest.raises(ValueError, match=r"caption 1 \('a photo of a dog'\)"):
        EditNegatives(["a red square", "a photo of a dog"])
    with pytest.raises(IndexError):
        neg.sample(torch.tensor([2]), torch.Generator())


def test_d_loss_uses_the_given_mismatched_texts():
    from scadfast.models.clip import FrozenCLIP

    torch.manual_seed(0)
    clip = FrozenCLIP("scadfast-tiny", pretrained=None)
    pair = variants_build(clip)
    real = torch.rand(4, 3, clip.image_size, clip.image_size) * 2 - 1
    s, z = torch.randn(4, clip.embed_dim), torch.randn(4, pair.z_dim)
    with torch.no_grad():
        fake = pair.G(z, s)
    base = pair.d_loss(real, s, z, fake=fake)[1]
    same = pair.d_loss(real, s, z, fake=fake, s_mis=torch.roll(s, 1, 0))[1]
    other = pair.d_loss(real, s, z, fake=fake, s_mis=torch.randn(4, clip.embed_dim))[1]
    assert torch.equal(base["d_mismatch"], same["d_mismatch"])
    assert not torch.equal(base["d_mismatch"], other["d_mismatch"])
    with pytest.raises(ValueError, match="s_mis"):
        pair.d_loss(real, s, z, fake=fake, s_mis=s[:2])


def variants_build(clip):
    from scadfast import variants

    cfg = variants.get("galip", ngf=8, ndf=8, gp_weight=0.0)
    return variants.build(cfg, clip)


def test_trainer_mixes_edit_negatives_with_rolled_texts(cache, tmp_path, tiny_train):
    args = train.parse_args(["--variant", "scad", "--edit-negatives", "1", "--out", str(tmp_path / "r"),
                             *tiny_train()])
    t = train.Trainer(args)
    idx = torch.arange(8)
    s = t.text_emb[idx].clone()
    s_mis = t._mismatched(s, idx, 0)
    neg = t.negatives.sample(idx, torch.Generator().manual_seed(
        ((args.seed * 1_000_003 + t.step) * 31 + 0) * 4099 + t.dist.rank))
    for b in range(8):
        want = t.text_emb[neg[b]] if neg[b] >= 0 else torch.roll(s, 1, 0)[b]
        assert torch.equal(s_mis[b], want.to(s_mis.dtype))
    t.args.seed += 1  # another (seed, step) draws otherwise
    assert not torch.equal(t._mismatched(s, idx, 0), s_mis)
    t.cfg = t.cfg.replace(edit_negatives=0.0)
    t.negatives = None
    assert t._mismatched(s, idx, 0) is None


def test_edit_negatives_flag_is_checked(tmp_path):
    with pytest.raises(SystemExit, match="--edit-negatives must be in"):
        train.parse_args(["--variant", "scad", "--edit-negatives", "1.5"])
    with pytest.raises(SystemExit, match="do\\(es\\) not apply"):
        train.parse_args(["--variant", "ms_clip_gan", "--edit-negatives", "0.5"])
