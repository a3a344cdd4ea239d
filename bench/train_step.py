#!/usr/bin/env python
"""End-to-end training-step benchmark: scadfast's step against a GALIP-style reference (issue 10, item 1).

    python bench/train_step.py [--variant scad_mi] [--config FILE.yaml] [--batch-size N]
                               [--warmup N] [--steps N] [--windows N] [--out FILE.json] [--tiny]
                               [--sides scadfast reference] [--ref-workers N] [--no-flops]
                               [any flag of `python -m scadfast.train`, e.g. --clip ViT-B-32
                                --clip-pretrained none --precision bf16 --shapes-n 1024 --device cuda]

In one process, on one device, with the same variant, batch, image size and image files, two sides:

``scadfast``
    the step exactly as ``python -m scadfast.train`` runs it: a :class:`scadfast.train.Trainer` is
    built from ``scadfast.train.parse_args([...])`` (the flags given here; with none, the embedded
    default) and ``trainer.train_step(batches)`` is called on the trainer's own batch stream (DALI,
    cached text embeddings, fused ops, and compile / bf16 where the trainer turns them on).
    Logging, sample grids and checkpoints of the training loop are not part of the timed step.
``reference``
    a step written the way GALIP's public code (tobran/GALIP) trains: eager (no compile); on a GPU
    fp16 autocast with one GradScaler per network, fp32 on a CPU; the same model pair built with the
    reference ops (``sn_impl="ref"``, and ``impl="ref"`` for every loss op); the captions tokenised
    and encoded by the CLIP text tower in every step; a ``torch.utils.data.DataLoader`` with PIL
    decoding and torchvision transforms (resize of the shorter side, centre crop, normalise to
    [-1, 1] — the same preprocessing as scadfast's DALI pipeline; no flip, as the shapes captions
    name left/right) over the same image files. The losses are the pair's own ``d_loss`` /
    ``g_loss``; like GALIP's code, the fakes are generated once per iteration with G's graph
    (``pair.make_fake``), used detached by the D step and reused by the G step, where the model pair
    offers that (``fake_reuse`` in the JSON; otherwise each loss generates its own). Compare
    ``flops_per_image`` of the two sides to see whether they compute the same amount (the reference
    also runs the CLIP text tower).

Reported per side: images/s (median over ``--windows`` timed windows of ``--steps`` training
iterations after ``--warmup`` iterations, with min/max), peak memory (CUDA max allocated; on a CPU
the process's peak RSS, reset before the side through /proc/self/clear_refs), FLOPs per image
(``torch.utils.flop_counter.FlopCounterMode`` over one extra iteration, run eagerly), MFU against the
device's peak (GPU: data-sheet dense tensor-core peak of the side's precision; CPU: an fp32 matmul
peak measured in the same run), the ratio scadfast / reference, and projected device-days for the
schedules in ``SCHEDULES`` from the measured rate.

``--tiny`` shrinks everything (widths 16, 32 images of 64 px, batch 4, one-step windows) for tests.
Timings taken on a loaded machine (or under ``TRITON_INTERPRET=1``) are not measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCHEMA = "scadfast.bench.train_step/1"
SIDES = ("scadfast", "reference")

# Dense (no sparsity) peak throughput in TFLOP/s from NVIDIA's data sheets, by the precision the
# matmuls/convs run in. Order matters: the first rule whose substrings all occur wins.
GPU_PEAK_TFLOPS: list[tuple[tuple[str, ...], tuple[str, ...], dict, str]] = [
    (("H200",), ("NVL",), {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}, "H200 SXM data sheet"),
    (("H100", "PCIE"), (), {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2}, "H100 PCIe data sheet"),
    (("H100",), ("NVL",), {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}, "H100 SXM data sheet"),
    (("A100",), (), {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}, "A100 data sheet"),
]

# Paper schedules for the projection (see the issue note for what was found and what was not).
SCHEDULES = [
    {
        "name": "GALIP COCO, one epoch (public code)",
        "images_seen": 82783, "batch_per_gpu": 64, "gpus": 8,
        "source": "tobran/GALIP code/scripts/train.sh: batch_size=64 per process, nproc_per_node=8, "
                  "mixed_precision=True; code/cfg/coco.yml: imsize 256, CLIP ViT-B/32; an epoch is one "
                  "caption for each COCO-2014 train image (82,783 images, DistributedSampler)",
    },
    {
        "name": "GALIP COCO, max_epoch 3005 (public code's loop bound)",
        "images_seen": 82783 * 3005, "batch_per_gpu": 64, "gpus": 8,
        "source": "tobran/GALIP code/cfg/coco.yml max_epoch: 3005 (the loop bound; the epochs behind the "
                  "released COCO model are not stated in the repository); batch as above",
    },
    {
        "name": "SCAD-MI, ~10 A100-days (paper, early results)",
        "gpu_days_budget": 10,
        "source": "SCAD paper (summary in the project's notes): SCAD-MI ~10 A100-days; images seen not stated",
    },
    {
        "name": "SCAD-DD on CC12M, ~190 A100-days (paper)",
        "gpu_days_budget": 190,
        "source": "SCAD paper (summary in the project's notes): zFID30k 12.34 after ~190 A100-days; images "
                  "seen not stated",
    },
]

TINY_TRAIN_ARGS = {"--ngf": "16", "--ndf": "16", "--shapes-n": "32", "--batch-size": "4"}


# ---------------------------------------------------------------------------------------------
# Small helpers


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s).strip("-").lower()


def gpu_peak_tflops(name: str | None, precision: str) -> tuple[float | None, str]:
    if not name:
        return None, "unknown device"
    up = name.upper()
    for need, avoid, table, label in GPU_PEAK_TFLOPS:
        if all(s in up for s in need) and not any(s in up for s in avoid):
            return table.get(precision), f"{label}, dense {precision}"
    return None, f"no data-sheet peak for {name!r}"


def measure_matmul_tflops(device, dtype, n: int, reps: int) -> float:
    """Best-of-``reps`` throughput of an n×n×n matmul (TFLOP/s) with the current thread settings.

    GPU: wall time. CPU: this process's CPU time divided by the thread count, so that a share of the
    cores taken by other processes does not lower the peak (the step's own rate is wall-clock)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    clock = time.perf_counter if cuda else time.process_time
    threads = 1 if cuda else max(1, torch.get_num_threads())
    for _ in range(2):
        a @ b
    sync()
    best = math.inf
    for _ in range(reps):
        t = clock()
        a @ b
        sync()
        best = min(best, (clock() - t) / threads)
    return 2.0 * n ** 3 / max(best, 1e-9) / 1e12


def project(images_per_s: float | None) -> list[dict]:
    """Device-days for each schedule at ``images_per_s`` per device (linear scaling over devices)."""
    out = []
    for s in SCHEDULES:
        row = {"name": s["name"]}
        if not images_per_s:
            out.append(dict(row, device_days=None))
            continue
        if "images_seen" in s:
            days = s["images_seen"] / images_per_s / 86400.0
            row.update(images_seen=s["images_seen"], gpus=s["gpus"], batch_per_gpu=s["batch_per_gpu"],
                       device_days=days, wall_days_on_gpus=days / s["gpus"])
        else:
            row.update(gpu_days_budget=s["gpu_days_budget"],
                       images_in_budget=s["gpu_days_budget"] * 86400.0 * images_per_s)
        out.append(row)
    return out


def _windows(step, images_of_step, warmup: int, steps: int, windows: int, sync) -> dict:
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    rates, secs = [], []
    for _ in range(windows):
        n_img = 0
        t = time.perf_counter()
        for _ in range(steps):
            n_img += images_of_step(step)
        sync()
        dt = time.perf_counter() - t
        rates.append(n_img / dt)
        secs.append(dt / steps)
    return {"warmup_s": warm_s, "window_images_per_s": rates, "window_step_s": secs,
            "images_per_s": statistics.median(rates), "images_per_s_min": min(rates),
            "images_per_s_max": max(rates), "step_s_median": statistics.median(secs)}


@contextlib.contextmanager
def _memory_probe(device, out: dict):
    import common
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        out.update(kind="cuda max_memory_allocated", peak_bytes=peak, peak_mib=peak / 2**20,
                   resident_at_start_mib=base / 2**20)
    else:
        gc.collect()
        reset = _reset_peak_rss()
        base = common.proc_status_kib("VmRSS").get("VmRSS")
        yield
        hwm = common.proc_status_kib("VmHWM").get("VmHWM")
        out.update(kind="process peak RSS (VmHWM" + (", reset before this side)" if reset else
                   ", NOT reset: peak of the whole process)"),
                   peak_bytes=None if hwm is None else hwm * 1024,
                   peak_mib=None if hwm is None else hwm / 1024,
                   resident_at_start_mib=None if base is None else base / 1024,
                   note="DataLoader worker processes are not included; RSS at the start includes what "
                        "earlier sides left in the allocator")


def _count_flops(step, eager_ctx) -> tuple[int | None, str | None]:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with eager_ctx():
            with FlopCounterMode(display=False) as fc:
                step()
        return int(fc.get_total_flops()), None
    except Exception as e:  # noqa: BLE001 - a missing count must not lose the timings
        return None, f"{type(e).__name__}: {e}"[:300]


# ---------------------------------------------------------------------------------------------
# The reference step (GALIP-style)


class FilesDataset:
    """(image, caption) pairs from image files: PIL decode + torchvision transforms (map-style)."""

    def __init__(self, files, captions, size: int):
        import torchvision.transforms as T

        self.files, self.captions = list(files), list(captions)
        self.transform = T.Compose([
            T.Resize(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            img = im.convert("RGB")
        return self.transform(img), self.captions[i]


def worker_context(workers: int):
    """Start DataLoader workers from a fork server, not by forking this process: by the time the
    reference runs, this process has DALI and OpenMP threads, and a forked child can inherit a lock
    one of them held (a worker hung that way once on a loaded 2-core machine)."""
    if workers <= 0:
        return None
    import multiprocessing as mp

    return mp.get_context("forkserver") if "forkserver" in mp.get_all_start_methods() else None


def data_spec(targs) -> str:
    """The data spec the Trainer reads (the embedded shapes set lives in the cache directory)."""
    if targs.data != "shapes":
        return targs.data
    cache = targs.cache_dir or os.environ.get("SCADFAST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "scadfast")
    return f"shapes:n={targs.shapes_n},root={os.path.join(cache, 'data')}"


class ReferenceStep:
    """One GALIP-style training iteration per call (see the module docstring)."""

    def __init__(self, targs, device, workers: int):
        import torch
        from torch.utils.data import DataLoader

        from scadfast import variants
        from scadfast.data import load_records
        from scadfast.models.clip import FrozenCLIP

        self.device, self.cfg = device, targs.cfg
        cuda = device.type == "cuda"
        self.precision = "fp16" if cuda else "fp32"
        torch.manual_seed(targs.seed)
        self.clip = FrozenCLIP(targs.clip, pretrained=targs.clip_pretrained, device=device)
        self.image_size = targs.image_size or self.clip.image_size
        records = load_records(data_spec(targs), image_size=self.image_size)
        if records.files is None:
            raise ValueError("the reference reads image files; webdataset shards are not supported here")
        self.batch_size = targs.batch_size
        gen = torch.Generator().manual_seed(targs.seed)
        self.loader = DataLoader(
            FilesDataset(records.files, records.captions, self.image_size), batch_size=targs.batch_size,
            shuffle=True, drop_last=True, num_workers=workers, pin_memory=cuda, generator=gen,
            persistent_workers=workers > 0, multiprocessing_context=worker_context(workers))
        if len(self.loader) == 0:
            raise ValueError(f"{len(records)} records give no full batch of {targs.batch_size}")
        torch.manual_seed(targs.seed)
        self.pair = variants.build(self.cfg, self.clip, img_size=self.image_size, sn_impl="ref").to(device)
        self.opt_g = torch.optim.Adam(self.pair.G.parameters(), lr=self.cfg.lr_g, betas=self.cfg.betas)
        self.opt_d = torch.optim.Adam(self.pair.D.parameters(), lr=self.cfg.lr_d, betas=self.cfg.betas)
        self.scaler_g = torch.amp.GradScaler(device.type, enabled=cuda)
        self.scaler_d = torch.amp.GradScaler(device.type, enabled=cuda)
        self._it = self._batches()
        self.workers = workers
        self.records = len(records)
        # GALIP's code generates the fakes once per iteration (with G's graph), detaches them for the D
        # step and reuses them for the G step; do the same where the model pair supports it.
        import inspect

        self.fake_reuse = hasattr(self.pair, "make_fake") and all(
            "fake" in inspect.signature(fn).parameters for fn in (self.pair.d_loss, self.pair.g_loss))

    def _batches(self):
        while True:
            yield from self.loader

    def _autocast(self):
        import torch

        if self.precision == "fp16":
            return torch.autocast(self.device.type, dtype=torch.float16)
        return torch.autocast(self.device.type, enabled=False)

    def _text(self, captions):
        import torch

        tokens = self.clip.tokenize(list(captions))
        with torch.no_grad(), self._autocast():
            return self.clip.encode_text(tokens).float()

    def __call__(self):
        import torch

        cfg, dev = self.cfg, self.device
        fake = None
        for i in range(cfg.n_critic):
            imgs, caps = next(self._it)
            real = imgs.to(dev, non_blocking=True)
            s = self._text(caps)  # CLIP text encoding every step, as GALIP's prepare_data does
            z = torch.randn(real.shape[0], cfg.z_dim, device=dev)
            with self._autocast():
                if self.fake_reuse:
                    fake = self.pair.make_fake(z, s, impl="ref") if i == cfg.n_critic - 1 else None
                    d_loss, _ = self.pair.d_loss(real, s, z, impl="ref", fake=fake)
                else:
                    d_loss, _ = self.pair.d_loss(real, s, z, impl="ref")
            self.opt_d.zero_grad(set_to_none=True)
            self.scaler_d.scale(d_loss).backward()
            self.scaler_d.step(self.opt_d)
            self.scaler_d.update()
        with self._autocast():
            if self.fake_reuse:
                g_loss, _ = self.pair.g_loss(s, z, impl="ref", fake=fake)
            else:
                g_loss, _ = self.pair.g_loss(s, torch.randn(real.shape[0], cfg.z_dim, device=dev), impl="ref")
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler_g.scale(g_loss).backward()
        self.scaler_g.step(self.opt_g)
        self.scaler_g.update()
        return self.batch_size * cfg.n_critic

    def close(self):
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._it = None


# ---------------------------------------------------------------------------------------------
# Running one side


def _run_side(name, targs, device, opts, peak) -> dict:
    import torch

    side: dict = {"status": "ok"}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    holder = {}
    try:
        t_build = time.perf_counter()
        if name == "scadfast":
            from scadfast import train as train_mod

            trainer = train_mod.Trainer(targs)
            holder["obj"] = trainer
            batches = trainer._batches()
            side.update(
                description="scadfast.train.Trainer(parse_args(argv)).train_step(batches), as `python -m "
                            "scadfast.train` runs it",
                precision=trainer.precision, compile=bool(trainer.compile), impl=targs.impl,
                loader=f"DALI ({'mixed' if trainer.loader.device_id is not None else 'cpu'} decoding)",
                text="cached sentence embeddings (TextEmbeddingCache)", image_size=trainer.image_size)

            def step():
                before = trainer.images_seen
                trainer.train_step(batches)
                return trainer.images_seen - before

            def eager_ctx():
                return torch.compiler.set_stance("force_eager") if trainer.compile else contextlib.nullcontext()
        else:
            ref = ReferenceStep(targs, device, opts.ref_workers)
            holder["obj"] = ref
            side.update(
                description="GALIP-style reference: eager, " + ("fp16 autocast + GradScaler" if device.type == "cuda"
                                                                else "fp32") + ", sn_impl='ref' and impl='ref', "
                "CLIP text encoding every step, torch DataLoader (PIL + torchvision), "
                + ("fakes generated once per iteration and reused for the G step (GALIP)" if ref.fake_reuse else
                   "fakes generated by d_loss (no grad) and again by g_loss (this model pair cannot reuse them)"),
                precision=ref.precision, compile=False, impl="ref", fake_reuse=ref.fake_reuse,
                loader=f"torch.utils.data.DataLoader, PIL + torchvision, num_workers={ref.workers}",
                text="CLIP text tower every step", image_size=ref.image_size)
            step = ref

            def eager_ctx():
                return contextlib.nullcontext()
        side["build_s"] = time.perf_counter() - t_build
        mem: dict = {}
        with _memory_probe(device, mem):
            side.update(_windows(step, lambda f: f(), opts.warmup, opts.steps, opts.windows, sync))
        side["peak_memory"] = mem
        side["images_per_step"] = targs.batch_size * targs.cfg.n_critic
        if opts.flops:
            flops, err = _count_flops(step, eager_ctx)
            side["flops_per_step"] = flops
            side["flops_per_image"] = None if flops is None else flops / side["images_per_step"]
            side["flops_note"] = err or ("FlopCounterMode over one iteration, run eagerly: matmul/conv/attention "
                                         "formulas, forward and backward (MA-GP double backward included); "
                                         "elementwise ops and fused custom ops count 0")
        else:
            side["flops_per_step"] = side["flops_per_image"] = None
        if opts.profile:
            side["profile_top"] = _profile(step, opts.profile, device, sync)
        side.update(_mfu(side, device, peak))
        side["projection"] = project(side["images_per_s"])
    except Exception as e:  # noqa: BLE001 - one failing side must not lose the other
        side.update(status="error", error=f"{type(e).__name__}: {e}"[:500], traceback=traceback.format_exc()[-3000:])
    finally:
        obj = holder.pop("obj", None)
        if obj is not None and hasattr(obj, "close"):
            obj.close()
        del obj
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return side


def _profile(step, n: int, device, sync, top: int = 12) -> dict:
    """``torch.profiler`` over ``n`` iterations: the ``top`` operators by self time (device time on a
    GPU, CPU time otherwise) with their share of the total, calls and mean self time per call."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        sync()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in rows) or 1
    rows.sort(key=lambda e: getattr(e, key), reverse=True)
    return {"iterations": n, "by": key, "total_ms": total / 1e3,
            "ops": [{"op": e.key, "share": getattr(e, key) / total, "calls": e.count // n,
                     "ms_per_iteration": getattr(e, key) / 1e3 / n} for e in rows[:top]]}


def _mfu(side, device, peak) -> dict:
    prec = side.get("precision", "fp32")
    if device.type == "cuda":
        tflops, src = gpu_peak_tflops(peak.get("device_name"), prec)
    else:
        tflops, src = peak.get("measured_tflops"), peak.get("measured_source")
    fpi = side.get("flops_per_image")
    achieved = fpi * side["images_per_s"] / 1e12 if fpi else None
    return {"achieved_tflops": achieved, "peak_tflops": tflops, "peak_source": src,
            "mfu": (achieved / tflops) if (achieved and tflops) else None}


# ---------------------------------------------------------------------------------------------
# CLI


def _build_train_argv(opts, passthrough: list[str]) -> list[str]:
    argv = ["--variant", opts.variant]
    if opts.config:
        argv += ["--config", opts.config]
    if opts.batch_size is not None:
        argv += ["--batch-size", str(opts.batch_size)]
    given = {a.split("=", 1)[0] for a in passthrough if a.startswith("--")} | {a for a in argv if a.startswith("--")}
    if opts.tiny:
        for flag, val in TINY_TRAIN_ARGS.items():
            if flag not in given:
                argv += [flag, val]
    if opts.device and "--device" not in given:
        argv += ["--device", opts.device]
    return argv + passthrough


def parse(argv=None):
    p = argparse.ArgumentParser(
        description="scadfast's training step vs a GALIP-style reference step; unknown flags go to "
                    "scadfast.train's parser (e.g. --clip ViT-B-32 --clip-pretrained none --precision bf16)")
    p.add_argument("--variant", default="scad_mi")
    p.add_argument("--config", default=None, help="YAML config of scadfast.train (default: the embedded default)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations per side (default 3 CPU, 10 GPU)")
    p.add_argument("--steps", type=int, default=None, help="iterations per timed window (default 5 CPU, 10 GPU)")
    p.add_argument("--windows", type=int, default=None, help="timed windows per side (default 5)")
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    p.add_argument("--ref-workers", type=int, default=None,
                   help="DataLoader workers of the reference (default: 2 on a CPU — the thread count of "
                        "scadfast's DALI pipeline —, GALIP's 8 on a GPU; capped at the CPU count)")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FlopCounterMode iteration")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also run torch.profiler over N iterations per side and keep the top operators")
    p.add_argument("--out", default=None, help="JSON file (default bench/results/train_step-<variant>-<device>.json)")
    p.add_argument("--tiny", action="store_true", help="tiny widths/data/windows (tests, dry runs)")
    opts, rest = p.parse_known_args(argv)
    return opts, rest


def run(argv=None) -> int:
    opts, passthrough = parse(argv)
    sys.path.insert(0, HERE)
    sys.path.insert(0, ROOT)  # measure the checkout this script is in
    import torch

    import common
    from scadfast import train as train_mod

    train_argv = _build_train_argv(opts, passthrough)
    targs = train_mod.parse_args(train_argv)
    device = torch.device(targs.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda and common.triton_interpret_on():
        print("bench/train_step.py: TRITON_INTERPRET=1 with a GPU: unset it to time the real kernels", file=sys.stderr)
        return 2
    if opts.tiny:
        dflt = {"warmup": 1, "steps": 1, "windows": 2}
    else:
        dflt = {"warmup": 10 if cuda else 3, "steps": 10 if cuda else 5, "windows": 5}
    for k, v in dflt.items():
        if getattr(opts, k) is None:
            setattr(opts, k, v)
    if opts.ref_workers is None:
        opts.ref_workers = 1 if opts.tiny else min(8 if cuda else 2, os.cpu_count() or 1)
    for k in ("warmup", "steps", "windows"):
        if getattr(opts, k) < (0 if k == "warmup" else 1):
            raise SystemExit(f"error: --{k} must be {'>= 0' if k == 'warmup' else '>= 1'}")

    env = common.environment(device)
    peak = {"device_name": env["device"]["name"]}
    if cuda:
        peak["measured_tflops"] = measure_matmul_tflops(device, torch.bfloat16, 8192, 10)
        peak["measured_source"] = "best of 10 bf16 8192x8192 matmuls in this run"
        for prec in ("bf16", "fp16", "fp32"):
            peak[f"datasheet_{prec}_tflops"], peak[f"datasheet_{prec}_source"] = gpu_peak_tflops(env["device"]["name"], prec)
    else:
        n = 512 if opts.tiny else 1024
        peak["measured_tflops"] = measure_matmul_tflops(device, torch.float32, n, 3 if opts.tiny else 8)
        peak["measured_source"] = (f"measured in this run: best of fp32 {n}x{n} matmuls with "
                                   f"{torch.get_num_threads()} thread(s), process CPU time / threads "
                                   "(no data-sheet peak for CPUs)")
    banner = (f"train-step benchmark: {opts.variant} on {env['device']['name']} ({device.type}), batch "
              f"{targs.batch_size}, warmup {opts.warmup}, {opts.windows} windows x {opts.steps} steps; "
              f"scadfast.train argv: {' '.join(train_argv)}")
    print(banner, flush=True)
    if not cuda:
        print("*** CPU NUMBERS: no CUDA device. Timings on a loaded machine are not measurements. ***", flush=True)

    result = {
        "schema": SCHEMA, **env, "complete": False, "cpu_numbers": not cuda,
        "settings": {
            "variant": opts.variant, "train_argv": train_argv, "batch_size": targs.batch_size,
            "n_critic": targs.cfg.n_critic, "clip": targs.clip, "clip_pretrained": targs.clip_pretrained,
            "image_size": targs.image_size, "data": data_spec(targs), "ngf": targs.cfg.ngf, "ndf": targs.cfg.ndf,
            "warmup": opts.warmup, "steps_per_window": opts.steps, "windows": opts.windows, "tiny": opts.tiny,
            "ref_workers": opts.ref_workers, "sides": opts.sides, "flops": opts.flops,
            "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "peak": peak, "schedules": SCHEDULES, "sides": {}, "ratio": {},
        "timing": "images/s per window = images trained in the window / wall time of the window "
                  "(device synchronised at the window's end); median, min and max over the windows",
    }
    out = opts.out or os.path.join(HERE, "results", f"train_step-{opts.variant}-{_slug(env['device']['name'] if cuda else 'cpu')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    for name in opts.sides:
        print(f"[{name}] building and running ...", flush=True)
        side = _run_side(name, targs, device, opts, peak)
        result["sides"][name] = side
        if side["status"] == "ok":
            mem, fpi, mfu = side["peak_memory"].get("peak_mib"), side["flops_per_image"], side["mfu"]
            mem_s = "-" if mem is None else f"{mem:.0f} MiB"
            fpi_s = "-" if not fpi else f"{fpi / 1e9:.2f} GFLOP/img"
            mfu_s = "-" if mfu is None else f"{100 * mfu:.2f}%"
            print(f"[{name}] {side['images_per_s']:.2f} img/s (min {side['images_per_s_min']:.2f}, max "
                  f"{side['images_per_s_max']:.2f}), {side['step_s_median']:.3f} s/step, peak memory {mem_s}, "
                  f"{fpi_s}, MFU {mfu_s}", flush=True)
        else:
            print(f"[{name}] FAILED: {side['error']}", file=sys.stderr, flush=True)
        _write(out, result)

    s, r = result["sides"].get("scadfast"), result["sides"].get("reference")
    if s and r and s["status"] == r["status"] == "ok":
        def ratio(a, b):
            return a / b if (a is not None and b) else None

        result["ratio"] = {
            "images_per_s": ratio(s["images_per_s"], r["images_per_s"]),
            "images_per_s_worst_case": ratio(s["images_per_s_min"], r["images_per_s_max"]),
            "peak_memory": ratio(s["peak_memory"].get("peak_mib"), r["peak_memory"].get("peak_mib")),
            "flops_per_image": ratio(s.get("flops_per_image"), r.get("flops_per_image")),
            "meaning": "scadfast / reference; images_per_s_worst_case = scadfast's slowest window over the "
                       "reference's fastest",
        }
        print(f"ratio scadfast/reference: {result['ratio']['images_per_s']:.2f}x images/s "
              f"(worst case {result['ratio']['images_per_s_worst_case']:.2f}x)", flush=True)
    result["complete"] = True
    _write(out, result)
    print(f"wrote {out}")
    return 0 if all(v["status"] == "ok" for v in result["sides"].values()) else 1


def _write(path: str, result: dict) -> None:
    import json

    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(run())
