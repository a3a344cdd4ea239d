"""Source indexing and the DALI pipeline (CPU: ``device_id=None``; the GPU path needs a GPU).

Fixture images encode their record number in their colour (``coded_images.py``): the left part of
image ``i`` has red level ``20 + 9 i`` and the right part is white, so a batch can be checked against
its indices (and a horizontal flip is visible).
"""

import io
import json
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from scadfast.data import (  # noqa: E402
    DataWarning,
    expand_braces,
    load_records,
    make_loader,
    parse_caption,
    parse_data_spec,
)
from scadfast.data.sources import DataSpec, check_image_bytes  # noqa: E402

from coded_images import coded_jpeg  # noqa: E402

N = 22  # with batch 4: 5 full batches, the last 2 records dropped
B = 4
S = 32


def decode_ids(images: torch.Tensor):
    """Record numbers and flip flags from a batch of coded images (in [-1, 1])."""
    x = (images.float() + 1) * 127.5
    left, right = x[:, 0, 8:24, 1:10].mean(dim=(1, 2)), x[:, 0, 8:24, 22:31].mean(dim=(1, 2))
    flipped = left > right + 1  # white moved to the left
    coded = torch.where(flipped, right, left)
    return torch.round((coded - 20) / 9).long(), flipped


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    """The webdataset index cache (and verified-images list) of these tests: a temporary directory."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SCADFAST_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    for i in range(N):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        (sub / f"img{i:03d}.jpg").write_bytes(coded_jpeg(i))
        (sub / f"img{i:03d}.txt").write_text(f"caption {i}\n")
    return root


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    (root / "annotations").mkdir()
    (root / "train2017").mkdir()
    images, anns = [], []
    for i in range(N):
        name = f"{i:012d}.jpg"
        (root / "train2017" / name).write_bytes(coded_jpeg(i))
        images.append({"id": 100 + i, "file_name": name, "height": 48, "width": 64})
        anns.append({"id": 5000 + i, "image_id": 100 + i, "caption": f"caption {i}"})
    anns.append({"id": 9999, "image_id": 100, "caption": "another caption 0"})
    (root / "annotations" / "captions_train2017.json").write_text(
        json.dumps({"images": images, "annotations": anns}))
    return root


def write_tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def wds(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    for shard in range(2):
        members = []
        for i in range(shard * 11, shard * 11 + 11):
            key = f"{i:09d}"
            members += [(f"{key}.jpg", coded_jpeg(i)), (f"{key}.txt", f"caption {i}".encode()),
                        (f"{key}.json", b"{}")]
        members.append(("000999999.json", b"{}"))  # a failed download: metadata only
        write_tar(root / f"shard-{shard:05d}.tar", members)
    return root


def specs(folder, coco, wds):
    return {"folder": f"folder:{folder}", "coco": f"coco:{coco}",
            "wds": f"wds:{wds}/shard-{{00000..00001}}.tar"}


@pytest.fixture(scope="module")
def all_specs(folder, coco, wds):
    return specs(folder, coco, wds)


def record_number(caption: str) -> int:
    return 0 if caption == "another caption 0" else int(caption.split()[1])


@pytest.mark.parametrize("kind", ["folder", "coco", "wds"])
def test_epoch_batches_and_index_mapping(all_specs, kind):
    loader = make_loader(all_specs[kind], S, B, seed=1, num_threads=1)
    n_rec = N + (1 if kind == "coco" else 0)
    assert loader.num_records == n_rec and len(loader) == n_rec // B
    seen = []
    for images, idx in loader:
        assert images.shape == (B, 3, S, S) and images.dtype == torch.float32
        assert images.device.type == "cpu"
        assert idx.shape == (B,) and idx.dtype == torch.int64
        assert images.min() >= -1.0 and images.max() <= 1.0
        assert images.max() > 0.95  # the white half reaches the top of the range
        ids, flipped = decode_ids(images)
        assert not flipped.any()
        assert ids.tolist() == [record_number(loader.captions[i]) for i in idx.tolist()]
        seen += idx.tolist()
    assert len(seen) == len(loader) * B and len(set(seen)) == len(seen)  # drop-last, no repeats
    assert seen == loader.epoch_order(0).tolist()
    assert loader.epoch == 1 and loader.batch == 0
    second = [i for _, idx in loader for i in idx.tolist()]
    assert second == loader.epoch_order(1).tolist() and second != seen
    assert loader.epoch == 2


def test_shapes_loader_matches_the_jpegs(tmp_path):
    loader = make_loader(f"shapes:n=20,root={tmp_path}", S, 8, seed=0, num_threads=1)
    assert loader.attrs is not None and len(loader.attrs) == 20 and len(loader) == 2
    images, idx = next(iter(loader))
    for img, i in zip(images, idx.tolist()):
        spec = parse_caption(loader.captions[i])
        assert all(loader.attrs[i][k] == v for k, v in spec.items())
        ref = np.asarray(Image.open(loader.records.files[i]).convert("RGB"), np.float32) / 127.5 - 1
        got = img.permute(1, 2, 0).numpy()
        assert np.abs(got - ref).mean() < 0.02
    assert loader.batch == 1  # one batch handed out, the generator was abandoned
    with pytest.raises(ValueError, match="left/right"):
        make_loader(f"shapes:n=20,root={tmp_path}", S, 8, flip=True)


@pytest.mark.parametrize("kind", ["folder", "wds"])
def test_sharding_two_ranks_are_disjoint(all_specs, kind):
    out = []
    for rank in range(2):
        loader = make_loader(all_specs[kind], S, 2, rank=rank, world_size=2, seed=5, num_threads=1)
        assert len(loader) == (N // 2) // 2
        idx = [i for images, ix in loader for i in ix.tolist()]
        assert idx == loader.epoch_order(0).tolist()
        out.append(idx)
    assert len(out[0]) == len(out[1]) == 10
    assert not set(out[0]) & set(out[1])


@pytest.mark.parametrize("kind", ["folder", "wds"])
def test_resume_mid_epoch_gives_the_remaining_batches(all_specs, kind):
    full = make_loader(all_specs[kind], S, B, seed=2, flip=True, num_threads=1)
    reference = [(img.clone(), idx.clone()) for img, idx in full]
    interrupted = make_loader(all_specs[kind], S, B, seed=2, flip=True, num_threads=1)
    for k, _ in enumerate(interrupted):
        if k == 1:
            break
    state = interrupted.state_dict()
    assert state["epoch"] == 0 and state["batch"] == 2
    resumed = make_loader(all_specs[kind], S, B, seed=2, flip=True, num_threads=1)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(reference) - 2
    for (img, idx), (ref_img, ref_idx) in zip(rest, reference[2:]):
        assert torch.equal(idx, ref_idx)
        assert torch.equal(img, ref_img)
    assert resumed.epoch == 1 and resumed.batch == 0
    bad = dict(state, seed=3)
    with pytest.raises(ValueError, match="seed"):
        resumed.load_state_dict(bad)


def test_flip_follows_the_documented_decisions(all_specs):
    loader = make_loader(all_specs["folder"], S, B, seed=4, flip=True, num_threads=1)
    flips = loader.epoch_flips(0)
    got = []
    for images, idx in loader:
        ids, flipped = decode_ids(images)
        assert ids.tolist() == [record_number(loader.captions[i]) for i in idx.tolist()]
        assert flipped.tolist() == flips[idx.numpy()].tolist()
        got += flipped.tolist()
    assert 0 < sum(got) < len(got)


def test_spec_parsing_and_brace_expansion():
    assert parse_data_spec("shapes") == DataSpec("shapes")
    assert parse_data_spec("shapes:n=100,size=32,seed=2").options == {"n": 100, "size": 32, "seed": 2}
    assert parse_data_spec("shapes:/data/my-set").path == "/data/my-set"
    assert parse_data_spec("coco:/a/ann.json,/a/imgs") == DataSpec("coco", "/a/ann.json", {}, "/a/imgs")
    assert parse_data_spec("folder:/x").kind == "folder"
    for bad in ("", "imagenet:/x", "folder:", "shapes:n=ten", "shapes:colour=red"):
        with pytest.raises(ValueError):
            parse_data_spec(bad)
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/x{8..10}") == ["a/x8", "a/x9", "a/x10", "b/x8", "b/x9", "b/x10"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_wds_glob_and_coco_explicit_forms(wds, coco):
    assert len(load_records(f"wds:{wds}/shard-*.tar")) == N
    ann = coco / "annotations" / "captions_train2017.json"
    assert len(load_records(f"coco:{ann}")) == N + 1
    assert len(load_records(f"coco:{ann},{coco / 'train2017'}")) == N + 1


def test_missing_and_empty_inputs(tmp_path, folder):
    missing = tmp_path / "nope"
    for spec in (f"folder:{missing}", f"coco:{missing}", f"wds:{missing}/s-{{0..1}}.tar",
                 f"shapes:{missing}"):
        with pytest.raises(FileNotFoundError, match="nope"):
            load_records(spec)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        load_records(f"folder:{tmp_path / 'empty'}")
    with pytest.raises(FileNotFoundError, match="captions_"):
        load_records(f"coco:{tmp_path / 'empty'}")
    with pytest.raises(ValueError, match="no full batch"):
        make_loader(f"folder:{folder}", S, 12, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        make_loader(f"folder:{folder}", S, 2, rank=2, world_size=2)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device_id=0"):
            make_loader(f"folder:{folder}", S, 2, device_id=0)


def test_missing_captions_are_errors(tmp_path):
    d = tmp_path / "f"
    d.mkdir()
    (d / "one.jpg").write_bytes(coded_jpeg(1))
    (d / "one.txt").write_text("a caption")
    (d / "two.jpg").write_bytes(coded_jpeg(2))
    with pytest.raises(FileNotFoundError, match="two.jpg"):
        load_records(f"folder:{d}")
    (d / "two.txt").write_text("   \n")
    with pytest.raises(ValueError, match="empty caption"):
        load_records(f"folder:{d}")
    write_tar(tmp_path / "s.tar", [("k1.jpg", coded_jpeg(1)), ("k1.txt", b"x"),
                                   ("k2.jpg", coded_jpeg(2))])
    with pytest.raises(FileNotFoundError, match="k2.txt"):
        load_records(f"wds:{tmp_path / 's.tar'}")


def test_unreadable_coco_annotation(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "train2017").mkdir()
    ann = tmp_path / "annotations" / "captions_train2017.json"
    ann.write_text("{not json")
    with pytest.raises(ValueError, match="captions_train2017.json"):
        load_records(f"coco:{tmp_path}")
    ann.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="annotations"):
        load_records(f"coco:{tmp_path}")


def test_corrupt_images_are_skipped_with_a_warning(tmp_path):
    d = tmp_path / "f"
    d.mkdir()
    for i in range(5):
        (d / f"ok{i}.jpg").write_bytes(coded_jpeg(i))
        (d / f"ok{i}.txt").write_text(f"caption {i}")
    good = coded_jpeg(7)
    (d / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (d / "garbage.jpg").write_bytes(b"this is not an image at all")
    (d / "garbled.jpg").write_bytes(good[:200] + bytes(range(256)) * 4 + good[-2:])  # valid ends
    for name in ("truncated", "garbage", "garbled"):
        (d / f"{name}.txt").write_text("caption 99")
    with pytest.warns(DataWarning, match=r"skipped 2 .*garbage\.jpg.*truncated\.jpg"):
        rec = load_records(f"folder:{d}")
    assert len(rec) == 6 and not any("truncated" in f or "garbage" in f for f in rec.files)
    with pytest.warns(DataWarning, match=r"skipped 3 .*garbled\.jpg"):
        assert len(load_records(f"folder:{d}", check_images="decode")) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_records(f"folder:{d}", check_images="none")) == 8
    # The loader runs on what is left (header mode keeps "garbled", which DALI still decodes).
    with pytest.warns(DataWarning):
        loader = make_loader(f"folder:{d}", S, 5, shuffle=False, num_threads=1,
                             check_images="decode")
    (images, idx), = list(loader)
    assert idx.tolist() == list(range(5))
    # Corrupt tar members are skipped the same way; all-corrupt sources are an error.
    write_tar(tmp_path / "s.tar", [("a.jpg", good), ("a.txt", b"x"),
                                   ("b.jpg", good[:100]), ("b.txt", b"y")])
    with pytest.warns(DataWarning, match=r"s\.tar:b\.jpg"):
        assert load_records(f"wds:{tmp_path / 's.tar'}").captions == ["x"]
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_bytes(b"")
    (only_bad / "x.txt").write_text("c")
    with pytest.warns(DataWarning), pytest.raises(ValueError, match="no readable images"):
        load_records(f"folder:{only_bad}")
    assert check_image_bytes(b"\x89PNG\r\n\x1a\n", b"....IEND\xaeB`\x82", 100) is None
    assert "truncated PNG" in check_image_bytes(b"\x89PNG\r\n\x1a\n", b"....", 100)


@pytest.mark.gpu
def test_gpu_pipeline_matches_cpu(all_specs):
    cpu = make_loader(all_specs["folder"], S, B, seed=1, num_threads=1)
    gpu = make_loader(all_specs["folder"], S, B, seed=1, device_id=0, num_threads=2)
    for (ci, cx), (gi, gx) in zip(cpu, gpu):
        assert gi.device.type == "cuda" and gi.shape == ci.shape and gi.dtype == torch.float32
        assert torch.equal(cx, gx.cpu())
        # nvJPEG and libjpeg-turbo may differ by a few levels.
        assert (gi.cpu() - ci).abs().mean() < 0.03
        ids, _ = decode_ids(gi.cpu())
        assert ids.tolist() == [record_number(gpu.captions[i]) for i in gx.tolist()]
    assert gpu.epoch == 1
