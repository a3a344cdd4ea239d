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
    rows = [ln for ln in text.splitlines() if ln.startswith("| G ngf 32, lr 0.001, Adam (0, 0.9), object weight 30 |")]
    assert [ln.split(" | ")[1] for ln in rows] == ["2"]  # only the last step: no step 400 or 1000 here
    assert "| chance |" in text and png.stat().st_size > 0
    with pytest.raises(SystemExit):
        gf.main(["--report", str(tmp_path / "missing.json")])



def test_weighted_median_minimises_the_weighted_l1_loss(bench_module):
    gf = bench_module("g_floor")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(7, 3, 2, 3)).astype(np.float32)
    w = rng.uniform(0.5, 5.0, size=(7, 3, 2)).astype(np.float32)
    m = gf.weighted_median(x, w)
    assert m.shape == (3, 2, 3)
    cand = np.arange(256, dtype=np.float32)
    loss = (w[..., None, None] * np.abs(cand - x[..., None])).sum(0)  # (3, 2, 3, 256)
    best = loss.min(-1)
    got = (w[..., None] * np.abs(m[None] - x)).sum(0)
    np.testing.assert_allclose(got, best, rtol=1e-6)
    # a heavy weight on one sample pulls the minimiser onto it
    w2 = np.ones((7, 3, 2), np.float32)
    w2[3] = 100.0
    np.testing.assert_array_equal(gf.weighted_median(x, w2), x[3])


def test_optimum_and_decoder_control_enter_the_report(bench_module, tmp_path, one_thread):
    gf = bench_module("g_floor")
    opt, dec = tmp_path / "optimum.json", tmp_path / "decoder.json"
    assert gf.main(["--optimum", "--n-eval", "6", "--renders", "3", "--out", str(opt)]) == 0
    res = json.loads(opt.read_text())
    assert set(res["accuracy"]) == {*shp.ATTRIBUTE_NAMES, "all"} and "curve" not in res
    assert res["args"] == {"object_weight": 30.0, "n_eval": 6, "renders": 3}
    assert gf.main(["--arch", "decoder", "--betas", "0.5", "0.999", "--steps", "1", "--eval-every", "1",
                    "--n-eval", "4", "--no-prefill", "--out", str(dec)]) == 0
    d = json.loads(dec.read_text())
    assert d["args"]["arch"] == "decoder" and d["args"]["betas"] == [0.5, 0.999] and d["n_params_G"] > 0
    md = gf.report_table([res, d])
    assert "| control decoder, lr 0.001, Adam (0.5, 0.999), object weight 30 | 1 |" in md
    assert "| the loss's optimum (weighted median of 3 renders, object weight 30) | – |" in md
    png = tmp_path / "curves.png"
    assert gf.main(["--report", str(opt), str(dec), "--plot", str(png)]) == 0 and png.stat().st_size > 0


def test_canonical_teacher_has_one_exact_target_per_caption(bench_module):
    gf = bench_module("g_floor")
    batches = gf.CaptionBatches(None, 64)
    batches.embed = lambda caps: torch.zeros(len(caps), 4)  # no CLIP needed to test the images
    attrs, labels = gf.draw_attrs(np.random.default_rng(5), 6)
    exact = gf.to_unit(np.stack([shp.render(a, 64, None) for a in attrs]))
    _, x, y = batches.draw(np.random.default_rng(5), 6, canonical=True)
    torch.testing.assert_close(x, exact, rtol=0, atol=0)
    assert torch.equal(y, labels)
    _, xj, yj = batches.draw(np.random.default_rng(5), 6)
    assert torch.equal(yj, labels) and not torch.equal(xj, exact)  # the default teacher jitters
    _, xe, _ = batches.draw(np.random.default_rng(5), 6, canonical=False)
    torch.testing.assert_close(xe, xj, rtol=0, atol=0)  # jittered draws depend only on the rng
    args = {"ngf": 32, "lr": 1e-3, "object_weight": 3.0, "arch": "decoder", "betas": [0.5, 0.999], "canonical": True}
    assert gf.label({"args": args}).endswith("object weight 3, canonical renders (no jitter)")


def test_onehot_code_names_each_attribute_in_its_own_block(bench_module, tmp_path, one_thread):
    gf = bench_module("g_floor")

    class StandInCLIP:  # only the width of s enters the code
        embed_dim = 40

    data = gf.CaptionBatches(StandInCLIP(), 64, onehot=True)
    attrs, labels = gf.draw_attrs(np.random.default_rng(0), 12)
    code = data.code(labels)
    assert code.shape == (12, 40) and not code[:, 31:].any()
    assert torch.equal(code.sum(1), torch.full((12,), 5 * gf.ONEHOT_SCALE))
    start = 0
    for k, a in enumerate(shp.ATTRIBUTE_NAMES):
        block = code[:, start:start + len(shp.ATTRIBUTES[a])]
        assert [shp.ATTRIBUTES[a][i] for i in block.argmax(1).tolist()] == [at[a] for at in attrs]
        assert torch.equal((block > 0).sum(1), torch.ones(12, dtype=torch.long))
        start += len(shp.ATTRIBUTES[a])
    s, x, y = data.draw(np.random.default_rng(1), 3, canonical=True)
    assert torch.equal(s, data.code(y)) and x.shape == (3, 3, 64, 64)

    out = tmp_path / "onehot.json"
    assert gf.main(["--arch", "decoder", "--cond", "onehot", "--steps", "1", "--eval-every", "1",
                    "--n-eval", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["args"]["cond"] == "onehot" and gf.label(res).endswith("one-hot attributes instead of s")


def test_image_size_and_batch_size_enter_the_run_and_its_label(bench_module, tmp_path, one_thread):
    gf = bench_module("g_floor")
    dec = gf.Decoder(10, grid=8, n_up=4)
    assert dec(torch.zeros(2, 4), torch.zeros(2, 6)).shape == (2, 3, 128, 128)
    out, opt, grid = tmp_path / "big.json", tmp_path / "opt.json", tmp_path / "big.png"
    assert gf.main(["--arch", "decoder", "--image-size", "32", "--batch-size", "2", "--steps", "1",
                    "--eval-every", "1", "--n-eval", "4", "--no-prefill", "--out", str(out), "--grid", str(grid)]) == 0
    res = json.loads(out.read_text())
    assert res["args"]["image_size"] == 32 and gf.label(res).endswith(", 32 px, batch 2")
    assert gf.main(["--optimum", "--image-size", "32", "--n-eval", "4", "--renders", "3", "--out", str(opt)]) == 0
    assert json.loads(opt.read_text())["args"]["image_size"] == 32
    assert "object weight 30, 32 px)" in gf.report_table([json.loads(opt.read_text()), res])
    for bad in ("48", "8"):
        with pytest.raises(SystemExit):
            gf.main(["--image-size", bad])
