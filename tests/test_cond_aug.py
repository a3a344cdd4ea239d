"""Fused conditioning augmentation (scadfast.ops.cond_aug, module scadfast.ops.conditioning) against its PyTorch reference.

On CPU, impl="auto" runs the C++ kernel of the extension scadfast._C (tests/test_extension.py checks
that it is built); the tests marked ``gpu`` run the CUDA kernels and are skipped without a GPU.

Tolerances: fp32/fp64 results match the reference to rounding (the same formulas, evaluated in the
same precision). For fp16/bf16 the fused kernel computes in fp32 and rounds each output once, while
the reference rounds mu/logvar before c_hat and the KL and runs its backward in half precision, so the
comparison allows a few ulps of the half type: fp16 rtol=atol=4e-3, bf16 rtol=atol=3e-2 (outputs and
gradients, gradients scaled by their max), and the fp32 KL to 5e-4 (fp16) / 5e-3 (bf16). Observed
errors are about 4x below these bounds.
"""

from __future__ import annotations

import pytest
import torch

from scadfast.ops import CondAug, cond_aug, cond_aug_ref
from scadfast.ops import _impl

MODES = ("glu", "relu")
PARTS = {"glu": 4, "relu": 2}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _fused_path_available():
    # Without the extension impl="auto" silently tests the reference against itself: fail instead.
    assert _impl.extension_available(), f"scadfast._C is not built: {_impl.extension_error()}"
    if torch.cuda.is_available():
        assert _impl.extension_available(cuda=True), "scadfast._C was built without its CUDA kernels"


def _inputs(mode, B=6, d=10, E=5, dtype=torch.float32, device="cpu", requires_grad=True, bias=True):
    g = torch.Generator().manual_seed(1234)
    s = torch.randn(B, d, generator=g, dtype=torch.float64)
    w = torch.randn(PARTS[mode] * E, d, generator=g, dtype=torch.float64) / d**0.5
    b = torch.randn(PARTS[mode] * E, generator=g, dtype=torch.float64) * 0.5 if bias else None
    eps = torch.randn(B, E, generator=g, dtype=torch.float64)
    out = []
    for t in (s, w, b, eps):
        if t is not None:
            t = t.to(device=device, dtype=dtype).requires_grad_(requires_grad)
        out.append(t)
    return out


def _grads(fn, tensors, outs_grad_seed=7):
    """Run fn, contract all four outputs with fixed random cotangents, return the input grads."""
    tensors = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    outs = fn(*tensors)
    g = torch.Generator().manual_seed(outs_grad_seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum() for o in outs)
    loss.backward()
    return outs, [t.grad if t is not None else None for t in tensors]


def _close(actual, expected, rtol, atol, what):
    assert actual.shape == expected.shape, what
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------
# Forward / backward against the reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
def test_forward_and_grads_match_reference(mode, dtype, device):
    x = _inputs(mode, dtype=dtype, device=device)
    outs, grads = _grads(lambda *t: cond_aug(*t, mode=mode), x)
    routs, rgrads = _grads(lambda *t: cond_aug_ref(*t, mode=mode), x)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for name, o, r in zip(("c_hat", "mu", "logvar", "kl"), outs, routs):
        assert o.dtype == r.dtype, name
        _close(o, r, what=name, **tol)
    assert outs[3].dim() == 0
    for name, g, r in zip(("s", "weight", "bias", "eps"), grads, rgrads):
        _close(g, r, what=f"grad {name}", **tol)


@pytest.mark.parametrize("mode", MODES)
def test_sampled_eps_follows_torch_rng(mode):
    s, w, b, _ = _inputs(mode, requires_grad=False)
    torch.manual_seed(123)
    fused = cond_aug(s, w, b, mode=mode)
    torch.manual_seed(123)
    ref = cond_aug_ref(s, w, b, mode=mode)
    for o, r in zip(fused, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
    # The noise really is sampled: another seed gives another c_hat, same mu/logvar/kl.
    torch.manual_seed(124)
    other = cond_aug(s, w, b, mode=mode)
    assert not torch.allclose(other[0], fused[0])
    torch.testing.assert_close(other[1], fused[1])
    torch.testing.assert_close(other[3], fused[3])


@pytest.mark.parametrize("mode", MODES)
def test_sampled_eps_gradients(mode):
    s, w, b, _ = _inputs(mode)
    torch.manual_seed(5)
    _, g = _grads(lambda *t: cond_aug(*t, mode=mode), [s, w, b])
    torch.manual_seed(5)
    _, r = _grads(lambda *t: cond_aug_ref(*t, mode=mode), [s, w, b])
    for a, e in zip(g, r):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_and_gradgradcheck_fp64(mode):
    x = _inputs(mode, B=3, d=4, E=2, dtype=torch.float64)
    fn = lambda *t: cond_aug(*t, mode=mode)  # noqa: E731
    assert torch.autograd.gradcheck(fn, x)
    assert torch.autograd.gradgradcheck(fn, x)


def test_gradgradcheck_without_bias_and_partial_outputs():
    # No bias; only c_hat and kl used (the other output gradients are None in the backward).
    s, w, _, eps = _inputs("glu", B=3, d=4, E=2, dtype=torch.float64, bias=False)

    def fn(s, w, eps):
        c, _, _, kl = cond_aug(s, w, None, eps, mode="glu")
        return c, kl

    assert torch.autograd.gradcheck(fn, (s, w, eps))
    assert torch.autograd.gradgradcheck(fn, (s, w, eps))


def test_double_backward_matches_reference():
    """A gradient penalty style objective: d/dparams of ||d loss / d s||²."""
    for mode in MODES:
        x = _inputs(mode, dtype=torch.float64)

        def penalty(fn):
            s, w, b, eps = [t.detach().clone().requires_grad_(True) for t in x]
            c, mu, lv, kl = fn(s, w, b, eps, mode=mode)
            loss = (c.sin()).sum() + (mu * lv).sum() + 3 * kl
            (gs,) = torch.autograd.grad(loss, s, create_graph=True)
            gs.pow(2).sum().backward()
            return [t.grad for t in (s, w, b, eps)]

        for g, r in zip(penalty(cond_aug), penalty(cond_aug_ref)):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_half_precision(mode, dtype, device):
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    kl_tol = 5e-4 if dtype == torch.float16 else 5e-3
    x = _inputs(mode, B=8, d=16, E=8, dtype=dtype, device=device)
    outs, grads = _grads(lambda *t: cond_aug(*t, mode=mode), x)
    routs, rgrads = _grads(lambda *t: cond_aug_ref(*t, mode=mode), x)
    for name, o, r in zip(("c_hat", "mu", "logvar"), outs[:3], routs[:3]):
        assert o.dtype == dtype
        _close(o, r, rtol=tol, atol=tol, what=name)
    assert outs[3].dtype == torch.float32
    _close(outs[3], routs[3], rtol=kl_tol, atol=kl_tol, what="kl")
    for name, g, r in zip(("s", "weight", "bias", "eps"), grads, rgrads):
        assert g.dtype == dtype
        scale = r.abs().max().double().clamp_min(1.0)
        _close(g / scale, r / scale, rtol=tol, atol=tol, what=f"grad {name}")


def test_non_contiguous_inputs():
    mode, B, d, E = "glu", 5, 6, 3
    s, w, b, eps = _inputs(mode, B=B, d=d, E=E, requires_grad=False)
    s_nc = torch.zeros(d, 2 * B).t()[::2]  # (B, d) with strides (1, 2B)
    s_nc.copy_(s)
    w_nc = w.t().contiguous().t()  # (4E, d) column-major
    eps_nc = torch.zeros(B, 3 * E)[:, ::3]
    eps_nc.copy_(eps)
    assert not (s_nc.is_contiguous() or w_nc.is_contiguous() or eps_nc.is_contiguous())
    x_nc = [t.requires_grad_(True) for t in (s_nc, w_nc, b.clone(), eps_nc)]
    outs, grads = _grads(lambda *t: cond_aug(*t, mode=mode), x_nc)
    routs, rgrads = _grads(lambda *t: cond_aug_ref(*t, mode=mode), [s, w, b, eps])
    for o, r in zip(outs, routs):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, rgrads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_cpu_kl_is_independent_of_thread_count():
    s, w, b, eps = _inputs("glu", B=257, d=8, E=64, requires_grad=False)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cond_aug(s, w, b, eps)
        torch.set_num_threads(max(2, n))
        many = cond_aug(s, w, b, eps)
    finally:
        torch.set_num_threads(n)
    for o, m in zip(one, many):
        assert torch.equal(o, m)


def test_empty_batch():
    # The KL mean of an empty batch is undefined: the op raises (issue 11 item 10; it returned kl=nan)
    # where the bare reference formula gives NaN.
    s, w, b, _ = _inputs("relu", requires_grad=False)
    for impl in ("auto", "ref"):
        with pytest.raises(ValueError, match=r"s is an empty batch \(shape \(0, "):
            cond_aug(s[:0], w, b, torch.zeros(0, 5), mode="relu", impl=impl)
    ref = cond_aug_ref(s[:0], w, b, torch.zeros(0, 5), mode="relu")
    assert ref[0].shape == (0, 5) and torch.isnan(ref[3])


# ---------------------------------------------------------------------------------------------
# torch.compile, opcheck, the module


def test_torch_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    mod = CondAug(12, E=4, mode="glu")
    x = torch.randn(3, 12)
    eps = torch.randn(3, 4)

    def step(m, x, eps):
        c, mu, lv, kl = m(x, eps)
        return (c * c).sum() + mu.sum() - lv.mean() + 2 * kl

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(mod, x, eps)
    loss.backward()
    got = [p.grad.clone() for p in mod.parameters()]
    mod.zero_grad()
    ref_mod = CondAug(12, E=4, mode="glu", impl="ref")
    ref_mod.load_state_dict(mod.state_dict())
    ref_loss = step(ref_mod, x, eps)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for g, p in zip(got, ref_mod.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode, device):
    E = 3
    a = torch.randn(4, PARTS[mode] * E, dtype=torch.float64, device=device, requires_grad=True)
    eps = torch.randn(4, E, dtype=torch.float64, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.scadfast.cond_aug.default, (a, eps, mode, device))
    grads = [torch.randn(4, E, dtype=torch.float64, device=device, requires_grad=True) for _ in range(3)]
    gkl = torch.randn((), dtype=torch.float64, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.scadfast.cond_aug_backward.default, (a, eps, *grads, gkl, mode, device))


def test_backend_must_match_the_device():
    a, eps = torch.randn(2, 8), torch.randn(2, 2)
    with pytest.raises(ValueError, match="backend='cuda' does not run tensors on cpu"):
        torch.ops.scadfast.cond_aug(a, eps, "glu", "cuda")


def test_module():
    m = CondAug(10, E=5, mode="relu")
    assert m.fc.weight.shape == (10, 10) and "mode='relu'" in repr(m)
    assert CondAug(10, E=5).fc.weight.shape == (20, 10)
    s = torch.randn(4, 10)
    eps = torch.randn(4, 5)
    out = m(s, eps)
    ref = cond_aug_ref(s, m.fc.weight, m.fc.bias, eps, mode="relu")
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r)
    with pytest.raises(ValueError, match="mode"):
        CondAug(10, mode="tanh")
    with pytest.raises(ValueError, match="impl"):
        CondAug(10, impl="triton")


def test_impl_ref_is_the_reference_and_bad_impl_raises():
    s, w, b, eps = _inputs("glu", requires_grad=False)
    for o, r in zip(cond_aug(s, w, b, eps, impl="ref"), cond_aug_ref(s, w, b, eps)):
        assert torch.equal(o, r)
    with pytest.raises(ValueError, match="impl='triton'"):
        cond_aug(s, w, b, eps, impl="triton")


# ---------------------------------------------------------------------------------------------
# Errors


def _bad_cases():
    s = torch.randn(4, 8)
    w4 = torch.randn(12, 8)  # glu, E=3
    b4 = torch.randn(12)
    eps = torch.randn(4, 3)
    return [
        ("mode", dict(s=s, weight=w4, bias=b4, mode="tanh"), ValueError, "mode must be one of"),
        ("s 1-D", dict(s=s[0], weight=w4, bias=b4), ValueError, r"s must have 2 dims"),
        ("s int", dict(s=s.long(), weight=w4, bias=b4), TypeError, r"s must be float16"),
        ("weight rows glu", dict(s=s, weight=torch.randn(10, 8), bias=None), ValueError,
         r"mode='glu' needs weight of shape \(4E, d\) \(mode='relu': \(2E, d\)\); got weight of shape \(10, 8\)"),
        ("weight rows relu", dict(s=s, weight=torch.randn(7, 8), bias=None, mode="relu"), ValueError,
         r"mode='relu' needs weight of shape \(2E, d\) \(mode='glu': \(4E, d\)\); got weight of shape \(7, 8\)"),
        ("d mismatch", dict(s=s, weight=torch.randn(12, 9), bias=b4), ValueError,
         r"expects d=9 input features but s has shape \(4, 8\)"),
        ("bias shape", dict(s=s, weight=w4, bias=torch.randn(8)), ValueError, r"bias must have shape \(12,\)"),
        ("eps shape", dict(s=s, weight=w4, bias=b4, eps=torch.randn(4, 6)), ValueError,
         r"eps must have shape \(B, E\) = \(4, 3\), got \(4, 6\)"),
        ("weight dtype", dict(s=s, weight=w4.double(), bias=b4), TypeError,
         "weight has dtype torch.float64 but s has dtype torch.float32"),
        ("eps dtype", dict(s=s, weight=w4, bias=b4, eps=eps.half()), TypeError, "eps has dtype torch.float16"),
        ("device", dict(s=s, weight=w4.to("meta"), bias=b4), ValueError, "different devices"),
        ("weight not tensor", dict(s=s, weight=[[1.0]], bias=None), TypeError, "weight must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("impl", ["auto", "ref"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs_raise(case, impl):
    _, kwargs, exc, match = case
    with pytest.raises(exc, match=match):
        cond_aug(impl=impl, **kwargs)


def test_extension_checks_shapes_itself():
    ext = _impl.extension()
    with pytest.raises(RuntimeError, match=r"a must have 4\*E = 12 columns for glu"):
        ext.cond_aug_forward(torch.randn(2, 8), torch.randn(2, 3), True)
    with pytest.raises(RuntimeError, match="grad_mu must have shape"):
        ext.cond_aug_backward(torch.randn(2, 6), torch.randn(2, 3), torch.randn(2, 3), torch.randn(3, 3),
                              torch.randn(2, 3), torch.zeros(()), False)


# ---------------------------------------------------------------------------------------------
# GPU only: the CUDA kernels (multi-block KL reduction, determinism)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_cuda_large_batch_and_determinism(mode):
    assert _impl.extension_available(cuda=True), "scadfast._C was built without its CUDA kernels"
    x = _inputs(mode, B=3001, d=64, E=128, device="cuda")  # many blocks in the KL reduction
    outs, grads = _grads(lambda *t: cond_aug(*t, mode=mode), x)
    routs, rgrads = _grads(lambda *t: cond_aug_ref(*t, mode=mode), x)
    for o, r in zip(outs, routs):
        torch.testing.assert_close(o, r, rtol=2e-5, atol=2e-5)
    for g, r in zip(grads, rgrads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    again = cond_aug(*[t.detach() for t in x], mode=mode)
    assert torch.equal(again[3], outs[3])


@pytest.mark.gpu
def test_cuda_gradgradcheck_and_compile():
    x = _inputs("glu", B=3, d=4, E=2, dtype=torch.float64, device="cuda")
    fn = lambda *t: cond_aug(*t, mode="glu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, x)
    assert torch.autograd.gradgradcheck(fn, x)
    torch._dynamo.reset()
    mod = CondAug(32, E=16).cuda()
    s = torch.randn(8, 32, device="cuda")
    eps = torch.randn(8, 16, device="cuda")
    compiled = torch.compile(lambda s, eps: mod(s, eps), fullgraph=True)
    out = compiled(s, eps)
    ref = cond_aug_ref(s, mod.fc.weight, mod.fc.bias, eps)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
