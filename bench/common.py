"""Shared helpers of the scadfast benchmark scripts: timing, device facts, environment report.

Timing
    Two numbers per measurement.
    ``ms`` (median over ``reps`` calls): on a GPU the device time of one call, from CUDA events
    recorded around it. Before each call the L2 cache is flushed (a 256 MiB buffer is zeroed, so
    inputs come from HBM and "% of peak HBM" means what it says; ``flush_l2=False`` measures L2-hot
    calls) and the GPU is kept busy with ``torch.cuda._sleep`` for about twice the call's host time,
    so the host has queued all of the call's kernels before the GPU reaches the start event: the
    events then bracket kernel time and the gaps between kernels, not host launch latency.
    On a CPU, ``time.perf_counter`` around each call.
    ``wall_ms``: wall time per call of back-to-back calls (host overhead included, synchronised at
    the end) — what an eager training loop that is bound by its host pays.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

# Peak HBM bandwidth in GB/s (10^9 B/s) from NVIDIA's data sheets, matched against
# torch.cuda.get_device_name(). Order matters: the first rule whose substrings all occur wins.
# H100 NVL (3900 GB/s) is excluded on purpose so it is not reported as an SXM part.
PEAK_HBM_GBPS: list[tuple[tuple[str, ...], tuple[str, ...], float, str]] = [
    # (must contain, must not contain, GB/s, label)
    (("H200",), (), 4800.0, "H200"),
    (("H100", "PCIE"), (), 2000.0, "H100 PCIe"),
    (("H100",), ("NVL",), 3350.0, "H100 SXM"),
    (("A100", "80GB"), ("PCIE",), 2039.0, "A100 80GB SXM"),
    (("A100", "80GB", "PCIE"), (), 1935.0, "A100 80GB PCIe"),
]


def peak_hbm_gbps(device_name: str | None) -> tuple[float | None, str]:
    """(peak GB/s, label) for a CUDA device name; (None, "unknown") when not in the table."""
    if not device_name:
        return None, "unknown"
    name = device_name.upper()
    for need, avoid, gbps, label in PEAK_HBM_GBPS:
        if all(s in name for s in need) and not any(s in name for s in avoid):
            return gbps, label
    return None, "unknown"


def triton_interpret_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cpu_name() -> str:
    """The CPU's model name with its family and model numbers, which tell apart generations that a
    virtual machine's bare "AMD EPYC" or "Intel(R) Xeon(R) Processor" does not."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break  # the first processor's block is enough
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    ids = ", ".join(f"{k} {fields[k]}" for k in ("cpu family", "model") if k in fields)
    return fields["model name"] + (f" ({ids})" if ids else "")


# What changes a CPU run's arithmetic or data besides the CPU: the training set is rendered and
# JPEG-encoded with Pillow and decoded by DALI (or Pillow), and the kernels are torch's.
RUN_PACKAGES = ("torch", "numpy", "pillow", "nvidia-dali-cuda130", "open_clip_torch")


def package_versions(names=RUN_PACKAGES) -> dict:
    """``{distribution: version}`` of the installed packages ``names`` (None where not installed), and
    Python's version."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(device: torch.device) -> dict:
    """Device and software versions for a results file."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - depends on the install
        triton_version = None
    try:
        import scadfast

        scadfast_version = scadfast.__version__
    except Exception:  # pragma: no cover
        scadfast_version = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip() or None
    except Exception:
        commit = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        peak, label = peak_hbm_gbps(name)
        dev = {
            "type": "cuda", "name": name, "peak_hbm_gbps": peak, "peak_source": label,
            "sm_count": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
        }
    else:
        dev = {"type": "cpu", "name": cpu_name(), "peak_hbm_gbps": None, "peak_source": "n/a (CPU)",
               "threads": torch.get_num_threads()}
    return {
        "device": dev,
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "scadfast": scadfast_version, "git_commit": commit,
        },
        "hostname": platform.node(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "argv": list(sys.argv),
    }


class Timer:
    """Times a callable on one device; see the module docstring for the method."""

    def __init__(self, device: torch.device, warmup: int, reps: int, min_reps: int = 3,
                 budget_s: float = 0.25, flush_l2: bool = True):
        self.device, self.warmup, self.reps, self.min_reps = device, warmup, reps, min_reps
        self.budget_s, self.flush_l2 = budget_s, flush_l2
        self._cache = None
        self._cycles_per_ms = None
        if device.type == "cuda":
            if flush_l2:
                self._cache = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
            self._cycles_per_ms = self._calibrate_sleep()

    def _calibrate_sleep(self) -> float:
        cycles = 2_000_000
        torch.cuda._sleep(cycles)  # warm
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        torch.cuda._sleep(cycles)
        e.record()
        torch.cuda.synchronize(self.device)
        return cycles / max(s.elapsed_time(e), 1e-3)

    def _reps_for(self, one_call_s: float) -> int:
        if one_call_s <= 0:
            return self.reps
        return int(max(self.min_reps, min(self.reps, math.ceil(self.budget_s / one_call_s))))

    def __call__(self, fn: Callable[[], object]) -> dict:
        """``{"ms": [per-call ms, ...], "wall_ms": float}``."""
        cuda = self.device.type == "cuda"
        sync = (lambda: torch.cuda.synchronize(self.device)) if cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(max(1, self.warmup)):
            fn()
        sync()
        one = (time.perf_counter() - t0) / max(1, self.warmup)
        n = self._reps_for(one)
        # Wall time of back-to-back calls.
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        wall_ms = (time.perf_counter() - t0) / n * 1e3
        if not cuda:
            out = []
            for _ in range(n):
                t = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t) * 1e3)
            return {"ms": out, "wall_ms": wall_ms}
        sleep_cycles = int(min(2.0 * wall_ms, 50.0) * self._cycles_per_ms)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            if self._cache is not None:
                self._cache.zero_()
            torch.cuda._sleep(sleep_cycles)
            starts[i].record()
            fn()
            ends[i].record()
        sync()
        return {"ms": [s.elapsed_time(e) for s, e in zip(starts, ends)], "wall_ms": wall_ms}


def proc_status_kib(*fields: str) -> dict:
    """The named fields of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ``RssAnon`` …) in KiB; a field
    the kernel does not report (or no ``/proc``) is absent from the result."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in fields:
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def nbytes(*tensors) -> int:
    """Bytes of the given tensors (nested lists/tuples allowed, None skipped; counts the elements
    a dense copy holds, so an expanded view counts its broadcast elements only once)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, (list, tuple)):
            total += nbytes(*t)
        elif isinstance(t, torch.Tensor):
            total += _storage_elems(t) * t.element_size()
    return total


def _storage_elems(t: torch.Tensor) -> int:
    # Elements reachable through the view: the product of sizes over dims with non-zero stride.
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) if j >= 4 else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([line, sep, *body])


def checkpoint_diagnostic(argv, doc: str, score, report, schema: str, add_args=None) -> int:
    """The command line of a per-checkpoint diagnostic (``shape_teacher.py``, ``d_attributes.py``):
    ``CKPT|RUN_DIR [...] [--seed S] [--out JSON]`` plus ``add_args(parser)``; ``score(ckpt, args)`` →
    a dict per checkpoint, ``report(result)`` prints it; with ``--out`` the list is written as
    ``{"schema": schema, "results": [...]}``."""
    import argparse
    import json
    import os

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("ckpt", nargs="+")
    if add_args is not None:
        add_args(p)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    for c in a.ckpt:
        if not os.path.exists(c):
            p.error(f"checkpoint not found: {c} (give a checkpoint file or a run directory)")
    res = [score(c, a) for c in a.ckpt]
    for r in res:
        report(r)
    if a.out:
        write_json(a.out, {"schema": schema, "results": res})
    return 0


def write_json(path: str, obj, announce: bool = False) -> None:
    """Write ``obj`` as indented JSON to ``path``, creating its folder; ``announce`` prints "wrote PATH"."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    if announce:
        print(f"wrote {path}")


def splice_readme(readme: str, begin: str, end: str, md: str) -> int:
    """Replace the text between the markers ``begin`` and ``end`` in the file ``readme`` by ``md``.
    Returns 0, or 2 with one line on stderr when a marker is missing."""
    text = open(readme).read()
    if begin not in text or end not in text:
        print(f"error: {readme} has no {begin} … {end} markers", file=sys.stderr)
        return 2
    pre, rest = text.split(begin, 1)
    post = rest.split(end, 1)[1]
    open(readme, "w").write(pre + begin + "\n" + md + "\n" + end + post)
    return 0
