"""The embedded shapes data set: determinism, captions, known per-prompt distribution, caching."""

import json
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from scadfast.data import shapes as S

# Chi-square critical values at p = 0.001 by degrees of freedom (scipy is not a dependency).
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 7: 24.32, 8: 26.12}


def chi2_uniform(counts, k):
    """Pearson chi-square statistic of ``counts`` (value index -> count) against uniform over k."""
    n = sum(counts.values())
    exp = n / k
    return sum((counts.get(i, 0) - exp) ** 2 / exp for i in range(k))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return S.make_shapes_dataset(root, n=240, image_size=48, seed=3)


def test_layout_and_rows(small_set):
    rows = S.load_shapes_index(small_set)
    assert len(rows) == 240
    meta = json.loads((small_set / "meta.json").read_text())
    assert meta["n"] == 240 and meta["image_size"] == 48 and meta["seed"] == 3
    for row in rows[:20]:
        with Image.open(row["file"]) as im:
            assert im.format == "JPEG" and im.size == (48, 48) and im.mode == "RGB"
        assert set(row["attrs"]) == set(S.ATTRIBUTE_NAMES)
        assert "shape" in row["mentioned"]


def test_same_seed_same_bytes_and_prefix_stability(tmp_path):
    a = S.make_shapes_dataset(tmp_path / "a", n=30, image_size=32, seed=7)
    b = S.make_shapes_dataset(tmp_path / "b", n=30, image_size=32, seed=7)
    c = S.make_shapes_dataset(tmp_path / "c", n=30, image_size=32, seed=8)
    longer = S.make_shapes_dataset(tmp_path / "d", n=45, image_size=32, seed=7)
    assert (a / "captions.jsonl").read_bytes() == (b / "captions.jsonl").read_bytes()
    ra, rb, rc = S.load_shapes_index(a), S.load_shapes_index(b), S.load_shapes_index(c)
    rl = S.load_shapes_index(longer)
    for x, y, z in zip(ra, rb, rl):
        data = open(x["file"], "rb").read()
        assert data == open(y["file"], "rb").read()
        assert data == open(z["file"], "rb").read()  # image i does not depend on n
        assert x["attrs"] == z["attrs"] and x["caption"] == z["caption"]
    assert [r["attrs"] for r in ra] != [r["attrs"] for r in rc]


def test_captions_match_attributes(small_set):
    for row in S.load_shapes_index(small_set):
        spec = S.parse_caption(row["caption"])
        assert set(spec) == set(row["mentioned"])
        assert all(row["attrs"][k] == v for k, v in spec.items())
        assert S.format_caption(row["attrs"], row["mentioned"]) == row["caption"]


def test_parse_caption_round_trip_every_prompt():
    prompts = S.prompts_with_free_attributes()
    assert len(prompts) == 12960
    assert len({p["caption"] for p in prompts}) == len(prompts)
    assert abs(sum(p["probability"] for p in prompts) - 1.0) < 1e-9
    for p in prompts:
        assert S.parse_caption(p["caption"]) == p["specified"]
        assert sorted(S.free_attributes(p["caption"])) == sorted(p["free"])


def test_parse_caption_normalises_and_rejects():
    assert S.parse_caption("  A Small  RED circle at the Top Left. ") == {
        "shape": "circle", "color": "red", "size": "small", "position": "top left"}
    assert S.parse_caption("an orange star on a noise background") == {
        "shape": "star", "color": "orange", "background": "noise"}
    assert S.parse_caption("a star on the left") == {"shape": "star", "position": "left"}
    for bad in ("a red", "a purple elephant", "a circle at the middle", "an red circle",
                "a orange circle", "red circle", ""):
        with pytest.raises(ValueError):
            S.parse_caption(bad)
    with pytest.raises(TypeError):
        S.parse_caption(None)
    with pytest.raises(ValueError, match="shape"):
        S.format_caption({"shape": "circle", "color": "red"}, ["color"])
    with pytest.raises(ValueError, match="color"):
        S.format_caption({"shape": "circle", "color": "mauve"}, ["shape", "color"])


def test_free_attributes_are_uniform_and_mentions_have_the_documented_rates():
    """Draw the generator's ground truth many times: given the mention pattern, every unmentioned
    attribute must be uniform (chi-square, p=0.001), and mentions must occur at MENTION_PROB."""
    rng = np.random.default_rng(123)
    n = 24000
    draws = [S.sample_attrs(rng) for _ in range(n)]
    for attr, p in S.MENTION_PROB.items():
        rate = sum(attr in m for _, m in draws) / n
        assert abs(rate - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-12, (attr, rate, p)
    for attr in ("color", "size", "position", "background"):
        values = S.ATTRIBUTES[attr]
        k = len(values)
        free = Counter(values.index(a[attr]) for a, m in draws if attr not in m)
        assert chi2_uniform(free, k) < CHI2_999[k - 1], (attr, free)
        # Independence of the mention decision from the value: the value distribution is the same
        # whether the attribute is mentioned or not (2 x k contingency test).
        said = Counter(values.index(a[attr]) for a, m in draws if attr in m)
        tot_f, tot_s = sum(free.values()), sum(said.values())
        stat = 0.0
        for i in range(k):
            col = free[i] + said[i]
            for obs, tot in ((free[i], tot_f), (said[i], tot_s)):
                exp = col * tot / n
                stat += (obs - exp) ** 2 / exp
        assert stat < CHI2_999[k - 1], (attr, stat)
    shapes = Counter(S.ATTRIBUTES["shape"].index(a["shape"]) for a, _ in draws)
    assert chi2_uniform(shapes, 6) < CHI2_999[5]


def test_written_set_follows_the_known_distribution(tmp_path):
    rows = S.load_shapes_index(S.make_shapes_dataset(tmp_path, n=1500, image_size=16, seed=1))
    for attr in ("color", "position"):
        values = S.ATTRIBUTES[attr]
        free = Counter(values.index(r["attrs"][attr]) for r in rows if attr not in r["mentioned"])
        assert chi2_uniform(free, len(values)) < CHI2_999[len(values) - 1]


def test_sample_prompt_attrs_respects_the_prompt():
    out = S.sample_prompt_attrs("a large blue square", 400, rng=0)
    assert all(a["shape"] == "square" and a["color"] == "blue" and a["size"] == "large" for a in out)
    pos = Counter(S.ATTRIBUTES["position"].index(a["position"]) for a in out)
    assert len(pos) == 9 and chi2_uniform(pos, 9) < CHI2_999[8]
    assert set(S.free_attributes("a large blue square")) == {"position", "background"}
    assert len(S.sample_prompts(50, seed=2)) == 50
    templates = S.caption_templates()
    assert len(templates) == 16 and abs(sum(t.probability for t in templates) - 1) < 1e-12


def _saturation_mask(img):
    img = img.astype(np.int32)
    return (img.max(axis=2) - img.min(axis=2)) > 70


@pytest.mark.parametrize("seed", [0, 1])
def test_rendered_pixels_show_the_attributes(seed):
    """Backgrounds are neutral and shapes saturated, so the saturated pixels are the shape: their
    centroid lies in the named region, their area grows with size, their colour is the named one."""
    rng = np.random.default_rng(seed)
    areas = {s: [] for s in S.ATTRIBUTES["size"]}
    for _ in range(60):
        attrs, _ = S.sample_attrs(rng)
        img = S.render(attrs, 64, rng)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        mask = _saturation_mask(img)
        assert mask.sum() > 5, attrs
        ys, xs = np.nonzero(mask)
        row, col = divmod(S.ATTRIBUTES["position"].index(attrs["position"]), 3)
        assert int(xs.mean() * 3 // 64) == col and int(ys.mean() * 3 // 64) == row, attrs
        assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any() and not mask[:, -1].any()
        mean = img[mask].astype(np.float64).mean(axis=0)
        nearest = min(S._COLOR_RGB, key=lambda c: np.sum((np.array(S._COLOR_RGB[c]) - mean) ** 2))
        assert nearest == attrs["color"], (attrs, mean)
        areas[attrs["size"]].append(mask.sum())
    assert max(areas["small"]) < min(areas["large"])
    assert np.mean(areas["small"]) < np.mean(areas["medium"]) < np.mean(areas["large"])


def test_render_canonical_and_errors():
    attrs = {"shape": "star", "color": "red", "size": "large", "position": "center",
             "background": "black"}
    a, b = S.render(attrs, 32), S.render(attrs, 32)
    assert np.array_equal(a, b)
    assert tuple(a[0, 0]) == (15, 15, 15)
    assert np.array_equal(S.render(attrs, 32, rng=5), S.render(attrs, 32, rng=5))
    circle = S.render({**attrs, "shape": "circle"}, 32)
    assert _saturation_mask(circle).sum() != _saturation_mask(a).sum()
    with pytest.raises(ValueError, match="shape"):
        S.render({**attrs, "shape": "blob"}, 32)
    with pytest.raises(ValueError, match="background"):
        S.render({k: v for k, v in attrs.items() if k != "background"}, 32)
    with pytest.raises(ValueError, match="size"):
        S.render(attrs, 4)


def test_idempotent_reuse_and_rebuild(tmp_path):
    path = S.make_shapes_dataset(tmp_path, n=12, image_size=16, seed=0)
    first = path / "images" / "000000.jpg"
    stamp = first.stat().st_mtime_ns
    os.utime(first, ns=(stamp - 10**9, stamp - 10**9))
    stamp = first.stat().st_mtime_ns
    assert S.make_shapes_dataset(tmp_path, n=12, image_size=16, seed=0) == path
    assert first.stat().st_mtime_ns == stamp  # reused, not rewritten
    # A partial set (an image gone) is rebuilt in place.
    (path / "images" / "000005.jpg").unlink()
    assert S.make_shapes_dataset(tmp_path, n=12, image_size=16, seed=0) == path
    assert (path / "images" / "000005.jpg").is_file()
    # A set whose meta was never written (interrupted build) is rebuilt too.
    (path / "meta.json").unlink()
    S.make_shapes_dataset(tmp_path, n=12, image_size=16, seed=0)
    assert (path / "meta.json").is_file() and len(S.load_shapes_index(path)) == 12
    # Different parameters live side by side; no temporary directories are left behind.
    other = S.make_shapes_dataset(tmp_path, n=13, image_size=16, seed=0)
    assert other != path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, other.name])


def test_make_shapes_dataset_validates_and_uses_cache_env(tmp_path, monkeypatch):
    for kw in ({"n": 0}, {"image_size": 4}, {"jpeg_quality": 101}, {"seed": -1}, {"n": 2.5}):
        with pytest.raises(ValueError):
            S.make_shapes_dataset(tmp_path, **{"n": 4, **kw})
    monkeypatch.setenv("SCADFAST_CACHE", str(tmp_path / "cache"))
    assert S.default_cache_dir() == tmp_path / "cache"
    p = S.make_shapes_dataset(n=3, image_size=16)
    assert p.parent == tmp_path / "cache" / "data"
    with pytest.raises(FileNotFoundError, match="captions.jsonl"):
        S.load_shapes_index(tmp_path)
