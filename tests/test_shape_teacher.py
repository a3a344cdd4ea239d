"""``bench/shape_teacher.py``: the generator's shape read by the classifier and by its own CLIP teacher."""

import json

import pytest

from scadfast import train


def test_scores_a_run_and_writes_json(cache, tmp_path, tiny_train, one_thread, bench_module):
    out = str(tmp_path / "run")
    assert train.main(["--variant", "galip", "--steps", "1", "--out", out, *tiny_train(shapes_n=16)]) == 0
    st = bench_module("shape_teacher")
    js = tmp_path / "teacher.json"
    assert st.main([out, "--n", "3", "--out", str(js)]) == 0
    (r,) = json.loads(js.read_text())["results"]
    assert r["step"] == 1 and r["n_per_shape"] == 3 and len(r["shapes"]) == 6
    assert sum(r["classifier_predicted_histogram"]) == sum(r["clip_predicted_histogram"]) == 18
    for k in ("classifier_shape_accuracy", "clip_zero_shot_shape_accuracy", "classifier_clip_agreement"):
        assert 0.0 <= r[k] <= 1.0
    with pytest.raises(SystemExit):
        st.main([str(tmp_path / "missing.pt")])
