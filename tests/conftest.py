"""Test configuration.

Triton kernels run on CPU tensors through the Triton interpreter, which must be switched on before
any kernel module is imported; on a machine with a GPU the real kernels run instead.
"""

import os

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if _has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (model-sized CPU work on a shared 2-core box is 10-20x slower
    with oversubscribed threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def clip():
    """The embedded tiny CLIP with random weights (seeded), shared by a test module."""
    from scadfast.models.clip import FrozenCLIP

    torch.manual_seed(0)
    return FrozenCLIP()


# Flags of a tiny training run: 16-wide networks on 48 shapes images at batch 4, a log line every step,
# a 2×2 sample grid every 2 steps, no learning-curve snapshots. A few steps take seconds on one CPU core.
TINY_TRAIN = {"shapes_n": 48, "batch_size": 4, "log_every": 1, "sample_every": 2, "ngf": 16, "ndf": 16,
              "device": "cpu", "sample_prompts": 2, "sample_noise": 2, "eval_every": 0}


def tiny_train_args(**overrides) -> list[str]:
    """``TINY_TRAIN`` with ``overrides`` (same keys) as command-line flags for ``scadfast.train``."""
    unknown = set(overrides) - set(TINY_TRAIN)
    if unknown:
        raise KeyError(f"tiny_train: unknown flag(s) {sorted(unknown)}; known: {sorted(TINY_TRAIN)}")
    flags = {**TINY_TRAIN, **overrides}
    return [x for k, v in flags.items() for x in ("--" + k.replace("_", "-"), str(v))]


@pytest.fixture(scope="session")
def bench_module():
    """``bench_module(name)`` → the script ``bench/<name>.py`` imported as a module (bench/ is not a package)."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", name + ".py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load


@pytest.fixture(scope="session")
def tiny_train():
    """``tiny_train(**overrides)`` → the flags of a tiny training run (see ``TINY_TRAIN``)."""
    return tiny_train_args


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh ``SCADFAST_CACHE`` (text-embedding cache, verified-image list) for one test module."""
    d = str(tmp_path_factory.mktemp("cache"))
    old = os.environ.get("SCADFAST_CACHE")
    os.environ["SCADFAST_CACHE"] = d
    yield d
    if old is None:
        os.environ.pop("SCADFAST_CACHE", None)
    else:
        os.environ["SCADFAST_CACHE"] = old


@pytest.fixture(scope="module")
def train_env(cache):
    """Environment for a ``python -m scadfast.*`` subprocess: this checkout first on the path, the module's
    cache, one thread, unbuffered output, and without the slow Triton interpreter these tests switch on
    (a CPU run takes the fused CPU paths)."""
    env = dict(os.environ, SCADFAST_CACHE=cache, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env
