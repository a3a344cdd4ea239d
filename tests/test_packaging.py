"""Packaging: pyproject.toml against the code, CI and README; the console scripts' --help names."""

from __future__ import annotations

import glob
import importlib
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


@pytest.fixture(scope="module")
def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_one_version_source(pyproject):
    import scadfast

    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "scadfast.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", scadfast.__version__)
    setup_py = open(os.path.join(ROOT, "setup.py")).read()
    assert not re.search(r"\b(version|name|install_requires|extras_require|entry_points)\s*=", setup_py)


def test_ci_extras_exist(pyproject):
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    wanted = re.search(r'-e "\.\[([\w,]+)\]"', ci).group(1).split(",")
    assert set(wanted) <= set(pyproject["project"]["optional-dependencies"]), wanted


def test_package_dirs_and_data_exist(pyproject):
    tool = pyproject["tool"]["setuptools"]
    for pkg, d in tool["package-dir"].items():
        assert os.path.isfile(os.path.join(ROOT, d, "__init__.py")), (pkg, d)
    for pkg, patterns in tool["package-data"].items():
        for pattern in patterns:
            assert glob.glob(os.path.join(ROOT, *pkg.split("."), pattern)), (pkg, pattern)


def test_scripts_resolve_and_are_documented(pyproject):
    readme = open(os.path.join(ROOT, "README.md")).read()
    for script, target in pyproject["project"]["scripts"].items():
        module, func = target.split(":")
        assert script == "scadfast-" + module.rsplit(".", 1)[-1], script
        assert callable(getattr(importlib.import_module(module), func)), target
        assert f"`{script}`" in readme, f"README does not document {script}"


@pytest.mark.parametrize("module", ["scadfast.train", "scadfast.sample", "scadfast.evaluate", "scadfast.export",
                                    "scadfast.env"])
@pytest.mark.parametrize("typed", ["script", "module"])
def test_help_shows_the_name_the_user_typed(module, typed, monkeypatch, capsys):
    script = "scadfast-" + module.rsplit(".", 1)[-1]
    mod = importlib.import_module(module)
    argv0 = os.path.join(os.path.dirname(sys.executable), script) if typed == "script" else mod.__file__
    monkeypatch.setattr(sys, "argv", [argv0, "--help"])
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    expected = script if typed == "script" else f"python -m {module}"
    assert capsys.readouterr().out.startswith(f"usage: {expected} ")
