"""``bench/clip_probe.py``: linear probes of what the frozen CLIP tells D and G about each attribute."""

import json

import pytest
import torch

@pytest.fixture(scope="module")
def cp(bench_module):
    return bench_module("clip_probe")


def test_probe_separates_separable_labels_and_not_random_ones(cp):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=g)
    y = (x[:, :3].argmax(1))  # a linear function of the features
    assert cp.probe_accuracy(x, y, 400) > 0.9
    y_rand = torch.randint(0, 3, (600,), generator=g)  # independent of the features
    assert cp.probe_accuracy(x, y_rand, 400) < 0.5


def test_tiny_run_writes_json(cp, tmp_path):
    out = tmp_path / "probe.json"
    assert cp.main(["--n", "60", "--fit", "40", "--iters", "25", "--data-root", str(tmp_path / "data"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["schema"] == cp.SCHEMA and res["feature_blocks"] == [0, 2, 4]
    acc = res["probe_heldout_accuracy"]
    assert set(acc) == set(cp.VIEWS)
    for view in acc.values():
        assert set(view) == {"shape", "color", "size", "position", "background"}
        assert all(0.0 <= v <= 1.0 for v in view.values())
    # The shipped weights read the background off the pooled embedding even from 40 examples.
    assert acc["pooled"]["background"] > 0.6
    assert res["zero_shot"]["num_images"] == 20


def test_all_blocks_adds_one_position_invariant_view_per_block(cp, tmp_path):
    out = tmp_path / "probe.json"
    assert cp.main(["--n", "60", "--fit", "40", "--iters", "10", "--all-blocks", "--data-root", str(tmp_path / "data"),
                    "--out", str(out)]) == 0
    acc = json.loads(out.read_text())["probe_heldout_accuracy"]
    assert set(acc) == set(cp.VIEWS) | {f"block{i}" for i in range(6)}  # scadfast-tiny has 6 vision blocks


def test_encode_blocks_is_mean_and_max_of_each_block_and_restores_feature_blocks(cp):
    from scadfast.models.clip import TINY_NAME, FrozenCLIP

    clip = FrozenCLIP(TINY_NAME, pretrained="shapes")
    imgs = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    views = cp.encode_blocks(clip, imgs)
    assert clip.feature_blocks == (0, 2, 4)
    feats, _ = clip.image_features(imgs.float() / 127.5 - 1.0)  # D's blocks 0, 2, 4
    b2 = feats[:, 1].float()
    assert torch.allclose(views["block2"], torch.cat([b2.mean(dim=(2, 3)), b2.amax(dim=(2, 3))], 1), atol=1e-5)


class _AdditiveText:
    """A stand-in CLIP whose sentence embedding is a sum of one vector per attribute value:
    ``scale[a]`` times a one-hot of the value, in a block of its own per attribute."""

    def __init__(self, scale):
        import itertools

        from scadfast.data import shapes as shp

        names = shp.ATTRIBUTE_NAMES
        widths = [len(shp.ATTRIBUTES[a]) for a in names]
        self.table = {}
        for combo in itertools.product(*(shp.ATTRIBUTES[a] for a in names)):
            e = torch.zeros(sum(widths))
            off = 0
            for a, v, w in zip(names, combo, widths):
                e[off + shp.ATTRIBUTES[a].index(v)] = scale[a]
                off += w
            self.table[shp.format_caption(dict(zip(names, combo)), names)] = e

    def tokenize(self, captions):
        return captions

    def encode_text(self, captions):
        return torch.stack([self.table[c] for c in captions])


def test_text_separation_gives_each_attribute_its_share_of_the_embedding(cp):
    only_shape = cp.text_separation(_AdditiveText({"shape": 3.0, "color": 0.0, "size": 0.0,
                                                   "position": 0.0, "background": 0.0}))
    assert only_shape["n_captions"] == 6 * 8 * 3 * 9 * 5
    shares = {a: v["share"] for a, v in only_shape["attributes"].items()}
    assert shares["shape"] == pytest.approx(1.0) and all(shares[a] == 0.0 for a in shares if a != "shape")
    # two one-hot class means at 3·(e_i − e_j) apart: distance 3·√2
    assert only_shape["attributes"]["shape"]["mean_distance"] == pytest.approx(3 * 2 ** 0.5, abs=1e-3)
    # Additive and balanced: the shares sum to one; an attribute's share grows with its scale.
    even = cp.text_separation(_AdditiveText({a: 1.0 for a in shares}))
    assert sum(v["share"] for v in even["attributes"].values()) == pytest.approx(1.0, abs=1e-3)
    louder = cp.text_separation(_AdditiveText({**{a: 1.0 for a in shares}, "shape": 2.0}))
    assert louder["attributes"]["shape"]["share"] > even["attributes"]["shape"]["share"]
