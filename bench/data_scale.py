#!/usr/bin/env python
"""Data at scale, measured on synthetic webdataset shards: the inputs of the README's plan
"Scaling to CC12M on 8×H100".

    python bench/data_scale.py [--shards 20] [--per-shard 500] [--min-side 96] [--max-side 320]
                               [--image-size 224] [--batch-size 32] [--batches 30] [--threads 2]
                               [--emb-dim 512] [--encode 512] [--work DIR] [--note TEXT] [--out FILE.json]

Steps (each timed on its own):

1. **Synthesise** ``--shards`` × ``--per-shard`` samples in img2dataset layout (``KEY.jpg``,
   ``KEY.txt``, ``KEY.json``): JPEGs (quality 90) with random sides in [min-side, max-side] and
   smooth-plus-noise content, captions of 8–24 random words.
2. **Index** the shards with :func:`scadfast.data.load_records` twice into an empty index cache:
   cold (every shard's tar headers walked, captions read, image headers checked; what every start
   paid before the cache) and warm (read from the cache: what a later start, or every rank after
   the shared build, pays). Also the Python heap the resulting record set keeps (tracemalloc): what
   each rank holds per record.
3. **Caption store**: :class:`scadfast.models.text_cache.TextEmbeddingCache` writes the embeddings
   of every caption (``--emb-dim``, float32 and float16) through its streaming path with a stand-in
   encoder (a fixed random projection of the token ids: the values do not matter for memory); then
   the file size, the growth of the process's resident memory (private and file-backed) after
   mapping it and after gathering ``--batches`` random batches
   (:func:`~scadfast.models.text_cache.gather_rows`), and the time per gather. The real embedded
   CLIP's (scadfast-tiny) encoding rate on ``--encode`` captions is measured separately.
4. **Loader**: the DALI loader with CPU decoding (``device_id=None``, ``--threads`` threads) over
   the shards at ``--image-size``: images/s and the JPEG bytes/s it reads, after 3 warm-up batches.

Wall times and process CPU times (all threads) are both recorded: on a shared or loaded machine the
wall times are not measurements of the hardware (say so with ``--note``); CPU seconds per record or
image are the less load-sensitive figure (cores needed = rate × CPU seconds per item).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile
import time
import tracemalloc
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402

SCHEMA = "scadfast.bench.data_scale/1"
_WORDS = ("a photo of the red blue green small large old new wooden metal house dog cat tree car street "
          "beach mountain city sunset woman man child table chair window river boat garden flower night "
          "people bicycle kitchen painting vintage modern design abstract portrait landscape").split()


def rss_bytes() -> dict:
    """This process's resident memory: total, private (anonymous) and file-backed (page cache pages it
    maps, shared with every other process that maps the same file), from /proc/self/status."""
    from common import proc_status_kib

    kib = proc_status_kib("VmRSS", "RssAnon", "RssFile")
    return {"rss": kib.get("VmRSS", 0) * 1024, "anon": kib.get("RssAnon", 0) * 1024,
            "file": kib.get("RssFile", 0) * 1024}


def _delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in a}


def synth_jpeg(rng: np.random.Generator, min_side: int, max_side: int) -> bytes:
    from PIL import Image

    h, w = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(xx / rng.uniform(5, 40) + c) * np.cos(yy / rng.uniform(5, 40)) for c in range(3)], -1)
    img = (127 + 90 * base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def synthesise(root: str, shards: int, per_shard: int, min_side: int, max_side: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    words = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    n_bytes = 0
    t = time.perf_counter()
    for s in range(shards):
        with tarfile.open(os.path.join(root, f"shard-{s:05d}.tar"), "w") as tf:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                jpg = synth_jpeg(rng, min_side, max_side)
                n_bytes += len(jpg)
                caption = " ".join(words.choice(_WORDS) for _ in range(words.randint(8, 24)))
                for name, data in ((f"{key}.jpg", jpg), (f"{key}.txt", caption.encode()),
                                   (f"{key}.json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    n = shards * per_shard
    return {"shards": shards, "per_shard": per_shard, "records": n, "min_side": min_side, "max_side": max_side,
            "mean_jpeg_bytes": n_bytes / n, "seconds": time.perf_counter() - t,
            "shard_bytes_total": sum(os.path.getsize(os.path.join(root, f)) for f in os.listdir(root))}


class StandInEncoder:
    """A fixed random projection of token ids to ``dim`` values (values irrelevant: memory only)."""

    name, context_length = "bench-stand-in", 32

    def __init__(self, dim: int):
        self.embed_dim = dim
        self._w = torch.randn(self.context_length, dim, generator=torch.Generator().manual_seed(0)) / 1000

    def weights_id(self) -> str:
        return f"stand-in:{self.embed_dim}"

    def tokenize(self, texts):
        return torch.tensor([list(t.encode()[:32].ljust(32, b" ")) for t in texts], dtype=torch.int64)

    def encode_text(self, tokens):
        return tokens.float() @ self._w


def measure_index(spec: str, cache_dir: str) -> dict:
    from scadfast.data import load_records

    out = {}
    for phase in ("cold", "warm"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tracemalloc.start()
            t, c = time.perf_counter(), time.process_time()
            rec = load_records(spec, index={"cache_dir": cache_dir, "verbose": False})
            dt, dc = time.perf_counter() - t, time.process_time() - c
            held, _ = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        out[phase] = {"seconds": dt, "us_per_record": dt / len(rec) * 1e6, "cpu_seconds": dc,
                      "cpu_us_per_record": dc / len(rec) * 1e6}
        out["records"] = len(rec)
        out["recordset_heap_bytes_per_record"] = held / len(rec)  # the record set is what is still held
        del rec
    out["index_cache_bytes"] = sum(os.path.getsize(os.path.join(cache_dir, f)) for f in os.listdir(cache_dir))
    return out


def measure_caption_store(captions, dim: int, batch: int, batches: int, work: str) -> dict:
    from scadfast.models.text_cache import TextEmbeddingCache, gather_rows

    out = {"captions": len(captions), "dim": dim}
    rng = np.random.default_rng(0)
    for dtype in ("float32", "float16"):
        cache = TextEmbeddingCache(StandInEncoder(dim), os.path.join(work, "emb"), batch_size=1024)
        t = time.perf_counter()
        cache.embed(captions, dtype=dtype)
        write_s = time.perf_counter() - t
        gather_rows(torch.zeros(1, dim), torch.zeros(1, dtype=torch.int64), "cpu")  # page the code in first
        r0 = rss_bytes()
        table = torch.as_tensor(cache.embed(captions, dtype=dtype))
        r_map = rss_bytes()
        ts = []
        for _ in range(batches):
            idx = torch.as_tensor(rng.integers(0, len(captions), batch))
            t = time.perf_counter()
            gather_rows(table, idx, "cpu")
            ts.append(time.perf_counter() - t)
        r_gather = rss_bytes()
        out[dtype] = {"file_bytes": os.path.getsize(cache.last_path), "bytes_per_caption": os.path.getsize(cache.last_path) / len(captions),
                      "write_seconds": write_s, "rss_delta_after_map": _delta(r0, r_map),
                      "rss_delta_after_gathers": _delta(r0, r_gather), "gather_us_median": float(np.median(ts) * 1e6),
                      "gather_batch": batch, "gathers": batches}
        del table
    return out


def measure_encode(captions, n: int) -> dict:
    from scadfast.models.clip import FrozenCLIP
    from scadfast.models.text_cache import TextEmbeddingCache

    clip = FrozenCLIP("scadfast-tiny", pretrained=None)
    caps = list(captions[:n])
    with tempfile.TemporaryDirectory() as d:
        cache = TextEmbeddingCache(clip, d, batch_size=256)
        t, c = time.perf_counter(), time.process_time()
        cache.embed(caps)
        dt, dc = time.perf_counter() - t, time.process_time() - c
    return {"clip": "scadfast-tiny (random init)", "captions": len(caps), "seconds": dt,
            "captions_per_s": len(caps) / dt, "captions_per_cpu_s": len(caps) / dc, "threads": torch.get_num_threads()}


def measure_loader(spec: str, cache_dir: str, image_size: int, batch: int, batches: int, threads: int) -> dict:
    from scadfast.data import load_records, make_loader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = load_records(spec, index={"cache_dir": cache_dir, "verbose": False})
    loader = make_loader(rec, image_size, batch, device_id=None, num_threads=threads, seed=0)
    def endless():
        while True:
            yield from loader

    it = endless()  # epochs follow each other as in training
    for _ in range(3):
        next(it)
    n = n_bytes = 0
    t, c = time.perf_counter(), time.process_time()
    for _ in range(batches):
        _, idx = next(it)
        n += len(idx)
        n_bytes += int(rec.sizes[idx.numpy()].sum())
    dt, dc = time.perf_counter() - t, time.process_time() - c
    return {"decode": "cpu", "threads": threads, "image_size": image_size, "batch_size": batch,
            "images": n, "seconds": dt, "images_per_s": n / dt, "jpeg_mb_per_s": n_bytes / dt / 1e6,
            "cpu_seconds": dc, "images_per_cpu_s": n / dc}


def run(argv=None) -> int:
    p = argparse.ArgumentParser(description="synthetic webdataset: index time, caption store memory, loader images/s")
    p.add_argument("--shards", type=int, default=20)
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--min-side", type=int, default=96)
    p.add_argument("--max-side", type=int, default=320)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--threads", type=int, default=2, help="DALI CPU threads")
    p.add_argument("--emb-dim", type=int, default=512, help="caption embedding width (ViT-B/32: 512)")
    p.add_argument("--encode", type=int, default=512, help="captions encoded by the real embedded CLIP (0: skip)")
    p.add_argument("--work", default=None, help="scratch directory, kept; shards synthesised there with the same "
                                                "settings are reused (default: a temporary one, removed)")
    p.add_argument("--note", default="", help="e.g. 'loaded machine' (stored in the JSON and the report)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    for name in ("shards", "per_shard", "min_side", "image_size", "batch_size", "batches", "threads", "emb_dim"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.max_side < a.min_side:
        p.error("--max-side must be >= --min-side")
    from common import environment

    work = a.work or tempfile.mkdtemp(prefix="scadfast-data-scale-")
    try:
        shard_dir = os.path.join(work, "shards")
        manifest = os.path.join(work, "synth.json")
        synth_args = [a.shards, a.per_shard, a.min_side, a.max_side]
        old = None
        if a.work and os.path.isfile(manifest):
            with open(manifest) as f:
                old = json.load(f)
            if old.get("args") != synth_args:
                old = None
        idx_dir = os.path.join(work, "wds-index")
        shutil.rmtree(idx_dir, ignore_errors=True)
        shutil.rmtree(os.path.join(work, "emb"), ignore_errors=True)
        res = {"schema": SCHEMA, **environment(torch.device("cpu")), "note": a.note,
               "settings": {k: v for k, v in vars(a).items() if k not in ("out", "work")}}
        if old is None:
            shutil.rmtree(shard_dir, ignore_errors=True)
            res["synth"] = synthesise(shard_dir, *synth_args)
            with open(manifest, "w") as f:
                json.dump({"args": synth_args, "synth": res["synth"]}, f)
        else:  # --work holds the same shards from an earlier run: reuse them
            res["synth"] = dict(old["synth"], reused=True)
        spec = f"wds:{shard_dir}/shard-*.tar"
        res["index"] = measure_index(spec, idx_dir)
        from scadfast.data import load_records

        captions = load_records(spec, index={"cache_dir": idx_dir, "verbose": False}).captions
        res["caption_store"] = measure_caption_store(captions, a.emb_dim, a.batch_size, a.batches, work)
        if a.encode:
            res["encode"] = measure_encode(captions, a.encode)
        res["loader"] = measure_loader(spec, idx_dir, a.image_size, a.batch_size, a.batches, a.threads)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if a.out:
        from common import write_json

        write_json(a.out, res)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run())
