"""The C++/CUDA extension scadfast._C: built, importable, and the fallback when it is missing."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from scadfast.ops import _impl, cond_aug, cond_aug_ref


def test_extension_is_importable_with_a_cpu_kernel():
    ext = _impl.extension()
    assert ext is not None, f"scadfast._C did not import: {_impl.extension_error()}"
    assert _impl.extension_error() is None
    assert _impl.extension_available()
    a = torch.tensor([[0.5, -1.0, 2.0, 0.0]])  # relu, E=2: mu=(0.5, 0), logvar=(2, 0)
    eps = torch.tensor([[1.0, -2.0]])
    c_hat, mu, logvar, kl = ext.cond_aug_forward(a, eps, False)
    torch.testing.assert_close(mu, torch.tensor([[0.5, 0.0]]))
    torch.testing.assert_close(logvar, torch.tensor([[2.0, 0.0]]))
    e = torch.e
    torch.testing.assert_close(c_hat, torch.tensor([[0.5 + e, -2.0]]))
    expected_kl = -0.5 * ((1 + 2 - 0.25 - e**2) + (1 + 0 - 0 - 1)) / 2
    torch.testing.assert_close(kl, torch.tensor(expected_kl))


def test_has_cuda_answers():
    ext = _impl.extension()
    assert ext is not None, _impl.extension_error()
    answer = ext.has_cuda()
    assert isinstance(answer, bool)
    if not answer:  # a CPU-only build refuses CUDA tensors with a clear message (checked before any CUDA call)
        if torch.cuda.is_available():
            with pytest.raises(RuntimeError, match="built without CUDA kernels"):
                ext.cond_aug_forward(torch.zeros(1, 4, device="cuda"), torch.zeros(1, 2, device="cuda"), False)


@pytest.mark.parametrize("has_cuda", [False, True])
def test_extension_available_follows_has_cuda(monkeypatch, has_cuda):
    """``extension_available(cuda=True)`` (what impl="auto"/"cuda" decide on) asks the build."""
    stub = types.SimpleNamespace(has_cuda=lambda: has_cuda)
    monkeypatch.setattr(_impl, "_load_extension", lambda: (stub, None))
    assert _impl.extension_available() is True
    assert _impl.extension_available(cuda=True) is has_cuda


def test_ops_have_fake_impls_with_the_right_shapes():
    """On meta tensors the ops answer through their fake implementations (what torch.compile uses)."""
    a, eps = torch.empty(5, 12, device="meta"), torch.empty(5, 3, device="meta")
    c_hat, mu, logvar, kl = torch.ops.scadfast.cond_aug(a, eps, "glu", "cpu")
    assert [t.shape for t in (c_hat, mu, logvar)] == [(5, 3)] * 3 and kl.shape == ()
    assert all(t.device.type == "meta" for t in (c_hat, mu, logvar, kl))
    g = torch.empty(5, 3, device="meta")
    grad_a, grad_eps = torch.ops.scadfast.cond_aug_backward(a, eps, g, g, g, torch.empty((), device="meta"),
                                                            "glu", "cpu")
    assert grad_a.shape == (5, 12) and grad_eps.shape == (5, 3)


@pytest.fixture
def no_extension(monkeypatch):
    """Pretend scadfast._C failed to import (and reset the warn-once registry)."""
    monkeypatch.setattr(_impl, "_load_extension", lambda: (None, "ImportError: simulated missing extension"))
    monkeypatch.setattr(_impl, "_warned", set())
    assert _impl.extension() is None


def _args():
    s = torch.randn(4, 6)
    w = torch.randn(12, 6)
    b = torch.randn(12)
    eps = torch.randn(4, 3)
    return s, w, b, eps


def test_missing_extension_auto_warns_once_and_matches_reference(no_extension):
    s, w, b, eps = _args()
    with pytest.warns(RuntimeWarning, match="simulated missing extension") as record:
        out = cond_aug(s, w, b, eps)
    assert len([r for r in record if issubclass(r.category, RuntimeWarning)]) == 1
    for o, r in zip(out, cond_aug_ref(s, w, b, eps)):
        assert torch.equal(o, r)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        out2 = cond_aug(s, w, b, eps, mode="glu")
    assert torch.equal(out2[0], out[0])
    # Gradients flow through the reference path.
    s.requires_grad_(True)
    cond_aug(s, w, b, eps)[0].sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_missing_extension_explicit_cuda_raises(no_extension):
    s, w, b, eps = _args()
    with pytest.raises(RuntimeError, match=r"impl='cuda' needs the compiled extension scadfast._C.*simulated"):
        cond_aug(s, w, b, eps, impl="cuda")
    # The raw op says the same instead of failing obscurely.
    with pytest.raises(RuntimeError, match="needs the compiled extension scadfast._C"):
        torch.ops.scadfast.cond_aug(torch.randn(4, 12), eps, "glu", "cpu")


def test_auto_impl_on_cpu_runs_the_extension_and_explicit_cuda_raises(monkeypatch):
    s, w, b, eps = _args()
    expected = cond_aug_ref(s, w, b, eps)

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference ran instead of the extension")

    import scadfast.ops.conditioning as mod

    monkeypatch.setattr(mod, "cond_aug_ref", no_reference)
    for o, r in zip(cond_aug(s, w, b, eps, impl="auto"), expected):
        torch.testing.assert_close(o, r)
    # impl="cuda" names the CUDA kernel: on CPU tensors it raises instead of running the CPU kernel.
    with pytest.raises(RuntimeError, match="impl='cuda' needs CUDA tensors, got s on cpu"):
        cond_aug(s, w, b, eps, impl="cuda")
