"""The in-memory loader (``backend="memory"``): DALI's batches, order and resume without DALI.

Fixture images encode their record number in their colour (``coded_images.py``: left part red level
``20 + 9 i``, right part white), as in ``test_data_dali.py``, so a batch can be checked against its
indices and a horizontal flip is visible.
"""

import warnings

import numpy as np
import pytest
import torch

from scadfast.data import DataWarning, make_loader
from scadfast.data import dali as dali_lib
from scadfast.data.memory import MemoryLoader, decode_image

from coded_images import coded_image

N, B, S = 22, 4, 32


@pytest.fixture
def folder(tmp_path):
    for i in range(N):
        (tmp_path / f"{i:03d}.png").write_bytes(coded_image(i))
        (tmp_path / f"{i:03d}.txt").write_text(f"image number {i}")
    return f"folder:{tmp_path}"


@pytest.fixture
def no_dali(monkeypatch):
    """DALI made unavailable: anything that reaches for it fails the test."""
    def missing():
        raise ImportError("no DALI in this test")
    monkeypatch.setattr(dali_lib, "_dali", missing)


def _red(images: torch.Tensor) -> list[int]:
    """Record numbers read back from the images' left part (red level 20 + 9 i)."""
    level = (images[:, 0, :, : S // 4].mean((1, 2)) + 1) * 127.5
    return [round((float(v) - 20) / 9) for v in level]


def test_decode_image_resizes_the_shorter_side_and_crops_the_centre():
    x = decode_image(coded_image(5), S)
    assert x.shape == (3, S, S) and x.dtype == np.uint8
    # 64 x 48 -> 43 x 32, centre 32 columns of 43: left edge at column 5, the red/white boundary at ~21.5
    assert (x[:, :, :12] == np.array([65, 120, 60], np.uint8)[:, None, None]).all()
    assert (x[:, :, -8:] == 255).all()


def test_batches_follow_the_documented_order_without_dali(folder, no_dali):
    loader = make_loader(folder, S, B, seed=7, backend="memory")
    assert isinstance(loader, MemoryLoader) and len(loader) == N // B
    seen = []
    for images, idx in loader:
        assert images.shape == (B, 3, S, S) and images.dtype == torch.float32 and idx.dtype == torch.int64
        assert -1 <= float(images.min()) and float(images.max()) <= 1
        assert _red(images) == idx.tolist()  # each image is the record its index names
        seen += idx.tolist()
    assert seen == loader.epoch_order(0).tolist() and len(set(seen)) == len(seen)
    assert (loader.epoch, loader.batch) == (1, 0)
    assert [i for _, idx in loader for i in idx.tolist()] == loader.epoch_order(1).tolist() != seen


def test_two_ranks_are_disjoint_and_resume_mid_epoch_gives_the_rest(folder, no_dali):
    ranks = [make_loader(folder, S, B, seed=1, rank=r, world_size=2, backend="memory") for r in (0, 1)]
    got = [[i for _, idx in r for i in idx.tolist()] for r in ranks]
    assert not set(got[0]) & set(got[1]) and len(got[0]) == len(got[1]) == (N // 2 // B) * B

    full = make_loader(folder, S, B, seed=3, backend="memory")
    it = iter(full)
    next(it), next(it)
    state = full.state_dict()
    rest = [idx.tolist() for _, idx in it]
    again = make_loader(folder, S, B, seed=3, backend="memory")
    again.load_state_dict(state)
    assert [idx.tolist() for _, idx in again] == rest
    with pytest.raises(ValueError, match="seed=3 in the checkpoint but 4"):
        make_loader(folder, S, B, seed=4, backend="memory").load_state_dict(state)


def test_flips_follow_the_documented_decisions(folder, no_dali):
    loader = make_loader(folder, S, B, seed=5, flip=True, backend="memory")
    flips = loader.epoch_flips(0)
    assert flips.any() and not flips.all()
    for images, idx in loader:
        white_left = images[:, :, :, 0].mean((1, 2)) > 0.9  # a flipped image has white on the left
        assert white_left.tolist() == flips[idx.numpy()].tolist()


def test_equals_the_dali_loader_batch_for_batch(tmp_path):
    pytest.importorskip("nvidia.dali")
    spec = f"shapes:n=40,root={tmp_path}"
    a = make_loader(spec, 64, 8, seed=2, num_threads=1)
    b = make_loader(spec, 64, 8, seed=2, backend="memory")
    for _ in range(2):  # two epochs
        for (xa, ia), (xb, ib) in zip(a, b):
            assert torch.equal(ia, ib) and torch.equal(xa, xb)  # the same JPEG pixels, the same arithmetic


def test_undecodable_image_is_skipped_with_a_warning_and_too_big_sets_are_refused(tmp_path, no_dali):
    for i in range(N):
        (tmp_path / f"{i:03d}.png").write_bytes(coded_image(i) if i != 4 else b"\x89PNG\r\n\x1a\n" + b"0" * 64)
        (tmp_path / f"{i:03d}.txt").write_text(f"image number {i}")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        loader = make_loader(f"folder:{tmp_path}", S, B, seed=0, backend="memory", check_images="none")
    assert any(issubclass(x.category, DataWarning) and "004" in str(x.message) for x in w)
    seen = [i for _, idx in loader for i in idx.tolist()]
    assert 4 not in seen and len(seen) == len(loader) * B
    with pytest.raises(ValueError, match=r"need 0\.0 GiB in memory, more than .*--loader dali"):
        MemoryLoader(loader.records, S, B, max_bytes=1000)
    with pytest.raises(ValueError, match="backend must be one of"):
        make_loader(f"folder:{tmp_path}", S, B, backend="torch")
