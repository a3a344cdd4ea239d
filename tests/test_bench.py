"""Tests of the microbenchmark script ``bench/kernels.py`` (SPEC §10).

The script runs in a subprocess WITHOUT ``TRITON_INTERPRET`` (conftest sets it for this process when
there is no GPU; the benchmark must refuse to time under the interpreter).
"""

from __future__ import annotations

import importlib.util
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


def _load_common():
    spec = importlib.util.spec_from_file_location("bench_common", os.path.join(ROOT, "bench", "common.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
    # The model shape of SPEC §10 is there, with all three providers in both modes.
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


def test_peak_bandwidth_table():
    common = _load_common()
    assert common.peak_hbm_gbps("NVIDIA H100 80GB HBM3") == (3350.0, "H100 SXM")
    assert common.peak_hbm_gbps("NVIDIA H100 PCIe")[0] == 2000.0
    assert common.peak_hbm_gbps("NVIDIA H200")[0] == 4800.0
    assert common.peak_hbm_gbps("NVIDIA A100-SXM4-80GB")[0] == 2039.0
    assert common.peak_hbm_gbps("NVIDIA H100 NVL") == (None, "unknown")
    assert common.peak_hbm_gbps("NVIDIA GeForce RTX 4090") == (None, "unknown")
    assert common.peak_hbm_gbps(None) == (None, "unknown")


def test_nbytes_counts_broadcast_inputs_once():
    import torch

    common = _load_common()
    w = torch.ones(64, 1, 1, 1).expand(64, 1, 26, 26)
    assert common.nbytes(w) == 64 * 4
    assert common.nbytes(torch.ones(3, 5, dtype=torch.float16), None, [torch.ones(2)]) == 30 + 8
