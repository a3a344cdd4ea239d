#!/usr/bin/env python
"""Data-loader throughput: scadfast's DALI loader (``device="mixed"`` decoding on a GPU, CPU decoding
otherwise) and, for comparison, the reference's torch DataLoader (PIL + torchvision) over the same files.

    python bench/loader.py [--data SPEC] [--image-size 224] [--batch-size 64] [--batches 50]
                           [--warmup 5] [--device cuda|cpu] [--workers 8] [--out FILE.json]

``--data`` is a scadfast data spec (default: the embedded shapes set, ``--shapes-n`` images rendered at
``--image-size`` in ``$SCADFAST_CACHE``). Each loader is iterated for ``--warmup`` batches, then
``--batches`` batches are timed (wall time, device synchronised at the end; on a GPU the batches are
moved to the device as the training loop does). Reported: images/s per loader and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCHEMA = "scadfast.bench.loader/1"


def _time(it, warmup: int, batches: int, device, sync) -> dict:
    for _ in range(warmup):
        next(it)
    sync()
    n_img = 0
    t = time.perf_counter()
    for _ in range(batches):
        images = next(it)[0]
        if images.device != device:
            images = images.to(device, non_blocking=True)
        n_img += images.shape[0]
    sync()
    dt = time.perf_counter() - t
    return {"images_per_s": n_img / dt, "seconds": dt, "images": n_img, "batches": batches}


def _endless(loader):
    while True:
        yield from loader


def run(argv=None) -> int:
    p = argparse.ArgumentParser(description="DALI loader vs torch DataLoader throughput")
    p.add_argument("--data", default="shapes")
    p.add_argument("--shapes-n", type=int, default=1024)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--workers", type=int, default=None, help="torch DataLoader workers (default 8 GPU / 2 CPU)")
    p.add_argument("--dali-threads", type=int, default=None, help="DALI CPU threads (default: the loader's default)")
    p.add_argument("--skip-torch", action="store_true", help="time the DALI loader only")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    sys.path.insert(0, HERE)
    sys.path.insert(0, ROOT)
    import torch

    import common
    from scadfast.data import load_records, make_loader

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    spec = args.data
    if spec == "shapes":
        cache = os.environ.get("SCADFAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "scadfast")
        spec = f"shapes:n={args.shapes_n},root={os.path.join(cache, 'data')}"
    records = load_records(spec, image_size=args.image_size)
    env = common.environment(device)
    result = {"schema": SCHEMA, **env, "settings": {"data": spec, "records": len(records), "image_size": args.image_size,
                                                    "batch_size": args.batch_size, "batches": args.batches,
                                                    "warmup": args.warmup}, "loaders": {}}
    kw = {} if args.dali_threads is None else {"num_threads": args.dali_threads}
    status = 0
    try:
        dali = make_loader(records, image_size=args.image_size, batch_size=args.batch_size,
                           device_id=(device.index or 0) if cuda else None, **kw)
        r = _time(_endless(dali), args.warmup, args.batches, device, sync)
        r["decode"] = "mixed (nvJPEG on the GPU)" if cuda else "cpu"
        result["loaders"]["dali"] = r
        print(f"DALI ({r['decode']}): {r['images_per_s']:.1f} img/s", flush=True)
    except Exception as e:  # noqa: BLE001
        result["loaders"]["dali"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(f"DALI: FAILED: {e}", file=sys.stderr, flush=True)
        status = 1
    if not args.skip_torch:
        from torch.utils.data import DataLoader

        import train_step

        workers = args.workers if args.workers is not None else min(8 if cuda else 2, os.cpu_count() or 1)
        dl = DataLoader(train_step.FilesDataset(records.files, records.captions, args.image_size),
                        batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        pin_memory=cuda, persistent_workers=workers > 0,
                        multiprocessing_context=train_step.worker_context(workers))
        r = _time(_endless(dl), args.warmup, args.batches, device, sync)
        r["workers"] = workers
        result["loaders"]["torch"] = r
        print(f"torch DataLoader (PIL + torchvision, {workers} workers): {r['images_per_s']:.1f} img/s", flush=True)
    d, t = result["loaders"].get("dali", {}), result["loaders"].get("torch", {})
    if d.get("images_per_s") and t.get("images_per_s"):
        result["ratio_dali_over_torch"] = d["images_per_s"] / t["images_per_s"]
    if args.out:
        common.write_json(args.out, result, announce=True)
    return status


if __name__ == "__main__":
    sys.exit(run())
