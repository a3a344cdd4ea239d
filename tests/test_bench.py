"""Tests of the microbenchmark script ``bench/kernels.py`` (docs/design.md §10).

The script runs in a subprocess WITHOUT ``TRITON_INTERPRET`` (conftest sets it for this process when
there is no GPU; the benchmark must refuse to time under the interpreter).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "kernels.py")

ROW_KEYS = {
    "op", "case", "kind", "shape", "dtype", "mode", "provider", "status", "note", "ms", "ms_min", "reps", "wall_ms",
    "speedup_vs_eager", "speedup_vs_compiled", "bytes", "gbps", "pct_peak",
}


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "1")  # a shared small CPU: threads only add contention here
    env.update(extra)
    return env


def test_quick_run_writes_results(tmp_path):
    out = tmp_path / "kernels.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--ops", "patch_hinge_loss", "--out", str(out)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())

    assert res["schema"] == "scadfast.bench.kernels/1"
    assert res["complete"] is True
    for key in ("device", "versions", "date", "command", "argv", "cpu_numbers", "settings", "timing",
                "byte_models", "rows"):
        assert key in res, key
    assert {"torch", "triton", "cuda"} <= set(res["versions"])
    assert res["versions"]["torch"]
    assert res["device"]["name"]
    assert "--quick" in res["argv"] and "kernels.py" in res["command"]
    assert res["settings"]["quick"] is True and res["settings"]["ops"] == ["patch_hinge_loss"]
    assert "patch_hinge_loss" in res["byte_models"]

    rows = res["rows"]
    assert rows and all(set(r) == ROW_KEYS for r in rows)
    assert {r["op"] for r in rows} == {"patch_hinge_loss"}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert {r["kind"] for r in rows} == {"model", "sweep"}
    # The model shape of docs/design.md §10 is there, with all three providers in both modes.
    model = [r for r in rows if r["shape"] == "64x1x26x26"]
    assert {(r["mode"], r["provider"]) for r in model} == {
        (m, p) for m in ("fwd", "fwd+bwd") for p in ("eager", "compiled", "fused")
    }
    for r in rows:
        assert r["status"] == "ok", r
        assert r["note"] is None, r  # a note on the fused row would mean a mismatch vs the reference
        assert r["ms"] > 0 and r["ms_min"] <= r["ms"] and r["reps"] >= 3 and r["wall_ms"] > 0
        assert r["bytes"] > 0 and r["gbps"] > 0
        assert r["speedup_vs_eager"] > 0 and r["speedup_vs_compiled"] > 0
        if r["provider"] == "eager":
            assert r["speedup_vs_eager"] == pytest.approx(1.0)
    # Byte model: fwd reads the logits and writes a 4-byte loss; fwd+bwd adds a re-read, the 4-byte
    # incoming gradient and the logits' gradient.
    n = 64 * 26 * 26 * 4
    fwd = next(r for r in model if r["mode"] == "fwd")
    bwd = next(r for r in model if r["mode"] == "fwd+bwd")
    assert fwd["bytes"] == n + 4 and bwd["bytes"] == 3 * n + 8

    if res["cpu_numbers"]:
        assert res["device"]["type"] == "cpu"
        assert "CPU NUMBERS" in proc.stdout and all(r["pct_peak"] is None for r in rows)
    else:
        assert res["device"]["type"] == "cuda"


def test_refuses_under_triton_interpreter(tmp_path):
    out = tmp_path / "never.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--ops", "patch_hinge_loss", "--out", str(out)],
        cwd=ROOT, env=_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "TRITON_INTERPRET" in proc.stderr
    assert not out.exists()


def test_peak_bandwidth_table(bench_module):
    common = bench_module("common")
    assert common.peak_hbm_gbps("NVIDIA H100 80GB HBM3") == (3350.0, "H100 SXM")
    assert common.peak_hbm_gbps("NVIDIA H100 PCIe")[0] == 2000.0
    assert common.peak_hbm_gbps("NVIDIA H200")[0] == 4800.0
    assert common.peak_hbm_gbps("NVIDIA A100-SXM4-80GB")[0] == 2039.0
    assert common.peak_hbm_gbps("NVIDIA H100 NVL") == (None, "unknown")
    assert common.peak_hbm_gbps("NVIDIA GeForce RTX 4090") == (None, "unknown")
    assert common.peak_hbm_gbps(None) == (None, "unknown")


def test_nbytes_counts_broadcast_inputs_once(bench_module):
    import torch

    common = bench_module("common")
    w = torch.ones(64, 1, 1, 1).expand(64, 1, 26, 26)
    assert common.nbytes(w) == 64 * 4
    assert common.nbytes(torch.ones(3, 5, dtype=torch.float16), None, [torch.ones(2)]) == 30 + 8


# ---------------------------------------------------------------------------------------------
# bench/train_step.py

TRAIN_STEP = os.path.join(ROOT, "bench", "train_step.py")
SIDE_KEYS = {
    "status", "description", "precision", "compile", "impl", "loader", "text", "image_size", "build_s", "warmup_s",
    "window_images_per_s", "window_step_s", "images_per_s", "images_per_s_min", "images_per_s_max",
    "step_s_median", "peak_memory", "images_per_step", "flops_per_step", "flops_per_image", "flops_note",
    "achieved_tflops", "peak_tflops", "peak_source", "mfu", "projection",
}


def test_train_step_tiny_runs_both_sides(tmp_path):
    out = tmp_path / "train_step.json"
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, TRAIN_STEP, "--tiny", "--variant", "scad_mi", "--device", "cpu", "--profile", "1",
         "--out", str(out)],
        cwd=ROOT, env=_env(SCADFAST_CACHE=str(cache)), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["schema"] == "scadfast.bench.train_step/1" and res["complete"] is True
    for key in ("device", "versions", "date", "command", "argv", "settings", "peak", "schedules", "sides", "ratio"):
        assert key in res, key
    assert res["versions"]["torch"] and "triton" in res["versions"]
    assert "train_step.py" in res["command"] and "--tiny" in res["argv"]
    st = res["settings"]
    assert st["variant"] == "scad_mi" and st["batch_size"] == 4 and st["tiny"] is True
    assert st["train_argv"][:2] == ["--variant", "scad_mi"] and "--device" in st["train_argv"]
    assert res["peak"]["measured_tflops"] > 0

    sides = res["sides"]
    assert set(sides) == {"scadfast", "reference"}
    for name, side in sides.items():
        assert side["status"] == "ok", side.get("traceback")
        assert SIDE_KEYS <= set(side), SIDE_KEYS - set(side)
        assert len(side["window_images_per_s"]) == st["windows"] == 2
        assert side["images_per_s_min"] <= side["images_per_s"] <= side["images_per_s_max"]
        assert side["images_per_s"] > 0 and side["images_per_step"] == 4
        assert side["peak_memory"]["peak_mib"] > 0
        assert side["flops_per_image"] > 1e6 and side["flops_per_step"] == pytest.approx(4 * side["flops_per_image"])
        assert 0 < side["mfu"] and side["peak_tflops"] == res["peak"]["measured_tflops"]
        prof = side["profile_top"]
        assert prof["iterations"] == 1 and prof["by"] == "self_cpu_time_total" and prof["total_ms"] > 0
        shares = [o["share"] for o in prof["ops"]]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
        assert any("conv" in o["op"] for o in prof["ops"]), prof["ops"]  # G and D are conv nets
        proj = {p["name"]: p for p in side["projection"]}
        assert len(proj) == len(res["schedules"]) >= 3
        for p in proj.values():
            if "images_seen" in p:
                assert p["device_days"] == pytest.approx(p["images_seen"] / side["images_per_s"] / 86400)
            else:
                assert p["images_in_budget"] == pytest.approx(p["gpu_days_budget"] * 86400 * side["images_per_s"])
    assert sides["scadfast"]["impl"] == "auto" and sides["scadfast"]["loader"].startswith("DALI")
    assert sides["reference"]["impl"] == "ref" and "DataLoader" in sides["reference"]["loader"]
    assert sides["reference"]["precision"] == "fp32"  # GALIP-style on a CPU: fp32, no GradScaler
    assert isinstance(sides["reference"]["fake_reuse"], bool)
    # The reference also runs the CLIP text tower every step: never fewer FLOPs than scadfast's step.
    assert sides["reference"]["flops_per_image"] >= sides["scadfast"]["flops_per_image"] * 0.99
    ratio = res["ratio"]
    assert ratio["images_per_s"] == pytest.approx(sides["scadfast"]["images_per_s"] / sides["reference"]["images_per_s"])
    assert ratio["images_per_s_worst_case"] == pytest.approx(
        sides["scadfast"]["images_per_s_min"] / sides["reference"]["images_per_s_max"])
    assert "ratio scadfast/reference" in proc.stdout and "CPU NUMBERS" in proc.stdout


def test_train_step_projection_and_peaks():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import train_step
    finally:
        sys.path.pop(0)
    rows = {r["name"]: r for r in train_step.project(1000.0)}
    one = rows["GALIP COCO, one epoch (public code)"]
    assert one["device_days"] == pytest.approx(82783 / 1000.0 / 86400) and one["gpus"] == 8
    assert one["wall_days_on_gpus"] == pytest.approx(one["device_days"] / 8)
    assert all(r["device_days"] is None for r in train_step.project(None))
    assert train_step.gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16")[0] == 989.4
    assert train_step.gpu_peak_tflops("NVIDIA H200", "fp16")[0] == 989.4
    assert train_step.gpu_peak_tflops("NVIDIA H100 PCIe", "bf16")[0] == 756.0
    assert train_step.gpu_peak_tflops("NVIDIA H100 NVL", "bf16")[0] is None
    assert train_step.gpu_peak_tflops(None, "bf16")[0] is None


# ---------------------------------------------------------------------------------------------
# bench/gpu_run.sh --cpu-dry-run and bench/report.py

GPU_RUN = os.path.join(ROOT, "bench", "gpu_run.sh")
REPORT = os.path.join(ROOT, "bench", "report.py")


def test_gpu_run_cpu_dry_run(tmp_path):
    """Every stage of the GPU run, with its real command line at tiny sizes on the CPU."""
    results = tmp_path / "results"
    env = _env(TMPDIR=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", GPU_RUN, "--cpu-dry-run", "--results-dir", str(results)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1900)
    summary = [line for line in proc.stdout.splitlines() if line.startswith("[gpu_run]")]
    assert proc.returncode == 0, "\n".join(summary) + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in results.iterdir())
    assert len(files) == 2 and files[0].startswith("cpu-dry-run-") and files[0].endswith(".json"), files
    assert files[1] == files[0][:-5] + ".log"
    res = json.loads((results / files[0]).read_text())
    assert res["schema"] == "scadfast.bench.gpu_run/1" and res["dry_run"] is True and res["ok"] is True
    stages = {s["name"]: s["status"] for s in res["stages"]}
    assert stages == {"install": "skipped", "build": "skipped", "learning": "skipped", "tests": "ok", "kernels": "ok",
                      "train-scad_mi": "ok", "train-galip": "ok", "loader": "ok", "kernels-sweep": "ok"}, stages
    assert "learning" not in res  # not a default stage
    schemas = [r["schema"] for r in res["results"]]
    assert schemas == ["scadfast.bench.kernels/1", "scadfast.bench.train_step/1", "scadfast.bench.train_step/1",
                       "scadfast.bench.loader/1", "scadfast.bench.kernels/1"]
    assert [r["settings"]["variant"] for r in res["results"][1:3]] == ["scad_mi", "galip"]
    assert all(r["ratio"]["images_per_s"] > 0 for r in res["results"][1:3])
    log = (results / files[1]).read_text()
    assert "[gpu_run] --- train-galip: ok" in log and "wrote" in log
    # The report renders the combined file.
    md = subprocess.run([sys.executable, REPORT, "--results", str(results)], cwd=ROOT, capture_output=True,
                        text=True, timeout=60)
    assert md.returncode == 0, md.stderr
    assert "GPU run on" in md.stdout and "dry run on the CPU" in md.stdout and "Training step: `galip`" in md.stdout


def test_gpu_run_learning_stage_cpu_dry_run(tmp_path):
    """``--stages learning``: the embedded default trained with ``--loader memory``; its curve and summary
    are embedded in the run's JSON and its run folder kept beside it."""
    results = tmp_path / "results"
    env = _env(TMPDIR=str(tmp_path), PYTHON=sys.executable, SCADFAST_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(["bash", GPU_RUN, "--cpu-dry-run", "--results-dir", str(results), "--stages", "learning"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (js,) = results.glob("*.json")
    res = json.loads(js.read_text())
    stages = {s["name"]: s["status"] for s in res["stages"]}
    assert stages["learning"] == "ok" and all(v == "skipped" for k, v in stages.items() if k != "learning"), stages
    assert [r["step"] for r in res["learning"]["curve"]] == [0, 2, 4]
    assert res["learning"]["summary"]["steps"] == 4 and "alignment" in res["learning"]["curve"][-1]
    run_dir = results / (js.stem + "-learning")
    assert (run_dir / "samples" / "latest.png").is_file() and (run_dir / "curves.png").is_file()


def _synthetic_train_step(device_name="NVIDIA H200", cuda=True):
    side = {"status": "ok", "precision": "bf16", "compile": True, "impl": "auto", "loader": "DALI (mixed decoding)",
            "image_size": 224, "images_per_s": 900.0, "images_per_s_min": 880.0, "images_per_s_max": 910.0,
            "step_s_median": 0.071, "peak_memory": {"kind": "cuda max_memory_allocated", "peak_mib": 20480.0},
            "flops_per_image": 2.5e11, "mfu": 0.23, "peak_source": "H200 SXM data sheet, dense bf16",
            "projection": [{"name": "GALIP COCO, one epoch (public code)", "device_days": 82783 / 900 / 86400}]}
    ref = dict(side, precision="fp16", compile=False, impl="ref", loader="torch.utils.data.DataLoader",
               images_per_s=300.0, images_per_s_min=290.0, images_per_s_max=310.0, mfu=0.08)
    return {"schema": "scadfast.bench.train_step/1", "device": {"type": "cuda" if cuda else "cpu", "name": device_name},
            "versions": {"torch": "2.14.1", "triton": "3.8.0", "git_commit": "abc1234"}, "date": "2026-12-01T00:00:00+00:00",
            "cpu_numbers": not cuda, "settings": {"variant": "scad_mi", "batch_size": 64, "clip": "ViT-B-32",
                                                  "windows": 5, "steps_per_window": 10, "warmup": 10},
            "peak": {}, "sides": {"scadfast": side, "reference": ref},
            "ratio": {"images_per_s": 3.0, "images_per_s_worst_case": 880 / 310, "peak_memory": 1.0, "flops_per_image": 1.0}}


def test_report_renders_and_splices(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "h200-train.json").write_text(json.dumps(_synthetic_train_step()))
    (results / "cpu-train.json").write_text(json.dumps(_synthetic_train_step("AMD EPYC", cuda=False)))
    (results / "notes.json").write_text(json.dumps({"schema": "something/else"}))
    readme = tmp_path / "README.md"
    readme.write_text("# T\n\nintro\n\n<!-- bench:begin -->\nold tables\n<!-- bench:end -->\n\nafter\n")

    proc = subprocess.run([sys.executable, REPORT, "--results", str(results), "--readme", str(readme)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    assert text.startswith("# T\n\nintro\n\n<!-- bench:begin -->\n") and text.endswith("<!-- bench:end -->\n\nafter\n")
    assert "old tables" not in text
    assert "on NVIDIA H200 (cuda)" in text and "on AMD EPYC (CPU" in text  # the device is named in each table
    assert "**3.00×**" in text and "| 900.0 (880.0–910.0) |" in text and "| 20480 |" in text
    assert "**CPU numbers**" in text and "skipped `notes.json`" in text
    # Idempotent, and --check agrees.
    again = subprocess.run([sys.executable, REPORT, "--results", str(results), "--readme", str(readme), "--check"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    (results / "h200-train.json").write_text(json.dumps(dict(_synthetic_train_step(), date="2026-12-03")))
    stale = subprocess.run([sys.executable, REPORT, "--results", str(results), "--readme", str(readme), "--check"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert stale.returncode == 1
    # Missing markers: a clear error, the file untouched.
    bare = tmp_path / "BARE.md"
    bare.write_text("no markers\n")
    bad = subprocess.run([sys.executable, REPORT, "--results", str(results), "--readme", str(bare)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "bench:begin" in bad.stderr and bare.read_text() == "no markers\n"


def test_op_shapes_file_matches_the_models(tmp_path):
    """bench/op_shapes.json is what bench/shapes.py records now (embedded CLIP; rerun shapes.py if not)."""
    out = tmp_path / "shapes.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "shapes.py"), "--clips", "scadfast-tiny",
                           "--out", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fresh = json.loads(out.read_text())["models"]
    committed = [m for m in json.loads(open(os.path.join(ROOT, "bench", "op_shapes.json")).read())["models"]
                 if m["clip"] == "scadfast-tiny"]
    assert fresh == committed, "the models changed: run `python bench/shapes.py` and commit bench/op_shapes.json"
    by = {m["variant"]: m for m in fresh}
    ops = {v: {c["op"] for c in m["calls"]} for v, m in by.items()}
    assert ops["galip"] == {"patch_hinge_loss"}
    assert {"spectral_norm", "san_logits", "san_d_loss", "patch_hinge_loss"} <= ops["scad_mi"]
    assert {"spectral_norm", "cond_aug", "patch_hinge_loss"} <= ops["ms_clip_gan"]
    dd = [c for c in by["scad_dd"]["calls"] if c["op"] == "spectral_norm" and c["grouped"]]
    assert len({c["module"] for c in dd}) == 4  # the PatchGAN body: one grouped update
    # 64 px, batch 16, widths 32: the PatchGAN map is 6x6 and the SAN head d_h = 2*32*(8-4+1)^2.
    hinge = {tuple(c["shapes"]["logits"]) for c in by["scad_dd"]["calls"] if c["op"] == "patch_hinge_loss"}
    assert (16, 1, 6, 6) in hinge
    san = [c for c in by["scad"]["calls"] if c["op"] == "san_d_loss"][0]["shapes"]
    assert san["h_real"] == [16, 64 * 25] and san["h_fake"] == [32, 64 * 25]


def test_kernels_model_cases_come_from_op_shapes():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import kernels
    finally:
        sys.path.pop(0)
    data = json.loads(open(os.path.join(ROOT, "bench", "op_shapes.json")).read())
    vit = [m for m in data["models"] if m["clip"] == "ViT-B-32"]
    mats = {tuple(c["shapes"]["matrix"]) for m in vit for c in m["calls"] if c["op"] == "spectral_norm"}
    assert {s for _, s in kernels.sn_weights()} == mats
    assert not hasattr(kernels, "SN_WEIGHTS")
    hinge = kernels.SPEC_BUILDERS["patch_hinge_loss"](False, True)
    shapes = {c.shape for c in hinge.cases if c.kind == "model"}
    assert {"64x1x26x26", "64x1x7x7", "64 w=64", "64"} == shapes
    san = kernels.SPEC_BUILDERS["san_d_loss"](False, True)
    assert [c.shape for c in san.cases if c.kind == "model"] == ["64+128x2048"]
