"""``bench/d_attributes.py``: which attributes a trained discriminator checks (true caption vs one-attribute edits)."""

import json

import pytest

from scadfast import train
from scadfast.data import shapes as shp


def test_edits_change_exactly_the_named_attribute(bench_module):
    da = bench_module("d_attributes")
    items, _ = da.edited_captions(200, seed=3)
    seen = set()
    for attrs, caption, edits in items:
        truth = shp.parse_caption(caption)
        assert set(edits) == set(truth)  # one edit per named attribute
        for a, e in edits.items():
            got = shp.parse_caption(e)
            assert set(got) == set(truth)
            assert [k for k in got if got[k] != truth[k]] == [a]
            seen.add(a)
    assert seen == set(shp.ATTRIBUTE_NAMES)


def test_scores_a_run_and_writes_json(cache, tmp_path, tiny_train, one_thread, bench_module):
    out = str(tmp_path / "run")
    assert train.main(["--variant", "scad", "--steps", "1", "--out", out, *tiny_train(shapes_n=16)]) == 0
    da = bench_module("d_attributes")
    js = tmp_path / "d.json"
    assert da.main([out, "--n", "12", "--out", str(js)]) == 0
    (r,) = json.loads(js.read_text())["results"]
    assert r["step"] == 1 and r["n"] == 12
    for side in ("real", "generated"):
        assert r[side]["shape"]["pairs"] == 12  # every caption names the shape
        for v in r[side].values():
            assert 0.0 <= v["accuracy"] <= 1.0 and v["pairs"] >= 1
    with pytest.raises(SystemExit):
        da.main([str(tmp_path / "missing.pt")])
