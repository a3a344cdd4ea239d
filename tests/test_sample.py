"""python -m scadfast.sample on a checkpoint the training engine wrote."""

import json
import os

import pytest
import torch
from PIL import Image

from scadfast import sample, train


@pytest.fixture(scope="module")
def run_dir(cache, tmp_path_factory, tiny_train):
    out = str(tmp_path_factory.mktemp("run") / "galip")
    assert train.main(["--variant", "galip", "--steps", "1", "--out", out, *tiny_train(shapes_n=16)]) == 0
    return out


def test_grid_rows_per_prompt_and_seeds_recorded(run_dir, tmp_path):
    out = str(tmp_path / "grid.png")
    assert sample.main(["--ckpt", run_dir, "--prompt", "a red circle", "--prompt", "a blue square", "-n", "3",
                        "--out", out, "--seed", "7", "--device", "cpu"]) == 0
    w, h = Image.open(out).size
    assert w > h  # 3 columns, 2 rows of 64 px images
    meta = json.load(open(str(tmp_path / "grid.json")))
    assert meta["seeds"] == [7, 8, 9] and meta["prompts"] == ["a red circle", "a blue square"]


def test_same_seed_same_image_and_per_prompt_files(run_dir, tmp_path):
    from scadfast import runs

    loaded = runs.load(run_dir, "cpu")
    a = sample.generate(loaded, ["a red circle"], 2, seed=3)
    b = sample.generate(loaded, ["a red circle", "a green star"], 2, seed=3)
    assert torch.allclose(a[0], b[0], atol=1e-5)  # text batched differently: rounding only
    assert sample.main(["--ckpt", run_dir, "--prompt", "a red circle", "--prompt", "a green star", "-n", "2",
                        "--per-prompt", "--out", str(tmp_path / "d"), "--device", "cpu"]) == 0
    assert sorted(os.listdir(tmp_path / "d")) == ["000_a_red_circle.png", "001_a_green_star.png", "samples.json"]


def test_bad_arguments(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", run_dir])  # no prompt
    assert sample.main(["--ckpt", str(tmp_path / "missing.pt"), "--prompt", "x"]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
