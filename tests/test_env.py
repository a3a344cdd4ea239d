"""The environment report ``python -m scadfast.env`` (what users paste into bug reports)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from scadfast import env
from scadfast.ops import _impl

FIELDS = ("scadfast", "python", "platform", "torch", "cuda available", "gpus", "nvidia driver", "triton", "kernels",
          "extension", "dali", "open_clip", "numpy", "env")


def _fields(report: str) -> dict:
    out = {}
    for line in report.splitlines():
        key, sep, value = line.partition(":")
        assert sep and value.startswith(" "), f"not a 'field: value' line: {line!r}"
        out[key] = value.strip()
    return out


def _module_dir(name):
    return os.path.dirname(__import__(name, fromlist=["_"]).__file__)


def test_report_runs_and_states_what_this_process_sees(train_env):
    r = subprocess.run([sys.executable, "-m", "scadfast.env"], env=train_env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = _fields(r.stdout)
    assert tuple(got) == FIELDS
    import scadfast

    assert got["scadfast"].startswith(f"{scadfast.__version__} ({_module_dir('scadfast')})")
    assert got["torch"].startswith(torch.__version__ + ", ")
    assert ("CPU-only build" in got["torch"]) == (torch.version.cuda is None)
    assert got["cuda available"] == ("yes" if torch.cuda.is_available() else "no")
    assert (got["gpus"] == "none") == (torch.cuda.device_count() == 0)
    if _impl.extension_available():
        with_cuda = _impl.extension_available(cuda=True)
        assert got["extension"].startswith("built with CUDA kernels" if with_cuda else "built without CUDA")
    else:
        assert got["extension"].startswith("not loaded (")
    assert got["kernels"] == f"({_module_dir('scadfast.kernels')})"
    import numpy

    assert got["numpy"] == f"{numpy.__version__} ({_module_dir('numpy')})"
    assert f"SCADFAST_CACHE={train_env['SCADFAST_CACHE']}" in got["env"]


def test_json_report_matches_the_process(capsys):
    assert env.main(["--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__ and info["torch_cuda"] == torch.version.cuda
    assert info["cuda_available"] == torch.cuda.is_available() and len(info["gpus"]) == torch.cuda.device_count()
    assert info["extension"]["loaded"] == _impl.extension_available()
    assert info["extension"]["cuda"] == _impl.extension_available(cuda=True)
    try:
        import triton
    except ImportError:
        assert "error" in info["triton"]
    else:
        assert info["triton"]["version"] == triton.__version__
    assert set(info["env"]) <= set(env.ENV_VARS)
    assert info["env"].get("TRITON_INTERPRET") == os.environ.get("TRITON_INTERPRET")


def test_missing_pieces_are_reported_with_the_reason(monkeypatch):
    monkeypatch.setattr(_impl, "_EXTENSION", (None, "ImportError: libc10.so: cannot open shared object file"))
    real_import = env.importlib.import_module

    def no_dali(name, *a, **k):
        if name.startswith("nvidia.dali"):
            raise ModuleNotFoundError("No module named 'nvidia.dali'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(env.importlib, "import_module", no_dali)
    info = env.collect()
    assert info["extension"] == {"loaded": False, "cuda": False,
                                 "error": "ImportError: libc10.so: cannot open shared object file"}
    assert info["dali"] == {"error": "ModuleNotFoundError: No module named 'nvidia.dali'"}
    got = _fields(env.format_report(info))
    assert got["extension"] == "not loaded (ImportError: libc10.so: cannot open shared object file)"
    assert got["dali"] == "not available (ModuleNotFoundError: No module named 'nvidia.dali')"
