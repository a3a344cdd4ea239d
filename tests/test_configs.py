"""Every shipped config file parses into train's flags (no unknown key, every value of its flag's type)."""

import glob
import os

import pytest

from scadfast import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_configs_exist():
    assert {"cpu_tiny.yaml", "cpu_long.yaml"} <= {os.path.basename(p) for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_parses(path):
    args = train.parse_args(["--variant", "scad_mi", "--config", path])
    from_file = train.load_config(path, train.build_parser())
    for key, value in from_file.items():
        assert getattr(args, key) == value, key


def test_long_recipe_is_the_default_trained_longer():
    tiny = train.parse_args(["--variant", "scad_mi", "--config", os.path.join(ROOT, "configs", "cpu_tiny.yaml")])
    long = train.parse_args(["--variant", "scad_mi", "--config", os.path.join(ROOT, "configs", "cpu_long.yaml")])
    assert long.steps == 4 * tiny.steps
    differ = {k for k in vars(tiny) if k not in ("steps", "eval_every", "cfg") and getattr(tiny, k) != getattr(long, k)}
    assert not differ and long.cfg == tiny.cfg
