"""The training engine end to end on CPU: every variant, exact resume after SIGKILL, DDP with gloo,
and the bad-input cases (each must fail with a message naming the problem and lose nothing)."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from scadfast import checkpoint as ckpt_lib
from scadfast import train, variants

# Learning-curve snapshots at a tiny size (2 held-out prompts × 2 images).
EVAL = ["--eval-every", "2", "--eval-prompts", "2", "--eval-n", "2"]


def _run(args, env, **kw):
    return subprocess.run([sys.executable, "-m", "scadfast.train", *args], env=env,
                          capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.parametrize("variant", variants.names())
def test_every_variant_trains_and_leaves_artifacts(variant, cache, tmp_path, tiny_train):
    out = str(tmp_path / "run")
    rc = train.main(["--variant", variant, "--steps", "2", "--out", out, "--ckpt-every", "2", *tiny_train()])
    assert rc == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["steps"] == 2 and summary["variant"] == variant
    assert summary["threads"] == torch.get_num_threads()  # a CPU run's trajectory depends on it
    losses = {k: summary.get(k) for k in ("d_loss", "g_loss")}  # a missing key is a failure, not a pass
    assert all(isinstance(v, float) and math.isfinite(v) for v in losses.values()), losses
    assert os.path.getsize(os.path.join(out, "samples", "latest.png")) > 100
    assert os.path.exists(os.path.join(out, "ckpt.pt")) and ckpt_lib.list_numbered(out)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tb")))
    state = ckpt_lib.load(out)
    assert state["step"] == 2 and state["variant"] == variant


def _params(path):
    s = ckpt_lib.load(path)
    return s["G"], s["D"], s["G_ema"], s["opt_g"]["state"], s["opt_d"]["state"]


def _assert_bitwise_equal(a, b, what=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _assert_bitwise_equal(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise_equal(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{what} differs"
    else:
        assert a == b, what


def test_resume_after_sigkill_is_bitwise_identical(train_env, tmp_path, tiny_train):
    steps = ["--steps", "10", "--ckpt-every", "2", "--keep-ckpts", "10"]
    # Lazy GP (its counter must resume), the EMA generator, learning-curve snapshots (which must not
    # touch the training RNG) and edit negatives (drawn per step) are all on.
    base = ["--variant", "scad_mi", "--seed", "3", "--gp-every", "3", *tiny_train(), *EVAL, "--ema-kimg", "1",
            "--edit-negatives", "0.5"]
    a = _run([*base, *steps, "--out", str(tmp_path / "a")], train_env)
    assert a.returncode == 0, a.stderr[-3000:]

    out_b = tmp_path / "b"
    p = subprocess.Popen([sys.executable, "-m", "scadfast.train", *base, *steps, "--out", str(out_b)],
                         env=train_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out_b / "ckpt-00000002.pt").exists() and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed; the test proves nothing"
    done = [ckpt_lib.load(c)["step"] for c in ckpt_lib.list_numbered(str(out_b))]
    assert done and max(done) < 10
    r = _run([*base, *steps, "--out", str(out_b), "--resume"], train_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    _assert_bitwise_equal(_params(str(tmp_path / "a")), _params(str(out_b)), "state")


def test_ddp_two_cpu_ranks_stay_in_sync_and_checkpoint_loads_single_process(train_env, tmp_path, tiny_train):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "scadfast.train", "--variant", "scad", "--steps", "3", "--ckpt-every", "3", "--out", out,
           *tiny_train()]
    r = subprocess.run(cmd, env=train_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    state = ckpt_lib.load(out)
    assert state["world_size"] == 2 and state["step"] == 3
    assert state["images_seen"] == 3 * 4 * 2
    # The single-process run continues the DDP checkpoint.
    rc = train.main(["--variant", "scad", "--steps", "4", "--ckpt-every", "4", "--out", out, "--resume",
                     *tiny_train()])
    assert rc == 0 and ckpt_lib.load(out)["step"] == 4


def test_eval_every_writes_learning_curve_and_does_not_change_training(cache, tmp_path, tiny_train):
    from scadfast.metrics.curves import read_jsonl

    common = ["--variant", "scad", "--steps", "4", "--ckpt-every", "4", "--ema-kimg", "1", *tiny_train()]
    a, b = str(tmp_path / "with_eval"), str(tmp_path / "without")
    assert train.main([*common, "--out", a, *EVAL]) == 0
    assert train.main([*common, "--out", b]) == 0
    recs = read_jsonl(os.path.join(a, "curves.jsonl"))
    assert [r["step"] for r in recs] == [0, 2, 4]  # initialisation, every 2 steps, the end
    for r in recs:
        for k in ("alignment", "coverage", "coverage_ideal", "mppd", "clip_score", "images_seen"):
            assert isinstance(r[k], (int, float)) and r[k] == r[k], k
        assert 0.0 <= r["alignment"] <= 1.0 and 0.0 <= r["coverage"] <= 1.0
        assert set(r["alignment_per_attribute"]) <= {"shape", "color", "size", "position", "background"}
        assert "shape" in r["alignment_per_attribute"]  # every shapes caption names the shape
        assert r["n_prompts"] == 2 and r["n_per_prompt"] == 2
        assert set(r) == {"step", "images_seen", "alignment", "alignment_per_attribute", "coverage", "coverage_ideal",
                          "coverage_per_attribute", "mppd", "mppd_backbone", "clip_score", "n_prompts",
                          "n_per_prompt", "eval_seconds"}  # the shapes default record, nothing added
    assert os.path.getsize(os.path.join(a, "curves.png")) > 1000
    summary = json.load(open(os.path.join(a, "summary.json")))
    assert summary["eval"]["step"] == 4 and summary["eval"]["alignment"] == recs[-1]["alignment"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(a, "tb")))
    assert not os.path.exists(os.path.join(b, "curves.jsonl"))
    # Evaluation never feeds training: both runs end bitwise identical.
    _assert_bitwise_equal(_params(a), _params(b), "state")


def test_memory_loader_trains_the_dali_run_and_resumes_across_loaders(cache, tmp_path, tiny_train):
    """``--loader memory`` hands out DALI's batches bit for bit on the shapes set (same order, same
    pixels, same normalisation arithmetic), so the run is the DALI run; and a checkpoint of one
    loader resumes with the other at the same position."""
    pytest.importorskip("nvidia.dali")
    common = ["--variant", "scad", "--ckpt-every", "2", "--ema-kimg", "1", *tiny_train()]
    a, b = str(tmp_path / "dali"), str(tmp_path / "memory")
    assert train.main([*common, "--steps", "4", "--out", a]) == 0
    assert train.main([*common, "--steps", "2", "--out", b, "--loader", "memory"]) == 0
    assert train.main([*common, "--steps", "4", "--out", b, "--resume"]) == 0  # the default loader, DALI
    _assert_bitwise_equal(_params(a), _params(b), "state")


def test_eval_prompts_are_held_out():
    from scadfast.data.shapes import free_attributes, sample_prompts
    from scadfast.metrics.curves import heldout_prompts

    train_caps = sample_prompts(2000, seed=0)
    held = heldout_prompts(16, exclude=train_caps)
    assert len(set(held)) == 16 and not set(held) & set(train_caps)
    assert all(free_attributes(p) for p in held)
    assert held == heldout_prompts(16, exclude=train_caps)  # deterministic


def test_eval_every_needs_shapes_data(tmp_path):
    with pytest.raises(SystemExit, match="--eval-every"):
        train.parse_args(["--variant", "galip", "--data", f"folder:{tmp_path}", "--eval-every", "5"])
    assert train.parse_args(["--variant", "galip", "--data", f"folder:{tmp_path}"]).eval_every == 0  # default off there


# ---- bad input ------------------------------------------------------------------------------


def test_unknown_variant_and_inapplicable_flags():
    with pytest.raises(SystemExit):
        train.parse_args(["--variant", "stylegan"])
    with pytest.raises(SystemExit, match="--mi-weight"):
        train.parse_args(["--variant", "ms_clip_gan", "--mi-weight", "1"])
    with pytest.raises(SystemExit, match="--kl-weight"):
        train.parse_args(["--variant", "scad", "--kl-weight", "1"])
    with pytest.raises(SystemExit, match="--steps must be positive"):
        train.parse_args(["--variant", "scad", "--steps", "0"])


def test_config_file_and_flag_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 7\nbatch_size: 3\nmi_weight: 0.25\n")
    a = train.parse_args(["--variant", "scad_mi", "--config", str(cfg), "--steps", "9"])
    assert a.steps == 9 and a.batch_size == 3 and a.cfg.mi_weight == 0.25
    cfg.write_text("stepz: 7\n")
    with pytest.raises(SystemExit, match="unknown key 'stepz'"):
        train.parse_args(["--variant", "scad_mi", "--config", str(cfg)])
    with pytest.raises(SystemExit, match="file not found"):
        train.parse_args(["--variant", "scad_mi", "--config", str(tmp_path / "nope.yaml")])


def test_missing_and_empty_data_paths(cache, tmp_path, capsys, tiny_train):
    # One line naming the problem and a non-zero exit (issue 11 item 7: before, a traceback).
    assert train.main(["--variant", "galip", "--data", f"folder:{tmp_path / 'nothing'}", "--out",
                       str(tmp_path / "r"), *tiny_train()]) == 2
    err = capsys.readouterr().err.strip()
    assert str(tmp_path / "nothing") in err and len(err.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert train.main(["--variant", "galip", "--data", f"folder:{tmp_path / 'empty'}", "--out",
                       str(tmp_path / "r2"), *tiny_train()]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search("empty|no images", err) and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def galip_run(cache, tmp_path_factory, tiny_train):
    out = str(tmp_path_factory.mktemp("galip") / "run")
    assert train.main(["--variant", "galip", "--steps", "2", "--ckpt-every", "1", "--out", out,
                       *tiny_train()]) == 0
    return out


def test_checkpoint_from_another_variant_is_refused(galip_run, capsys, tiny_train):
    rc = train.main(["--variant", "scad", "--steps", "3", "--out", galip_run, "--resume", *tiny_train()])
    assert rc == 1
    assert "variant 'galip'" in capsys.readouterr().err


def test_truncated_checkpoint_is_named(galip_run, tmp_path, capsys, tiny_train):
    import shutil

    out = str(tmp_path / "trunc")
    shutil.copytree(galip_run, out)
    path = os.path.join(out, "ckpt.pt")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    # The damaged ckpt.pt is named, and --resume falls back to the newest intact numbered checkpoint
    # (issue 11 item 4: before, the run was refused with no fallback).
    for numbered in ckpt_lib.list_numbered(out)[:-1]:
        os.remove(numbered)
    rc = train.main(["--variant", "galip", "--steps", "3", "--out", out, "--resume", *tiny_train()])
    assert rc == 0
    err = capsys.readouterr().err
    assert "ckpt.pt is truncated or corrupt" in err and "resuming from" in err and "ckpt-00000002.pt" in err
    # With no intact checkpoint left the run is refused, naming the file.
    for p in [path] + ckpt_lib.list_numbered(out):
        data = open(p, "rb").read()
        open(p, "wb").write(data[: len(data) // 2])
    rc = train.main(["--variant", "galip", "--steps", "4", "--out", out, "--resume", *tiny_train()])
    assert rc == 1
    err = capsys.readouterr().err
    assert "ckpt.pt" in err and "truncated or corrupt" in err and "no intact numbered checkpoint" in err


def test_existing_run_without_resume_is_refused(galip_run, tiny_train):
    with pytest.raises(SystemExit, match="--resume"):
        train.main(["--variant", "galip", "--steps", "3", "--out", galip_run, *tiny_train()])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(cache, tmp_path, monkeypatch, capsys, tiny_train):
    out = str(tmp_path / "nan")
    real_step = train.Trainer.train_step

    def poisoned(self, batches):
        stats = real_step(self, batches)
        if self.step >= 2:  # the step about to become step 3
            stats["d_loss"] = torch.tensor(float("nan"))
        return stats

    monkeypatch.setattr(train.Trainer, "train_step", poisoned)
    rc = train.main(["--variant", "galip", "--steps", "5", "--ckpt-every", "1", "--out", out, *tiny_train()])
    assert rc == 1
    assert "non-finite loss at step 3" in capsys.readouterr().err
    assert ckpt_lib.load(out)["step"] == 2


class _FullDisk:
    """A file opened for writing whose ``write`` stores half the data, then fails as a full disk does."""

    def __init__(self, f, failed):
        self.f, self.failed = f, failed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.failed.append(self.f.name)
        raise OSError(errno.ENOSPC, "No space left on device")


def _fill_disk(monkeypatch, prefix=""):
    """Make every file that scadfast.checkpoint opens for writing under a name starting with ``prefix`` hit a
    full disk; returns the list the failed files' names are appended to."""
    real_open, failed = open, []

    def opener(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return _FullDisk(f, failed) if "w" in mode and os.path.basename(str(path)).startswith(prefix) else f

    monkeypatch.setattr(ckpt_lib, "open", opener, raising=False)  # the module's open, not the builtin
    return failed


def test_disk_full_while_checkpointing_keeps_previous(cache, tmp_path, monkeypatch, capsys, tiny_train):
    # The disk fills up while the step-2 checkpoint is written: the real atomic_write_bytes runs, only the
    # write of its temp file fails.
    out = str(tmp_path / "full")
    failed = _fill_disk(monkeypatch, ".ckpt-00000002.pt.tmp")
    rc = train.main(["--variant", "galip", "--steps", "3", "--ckpt-every", "1", "--out", out, *tiny_train()])
    monkeypatch.undo()
    assert rc == 1 and len(failed) == 1
    err = capsys.readouterr().err
    assert f"no space left on device while writing {os.path.join(out, 'ckpt-00000002.pt')}" in err, err
    # The step-1 checkpoint survives as both files, loads, and no partial file is left behind.
    assert ckpt_lib.load(out)["step"] == 1
    assert [os.path.basename(p) for p in ckpt_lib.list_numbered(out)] == ["ckpt-00000001.pt"]
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_atomic_write_enospc_removes_temp_and_keeps_old(tmp_path, monkeypatch):
    target = tmp_path / "f.pt"
    target.write_bytes(b"old")
    failed = _fill_disk(monkeypatch)
    with pytest.raises(ckpt_lib.CheckpointError, match="no space left"):
        ckpt_lib.atomic_write_bytes(str(target), b"new")
    monkeypatch.undo()
    assert len(failed) == 1
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["f.pt"]


def test_init_from_starts_a_new_run_from_another_runs_weights(galip_run, tmp_path, tiny_train):
    from scadfast import checkpoint as ckpt_lib

    src = ckpt_lib.load(galip_run)
    trainer = train.Trainer(train.parse_args(["--variant", "galip", "--out", str(tmp_path / "x"),
                                              "--init-from", galip_run, *tiny_train()]))
    trainer.init_from(galip_run)
    for key, net in (("G", trainer.pair.G), ("D", trainer.pair.D), ("G_ema", trainer.g_ema)):
        _assert_bitwise_equal(net.state_dict(), src[key], key)
    assert trainer.step == 0 and trainer.images_seen == 0 and not trainer.opt_g.state  # a new run

    out = str(tmp_path / "ft")
    assert train.main(["--variant", "galip", "--steps", "1", "--out", out, "--init-from", galip_run,
                       *tiny_train()]) == 0
    state = ckpt_lib.load(out)
    assert state["step"] == 1 and all(v["step"].item() == 1 for v in state["opt_g"]["state"].values())
    assert json.load(open(os.path.join(out, "config.json")))["init_from"] == galip_run


def test_init_from_refuses_weights_that_do_not_fit(galip_run, tmp_path, tiny_train, capsys):
    out = str(tmp_path / "ft")
    code = train.main(["--variant", "galip", "--steps", "1", "--out", out, "--init-from", galip_run,
                       *tiny_train(ngf=8)])
    assert code == 1
    err = capsys.readouterr().err
    assert f"--init-from {galip_run}" in err and "does not fit --variant galip" in err and "G" in err


def test_dry_run_runs_one_step_and_writes_nothing(cache, tmp_path, tiny_train, capsys):
    out = tmp_path / "never"
    assert train.main(["--variant", "scad_mi", "--out", str(out), "--dry-run", *tiny_train()]) == 0
    err = capsys.readouterr().err
    assert "dry run: scad_mi on cpu | one step of 4 images" in err and "peak RSS" in err and "d_loss=" in err
    assert not out.exists()


def test_d_grad_clip_bounds_the_d_step_and_old_checkpoints_still_resume(galip_run, tmp_path, tiny_train, capsys):
    import shutil

    trainer = train.Trainer(train.parse_args(["--variant", "scad", "--out", str(tmp_path / "c"),
                                              "--d-grad-clip", "1e-3", *tiny_train()]))
    assert trainer.cfg.d_grad_clip == 1e-3
    params = list(trainer.pair.D.parameters())
    loss = 1e3 * sum(p.float().square().sum() for p in params)
    before = [p.detach().clone() for p in params]
    norm = trainer._opt_step(loss, trainer.opt_d, params, clip=1e-3)
    grads = [p.grad for p in params if p.grad is not None]
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert float(norm) > 1.0 and float(clipped) <= 1e-3 * (1 + 1e-5)  # the pre-clip norm is returned
    assert any(not torch.equal(a, p) for a, p in zip(before, params))  # and D still stepped
    assert trainer._opt_step(loss.detach().requires_grad_(), trainer.opt_g, [], clip=0.0) is None  # off: no norm
    with pytest.raises(SystemExit, match="--d-grad-clip"):
        train.parse_args(["--variant", "scad", "--d-grad-clip", "-1"])
    # The log line counts the D steps the clip bound since the previous line (here every one, 2 per line).
    capsys.readouterr()
    assert train.main(["--variant", "scad", "--steps", "4", "--out", str(tmp_path / "n"), "--d-grad-clip", "1e-6",
                       *tiny_train(log_every=2)]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("step ")]
    assert len(lines) == 2 and all("clipped_steps=2 " in ln for ln in lines), lines
    # A checkpoint written before the field existed resumes (the field takes its default, off) ...
    out = str(tmp_path / "old")
    shutil.copytree(galip_run, out)
    state = ckpt_lib.load(out)
    del state["cfg"]["d_grad_clip"]
    for p in [os.path.join(out, "ckpt.pt")] + ckpt_lib.list_numbered(out):
        os.remove(p)
    ckpt_lib.save(out, state, state["step"])
    assert train.main(["--variant", "galip", "--steps", "3", "--out", out, "--resume", *tiny_train()]) == 0
    # ... and resuming it with the field changed is refused, naming the field.
    capsys.readouterr()
    assert train.main(["--variant", "galip", "--steps", "4", "--out", out, "--resume", "--d-grad-clip", "5",
                       *tiny_train()]) == 1
    err = capsys.readouterr().err
    assert "'d_grad_clip': (0.0, 5.0)" in err and "resume it with --d-grad-clip 0.0" in err
    assert train._flags_for({"cond_aug": False, "lr_d": 1e-4, "gp_power": 6.0}) == "--no-cond-aug --lr-d 0.0001"


def test_embedded_default_clips_d_for_the_san_variants_only():
    def clip(*argv):
        return train.parse_args(["--variant", *argv]).cfg.d_grad_clip

    assert [clip(v) for v in ("scad", "scad_mi", "scad_dd")] == [train.EMBEDDED_D_GRAD_CLIP] * 3 == [200.0] * 3
    assert clip("galip") == clip("ms_clip_gan") == 0.0  # galip's hinge D never reached the bound
    assert clip("galip", "--d-loss", "san") == 200.0 and clip("scad", "--d-loss", "hinge") == 0.0
    assert clip("scad_mi", "--d-grad-clip", "0") == 0.0 and clip("scad_mi", "--d-grad-clip", "50") == 50.0
    assert clip("scad_mi", "--clip", "ViT-B-32") == 0.0  # the paper's presets keep GALIP's unclipped D
