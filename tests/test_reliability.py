"""Issue 11: no lost run, no silent corruption, no code execution from a checkpoint.

One or more cases per item of the issue; each failed on the code before the fix. Runs are tiny (a few
steps of 16-wide networks on 48 shapes images at batch 4) so the module stays fast on a 2-core CPU.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from scadfast import checkpoint as ckpt_lib
from scadfast import evaluate, sample, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(cache, tmp_path_factory, tiny_train):
    """A finished 2-step galip run with checkpoints at steps 1 and 2."""
    out = str(tmp_path_factory.mktemp("rel") / "run")
    assert train.main(["--variant", "galip", "--steps", "2", "--ckpt-every", "1", "--out", out, *tiny_train()]) == 0
    return out


def _copy_run(run_dir, dst):
    shutil.copytree(run_dir, dst)
    return str(dst)


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


# ---- 1. the checkpoint is written before anything optional at a step boundary ------------------


def test_sample_prompts_zero_keeps_the_checkpoint(cache, tmp_path, tiny_train):
    out = str(tmp_path / "r")
    assert train.main(["--variant", "galip", "--steps", "2", "--out", out, *tiny_train(sample_prompts=0)]) == 0
    assert ckpt_lib.load(out)["step"] == 2
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["checkpoint"] == os.path.join(out, "ckpt.pt") and summary["samples"] is None


def test_failing_samples_and_tensorboard_warn_and_training_continues(cache, tmp_path, monkeypatch, capsys, tiny_train):
    from scadfast.progress import Progress

    def boom(*a, **k):
        raise RuntimeError("simulated sample failure")

    def tb_boom(*a, **k):
        raise OSError("simulated TensorBoard write failure")

    monkeypatch.setattr(train.Trainer, "write_samples", boom)
    monkeypatch.setattr(Progress, "log", tb_boom)
    out = str(tmp_path / "r")
    assert train.main(["--variant", "galip", "--steps", "3", "--ckpt-every", "1", "--out", out, *tiny_train()]) == 0
    err = capsys.readouterr().err
    assert ckpt_lib.load(out)["step"] == 3  # every checkpoint was written
    assert err.count("warning: sample grid failed at step") == 2  # steps 2 and 3
    assert "simulated sample failure" in err and "training continues" in err
    assert err.count("warning: progress/TensorBoard logging failed") == 3


# ---- 2. config values are checked like their flags ---------------------------------------------


@pytest.mark.parametrize("line, key", [
    ("steps: 2.7", "steps"), ("steps: abc", "steps"), ("precision: fp8", "precision"),
    ('resume: "no"', "resume"), ("mi_weight: lots", "mi_weight"), ("compile: 1", "compile"),
    ("batch_size: true", "batch_size"), ("data: 3", "data"), ("impl: [auto]", "impl"),
])
def test_bad_config_values_name_key_and_file(tmp_path, line, key):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(line + "\n")
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--variant", "scad_mi", "--out", str(tmp_path / "o"), "--config", str(cfg)])
    msg = str(e.value)
    assert str(cfg) in msg and repr(key) in msg and "--" + key.replace("_", "-") in msg, msg


def test_good_config_values_are_converted_like_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 5\nlr_g: 1e-4\nmi_weight: 1\nprecision: fp32\ncompile: false\nresume: false\n"
                   "image_size: null\n")
    a = train.parse_args(["--variant", "scad_mi", "--config", str(cfg)])
    assert a.steps == 5 and a.cfg.lr_g == 1e-4 and isinstance(a.cfg.mi_weight, float)
    assert a.precision == "fp32" and a.compile is False and a.resume is False and a.image_size is None


# ---- 3. one process per run directory -----------------------------------------------------------


def test_second_train_on_the_same_out_fails_at_once_naming_the_pid(train_env, tmp_path, monkeypatch, tiny_train):
    out = tmp_path / "busy"
    first = subprocess.Popen(
        [sys.executable, "-m", "scadfast.train", "--variant", "galip", "--steps", "1000", "--ckpt-every", "1000",
         "--out", str(out), *tiny_train()], env=train_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "config.json").exists() and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()[-2000:]

        def no_setup(self, args):
            raise AssertionError("the second process built the models before checking the lock")

        monkeypatch.setattr(train.Trainer, "__init__", no_setup)
        t0 = time.perf_counter()
        with pytest.raises(SystemExit) as e:
            train.main(["--variant", "galip", "--steps", "1", "--out", str(out), *tiny_train()])
        assert time.perf_counter() - t0 < 5
        assert f"pid {first.pid}" in str(e.value) and str(out) in str(e.value)
    finally:
        first.kill()
        first.wait()
    # The lock died with the process.
    from scadfast import runlock

    runlock.acquire(str(out)).release()


# ---- 4. checksums; --resume falls back to the newest intact checkpoint --------------------------


def _flip_middle(path, n=64):
    data = bytearray(open(path, "rb").read())
    m = len(data) // 2
    data[m:m + n] = bytes(b ^ 0xFF for b in data[m:m + n])
    open(path, "wb").write(bytes(data))


def test_flipped_bytes_are_refused_and_resume_uses_the_newest_intact(run_dir, tmp_path, capsys, tiny_train):
    out = _copy_run(run_dir, tmp_path / "flip")
    latest = os.path.join(out, "ckpt.pt")
    _flip_middle(latest)
    with pytest.raises(ckpt_lib.CheckpointError, match="ckpt.pt is corrupt: SHA-256 checksum mismatch"):
        ckpt_lib.load(latest)
    # sample refuses too, naming the file and the intact checkpoint beside it
    assert sample.main(["--ckpt", out, "--prompt", "a red circle", "-n", "1", "--device", "cpu",
                        "--out", str(tmp_path / "s.png")]) == 1
    err = capsys.readouterr().err
    assert "ckpt.pt is corrupt" in err and "ckpt-00000002.pt" in err
    assert not (tmp_path / "s.png").exists()
    # --resume continues from ckpt-00000002.pt (same step as the damaged ckpt.pt), saying so
    _flip_middle(os.path.join(out, "ckpt-00000001.pt"))
    assert train.main(["--variant", "galip", "--steps", "3", "--ckpt-every", "1", "--out", out, "--resume",
                       *tiny_train()]) == 0
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "resuming from" in err and "ckpt-00000002.pt (step 2)" in err
    assert ckpt_lib.load(out)["step"] == 3


def test_truncated_checkpoint_file_is_refused_with_its_size(run_dir, tmp_path):
    p = str(tmp_path / "t.pt")
    data = open(os.path.join(run_dir, "ckpt.pt"), "rb").read()
    open(p, "wb").write(data[: len(data) - 100])
    with pytest.raises(ckpt_lib.CheckpointError, match=r"t\.pt is truncated or corrupt: \d+ payload bytes"):
        ckpt_lib.load(p)


# ---- 6. no code execution from a checkpoint; safetensors export --------------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _legacy_file(state) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _container_file(state) -> bytes:
    """A version-2 file with a *valid* checksum: an attacker can compute one too."""
    payload = _legacy_file(state)
    header = json.dumps({"format": 2, "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)})
    return b"SCADFAST-CKPT\n" + header.encode() + b"\n" + payload


@pytest.mark.parametrize("make", [_legacy_file, _container_file], ids=["bare-zip", "checksummed"])
def test_pickle_payload_is_refused_without_running(run_dir, cache, tmp_path, make, capsys, tiny_train):
    marker = str(tmp_path / "PWNED")
    evil_dir = tmp_path / "evil"
    evil_dir.mkdir()
    state = ckpt_lib.load(run_dir)
    state["sample_prompts"] = _Payload(marker)
    for name in ("ckpt.pt", "ckpt-00000001.pt"):
        (evil_dir / name).write_bytes(make(state))
    with pytest.raises(ckpt_lib.CheckpointError, match="refused.*nothing in it was run"):
        ckpt_lib.load(str(evil_dir))
    assert sample.main(["--ckpt", str(evil_dir), "--prompt", "x", "-n", "1", "--device", "cpu",
                        "--out", str(tmp_path / "s.png")]) == 1
    assert evaluate.main(["--ckpt", str(evil_dir), "--metrics", "clip_score", "--device", "cpu", "--quiet",
                          "--out", str(tmp_path / "e.json")]) == 2
    assert train.main(["--variant", "galip", "--steps", "3", "--out", str(evil_dir), "--resume", *tiny_train()]) == 1
    assert "refused" in capsys.readouterr().err
    assert not os.path.exists(marker)


def test_export_safetensors_is_loaded_by_sample_and_evaluate(run_dir, cache, tmp_path):
    from safetensors.torch import load_file

    from scadfast import export, runs

    g = str(tmp_path / "G.safetensors")
    assert export.main(["--ckpt", run_dir, "--out", g]) == 0
    tensors = load_file(g)
    state = ckpt_lib.load(run_dir)
    gen = state["G_ema"]  # the embedded default keeps an EMA generator: that is what is shared and sampled
    assert gen is not None and tensors.keys() == gen.keys()
    assert all(torch.equal(tensors[k], gen[k]) for k in tensors)
    from_ckpt = sample.generate(runs.load(run_dir, "cpu"), ["a red circle"], 2, seed=1)
    from_export = sample.generate(runs.load(g, "cpu"), ["a red circle"], 2, seed=1)
    assert torch.equal(from_ckpt, from_export)
    assert sample.main(["--ckpt", g, "--prompt", "a red circle", "-n", "2", "--device", "cpu",
                        "--out", str(tmp_path / "s.png")]) == 0
    assert json.load(open(tmp_path / "s.json"))["step"] == 2
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    assert evaluate.main(["--ckpt", g, "--metrics", "clip_score", "--n-per-prompt", "2", "--prompts", str(prompts),
                          "--device", "cpu", "--quiet", "--out", str(tmp_path / "e.json")]) == 0
    assert json.load(open(tmp_path / "e.json"))["variant"] == "galip"


# ---- 7. clear one-line errors, checked before the expensive work -------------------------------


def _no_loading(monkeypatch):
    from scadfast import runs

    def fail(*a, **k):
        raise AssertionError("loaded the checkpoint before checking --out")

    monkeypatch.setattr(runs, "load", fail)
    monkeypatch.setattr(evaluate, "run", fail)


def test_out_that_cannot_be_written_fails_first(run_dir, tmp_path, monkeypatch, capsys, tiny_train):
    a_file = tmp_path / "file"
    a_file.write_text("x")

    def no_setup(self, args):
        raise AssertionError("built the models before checking --out")

    monkeypatch.setattr(train.Trainer, "__init__", no_setup)
    with pytest.raises(SystemExit, match=f"--out {a_file} is a file"):
        train.main(["--variant", "galip", "--steps", "1", "--out", str(a_file), *tiny_train()])
    with pytest.raises(SystemExit, match="cannot create the run directory"):
        train.main(["--variant", "galip", "--steps", "1", "--out", str(a_file / "run"), *tiny_train()])
    _no_loading(monkeypatch)
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", run_dir, "--prompt", "x", "--out", str(a_file / "grid.png")])
    assert "cannot write there" in capsys.readouterr().err
    assert evaluate.main(["--ckpt", run_dir, "--metrics", "clip_score", "--out", str(a_file / "r.json")]) == 2
    assert "cannot write there" in _one_line(capsys.readouterr().err)


def test_bench_out_that_cannot_be_written_fails_first(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kernels.py"), "--quick",
                        "--out", str(a_file / "k.json")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "cannot write there" in _one_line(r.stderr)
    assert time.perf_counter() - t0 < 60


def test_sample_batch_size_zero(run_dir, capsys):
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", run_dir, "--prompt", "x", "--batch-size", "0"])
    assert "--batch-size must be >= 1" in capsys.readouterr().err


def _write_jpeg(path, color=(200, 30, 30)):
    from PIL import Image

    Image.new("RGB", (32, 32), color).save(path, format="JPEG")


def _data_error(tiny_train, tmp_path, data, capsys, *extra):
    rc = train.main(["--variant", "galip", "--steps", "1", "--data", data, "--out", str(tmp_path / "o"),
                     *tiny_train(), *extra])
    return rc, _one_line(capsys.readouterr().err)


def test_data_errors_are_one_line(cache, tmp_path, capsys, tiny_train):
    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(3):
        _write_jpeg(folder / f"{i}.jpg")
    rc, err = _data_error(tiny_train, tmp_path, f"folder:{folder}", capsys)  # images without captions
    assert rc == 2 and "caption file missing" in err and "0.jpg" in err
    for i in range(3):
        (folder / f"{i}.txt").write_text("a red square")
    (folder / "1.txt").write_bytes(b"\xff\xfe bad")  # not UTF-8
    rc, err = _data_error(tiny_train, tmp_path, f"folder:{folder}", capsys)
    assert rc == 2 and "1.txt" in err and "UTF-8" in err
    (folder / "1.txt").write_text("   ")  # empty caption
    rc, err = _data_error(tiny_train, tmp_path, f"folder:{folder}", capsys)
    assert rc == 2 and "empty caption" in err and "1.txt" in err
    (folder / "1.txt").write_text("a red square")
    rc, err = _data_error(tiny_train, tmp_path, f"folder:{folder}", capsys)  # 3 images, batch 4
    assert rc == 2 and "no full batch of 4" in err and "--batch-size" in err
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "train2017").mkdir()
    (coco / "annotations" / "captions_train2017.json").write_text('{"images": [}')
    rc, err = _data_error(tiny_train, tmp_path, f"coco:{coco}", capsys)
    assert rc == 2 and "captions_train2017.json" in err and "not a valid captions file" in err


def test_truncated_webdataset_shard_is_named(cache, tmp_path, capsys, tiny_train):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tf:
        for i in range(8):
            buf = io.BytesIO()
            _write_jpeg(buf)
            for name, data in ((f"{i:04d}.jpg", buf.getvalue()), (f"{i:04d}.txt", b"a red square")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    rc, err = _data_error(tiny_train, tmp_path, f"wds:{shard}", capsys)
    assert rc == 2 and str(shard) in err and "truncated" in err


def test_resume_with_another_batch_size_is_one_line(run_dir, tmp_path, capsys, tiny_train):
    out = _copy_run(run_dir, tmp_path / "bs")
    assert train.main(["--variant", "galip", "--steps", "3", "--out", out, "--resume",
                       *tiny_train(batch_size=3)]) == 1
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "batch_size=4 in the checkpoint" in line[0] and "--batch-size" in line[0]


# ---- 8. SIGINT behaves like SIGTERM; stale temp files are removed --------------------------------


def test_sigint_checkpoints_and_exits_130_and_stale_temp_files_go(train_env, tmp_path, tiny_train):
    out = tmp_path / "int"
    out.mkdir()
    stale = [out / ".ckpt.pt.tmp-999999", out / ".ckpt-00000007.pt.tmp-4242"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    p = subprocess.Popen(
        [sys.executable, "-m", "scadfast.train", "--variant", "galip", "--steps", "1000", "--ckpt-every", "1000",
         *tiny_train(sample_every=1000), "--out", str(out)],
        env=train_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.time() + 300
    while time.time() < deadline:
        line = p.stderr.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("step 1/"):
            break
    assert p.poll() is None, "".join(lines)[-3000:]
    p.send_signal(signal.SIGINT)
    rest = p.communicate(timeout=300)[1]
    err = "".join(lines) + rest
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert not any(s.exists() for s in stale)
    assert os.path.exists(out / "ckpt.pt"), err[-3000:]
    state = ckpt_lib.load(str(out))
    assert 1 <= state["step"] < 1000
    summary = json.load(open(out / "summary.json"))
    assert summary["stopped_by"] == "SIGINT" and summary["steps"] == state["step"]
    for key in ("checkpoint", "samples"):  # the summary names no file that was not written
        assert summary[key] is None or os.path.exists(summary[key]), key
    assert summary["samples"] is None  # stopped long before the first sample grid
    assert "samples" not in [ln for ln in err.splitlines() if "done:" in ln][0]


# ---- 9. prompts longer than the CLIP context, empty prompts -------------------------------------


def test_long_and_empty_prompts_warn_once(run_dir, tmp_path, monkeypatch, capsys):
    from scadfast import runs

    monkeypatch.setattr(runs, "_warned", set())
    loaded = runs.load(run_dir, "cpu")
    limit = loaded.clip.context_length
    long_prompt = "a red circle at the top left " * 400  # ~12,000 characters
    loaded.embed([long_prompt, "a blue square"])
    err = capsys.readouterr().err
    assert f"exceed CLIP's context of {limit} tokens" in err and "number 1" in err and err.count("warning") == 1
    loaded.embed([long_prompt])  # once per process
    assert capsys.readouterr().err == ""
    loaded.embed(["a blue square", "short and fine"])
    assert capsys.readouterr().err == ""
    assert sample.main(["--ckpt", run_dir, "--prompt", "", "--prompt", "a red circle", "-n", "1",
                        "--device", "cpu", "--out", str(tmp_path / "e.png")]) == 0
    assert "1 empty prompt(s) (number 1)" in capsys.readouterr().err


# ---- 10. ops: consistent errors, fp16 spectral norm ---------------------------------------------


@pytest.mark.parametrize("impl", ["auto", "ref"])
def test_patch_hinge_zero_or_negative_weights_raise_like_san(impl):
    from scadfast.ops import patch_hinge_loss, san_d_loss

    x = torch.randn(3, 1, 4, 4)
    with pytest.raises(ValueError, match="weight must have a positive sum"):
        patch_hinge_loss(x, False, weight=torch.zeros(3, 1, 1, 1), impl=impl)
    with pytest.raises(ValueError, match="weight must be non-negative"):
        patch_hinge_loss(x, True, weight=torch.tensor([1.0, -0.5, 1.0]).view(3, 1, 1, 1), impl=impl)
    h, w = torch.randn(3, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match="positive sum"):
        san_d_loss(h, w, h, w, torch.zeros(3), impl=impl)
    with pytest.raises(ValueError, match="fake_weight must be non-negative"):
        san_d_loss(h, w, h, w, torch.tensor([1.0, -0.5, 1.0]), impl=impl)


@pytest.mark.parametrize("impl", ["auto", "ref"])
def test_cond_aug_empty_batch_raises(impl):
    from scadfast.ops import cond_aug

    with pytest.raises(ValueError, match="empty batch"):
        cond_aug(torch.randn(0, 8), torch.randn(16, 8), torch.randn(16), torch.randn(0, 4), impl=impl)


def test_cond_aug_explicit_cuda_on_cpu_tensors_raises():
    from scadfast.ops import _impl, cond_aug

    if not _impl.extension_available():
        pytest.skip("needs the compiled extension (without it impl='cuda' raises for that reason)")
    with pytest.raises(RuntimeError, match="impl='cuda' needs CUDA tensors"):
        cond_aug(torch.randn(2, 8), torch.randn(16, 8), torch.randn(16), torch.randn(2, 4), impl="cuda")


@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_spectral_norm_fp16_large_weights_computed_in_fp32(impl):
    import copy

    from torch import nn

    from scadfast.ops import _impl
    from scadfast.ops import spectral_norm

    if impl == "triton" and not _impl.triton_runs_on(torch.zeros(1)):
        pytest.skip("Triton cannot run on CPU tensors here")
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    with torch.no_grad():
        base.weight.copy_(torch.rand(8, 16) * 6e4)  # fp16 max is 65504: W v overflows in fp16
    torch.manual_seed(1)
    ref32 = spectral_norm(copy.deepcopy(base), impl="ref").weight
    torch.manual_seed(1)
    w16 = spectral_norm(copy.deepcopy(base).half(), impl=impl).weight
    assert w16.dtype == torch.float16 and torch.isfinite(w16).all() and w16.abs().max() > 0
    torch.testing.assert_close(w16.float(), ref32, rtol=2e-2, atol=2e-3)


# ---- 5. an image DALI cannot decode mid-run: named and skipped; --check-images up front ----------


def _folder_with_corrupt_jpeg(root, n=8):
    import numpy as np
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.jpg", quality=90)
        (root / f"{i}.txt").write_text(f"a red square number {i}")
    bad = root / "5.jpg"
    data = bytearray(bad.read_bytes())
    data[20:-2] = rng.integers(0, 256, len(data) - 22, dtype=np.uint8).tobytes()  # header and EOI intact
    bad.write_bytes(bytes(data))
    return str(bad)


def test_undecodable_jpeg_mid_run_is_named_and_skipped(cache, tmp_path):
    from scadfast.data import DataWarning, make_loader
    from scadfast.data.sources import check_image_bytes

    bad = _folder_with_corrupt_jpeg(tmp_path / "f")
    data = open(bad, "rb").read()
    assert check_image_bytes(data[:16], data[-64:], len(data)) is None  # passes the indexing check
    loader = make_loader(f"folder:{tmp_path / 'f'}", image_size=32, batch_size=2, shuffle=False)
    seen = []
    with pytest.warns(DataWarning, match=r"skipped 1 image\(s\) that cannot be decoded: .*5\.jpg"):
        for _, idx in loader:
            seen += idx.tolist()
    assert len(seen) == 8 and 5 not in seen  # static batch count; the slot is refilled
    assert loader.state_dict()["skipped"] == [5]
    # The skipped set is part of the position: a resumed loader reads the same order, with no error.
    again = make_loader(f"folder:{tmp_path / 'f'}", image_size=32, batch_size=2, shuffle=False)
    again.load_state_dict(loader.state_dict())
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")
        assert [i for _, idx in again for i in idx.tolist()] == seen


def test_training_survives_an_undecodable_jpeg(cache, tmp_path, recwarn, tiny_train):
    _folder_with_corrupt_jpeg(tmp_path / "f")
    out = str(tmp_path / "r")
    assert train.main(["--variant", "galip", "--steps", "3", "--data", f"folder:{tmp_path / 'f'}",
                       "--out", out, *tiny_train()]) == 0
    assert any("5.jpg" in str(w.message) and "cannot be decoded" in str(w.message) for w in recwarn.list)
    assert ckpt_lib.load(out)["data_position"]["skipped"]


def test_unidentified_decode_error_stops_cleanly_naming_the_files(cache, tmp_path, monkeypatch, capsys, tiny_train):
    from scadfast.data import dali

    monkeypatch.setattr(dali, "_pil_decode_error", lambda data: None)  # Pillow "reads" everything
    _folder_with_corrupt_jpeg(tmp_path / "f")
    rc = train.main(["--variant", "galip", "--steps", "3", "--data", f"folder:{tmp_path / 'f'}",
                     "--out", str(tmp_path / "r"), *tiny_train()])
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(line) == 1 and "DALI failed to decode" in line[0] and ".jpg" in line[0]
    assert "Traceback" not in err


def test_check_images_skips_up_front_and_caches_verified_files(cache, tmp_path):
    from scadfast.data import DataWarning, load_records
    from scadfast.data import sources

    _folder_with_corrupt_jpeg(tmp_path / "f")
    with pytest.warns(DataWarning, match=r"skipped 1 .*5\.jpg"):
        recs = load_records(f"folder:{tmp_path / 'f'}", check_images="decode")
    assert len(recs) == 7
    verified = json.load(open(os.path.join(cache, "verified-images.json")))
    assert len([k for k in verified if k.startswith(str(tmp_path / "f"))]) == 7
    calls = []
    real = sources._pil_decode_error
    sources_mod_fn = lambda data: calls.append(1) or real(data)  # noqa: E731
    import unittest.mock

    with unittest.mock.patch.object(sources, "_pil_decode_error", sources_mod_fn):
        with pytest.warns(DataWarning):
            assert len(load_records(f"folder:{tmp_path / 'f'}", check_images="decode")) == 7
    assert len(calls) == 1  # only the bad file is decoded again
    a = train.parse_args(["--variant", "galip", "--check-images"])
    assert a.check_images is True


def test_version_1_checkpoints_still_load(run_dir, tmp_path):
    """A checkpoint of the previous format (a bare torch.save zip, numpy RNG state as an array)."""
    import numpy as np

    state = ckpt_lib.load(run_dir)
    state["format_version"] = 1
    state["rng"]["numpy"] = np.random.get_state()
    p = tmp_path / "old.pt"
    p.write_bytes(_legacy_file(state))
    old = ckpt_lib.load(str(p))
    assert old["step"] == 2 and old["rng"]["numpy"][0] == "MT19937"
    ckpt_lib.set_rng_state(old["rng"])
