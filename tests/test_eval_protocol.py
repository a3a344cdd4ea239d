"""Evaluation comparable with the papers: the caption protocol on a COCO-layout set whose images have
different sizes (prompts from the reference captions, the fixed resize, reference statistics as .npz
and back), KID / precision-recall / Fréchet distance against the reference implementations, zFID,
and ``sample --per-image``. No weights are downloaded: a tiny random network stands in for Inception."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluate import run_dir  # noqa: F401  (hand-built untrained GALIP checkpoint, data 'shapes')
from test_metrics import _TinyExtractor

from scadfast import evaluate, sample
from scadfast.metrics import fid as fid_lib
from scadfast.metrics.kid import kernel_inception_distance, mmd2_unbiased, precision_recall
from scadfast.metrics.reference import load_reference

# Reference numbers on the synthetic features below (_gaussian_samples), computed once with the reference
# packages in a scratch install, not a dependency: pytorch-fid 0.3.0 ``calculate_frechet_distance``
# (scipy 1.17.1 ``linalg.sqrtm`` route) and torch-fidelity 0.4.0 ``kid_features_to_metric``.
PYTORCH_FID_REFERENCE = 9.229148674942191
TORCH_FIDELITY_KID_REFERENCE = 0.7603603828820477

SIZES = [(40, 30), (64, 64), (50, 80), (96, 72), (33, 47), (80, 60), (64, 48), (72, 96)]  # (w, h)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    """COCO layout: annotations/captions_val2014.json + val2014/*.jpg, 8 images of 8 sizes, 20 captions
    (and a one-image train2014 split)."""
    root = tmp_path_factory.mktemp("coco")
    (root / "annotations").mkdir()
    (root / "val2014").mkdir()
    rng = np.random.RandomState(0)
    images, anns = [], []
    for i, (w, h) in enumerate(SIZES):
        name = f"COCO_val2014_{i:012d}.jpg"
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy + 30 * i) % 256], -1) + rng.randint(0, 20, (h, w, 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(root / "val2014" / name, quality=95)
        images.append({"id": 100 + i, "file_name": name, "width": w, "height": h})
        for c in range(2 + i % 2):
            anns.append({"id": 1000 + 10 * i + c, "image_id": 100 + i, "caption": f"photo {i}, caption {c}"})
    with open(root / "annotations" / "captions_val2014.json", "w") as f:
        json.dump({"images": images, "annotations": anns}, f)
    # A train split beside it: training's coco:ROOT picks train, the reference set must pick val.
    (root / "train2014").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "train2014" / "t.jpg")
    with open(root / "annotations" / "captions_train2014.json", "w") as f:
        json.dump({"images": [{"id": 1, "file_name": "t.jpg"}],
                   "annotations": [{"id": 1, "image_id": 1, "caption": "a train image"}]}, f)
    return root


# --- reference set: captions and the fixed resize -------------------------------------------------

def test_reference_counts_each_image_once_and_orders_captions(coco_root):
    ref = load_reference(f"coco:{coco_root}")
    assert ref.n == 8 and len(ref.captions) == 20
    order = ref.caption_order(0)
    assert sorted(order) == sorted(ref.captions) and order == ref.caption_order(0)
    assert order != ref.caption_order(1) and order != ref.captions
    folder = load_reference(str(coco_root / "val2014"))  # a raw folder: images only
    assert folder.n == 8 and folder.captions is None


def test_fixed_resize_is_pil_bicubic_of_the_whole_image(coco_root):
    ref = load_reference(f"coco:{coco_root}")
    batches = list(ref.iter_batches(3, 32))
    assert [tuple(b.shape) for b in batches] == [(3, 3, 32, 32), (3, 3, 32, 32), (2, 3, 32, 32)]
    x = torch.cat(batches)
    for i in (0, 2, 7):  # landscape, portrait, portrait of another size
        want = np.asarray(Image.open(ref.read(i)).convert("RGB").resize((32, 32), Image.BICUBIC))
        got = ((x[i] + 1) * 127.5).round().permute(1, 2, 0).to(torch.uint8).numpy()
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="--ref-size"):  # mixed sizes without a resize: one clear error
        list(ref.iter_batches(4, None))


def test_webdataset_reference_reads_members_and_keys_by_shard(tmp_path):
    import io
    import tarfile

    shard = tmp_path / "shard-00000.tar"
    with tarfile.open(shard, "w") as tf:
        for i, (w, h) in enumerate(SIZES[:3]):
            buf = io.BytesIO()
            Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(buf, format="PNG")
            for name, data in ((f"{i:05d}.png", buf.getvalue()), (f"{i:05d}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    ref = load_reference(f"wds:{shard}")
    assert ref.n == 3 and ref.captions == ["caption 0", "caption 1", "caption 2"]
    x = torch.cat(list(ref.iter_batches(2, 16)))
    assert x.shape == (3, 3, 16, 16)
    assert torch.allclose((x[2] + 1) * 127.5, torch.full_like(x[2], 80.0))
    key = ref.key("ext", 16)
    assert key == load_reference(f"wds:{shard}").key("ext", 16) and key != ref.key("ext", 32)
    os.utime(shard, ns=(1, 1))  # a rewritten shard is another reference set
    assert load_reference(f"wds:{shard}").key("ext", 16) != key


# --- the COCO protocol end to end --------------------------------------------------------------------

def _eval(run_dir, tmp_path, *extra):
    out = tmp_path / f"r{len(os.listdir(tmp_path))}.json"
    rc = evaluate.main(["--ckpt", str(run_dir), "--batch-size", "8", "--device", "cpu", "--quiet",
                        "--cache-dir", str(tmp_path / "cache"), "--out", str(out), *extra])
    return rc, (json.loads(out.read_text()) if rc == 0 else None)


def test_coco_protocol_prompts_resize_stats_round_trip(run_dir, coco_root, tmp_path, monkeypatch, capsys):  # noqa: F811
    ext = _TinyExtractor()
    monkeypatch.setattr(fid_lib, "InceptionFeatures", lambda *a, **k: ext)
    stats = tmp_path / "ref.npz"
    rc, rep = _eval(run_dir, tmp_path, "--ref", f"coco:{coco_root}", "--metrics", "fid,kid,pr,clip_score",
                    "--save-stats", str(stats))
    printed = capsys.readouterr().out
    assert rc == 0
    m = rep["metrics"]
    # One image per reference caption (20 < 30,000), in the seeded caption order.
    captions = load_reference(f"coco:{coco_root}").caption_order(0)
    assert rep["settings"]["image_prompts"]["prompts"] == captions
    assert m["clip_score"]["n_images"] == 20 and m["clip_score"]["n_prompts"] == 20
    assert m["fid"]["n_real"] == 8 and m["fid"]["n_fake"] == 20 and m["fid"]["fid"] > 0
    assert "PIL bicubic" in m["fid"]["reference"]["resize"] and "64 px" in m["fid"]["reference"]["resize"]
    assert m["kid"]["subset_size"] == 8 and m["kid"]["subsets"] == 100 and np.isfinite(m["kid"]["kid"])
    assert 0 <= m["pr"]["precision"] <= 1 and 0 <= m["pr"]["recall"] <= 1 and m["pr"]["k"] == 3
    for s in ("FID", "KID", "precision", "recall", "one image per caption", "PIL bicubic"):
        assert s in printed, s
    with np.load(stats) as z:
        assert z["mu"].shape == (8,) and z["sigma"].shape == (8, 8) and int(z["n"]) == 8
        assert z["features"].shape == (8, 8)
    # Round trip: the saved statistics replace the real images (only generated batches are extracted).
    ext.calls = 0
    rc, rep2 = _eval(run_dir, tmp_path, "--ref", f"coco:{coco_root}", "--ref-stats", str(stats),
                     "--metrics", "fid,kid,pr")
    assert rc == 0 and ext.calls == 3  # ceil(20 / 8) generated batches
    for k, v in (("fid", "fid"), ("kid", "kid"), ("pr", "precision"), ("pr", "recall")):
        assert rep2["metrics"][k][v] == pytest.approx(m[k][v], abs=1e-9), k
    # A published-style file (mu and sigma only, as DF-GAN / GALIP / pytorch-fid) serves FID, not KID.
    plain = tmp_path / "plain.npz"
    with np.load(stats) as z:
        np.savez(plain, mu=z["mu"], sigma=z["sigma"])
    rc, rep3 = _eval(run_dir, tmp_path, "--ref", f"coco:{coco_root}", "--ref-stats", str(plain), "--metrics", "fid")
    assert rc == 0 and rep3["metrics"]["fid"]["fid"] == pytest.approx(m["fid"]["fid"], abs=1e-9)
    assert rep3["metrics"]["fid"]["n_real"] is None
    capsys.readouterr()
    rc, _ = _eval(run_dir, tmp_path, "--ref", f"coco:{coco_root}", "--ref-stats", str(plain), "--metrics", "kid")
    assert rc == 2 and "mu/sigma only" in capsys.readouterr().err


def test_zfid_is_fid_on_another_set_and_refuses_the_training_set(run_dir, coco_root, tmp_path, monkeypatch,  # noqa: F811
                                                                 capsys):
    monkeypatch.setattr(fid_lib, "InceptionFeatures", lambda *a, **k: _TinyExtractor())
    rc, rep = _eval(run_dir, tmp_path, "--ref", f"coco:{coco_root}", "--metrics", "zfid", "--fid-n", "12")
    assert rc == 0 and "fid" not in rep["metrics"]
    z = rep["metrics"]["zfid"]
    assert z["label"] == "zFID" and z["n_fake"] == 12 and z["fid"] > 0
    assert rep["settings"]["image_prompts"]["n"] == 12
    # The checkpoint was trained on 'shapes': a shapes reference is the training set, so zfid refuses.
    rc, _ = _eval(run_dir, tmp_path, "--ref", "shapes:n=8,size=64", "--metrics", "zfid")
    assert rc == 2 and "plain FID" in capsys.readouterr().err
    rc, _ = _eval(run_dir, tmp_path, "--ref", f"coco:{coco_root}", "--metrics", "fid,zfid")
    assert rc == 2 and "ask for one" in capsys.readouterr().err


def test_image_metric_labels_name_the_paper_n():
    rng = np.random.RandomState(0)
    fs = fid_lib.FeatureSet(np.zeros(4), np.eye(4), 10, rng.randn(10, 4).astype(np.float32), {"source": "s"})
    fake = fid_lib.FeatureSet(np.ones(4), np.eye(4), 30_000, None)
    ext = _TinyExtractor()
    ext.dim = 4
    args = evaluate.build_parser().parse_args(["--ckpt", "x"])
    out = evaluate._image_metric_results(args, ["zfid"], fs, fake, ext)
    assert out["zfid"]["label"] == "zFID30k" and out["zfid"]["fid"] == pytest.approx(4.0)
    assert evaluate._image_metric_results(args, ["fid"], fs, fake, ext)["fid"]["label"] == "FID30k"


# --- against the reference implementations -------------------------------------------------------------

def _gaussian_samples(seed, n, d, shift):
    rng = np.random.RandomState(seed)  # legacy generator: its stream is frozen across numpy versions
    a = rng.randn(d, d) / np.sqrt(d)
    return rng.randn(n, d) @ a + shift


def test_frechet_distance_matches_torch_fidelity_and_pytorch_fid():
    x, y = _gaussian_samples(0, 500, 16, 0.0), _gaussian_samples(1, 400, 16, 0.3)
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    ours = fid_lib.frechet_distance(mu1, s1, mu2, s2)
    tf_metric = pytest.importorskip("torch_fidelity.metric_fid")
    theirs = tf_metric.fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    assert abs(ours - theirs["frechet_inception_distance"]) < 1e-6
    assert abs(ours - PYTORCH_FID_REFERENCE) < 1e-6


def test_kid_matches_torch_fidelity_and_the_documented_formula():
    fake = torch.from_numpy(_gaussian_samples(2, 300, 12, 0.2))
    real = torch.from_numpy(_gaussian_samples(3, 250, 12, 0.0))
    ours = kernel_inception_distance(fake, real, subsets=10, subset_size=100, seed=2020)
    tf_kid = pytest.importorskip("torch_fidelity.metric_kid")
    theirs = tf_kid.kid_features_to_metric(fake, real, kid_subsets=10, kid_subset_size=100, rng_seed=2020,
                                           verbose=False)
    assert abs(ours["kid"] - theirs["kernel_inception_distance_mean"]) < 1e-6
    assert abs(ours["kid_std"] - theirs["kernel_inception_distance_std"]) < 1e-6
    assert abs(ours["kid"] - TORCH_FIDELITY_KID_REFERENCE) < 1e-6
    # The unbiased estimator written out term by term on a small case.
    rng = np.random.RandomState(4)
    x, y = rng.randn(5, 3), rng.randn(5, 3) + 0.5
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    want = (sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
            - 2 * sum(k(x[i], y[j]) for i in range(5) for j in range(5)) / 25)
    assert mmd2_unbiased(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(want, rel=1e-12)
    same = kernel_inception_distance(real[:125], real[125:], subsets=5, subset_size=100)
    assert abs(same["kid"]) < 0.2 * ours["kid"]  # same distribution: near 0, far below the shifted one


def test_precision_recall_matches_torch_fidelity_and_extremes():
    fake = torch.from_numpy(_gaussian_samples(5, 200, 8, 0.4)).float()
    real = torch.from_numpy(_gaussian_samples(6, 150, 8, 0.0)).float()
    ours = precision_recall(fake, real, k=3, chunk=64)
    tf_prc = pytest.importorskip("torch_fidelity.metric_prc")
    theirs = tf_prc.prc_features_to_metric(fake, real, prc_neighborhood=3, save_cpu_ram=False, verbose=False)
    # torch-fidelity averages in float32; one sample differing would move a value by 1/200 or 1/150.
    assert ours["precision"] == pytest.approx(theirs["precision"], abs=1e-6)
    assert ours["recall"] == pytest.approx(theirs["recall"], abs=1e-6)
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1
    same = precision_recall(real, real)
    assert same["precision"] == 1 and same["recall"] == 1
    far = precision_recall(real + 100, real)
    assert far["precision"] == 0 and far["recall"] == 0
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(real[:3], real)


# --- sample --per-image -----------------------------------------------------------------------------------

def test_sample_per_image_files_match_generate(run_dir, tmp_path):  # noqa: F811
    from scadfast import runs
    from scadfast.grid import to_uint8

    out = tmp_path / "imgs"
    assert sample.main(["--ckpt", str(run_dir), "--prompt", "a red circle", "--prompt", "a green star", "-n", "2",
                        "--per-image", "--out", str(out), "--seed", "5", "--batch-size", "1", "--device", "cpu"]) == 0
    names = sorted(os.listdir(out))
    assert names == ["00000_00.png", "00000_01.png", "00001_00.png", "00001_01.png", "samples.json"]
    want = to_uint8(sample.generate(runs.load(str(run_dir), "cpu"), ["a red circle", "a green star"], 2,
                                    seed=5).flatten(0, 1))
    for k, name in enumerate(names[:4]):
        got = np.asarray(Image.open(out / name)).astype(int)
        assert np.abs(got - want[k].astype(int)).max() <= 1, name  # batching differs: rounding only
    meta = json.loads((out / "samples.json").read_text())
    assert meta["seeds"] == [5, 6] and "one file per image" in meta["layout"]
