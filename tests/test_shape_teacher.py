"""``bench/shape_teacher.py``: the generator's shape read by the classifier and by its own CLIP teacher."""

import importlib.util
import json
import os

import pytest

from scadfast import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("shape_teacher", os.path.join(ROOT, "bench", "shape_teacher.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scores_a_run_and_writes_json(cache, tmp_path, tiny_train, one_thread):
    out = str(tmp_path / "run")
    assert train.main(["--variant", "galip", "--steps", "1", "--out", out, *tiny_train(shapes_n=16)]) == 0
    st = _load()
    js = tmp_path / "teacher.json"
    assert st.main([out, "--n", "3", "--out", str(js)]) == 0
    (r,) = json.loads(js.read_text())["results"]
    assert r["step"] == 1 and r["n_per_shape"] == 3 and len(r["shapes"]) == 6
    assert sum(r["classifier_predicted_histogram"]) == sum(r["clip_predicted_histogram"]) == 18
    for k in ("classifier_shape_accuracy", "clip_zero_shot_shape_accuracy", "classifier_clip_agreement"):
        assert 0.0 <= r[k] <= 1.0
    with pytest.raises(SystemExit):
        st.main([str(tmp_path / "missing.pt")])
