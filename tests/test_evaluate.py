"""``python -m scadfast.evaluate`` end to end on a checkpoint built in the test.

The checkpoint is assembled by hand in the format of ``scadfast.train.Trainer.state_dict`` +
``scadfast.checkpoint.save`` (an untrained GALIP pair around the shipped shapes CLIP), so this test
does not depend on running the training engine.
"""

import json

import pytest
import torch

from scadfast import checkpoint as ckpt_lib
from scadfast import evaluate, variants


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from scadfast.models.clip import FrozenCLIP, shipped_weights_path

    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    cfg = variants.get("galip")
    clip = FrozenCLIP("scadfast-tiny", pretrained=shipped_weights_path())
    pair = variants.build(cfg, clip, img_size=64)
    state = {"variant": "galip", "cfg": cfg.__dict__.copy(), "clip": {"name": "scadfast-tiny", "pretrained": "shapes"},
             "image_size": 64, "data": "shapes", "G": pair.G.state_dict(), "D": pair.D.state_dict()}
    ckpt_lib.save(str(d), state, step=1)
    return d


def test_evaluate_cli_end_to_end(run_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na small blue square at the top left\n\n")
    out = tmp_path / "report.json"
    rc = evaluate.main(["--ckpt", str(run_dir), "--metrics", "clip_score,ppd,shapes", "--n-per-prompt", "6",
                        "--prompts", str(prompts), "--batch-size", "4", "--device", "cpu", "--quiet",
                        "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    rep = json.loads(out.read_text())
    m = rep["metrics"]
    assert rep["step"] == 1 and rep["variant"] == "galip"
    assert rep["settings"]["prompts"] == ["a red circle", "a small blue square at the top left"]
    assert m["clip_score"]["n_images"] == 12 and -100 <= m["clip_score"]["clip_score"] <= 100
    assert m["ppd"]["n_per_prompt"] == 6 and m["ppd"]["distance"] == "cosine" and m["ppd"]["fallback_backbone"]
    assert m["ppd"]["mppd"] >= 0
    assert 0 <= m["shapes"]["alignment"] <= 1 and 0 <= m["shapes"]["coverage"] <= 1
    assert m["shapes"]["n_per_prompt"] == 6
    # The readable report names each metric, its extractor/settings and N.
    for s in ("CLIP score", "training CLIP scadfast-tiny:shapes", "mPPD", "FALLBACK", "distance cosine", "N 6",
              "shapes alignment", "shapes coverage"):
        assert s in printed, s


def test_evaluate_fid_stops_without_standard_weights(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    rc = evaluate.main(["--ckpt", str(run_dir), "--metrics", "fid", "--device", "cpu", "--quiet",
                        "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "Inception-v3" in err and "--inception-weights" in err
    assert not (tmp_path / "r.json").exists()


def test_evaluate_rejects_bad_arguments(run_dir, tmp_path, capsys):
    assert evaluate.main(["--ckpt", str(run_dir), "--metrics", "fid,bogus", "--device", "cpu"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert evaluate.main(["--ckpt", str(tmp_path / "missing"), "--metrics", "clip_score", "--device", "cpu"]) == 2
    assert "not found" in capsys.readouterr().err
