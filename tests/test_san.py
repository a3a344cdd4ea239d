"""Tests of the fused SAN ops (scadfast.ops.san, kernels/san.py) against the reference.

On CPU the Triton kernels run in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1), on
small shapes only. Tolerances (fused vs reference on the same inputs; both accumulate in fp32,
fp64 for fp64, and differ only in summation order and in the order of the final rounding):

    dtype    logits / grads (rtol, atol)      loss (rtol, atol)
    fp64     1e-10, 1e-10                      1e-10, 1e-10
    fp32     1e-5,  1e-5 · scale               1e-5,  1e-5
    fp16     2e-3,  2e-3 · scale  (≈ 2 ulp)    1e-5,  1e-5   (loss is fp32)
    bf16     1.6e-2, 1.6e-2 · scale (≈ 2 ulp)  1e-5,  1e-5

where ``scale`` is the largest magnitude of the compared tensor (logits grow like √D).
"""

from __future__ import annotations

import pytest
import torch

from scadfast.ops import san as san_mod
from scadfast.ops._impl import triton_interpret
from scadfast.ops.san import san_d_loss, san_d_loss_ref, san_logits, san_logits_ref

try:
    from scadfast.kernels import san as san_kernels
except Exception:  # pragma: no cover - triton missing
    san_kernels = None

# The CPU-tensor tests of the Triton path run under the interpreter only; with a GPU the
# "gpu"-marked tests below run the real kernels instead.
needs_triton = pytest.mark.skipif(
    san_kernels is None or not triton_interpret(),
    reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest when there is no GPU)",
)

TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
LOSS_TOL = {torch.float64: (1e-10, 1e-10)}


def _close(a, b, dtype, what):
    rtol, atol = TOL[dtype]
    scale = max(1.0, float(b.detach().abs().max())) if b.numel() else 1.0
    torch.testing.assert_close(a.detach().double(), b.detach().double(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def _close_loss(a, b, dtype, what):
    rtol, atol = LOSS_TOL.get(dtype, (1e-5, 1e-5))
    torch.testing.assert_close(a.detach().double(), b.detach().double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _pair(B, D, dtype=torch.float32, scale=1.0, device="cpu"):
    # scale chosen so that ⟨h, ω⟩ straddles ±1 and both hinge branches are exercised
    h = (torch.randn(B, D, device=device, dtype=torch.float64) * scale / D**0.5).to(dtype).requires_grad_()
    w = (torch.randn(B, D, device=device, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    return h, w


def _logits_and_grads(fn, h, w, gs):
    outs = fn(h, w)
    loss = sum((o.double() * g).sum() for o, g in zip(outs, gs))
    gh, gw = torch.autograd.grad(loss, (h, w))
    return outs, gh, gw


def _check_logits(impl, B, D, dtype, h=None, w=None):
    if h is None:
        h, w = _pair(B, D, dtype)
    gs = [torch.randn(B, dtype=torch.float64, device=h.device) for _ in range(3)]
    outs, gh, gw = _logits_and_grads(lambda a, b: san_logits(a, b, impl=impl), h, w, gs)
    routs, rgh, rgw = _logits_and_grads(san_logits_ref, h, w, gs)
    out_dtype = torch.promote_types(h.dtype, w.dtype)
    for name, o, r in zip(("f_fun", "f_dir", "f"), outs, routs):
        assert o.shape == (B,) and o.dtype == out_dtype, (name, o.shape, o.dtype)
        _close(o, r, out_dtype, name)
    assert gh.dtype == h.dtype and gw.dtype == w.dtype
    _close(gh, rgh, h.dtype, "grad h")
    _close(gw, rgw, w.dtype, "grad omega")
    # each logit's gradient separately: they must differ exactly where the stop-gradients say
    for i in range(3):
        one = [torch.zeros_like(g) for g in gs]
        one[i] = gs[i]
        _, gh_i, gw_i = _logits_and_grads(lambda a, b: san_logits(a, b, impl=impl), h, w, one)
        _, rgh_i, rgw_i = _logits_and_grads(san_logits_ref, h, w, one)
        _close(gh_i, rgh_i, h.dtype, f"grad h of output {i}")
        _close(gw_i, rgw_i, w.dtype, f"grad omega of output {i}")


def _check_loss(impl, Br, Bf, D, dtype, weighted, hr=None, wr=None, hf=None, wf=None):
    if hr is None:
        hr, wr = _pair(Br, D, dtype)
        hf, wf = _pair(Bf, D, dtype)
    fw = torch.rand(Bf, dtype=torch.float32, device=hr.device) + 0.1 if weighted else None
    inputs = (hr, wr, hf, wf)
    loss = san_d_loss(hr, wr, hf, wf, fw, impl=impl)
    ref = san_d_loss_ref(hr, wr, hf, wf, fw)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.shape == () and loss.dtype == acc
    _close_loss(loss, ref, dtype, "loss")
    grads = torch.autograd.grad(loss * 3.0, inputs)
    rgrads = torch.autograd.grad(ref * 3.0, inputs)
    for name, t, g, r in zip(("h_real", "omega_real", "h_fake", "omega_fake"), inputs, grads, rgrads):
        assert g.dtype == t.dtype and g.shape == t.shape
        _close(g, r, t.dtype, f"grad {name}")
    return loss


# ---------------------------------------------------------------------------------------------
# forward and gradients vs the reference


@pytest.mark.parametrize("B,D", [(4, 16), (5, 37), (8, 300)])
def test_logits_auto_fp32(B, D):
    _check_logits("auto", B, D, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_logits_auto_dtypes(dtype):
    _check_logits("auto", 6, 70, dtype)


def test_logits_mixed_dtypes():
    h, _ = _pair(4, 33, torch.bfloat16)
    _, w = _pair(4, 33, torch.float32)
    _check_logits("auto", 4, 33, torch.float32, h, w)
    f = san_logits(h, w)[2]
    assert f.dtype == torch.float32


@needs_triton
@pytest.mark.parametrize("B,D,dtype", [(4, 16, torch.float32), (5, 37, torch.float32),
                                       (8, 300, torch.float32), (6, 130, torch.float16),
                                       (3, 21, torch.float64)])
def test_logits_triton(B, D, dtype):
    _check_logits("triton", B, D, dtype)


@needs_triton
def test_logits_kernel_tiling():
    """Several programs, a partial last row block and several (masked) D tiles."""
    h, w = _pair(5, 37)
    f_fun, f_dir, f, stats = san_kernels.san_logits_forward(h.detach(), w.detach(), block_b=2, block_d=16)
    ref = (h * w).sum(1)
    for t in (f_fun, f_dir, f, stats[0]):
        torch.testing.assert_close(t, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats[1], (w * w).sum(1).detach(), rtol=1e-5, atol=1e-5)
    g = [torch.randn(5) for _ in range(3)]
    gh, gw = san_kernels.san_logits_backward(*g, h.detach(), w.detach(), stats, block_b=2, block_d=16)
    rgh, rgw = san_mod._logits_backward_torch(*g, h.detach(), w.detach(), stats)
    torch.testing.assert_close(gh, rgh)
    torch.testing.assert_close(gw, rgw)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("Br,Bf,D", [(4, 4, 16), (5, 8, 37), (8, 3, 300)])
def test_loss_auto_fp32(Br, Bf, D, weighted):
    _check_loss("auto", Br, Bf, D, torch.float32, weighted)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_loss_auto_dtypes(dtype):
    _check_loss("auto", 6, 9, 70, dtype, weighted=True)


@needs_triton
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("Br,Bf,D,dtype", [(4, 4, 16, torch.float32), (5, 8, 37, torch.float32),
                                           (8, 3, 300, torch.float32), (6, 5, 130, torch.float16),
                                           (3, 4, 21, torch.float64)])
def test_loss_triton(Br, Bf, D, dtype, weighted):
    _check_loss("triton", Br, Bf, D, dtype, weighted)


@needs_triton
def test_loss_kernel_reduction_many_programs():
    """One row per program, several BLOCK_P chunks in the last program's reduction."""
    Br, Bf, D = 9, 7, 20
    hr, wr = _pair(Br, D)
    hf, wf = _pair(Bf, D)
    fw = torch.rand(Bf) + 0.1
    args = [t.detach() for t in (hr, wr, hf, wf)]
    loss, sr, sf, ws = san_kernels.san_d_loss_forward(*args, fw, block_b=1, block_d=16, block_p=4)
    torch.testing.assert_close(loss, san_d_loss_ref(*args, fw), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ws, fw.sum().reshape(1))
    torch.testing.assert_close(sr[0], (args[0] * args[1]).sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sf[1], (args[3] * args[3]).sum(1), rtol=1e-5, atol=1e-5)
    again = san_kernels.san_d_loss_forward(*args, fw, block_b=1, block_d=16, block_p=4)[0]
    assert torch.equal(loss, again)
    grad = torch.tensor(0.7)
    got = san_kernels.san_d_loss_backward(grad, *args, fw, sr, sf, ws, block_b=2, block_d=8)
    want = san_mod._san_d_loss_backward_op(grad, *args, fw, sr, sf, ws, "torch")
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("impl", ["auto", pytest.param("triton", marks=needs_triton)])
def test_loss_weight_semantics(impl):
    """Fake and mismatched pairs in one call with weights 1 and ½ = the §5.2-style combination."""
    hr, wr = _pair(4, 24)
    hx, wx = _pair(4, 24)
    hm, wm = _pair(4, 24)
    fw = torch.tensor([1.0] * 4 + [0.5] * 4)
    loss = san_d_loss(hr, wr, torch.cat([hx, hm]), torch.cat([wx, wm]), fw, impl=impl)
    fr, dr, _ = san_logits_ref(hr, wr)
    fx, dx, _ = san_logits_ref(hx, wx)
    fm, dm, _ = san_logits_ref(hm, wm)
    fake = (torch.relu(1 + fx).sum() + 0.5 * torch.relu(1 + fm).sum()) / 6
    wdir = (dx.sum() + 0.5 * dm.sum()) / 6
    want = torch.relu(1 - fr).mean() + fake - (dr.mean() - wdir)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    # fake_weight is a constant: no gradient, even if it requires one
    fwg = fw.clone().requires_grad_()
    out = san_d_loss(hr, wr, torch.cat([hx, hm]), torch.cat([wx, wm]), fwg, impl=impl)
    assert out.grad_fn is not None
    assert torch.autograd.grad(out, fwg, allow_unused=True)[0] is None


def test_zero_omega_row_matches_ref():
    """‖ω‖ < eps: the scale is clamped and gets no gradient (k = 0) in both paths."""
    h, w = _pair(3, 12)
    with torch.no_grad():
        w[1].zero_()
    _check_logits("auto", 3, 12, torch.float32, h, w)


@pytest.mark.parametrize("impl", ["auto", pytest.param("triton", marks=needs_triton)])
def test_non_contiguous(impl):
    base_h = torch.randn(6, 2 * 40, dtype=torch.float64)
    h = (base_h[:, ::2] / 6).float().requires_grad_()  # dense but we re-stride below
    h_nc = h[:, :]  # view with grad
    wt = torch.randn(40, 6).requires_grad_()
    w_nc = wt.t()  # column-major (strides (1, 6))
    hs = torch.randn(6, 80)[:, ::2].requires_grad_()  # strides (80, 2)
    assert not w_nc.is_contiguous() and not hs.is_contiguous()
    _check_logits(impl, 6, 40, torch.float32, hs, w_nc)
    _check_loss(impl, 6, 6, 40, torch.float32, True, hs, w_nc, h_nc, wt.t().flip(0))


# ---------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck (double backward, as the MA-GP needs)


def _gc_inputs(B, D, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, D, generator=g, dtype=torch.float64) / D**0.5).to(device).requires_grad_()
    w = (torch.randn(B, D, generator=g, dtype=torch.float64) * 1.5).to(device).requires_grad_()
    return h, w


# A first-order gradcheck only applies to ``f``: the analytic gradients of f_fun, f_dir and of the
# SAN loss are by design *not* the derivatives of their values (stop-gradients), so those are
# checked against the reference's autograd above. gradgradcheck is valid for all of them: it
# numerically differentiates the backward (a genuine function of the inputs and output grads).


@pytest.mark.parametrize("impl", ["auto", pytest.param("triton", marks=needs_triton)])
def test_gradcheck_f(impl):
    h, w = _gc_inputs(3, 7, 1)
    assert torch.autograd.gradcheck(lambda a, b: san_logits(a, b, impl=impl)[2], (h, w))


def test_gradgradcheck_logits_auto():
    h, w = _gc_inputs(3, 7, 1)
    assert torch.autograd.gradgradcheck(lambda a, b: san_logits(a, b, impl="auto"), (h, w))


@pytest.mark.parametrize("i", [0, 1, 2])
def test_gradgradcheck_each_logit(i):
    h, w = _gc_inputs(3, 6, 2 + i)
    fn = lambda a, b: san_logits(a, b, impl="auto")[i]  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (h, w))


def test_gradgradcheck_loss_auto():
    hr, wr = _gc_inputs(3, 5, 7)
    hf, wf = _gc_inputs(4, 5, 8)
    fw = torch.tensor([1.0, 0.5, 2.0, 0.25], dtype=torch.float64)
    fn = lambda a, b, c, d: san_d_loss(a, b, c, d, fw, impl="auto")  # noqa: E731
    # hinge kinks are measure-zero: make sure no logit sits within the finite-difference step of ±1
    s = torch.cat([(hr * wr).sum(1), (hf * wf).sum(1)]).detach()
    assert ((s.abs() - 1).abs() > 1e-3).all()
    assert torch.autograd.gradgradcheck(fn, (hr, wr, hf, wf))
    # the loss's gradient w.r.t. its incoming scalar gradient is part of that check too
    gg = torch.autograd.grad(fn(hr, wr, hf, wf), (hr,), create_graph=True)[0]
    assert gg.requires_grad


@needs_triton
def test_gradgradcheck_triton_small():
    h, w = _gc_inputs(2, 5, 11)
    fn = lambda a, b: san_logits(a, b, impl="triton")  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (h, w), fast_mode=True)
    hr, wr = _gc_inputs(2, 5, 12)
    fn = lambda a, b: san_d_loss(hr, wr, a, b, impl="triton")  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (h, w), fast_mode=True)


@pytest.mark.parametrize("impl", ["auto", pytest.param("triton", marks=needs_triton)])
def test_magp_double_backward_matches_ref(impl):
    """MA-GP pattern: ‖[∂f/∂h, ∂f/∂ω]‖^6 with create_graph, then backward to h, ω."""
    h, w = _pair(4, 19, torch.float32)

    def penalty(fn):
        f = fn(h, w)[2]
        gh, gw = torch.autograd.grad(f.sum(), (h, w), create_graph=True)
        gp = torch.cat([gh, gw], 1).norm(dim=1).pow(6).mean() * 2
        return (gp,) + torch.autograd.grad(gp, (h, w))

    got = penalty(lambda a, b: san_logits(a, b, impl=impl))
    want = penalty(san_logits_ref)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def _loss_field_torch(hr, wr, hf, wf, fw):
    """The SAN loss's gradient field written directly as a differentiable function of the inputs
    (independent of scadfast): ∂h = g_fun·ω, ∂ω = g_dir·h + (g_fun − g_dir)·(s/‖ω‖²)·ω."""
    out = []
    for h, w, real in ((hr, wr, True), (hf, wf, False)):
        s = (h * w).sum(1)
        n2 = (w * w).sum(1)
        if real:
            g_dir = torch.full_like(s, -1.0 / s.shape[0])
            g_fun = torch.where(1 - s.detach() > 0, g_dir, 0.0)
        else:
            g_dir = fw / fw.sum()
            g_fun = torch.where(1 + s.detach() > 0, g_dir, 0.0)
        out += [g_fun[:, None] * w, g_dir[:, None] * h + ((g_fun - g_dir) * s / n2)[:, None] * w]
    return out


@pytest.mark.parametrize("impl", ["auto", pytest.param("triton", marks=needs_triton)])
def test_loss_double_backward_is_jacobian_of_gradient(impl):
    """Differentiating the loss's gradient (create_graph) gives the Jacobian of the gradient field."""
    hr, wr = _pair(3, 9, torch.float64)
    hf, wf = _pair(5, 9, torch.float64)
    fw = torch.rand(5, dtype=torch.float64) + 0.1
    xs = (hr, wr, hf, wf)
    g = torch.autograd.grad(san_d_loss(*xs, fw, impl=impl), xs, create_graph=True)
    want_g = _loss_field_torch(*xs, fw)
    for a, b in zip(g, want_g):
        torch.testing.assert_close(a, b)
    pen = sum((x ** 3).sum() for x in g)
    want_pen = sum((x ** 3).sum() for x in want_g)
    for a, b in zip(torch.autograd.grad(pen, xs), torch.autograd.grad(want_pen, xs)):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# torch.compile and custom-op registration


def test_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()
    h, w = _pair(4, 24)
    hf, wf = _pair(6, 24)
    fw = torch.rand(6) + 0.1

    def step(h, w, hf, wf, fw):
        f_fun, f_dir, f = san_logits(h, w)
        return san_d_loss(h, w, hf, wf, fw) + (f_fun + 2 * f_dir - f).square().mean()

    explain = torch._dynamo.explain(step)(h, w, hf, wf, fw)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(h, w, hf, wf, fw)
    grads = torch.autograd.grad(out, (h, w, hf, wf))
    ref = step(h, w, hf, wf, fw)
    rgrads = torch.autograd.grad(ref, (h, w, hf, wf))
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, rgrads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_opcheck(backend):
    h, w = _pair(3, 10)
    hf, wf = _pair(4, 10)
    fw = torch.rand(4) + 0.1
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.scadfast.san_logits, (h, w, backend), test_utils=tests)
    torch.library.opcheck(torch.ops.scadfast.san_d_loss, (h, w, hf, wf, fw, backend), test_utils=tests)
    _, _, _, stats = torch.ops.scadfast.san_logits(h, w, backend)
    g = [torch.randn(3) for _ in range(3)]
    torch.library.opcheck(torch.ops.scadfast.san_logits_backward, (*g, h, w, stats, backend), test_utils=tests)
    _, sr, sf, ws = torch.ops.scadfast.san_d_loss(h, w, hf, wf, fw, backend)
    torch.library.opcheck(torch.ops.scadfast.san_d_loss_backward,
                          (torch.tensor(1.0), h, w, hf, wf, fw, sr, sf, ws, backend), test_utils=tests)


# ---------------------------------------------------------------------------------------------
# errors


def test_bad_inputs_raise():
    h, w = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="h must have 2 dims"):
        san_logits(torch.randn(8), w)
    with pytest.raises(ValueError, match="same shape"):
        san_logits(h, torch.randn(4, 9))
    with pytest.raises(TypeError, match="omega must be float16"):
        san_logits(h, torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="h must be a torch.Tensor"):
        san_logits([[1.0]], w)
    with pytest.raises(ValueError, match="different devices"):
        san_logits(h, torch.empty(4, 8, device="meta"))
    with pytest.raises(ValueError, match="impl='fast'"):
        san_logits(h, w, impl="fast")
    with pytest.raises(ValueError, match="impl='cuda'"):
        san_d_loss(h, w, h, w, impl="cuda")
    with pytest.raises(ValueError, match="same width D"):
        san_d_loss(h, w, torch.randn(4, 9), torch.randn(4, 9))
    with pytest.raises(ValueError, match="h_fake and omega_fake must have the same shape"):
        san_d_loss(h, w, torch.randn(3, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="empty batch"):
        san_d_loss(h[:0], w[:0], h, w)
    with pytest.raises(ValueError, match=r"fake_weight must have shape \(B_fake,\) = \(4,\)"):
        san_d_loss(h, w, h, w, torch.ones(5))
    with pytest.raises(ValueError, match="fake_weight must have 1 dims"):
        san_d_loss(h, w, h, w, torch.ones(4, 1))
    with pytest.raises(TypeError, match="fake_weight must be float16"):
        san_d_loss(h, w, h, w, torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="positive sum"):
        san_d_loss(h, w, h, w, torch.tensor([1.0, -2.0, 0.5, 0.0]))
    with pytest.raises(ValueError, match="positive sum"):
        san_d_loss(h, w, h, w, torch.zeros(4), impl="ref")
    with pytest.raises(ValueError, match="different devices"):
        san_d_loss(h, w, h, w, torch.ones(4, device="meta"))


def test_nonpositive_weight_sum_is_nan_without_check():
    """Where the sum is not checked (GPU, compile), the fused op poisons the loss with NaN."""
    h, w = torch.randn(3, 8), torch.randn(3, 8)
    out = torch.ops.scadfast.san_d_loss(h, w, h, w, torch.zeros(3), "torch")[0]
    assert torch.isnan(out)


# ---------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): model shapes, real kernels, determinism


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [512, 2048, 8192, 1000])
def test_gpu_model_shapes(dtype, D):
    _check_logits("triton", 64, D, dtype, *_pair(64, D, dtype, device="cuda"))
    hr, wr = _pair(64, D, dtype, device="cuda")
    hf, wf = _pair(96, D, dtype, device="cuda")
    loss = _check_loss("auto", 64, 96, D, dtype, True, hr, wr, hf, wf)
    again = san_d_loss(hr, wr, hf, wf, torch.rand(96, device="cuda") * 0 + 1)
    assert torch.isfinite(again)
    fw = torch.rand(96, device="cuda") + 0.1
    l1 = san_d_loss(hr, wr, hf, wf, fw)
    for _ in range(3):
        assert torch.equal(l1, san_d_loss(hr, wr, hf, wf, fw)), "loss must be deterministic"
    assert loss.dtype == torch.float32


@pytest.mark.gpu
def test_gpu_many_rows_reduction():
    """More programs than one BLOCK_P chunk in the final reduction, plus a partial row block."""
    hr, wr = _pair(3001, 256, device="cuda")
    hf, wf = _pair(2999, 256, device="cuda")
    _check_loss("triton", 3001, 2999, 256, torch.float32, True, hr, wr, hf, wf)


@pytest.mark.gpu
def test_gpu_gradgradcheck_and_compile():
    h, w = _gc_inputs(3, 33, 5, device="cuda")
    assert torch.autograd.gradgradcheck(lambda a, b: san_logits(a, b, impl="triton"), (h, w))
    hr, wr = _gc_inputs(4, 33, 6, device="cuda")
    assert torch.autograd.gradgradcheck(lambda a, b: san_d_loss(hr, wr, a, b, impl="triton"), (h, w))
    torch._dynamo.reset()
    hb, wb = _pair(64, 2048, torch.bfloat16, device="cuda")

    def step(h, w):
        return san_d_loss(h, w, h.roll(1, 0), w) - san_logits(h, w)[2].float().mean()

    out = torch.compile(step, fullgraph=True)(hb, wb)
    g = torch.autograd.grad(out, (hb, wb))
    ref = step(hb, wb)
    rg = torch.autograd.grad(ref, (hb, wb))
    torch.testing.assert_close(out, ref)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b)
