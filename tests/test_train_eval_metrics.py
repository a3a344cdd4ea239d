"""Metrics at snapshots for COCO-style runs: ``train --eval-every N --eval-metrics fid,kid,clip_score
--eval-ref REF`` (issue 13). No weights are downloaded: a tiny random network stands in for Inception,
as in the evaluate tests."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_metrics import _TinyExtractor

from scadfast import evaluate, train
from scadfast.metrics import fid as fid_lib
from scadfast.metrics.curves import read_jsonl


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """COCO layout with a train split (8 images, one caption each: the training data) and a val split
    (6 images of mixed sizes, 2 captions each: the reference)."""
    root = tmp_path_factory.mktemp("coco")
    (root / "annotations").mkdir()
    rng = np.random.RandomState(0)
    for split, n, caps in (("train2014", 8, 1), ("val2014", 6, 2)):
        (root / split).mkdir()
        images, anns = [], []
        for i in range(n):
            w, h = (64, 64) if split == "train2014" else (40 + 8 * i, 56)
            name = f"COCO_{split}_{i:012d}.jpg"
            Image.fromarray(rng.randint(0, 256, (h, w, 3)).astype(np.uint8)).save(root / split / name)
            images.append({"id": i, "file_name": name, "width": w, "height": h})
            anns += [{"id": 10 * i + c, "image_id": i, "caption": f"{split} photo {i} view {c}"} for c in range(caps)]
        with open(root / "annotations" / f"captions_{split}.json", "w") as f:
            json.dump({"images": images, "annotations": anns}, f)
    return root


@pytest.fixture
def tiny_inception(monkeypatch):
    ext = _TinyExtractor()
    monkeypatch.setattr(fid_lib, "InceptionFeatures", lambda *a, **k: ext)
    return ext


def _coco_run(coco, tiny_train, out, *extra):
    return ["--variant", "galip", "--data", f"coco:{coco}", "--out", str(out), *tiny_train(eval_every=2),
            "--eval-ref", f"coco:{coco}", "--eval-images", "6", *extra]


def test_fid_kid_clip_score_snapshots_on_a_coco_run(coco, cache, tmp_path, tiny_train, tiny_inception, capsys):
    out = tmp_path / "run"
    assert train.main([*_coco_run(coco, tiny_train, out, "--eval-metrics", "fid,kid,clip_score"), "--steps", "2",
                       "--ckpt-every", "2"]) == 0
    err = capsys.readouterr().err
    recs = read_jsonl(str(out / "curves.jsonl"))
    assert [r["step"] for r in recs] == [0, 2]
    for r in recs:
        assert r["fid"] > 0 and np.isfinite(r["kid"]) and r["kid_std"] >= 0 and -100 <= r["clip_score"] <= 100
        assert r["n_images"] == 6 and r["n_real"] == 6 and "alignment" not in r
    assert recs[0]["fid"] != recs[1]["fid"]  # the generator changed, the prompts and noise did not
    assert "FID" in err and "KID" in err and "fid=" in err  # the snapshot line and the progress line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["fid"] == recs[-1]["fid"] and os.path.getsize(summary["curves"]) > 1000
    assert os.listdir(os.path.join(cache, "fid_stats"))  # the reference statistics, computed once and cached
    # The last snapshot is evaluate's caption protocol on the final checkpoint (same seed, N, batch size).
    stats = tmp_path / "ref.npz"
    rc = evaluate.main(["--ckpt", str(out), "--ref", f"coco:{coco}", "--metrics", "fid,kid,clip_score", "--fid-n", "6",
                        "--batch-size", "64", "--seed", "0", "--device", "cpu", "--quiet", "--cache-dir", cache,
                        "--out", str(tmp_path / "eval.json"), "--save-stats", str(stats)])
    assert rc == 0
    m = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert recs[-1]["fid"] == pytest.approx(m["fid"]["fid"], rel=1e-4)
    assert recs[-1]["kid"] == pytest.approx(m["kid"]["kid"], rel=1e-4, abs=1e-9)
    assert recs[-1]["clip_score"] == pytest.approx(m["clip_score"]["clip_score"], rel=1e-4)
    # --eval-ref-stats: the saved statistics replace the real images; the same seed gives the same snapshot.
    tiny_inception.calls = 0
    out2 = tmp_path / "run2"
    assert train.main([*_coco_run(coco, tiny_train, out2, "--eval-metrics", "fid", "--eval-ref-stats", str(stats)),
                       "--steps", "1"]) == 0
    r2 = read_jsonl(str(out2 / "curves.jsonl"))
    assert [r["step"] for r in r2] == [0, 1] and r2[0]["fid"] == pytest.approx(recs[0]["fid"], rel=1e-6)
    assert tiny_inception.calls == 2 and "kid" not in r2[0]  # generated batches only, one per snapshot


def test_missing_inception_weights_stop_before_training(coco, cache, tmp_path, tiny_train, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main([*_coco_run(coco, tiny_train, out, "--eval-metrics", "fid"), "--steps", "2"])
    msg = str(e.value)
    assert msg.startswith("error: --eval-metrics fid:") and "Inception-v3" in msg and "--inception-weights" in msg
    assert "\n" not in msg and not out.exists()


def test_mu_sigma_only_statistics_refuse_kid_at_startup(coco, cache, tmp_path, tiny_train, tiny_inception):
    plain = tmp_path / "plain.npz"
    np.savez(plain, mu=np.zeros(8), sigma=np.eye(8))
    with pytest.raises(SystemExit, match="--eval-ref-stats .* holds mu/sigma only"):
        train.main([*_coco_run(coco, tiny_train, tmp_path / "run", "--eval-metrics", "kid", "--eval-ref-stats",
                               str(plain)), "--steps", "2"])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, message", [
    (["--data", "folder:X", "--eval-every", "5"], r"--eval-every on --data folder:X needs --eval-metrics"),
    (["--eval-metrics", "fid"], r"--eval-metrics fid needs --eval-ref REF"),
    (["--eval-metrics", "fid,bogus", "--eval-ref", "coco:X"], r"--eval-metrics: unknown bogus; choose from "),
    (["--data", "coco:X", "--eval-every", "5", "--eval-metrics", "shapes"], r"shapes .* needs --data shapes"),
    (["--eval-metrics", "shapes,clip_score", "--eval-ref", "coco:X"], r"shapes already reports clip_score"),
    (["--eval-metrics", "shapes", "--eval-ref", "coco:X"], r"--eval-ref is read by fid, kid and clip_score"),
    (["--eval-metrics", "fid", "--eval-ref", "."], r"--eval-ref \.: .*not a plain image folder"),
    (["--eval-metrics", "clip_score", "--eval-ref", "coco:X", "--eval-ref-stats", "s.npz"], r"read by fid and kid"),
    (["--eval-metrics", "fid", "--eval-ref", "coco:X", "--eval-ref-stats", "nope.npz"], r"nope.npz: file not found"),
    (["--eval-every", "0", "--eval-metrics", "fid"], r"--eval-metrics take\(s\) effect only with --eval-every"),
    (["--eval-images", "1"], r"--eval-images >= 2"),
])
def test_eval_metric_flags_are_checked_in_one_line(extra, message):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--variant", "galip", *extra])
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)
    assert __import__("re").search(message, str(e.value)), str(e.value)


def test_shapes_default_is_unchanged():
    a = train.parse_args(["--variant", "scad_mi"])
    assert a.eval_every == 100 and a.eval_metrics == ["shapes"] and a.eval_ref is None
    assert train.parse_args(["--variant", "galip", "--data", "coco:X"]).eval_metrics == []  # off there
