"""Data at scale: the on-disk webdataset index (reused, rebuilt when a shard changes, DALI's format,
split across ranks), caption embeddings kept on the host (batches gather their rows) and their
one-time encoding split across gloo ranks."""

from __future__ import annotations

import functools
import io
import os
import shutil
import subprocess
import sys
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from scadfast import distributed as dist_lib
from scadfast.data import DataWarning, load_records
from scadfast.data import wds_index
from scadfast.models.text_cache import EmbeddingCacheError, TextEmbeddingCache, gather_rows

# Varied image sizes (H, W): portrait, landscape, square, tiny.
SIZES = [(40, 64), (72, 48), (33, 33), (16, 90), (64, 64), (90, 20)]


def jpeg(i: int) -> bytes:
    h, w = SIZES[i % len(SIZES)]
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = (17 * i) % 256
    img[:, : w // 2, 1] = 200
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shard(path, start: int, n: int, extra=()):
    with tarfile.open(path, "w") as tf:
        members = []
        for i in range(start, start + n):
            key = f"{i:09d}"
            members += [(f"{key}.jpg", jpeg(i)), (f"{key}.txt", f"photo number {i}".encode()),
                        (f"{key}.json", b'{"w": 1}')]
        members += list(extra)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    bad = jpeg(99)[:50]  # truncated: skipped with a warning, also when read from the cache
    write_shard(d / "s-000.tar", 0, 7, extra=[("000999999.json", b"{}"), ("000000100.jpg", bad),
                                              ("000000100.txt", b"a broken one")])
    write_shard(d / "s-001.tar", 7, 6)
    return d


def _columns(rec):
    return (rec.captions, rec.keys, rec.tar_paths, rec.tar_index.tolist(), rec.offsets.tolist(), rec.sizes.tolist())


def test_wds_index_is_reused_and_rebuilt_when_a_shard_changes(shards, tmp_path, monkeypatch, capsys):
    spec = f"wds:{shards}/s-{{000..001}}.tar"
    cache = str(tmp_path / "idx")
    scanned = []
    real_scan = wds_index.scan_shard
    monkeypatch.setattr(wds_index, "scan_shard", lambda s, *a: scanned.append(os.path.basename(s)) or real_scan(s, *a))
    with pytest.warns(DataWarning, match=r"s-000\.tar:000000100\.jpg \(truncated JPEG"):
        cold = load_records(spec, index={"cache_dir": cache})
    assert sorted(scanned) == ["s-000.tar", "s-001.tar"] and len(cold) == 13
    assert "[scadfast] webdataset" in capsys.readouterr().err  # the progress/summary line
    for i, key in enumerate(cold.keys):  # every record's bytes are its image
        n = int(key.rsplit(":", 1)[1].split(".")[0])
        assert cold.read_bytes(i) == jpeg(n) and cold.captions[i] == f"photo number {n}"
    files = sorted(os.listdir(cache))
    assert len([f for f in files if f.endswith(".idx")]) == 2
    assert len([f for f in files if f.endswith(".header.json")]) == 2

    scanned.clear()  # a second start reads no shard
    with pytest.warns(DataWarning, match=r"000000100\.jpg"):
        warm = load_records(spec, index={"cache_dir": cache})
    assert scanned == [] and _columns(warm) == _columns(cold)

    write_shard(shards / "s-001.tar", 7, 9)  # the shard changes (size and mtime): rebuilt, alone
    with pytest.warns(DataWarning):
        changed = load_records(spec, index={"cache_dir": cache})
    assert scanned == ["s-001.tar"] and len(changed) == 16
    assert changed.captions[-1] == "photo number 15" and changed.read_bytes(15) == jpeg(15)
    assert sorted(os.listdir(cache)) != files and len(os.listdir(cache)) == 4  # the stale entry is gone
    st = os.stat(shards / "s-000.tar")  # same size, new mtime: rebuilt too
    os.utime(shards / "s-000.tar", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    scanned.clear()
    with pytest.warns(DataWarning):
        load_records(spec, index={"cache_dir": cache})
    assert scanned == ["s-000.tar"]
    # Another check mode has its own verdicts (the index file is shared).
    scanned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_records(spec, check_images="none", index={"cache_dir": cache})) == 17
    assert sorted(scanned) == ["s-000.tar", "s-001.tar"]
    # A damaged cache entry is rebuilt, not trusted.
    idx = wds_index.index_path(str(shards / "s-001.tar"), cache)
    with open(idx, "w") as f:
        f.write("v1.2 3\njpg 1 2\n")
    scanned.clear()
    with pytest.warns(DataWarning):
        assert _columns(load_records(spec, index={"cache_dir": cache})) == _columns(changed)
    assert scanned == ["s-001.tar"]


def test_index_is_dalis_wds2idx_format_and_feeds_its_reader(shards, tmp_path):
    shard = str(shards / "s-001.tar")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        rec = load_records(f"wds:{shard}", index={"cache_dir": str(tmp_path / "idx")})
    ours = wds_index.index_path(shard, str(tmp_path / "idx"))
    samples = [wds_index.parse_line(line) for line in wds_index.read_idx(ours)]
    assert [m[0] for m in samples[0]] == ["jpg", "txt", "json"] and len(samples) == 6
    assert [(s[0][1], s[0][2]) for s in samples] == list(zip(rec.offsets.tolist(), rec.sizes.tolist()))
    tool = shutil.which("wds2idx", path=os.path.dirname(sys.executable))
    if tool and shutil.which("tar"):  # DALI's own indexer gives the same file
        ref = tmp_path / "ref.idx"
        subprocess.run([sys.executable, tool, shard, str(ref)], check=True, capture_output=True)
        assert open(ours).read() == ref.read_text()
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        jpg, txt = fn.readers.webdataset(paths=[shard], index_paths=[ours], ext=["jpg", "txt"],
                                         missing_component_behavior="error")
        return jpg, txt

    p = pipe()
    p.build()
    got = []
    for _ in range(3):
        jpgs, txts = p.run()
        got += [(bytes(np.asarray(j)), bytes(np.asarray(t)).decode()) for j, t in zip(jpgs, txts)]
    assert got == [(rec.read_bytes(i), rec.captions[i]) for i in range(6)]


def test_remote_shards_are_refused_with_one_line(tmp_path):
    for spec in ("wds:pipe:curl -s https://host/s-{000..009}.tar", "wds:https://host/s-000.tar",
                 "wds:s3://bucket/s-000.tar"):
        with pytest.raises(ValueError, match="not a local file; pipe: commands and URLs are not supported"):
            load_records(spec)


def test_caption_embeddings_stay_on_the_host(shards, tmp_path):
    """The trainer keeps the memory-mapped table on the host and a batch carries only its B rows."""
    from scadfast import train

    args = train.parse_args(["--variant", "scad", "--data", f"wds:{shards}/s-*.tar", "--device", "cpu",
                             "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4", "--ngf", "16",
                             "--ndf", "16", "--sample-prompts", "2", "--sample-noise", "2",
                             "--out", str(tmp_path / "run"), "--no-compile"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        trainer = train.Trainer(args)
    n, d = len(trainer.loader.captions), trainer.clip.embed_dim
    table = trainer.text_emb
    assert isinstance(trainer.text_store, np.memmap)  # the cache file itself, not a copy
    assert table.device.type == "cpu" and tuple(table.shape) == (n, d) and table.dtype == torch.float32
    assert table.data_ptr() == trainer.text_store.ctypes.data
    images, s, _ = next(trainer._batches())
    order = trainer.loader.epoch_order(0)[:4]
    assert tuple(s.shape) == (4, d) and s.device == trainer.device and s.dtype == torch.float32
    assert torch.equal(s, table[torch.as_tensor(order)])
    ref = TextEmbeddingCache(trainer.clip, tmp_path / "ref").embed(trainer.loader.captions)
    assert np.array_equal(np.asarray(trainer.text_store), np.asarray(ref))  # fp32 by default, unchanged


def test_gather_rows_and_fp16_storage(tmp_path):
    torch.manual_seed(0)
    from scadfast.models.clip import FrozenCLIP

    clip = FrozenCLIP()
    caps = [f"a caption {i}" for i in range(11)]
    cache = TextEmbeddingCache(clip, tmp_path, batch_size=4)
    f32 = cache.embed(caps)
    f16 = cache.embed(caps, dtype="float16")
    assert cache.last_hit is False and f16.dtype == np.float16 and f32.dtype == np.float32
    assert os.path.getsize(cache.path(caps, "float16")) < 0.55 * os.path.getsize(cache.path(caps))
    assert cache.path(caps, "float16") != cache.path(caps)
    np.testing.assert_allclose(np.asarray(f16, np.float32), f32, rtol=1e-3, atol=1e-3)
    idx = torch.tensor([3, 0, 10, 3])
    for table in (torch.as_tensor(f32), torch.as_tensor(f16)):
        rows = gather_rows(table, idx, "cpu")
        assert rows.dtype == torch.float32 and tuple(rows.shape) == (4, clip.embed_dim)
        assert torch.equal(rows, table[idx].float())
    with pytest.raises(ValueError, match="dtype must be one of"):
        cache.embed(caps, dtype="bfloat16")


@pytest.mark.gpu
def test_gather_rows_device_memory_does_not_grow_with_captions():
    table = torch.randn(200_000, 512)  # 400 MB on the host
    before = torch.cuda.memory_allocated()
    rows = gather_rows(table, torch.arange(64) * 3000, "cuda")
    torch.cuda.synchronize()
    assert rows.is_cuda and tuple(rows.shape) == (64, 512)
    assert torch.cuda.memory_allocated() - before <= 64 * 512 * 4 + 4096
    assert torch.equal(rows.cpu(), table[torch.arange(64) * 3000])


# ------------------------------------------------------------------------------------------------
# Two gloo ranks
# ------------------------------------------------------------------------------------------------


class BatchSensitiveEncoder:
    """A stand-in text tower whose output for a caption depends on the other captions of its batch
    (it adds the batch mean), so a file is bitwise equal to a single process's only if every caption
    was encoded in the same batch."""

    name, context_length, embed_dim = "fake", 16, 8

    def weights_id(self) -> str:
        return "fake:1"

    def tokenize(self, texts):
        return torch.tensor([list(t.encode()[:16].ljust(16, b" ")) for t in texts], dtype=torch.int64)

    def encode_text(self, tokens):
        x = tokens.float() @ torch.linspace(-1, 1, 16 * 8).reshape(16, 8) / 100
        return x + x.mean(0, keepdim=True)


def _rank_main(rank: int, world: int, init: str, tmp: str, shards: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        info = dist_lib.DistInfo(rank, world, rank)
        sync = functools.partial(dist_lib.all_true, info=info)
        # The shard index: each rank scans its share of the shards, then reads the rest from the cache.
        scanned = []
        real_scan = wds_index.scan_shard
        wds_index.scan_shard = lambda s, *a: scanned.append(os.path.basename(s)) or real_scan(s, *a)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)
            rec = load_records(f"wds:{shards}/s-*.tar",
                               index={"cache_dir": f"{tmp}/idx", "rank": rank, "world_size": world, "sync": sync})
        wds_index.scan_shard = real_scan
        # The caption embeddings: each rank encodes its slice, rank 0 assembles.
        caps = list(rec.captions) + [f"more {i}" for i in range(10)]  # 23 captions, batches of 4
        cache = TextEmbeddingCache(BatchSensitiveEncoder(), f"{tmp}/emb", batch_size=4)
        emb = cache.embed(caps, rank=rank, world_size=world, sync=sync)
        first = (cache.last_hit, cache.last_encoded)
        cache.embed(caps, rank=rank, world_size=world, sync=sync)
        second = (cache.last_hit, cache.last_encoded)
        # A cache directory that rank 0 does not see (another node's local disk) is named.
        other = TextEmbeddingCache(BatchSensitiveEncoder(), f"{tmp}/emb-rank{rank}", batch_size=4)
        try:
            other.embed(caps, rank=rank, world_size=world, sync=sync)
            not_shared = "no error"
        except EmbeddingCacheError as e:
            not_shared = str(e)
        np.save(f"{tmp}/rank{rank}.npy", np.asarray(emb))
        with open(f"{tmp}/rank{rank}.txt", "w") as f:
            f.write(repr({"scanned": scanned, "records": len(rec), "keys": rec.keys, "captions": caps,
                          "first": first, "second": second, "not_shared": not_shared, "path": cache.last_path}))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_split_the_index_and_the_encoding(shards, tmp_path):
    import ast

    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path), str(shards)), nprocs=2, join=True)
    out = [ast.literal_eval((tmp_path / f"rank{r}.txt").read_text()) for r in range(2)]
    assert out[0]["scanned"] == ["s-000.tar"] and out[1]["scanned"] == ["s-001.tar"]  # one shard each
    assert out[0]["keys"] == out[1]["keys"] and out[0]["records"] == 13
    # 23 captions = 6 batches of 4: rank 0 encodes batches 0-2 (12 captions), rank 1 the other 11.
    assert out[0]["first"] == (False, 12) and out[1]["first"] == (False, 11)
    assert out[0]["second"] == out[1]["second"] == (True, 0)
    assert "rank 0 cannot see the embedding parts of rank(s) [1]" in out[0]["not_shared"]
    assert "see its error" in out[1]["not_shared"]
    emb_dir = os.path.dirname(out[0]["path"])
    assert [f for f in os.listdir(emb_dir) if not f.endswith(".npy") or ".part-" in f] == []  # parts removed
    # The assembled file equals a single process's, bit for bit (every caption in the same batch).
    single = TextEmbeddingCache(BatchSensitiveEncoder(), tmp_path / "single", batch_size=4)
    ref = np.asarray(single.embed(out[0]["captions"]))
    for r in range(2):
        assert np.array_equal(np.load(tmp_path / f"rank{r}.npy"), ref)
    # A slice boundary inside a batch would have changed the values: the test can tell.
    shifted = BatchSensitiveEncoder().encode_text(BatchSensitiveEncoder().tokenize(out[0]["captions"][10:14]))
    assert not np.array_equal(shifted.numpy(), ref[10:14])


def test_data_scale_bench_runs_small_and_renders(tmp_path, capsys):
    import json

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "ds.json"
    sys.path.insert(0, os.path.join(root, "bench"))
    try:
        import data_scale
        import report
    finally:
        sys.path.pop(0)
    rc = data_scale.run(["--shards", "2", "--per-shard", "6", "--min-side", "24", "--max-side", "40",
                         "--image-size", "32", "--batch-size", "4", "--batches", "4", "--threads", "1",
                         "--emb-dim", "16", "--encode", "0", "--note", "test", "--work", str(tmp_path / "w"),
                         "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    store = res["caption_store"]
    assert res["index"]["records"] == 12 and store["float16"]["file_bytes"] - 128 == (store["float32"]["file_bytes"] - 128) // 2
    assert res["index"]["warm"]["seconds"] > 0 and res["loader"]["images"] == 16  # 4 batches across epochs
    text = report.render(res, str(out))
    assert "Data at scale" in text and "**test**" in text and "µs/record" in text
