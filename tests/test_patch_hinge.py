"""Tests of ``scadfast.ops.patch_hinge_loss`` (docs/design.md §5.2, §5.4, §7).

On CPU the "triton" path runs in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so those
tests use small maps. Tolerances against the reference (which runs the same math through autograd):

* loss, any input dtype: both paths upcast the same stored values and accumulate in fp32 (fp64 for
  fp64), so only the summation order differs: rtol 1e-5 (fp32), 1e-12 (fp64).
* gradient: the same formula ``g·(±1)·w/Σw`` rounded once to the logits' dtype; ``Σw`` may differ in
  its last fp32 bit (summation order), which can move a half-precision result by one ulp:
  rtol 1e-6 (fp32), 1e-3 (fp16, ulp 2^-10), 8e-3 (bf16, ulp 2^-7 relative to the value); for fp16
  also atol 2^-23 (two subnormal ulps: with ~10^6 elements the per-element gradient 1/N falls below
  fp16's smallest normal, where the spacing is absolute).
"""

from __future__ import annotations

import pytest
import torch

from scadfast.ops import _impl
from scadfast.ops.patch_hinge import patch_hinge_loss, patch_hinge_loss_ref

TRITON = _impl.triton_importable() and (torch.cuda.is_available() or _impl.triton_interpret())
DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not TRITON, reason="Triton cannot run here")

GRAD_RTOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}
GRAD_ATOL = {torch.float32: 0.0, torch.float16: 2.0**-23, torch.bfloat16: 0.0, torch.float64: 0.0}
LOSS_RTOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5, torch.float64: 1e-12}


def _logits(shape, dtype=torch.float32, device=DEV):
    # Spread over the hinge kinks at ±1, both sides active.
    return (torch.randn(shape, device=device) * 2).to(dtype)


def _weight(kind, shape, device=DEV):
    if kind is None:
        return None
    if kind == "sample":
        return torch.rand((shape[0],) + (1,) * (len(shape) - 1), device=device) + 0.1
    if kind == "full":
        return torch.rand(shape, device=device) + 0.1
    if kind == "inner":  # broadcast over the leading dims only
        return torch.rand(shape[-1], device=device) + 0.1
    raise AssertionError(kind)


def _run(fn, x, real, w):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, real, w)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


def _compare(x, real, w, impl):
    ref_loss, ref_g = _run(patch_hinge_loss_ref, x, real, w)
    loss, g = _run(lambda a, r, ww: patch_hinge_loss(a, r, ww, impl=impl), x, real, w)
    dt = x.dtype
    assert loss.dtype == (torch.float64 if dt == torch.float64 else torch.float32)
    assert loss.shape == ()
    assert g.dtype == dt and g.shape == x.shape
    torch.testing.assert_close(loss, ref_loss, rtol=LOSS_RTOL[dt], atol=0)
    torch.testing.assert_close(g, ref_g, rtol=GRAD_RTOL[dt], atol=GRAD_ATOL[dt])


# ---------------------------------------------------------------------------------------------
# Agreement with the reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("weight", [None, "sample", "full", "inner"])
@pytest.mark.parametrize("real", [True, False])
def test_auto_matches_reference(dtype, weight, real):
    shape = (4, 1, 26, 26)
    x = _logits(shape, dtype)
    _compare(x, real, _weight(weight, shape), "auto")


@pytest.mark.parametrize("shape", [(7,), (3, 5, 7), (2, 3, 1, 5, 2, 3)])
def test_auto_odd_shapes(shape):
    x = _logits(shape)
    _compare(x, True, None, "auto")
    _compare(x, False, _weight("full", shape), "auto")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("weight", [None, "sample", "full"])
@pytest.mark.parametrize("real", [True, False])
def test_triton_matches_reference(dtype, weight, real):
    shape = (2, 1, 26, 26)  # 1352 elements: 2 programs + the finishing reduce in the interpreter
    _compare(_logits(shape, dtype), real, _weight(weight, shape), "triton")


@needs_triton
@pytest.mark.parametrize("shape,weight", [((3, 5, 7), "inner"), ((1,), None), ((5, 1, 3), "sample")])
def test_triton_odd_sizes(shape, weight):
    _compare(_logits(shape), False, _weight(weight, shape), "triton")


@needs_triton
@pytest.mark.parametrize("programs", [1, 3, 7])
@pytest.mark.parametrize("weight", [None, "sample"])
def test_triton_reduction_paths(programs, weight):
    """Single-program and multi-program (partials + finishing kernel) forwards agree and are repeatable."""
    from scadfast.kernels.patch_hinge import patch_hinge_forward

    shape = (3, 1, 9, 11)
    x, w = _logits(shape), _weight(weight, shape)
    ref = patch_hinge_loss_ref(x, True, w)
    loss, denom = patch_hinge_forward(x, w, True, block=32, programs=programs)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    want_denom = torch.tensor(float(x.numel())) if w is None else w.expand(shape).sum()
    torch.testing.assert_close(denom.cpu(), want_denom.cpu(), rtol=1e-6, atol=0)
    again, _ = patch_hinge_forward(x, w, True, block=32, programs=programs)
    assert torch.equal(loss, again), "the forward reduction must be deterministic"


def test_coalesce_layouts():
    from scadfast.kernels.patch_hinge import coalesce

    x = torch.empty(4, 1, 26, 26)
    assert coalesce(x.shape, x.stride()) == [(4 * 26 * 26, 1)]
    w = torch.empty(4, 1, 1, 1).expand(4, 1, 26, 26)
    assert coalesce(w.shape, w.stride()) == [(4, 1), (26 * 26, 0)]
    t = torch.empty(6, 5).t()
    assert coalesce(t.shape, t.stride()) == [(5, 1), (6, 5)]
    s = torch.empty(()).expand(3, 4)
    assert coalesce(s.shape, s.stride()) == [(12, 0)]
    assert coalesce((1, 1), (1, 1)) == [(1, 0)]


# ---------------------------------------------------------------------------------------------
# Layouts


@pytest.mark.parametrize("impl", ["auto", pytest.param("triton", marks=needs_triton)])
def test_non_contiguous(impl):
    base = _logits((2, 3, 8, 10))
    x = base.permute(0, 2, 3, 1)[:, ::2, 1:, :]  # permuted, strided and offset
    assert not x.is_contiguous()
    w = (torch.rand(x.shape[0], 1, 1, 1, device=DEV) + 0.1).expand(-1, x.shape[1], -1, x.shape[3])
    _compare(x, True, None, impl)
    _compare(x, False, w, impl)
    wt = (torch.rand(x.shape[-1], x.shape[-2], device=DEV) + 0.1).t()  # transposed full trailing weight
    _compare(x, True, wt, impl)


@needs_triton
def test_triton_high_rank_layout_falls_back_to_copy():
    # A layout that stays 6-dimensional after coalescing is copied before the kernel runs.
    x = _logits((2, 3, 2, 3, 2, 3)).permute(5, 3, 1, 4, 2, 0)
    w = (torch.rand(3, 1, 3, 1, 1, 2, device=DEV) + 0.1)
    _compare(x, False, w, "triton")


# ---------------------------------------------------------------------------------------------
# Autograd contract


@pytest.mark.parametrize("impl", ["auto", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("weight", [None, "sample"])
@pytest.mark.parametrize("real", [True, False])
def test_gradcheck_and_gradgradcheck(impl, weight, real):
    shape = (2, 1, 3, 4)
    x = _logits(shape, torch.float64).requires_grad_(True)
    # Keep finite differences away from the kinks at ±1.
    with torch.no_grad():
        x[(x.abs() - 1).abs() < 1e-2] += 0.1
    w = _weight(weight, shape)
    w = None if w is None else w.double()
    fn = lambda t: patch_hinge_loss(t, real, w, impl=impl)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_double_backward_matches_reference():
    """A penalty on the first gradient back-propagates like the reference (through the incoming grad)."""
    x = _logits((3, 1, 4, 4), torch.float64)
    w = _weight("sample", x.shape).double()
    out = []
    for fn in (patch_hinge_loss_ref, lambda a, r, ww: patch_hinge_loss(a, r, ww, impl="auto")):
        xx = x.clone().requires_grad_(True)
        scale = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
        loss = fn(xx, True, w) * scale
        (g,) = torch.autograd.grad(loss, xx, create_graph=True)
        (g.pow(2).sum()).backward()
        out.append(scale.grad)
    torch.testing.assert_close(out[1], out[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("impl", ["ref", "auto", pytest.param("triton", marks=needs_triton)])
def test_weight_gets_no_gradient(impl):
    x = _logits((2, 1, 5, 5)).requires_grad_(True)
    w = (torch.rand(2, 1, 1, 1, device=DEV) + 0.1).requires_grad_(True)
    patch_hinge_loss(x, True, w, impl=impl).backward()
    assert x.grad is not None and w.grad is None


@pytest.mark.parametrize("impl", ["auto", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("real", [True, False])
def test_nan_like_reference(impl, real):
    """NaN logits: NaN loss, and the gradient at the NaN passes through exactly as autograd's relu does."""
    x = _logits((2, 1, 5, 5))
    x[1, 0, 2, 3] = float("nan")
    for w in (None, _weight("full", x.shape)):
        ref_loss, ref_g = _run(patch_hinge_loss_ref, x, real, w)
        loss, g = _run(lambda a, r, ww: patch_hinge_loss(a, r, ww, impl=impl), x, real, w)
        assert torch.isnan(loss) and torch.isnan(ref_loss)
        torch.testing.assert_close(g, ref_g, rtol=1e-6, atol=0, equal_nan=True)
        assert g[1, 0, 2, 3] != 0


def test_fake_tensors_go_through_the_fake_impl():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = _logits((2, 3))
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        out = patch_hinge_loss(fx, True)  # the custom op's fake impl answers
        assert out.shape == () and out.dtype == torch.float32


def test_custom_ops_opcheck():
    x = _logits((2, 1, 5, 6)).requires_grad_(True)
    w = _weight("sample", x.shape)
    for backend in ["torch"] + (["triton"] if TRITON else []):
        torch.library.opcheck(torch.ops.scadfast.patch_hinge_loss.default, (x, None, True, backend))
        torch.library.opcheck(torch.ops.scadfast.patch_hinge_loss.default, (x, w, False, backend))
        g = torch.tensor(1.3, device=x.device, requires_grad=True)
        denom = w.expand(x.shape).sum()
        torch.library.opcheck(torch.ops.scadfast.patch_hinge_loss_backward.default,
                              (g, x.detach(), w, denom, True, backend))


@pytest.mark.parametrize(
    "backend",
    [
        # aot_eager: Dynamo (no graph break), the fake impls and the autograd registration through
        # AOTAutograd; inductor adds code generation around the opaque ops (~40 s on a small CPU).
        "aot_eager",
        pytest.param("inductor", marks=pytest.mark.slow),
    ],
)
def test_torch_compile_fullgraph(backend):
    def step(x, w):
        return patch_hinge_loss(x, True, w) + patch_hinge_loss(x * 0.5, False)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    x = _logits((4, 1, 26, 26))
    w = _weight("sample", x.shape)
    xc = x.clone().requires_grad_(True)
    xe = x.clone().requires_grad_(True)
    lc = compiled(xc, w)
    lc.backward()
    le = patch_hinge_loss_ref(xe, True, w) + patch_hinge_loss_ref(xe * 0.5, False)
    le.backward()
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=0)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_raise():
    x = _logits((2, 1, 4, 4))
    for bad_real in (1, 0, None, "real", torch.tensor(True)):
        with pytest.raises(TypeError, match="real must be a Python bool"):
            patch_hinge_loss(x, bad_real)
    with pytest.raises(ValueError, match="empty"):
        patch_hinge_loss(torch.empty(0, 1, 4, 4, device=DEV), True)
    with pytest.raises(ValueError, match=r"weight of shape \(3, 1, 1, 1\) is not broadcastable to logits of shape \(2, 1, 4, 4\)"):
        patch_hinge_loss(x, True, torch.ones(3, 1, 1, 1, device=DEV))
    with pytest.raises(ValueError, match="not broadcastable"):  # weight may not add dims
        patch_hinge_loss(x[0, 0], True, torch.ones(1, 4, 4, device=DEV))
    with pytest.raises(TypeError, match="logits must be float16"):
        patch_hinge_loss(torch.ones(2, 3, dtype=torch.int64, device=DEV), True)
    with pytest.raises(TypeError, match="weight must be"):
        patch_hinge_loss(x, True, torch.ones(2, 1, 1, 1, dtype=torch.int32, device=DEV))
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        patch_hinge_loss([1.0, 2.0], True)
    with pytest.raises(ValueError, match="different devices"):
        patch_hinge_loss(x, True, torch.ones(2, 1, 1, 1, device="meta"))
    with pytest.raises(ValueError, match="impl="):
        patch_hinge_loss(x, True, impl="cuda")
    with pytest.raises(ValueError, match="impl="):
        patch_hinge_loss(x, True, impl="fast")


def test_triton_unavailable_raises(monkeypatch):
    x = _logits((2, 3), device="cpu")
    # Triton installed, but a CPU tensor without the interpreter: the kernel cannot run
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if _impl.triton_importable():
        with pytest.raises(RuntimeError, match="impl='triton' needs a CUDA tensor; got a tensor on cpu"):
            patch_hinge_loss(x, True, impl="triton")
    # Triton not importable at all: the message says so, and "auto" still runs (the torch path)
    monkeypatch.setattr(_impl, "_TRITON_OK", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="impl='triton' needs triton installed"):
        patch_hinge_loss(x, True, impl="triton")
    torch.testing.assert_close(patch_hinge_loss(x, True), patch_hinge_loss_ref(x, True), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [64 * 26 * 26, (1 << 20) + 3])
def test_gpu_matches_reference(dtype, n):
    x = _logits((n,), dtype, device="cuda")
    _compare(x, True, None, "triton")
    _compare(x, False, _weight("full", (n,), device="cuda"), "triton")
    a, b = patch_hinge_loss(x, True), patch_hinge_loss(x, True)
    assert torch.equal(a, b)
