"""``bench/g_floor.py``: the generator's learning speed under a direct pixel teacher."""

import json

import numpy as np
import pytest
import torch

from scadfast.data import shapes as shp


def test_object_mask_finds_the_object_and_not_the_background(bench_module):
    gf = bench_module("g_floor")
    for bg in shp.ATTRIBUTES["background"]:
        attrs = {"shape": "square", "color": "cyan", "size": "large", "position": "center", "background": bg}
        img = torch.from_numpy(shp.render(attrs, 64, np.random.default_rng(0))).float().permute(2, 0, 1) / 127.5 - 1
        mask = gf.object_mask(img[None])[0, 0]
        assert not mask[:8].any() and not mask[:, :8].any(), bg  # corners/edges are background
        # the square's side is 2 * 0.78 * 0.14 * 64 ≈ 14 px (±8 % jitter)
        assert 150 <= int(mask.sum()) <= 260, (bg, int(mask.sum()))
        assert mask[32, 32]


def test_short_run_writes_the_curve(bench_module, tmp_path, one_thread):
    gf = bench_module("g_floor")
    out, grid = tmp_path / "floor.json", tmp_path / "floor.png"
    assert gf.main(["--steps", "2", "--eval-every", "1", "--n-eval", "8", "--out", str(out),
                    "--grid", str(grid), "--no-prefill"]) == 0
    res = json.loads(out.read_text())
    assert [r["step"] for r in res["curve"]] == [0, 1, 2]
    for r in res["curve"]:
        assert set(r) == {"step", "train_seconds", *shp.ATTRIBUTE_NAMES, "all"}
        assert all(0.0 <= r[a] <= 1.0 for a in (*shp.ATTRIBUTE_NAMES, "all"))
    assert res["args"]["lr"] == 1e-3 and res["n_params_G"] > 0 and grid.stat().st_size > 0
    with pytest.raises(SystemExit):
        gf.main(["--steps", "0"])

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- g-floor:begin -->\nold\n<!-- g-floor:end -->\nrest\n")
    png = tmp_path / "curves.png"
    assert gf.main(["--report", str(out), "--readme", str(readme), "--plot", str(png)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    rows = [ln for ln in text.splitlines() if ln.startswith("| lr 0.001, ngf 32, object weight 30 |")]
    assert [ln.split(" | ")[1] for ln in rows] == ["2"]  # only the last step: no step 400 or 1000 here
    assert "| chance |" in text and png.stat().st_size > 0
    with pytest.raises(SystemExit):
        gf.main(["--report", str(tmp_path / "missing.json")])

