"""``bench/clip_probe.py``: linear probes of what the frozen CLIP tells D and G about each attribute."""

import importlib.util
import json
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("clip_probe", os.path.join(ROOT, "bench", "clip_probe.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_probe_separates_separable_labels_and_not_random_ones():
    cp = _load()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=g)
    y = (x[:, :3].argmax(1))  # a linear function of the features
    assert cp.probe_accuracy(x, y, 400) > 0.9
    y_rand = torch.randint(0, 3, (600,), generator=g)  # independent of the features
    assert cp.probe_accuracy(x, y_rand, 400) < 0.5


def test_tiny_run_writes_json(tmp_path):
    cp = _load()
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
