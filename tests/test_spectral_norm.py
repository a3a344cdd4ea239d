"""Tests of scadfast.ops.spectral (spectral_norm, power_iteration_*) against torch.nn.utils.parametrizations.spectral_norm.

Runs on CUDA when available (then impl="triton"/"auto" are the real kernel), otherwise on CPU with
the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).

Tolerances (relative to torch's fp32 parametrization, or to fp32 math on the same weights):

* fp32, impl="ref", and impl="auto" on CPU: bit-identical (the same torch ops in the same order).
* fp32, the Triton kernel (impl="triton", and "auto" on CUDA): rtol 1e-5 / atol 1e-6 on outputs,
  u/v buffers and gradients (the kernel sums in a different order, in fp32).
* fp16 weights: u, v within 2e-3 (abs, they are unit vectors) of fp32 math on the same
  (fp16-valued) weights; σ within rel. 2e-3.
* bf16 weights: u, v within 2e-2; σ within rel. 2e-2 (8-bit mantissa of the stored vectors).
* fp64 (gradgradcheck): torch.autograd defaults.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scadfast.ops import (
    SpectralNorm, power_iteration_, power_iteration_grouped_, power_iteration_ref, spectral_norm, spectral_norm_all,
)
from scadfast.ops import _impl
from scadfast.ops.spectral import SpectralNormDimError

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TORCH_SN = torch.nn.utils.parametrizations.spectral_norm
IMPLS = ["ref", "auto", "triton"]


def _exact(impl):
    """Is this impl bit-identical to torch's fp32 math on DEV?"""
    return impl == "ref" or (impl == "auto" and DEV.type == "cpu")


def _close(a, b, impl, rtol=1e-5, atol=1e-6):
    if _exact(impl):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    else:
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _make_d(apply_sn):
    """A small discriminator: conv, conv-transpose, strided conv, linear (all spectrally normalised)."""
    torch.manual_seed(1)
    d = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(8, 6, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(6, 4, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 1),
    )
    torch.manual_seed(2)  # same RNG stream for the u/v initialisation on both sides
    apply_sn(d)
    return d.to(DEV)


def _sn_each(fn):
    def apply(d):
        for m in d:
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                fn(m)
    return apply


def _train_steps(d, x, steps=3):
    """Hinge-like steps with SGD; returns per-step outputs, grads, buffers."""
    opt = torch.optim.SGD(d.parameters(), lr=0.05)
    log = []
    for _ in range(steps):
        opt.zero_grad()
        out = d(x)
        # two forwards in one graph, as in D(real) − D(fake)
        loss = F.relu(1 - out).mean() + F.relu(1 + d(-x)).mean()
        loss.backward()
        log.append((out.detach().clone(), [p.grad.clone() for p in d.parameters()],
                    [b.clone() for b in d.buffers()]))
        opt.step()
    return log


def _compare_logs(la, lb, impl):
    for (oa, ga, ba), (ob, gb, bb) in zip(la, lb):
        _close(ob, oa, impl)
        assert len(ga) == len(gb) and len(ba) == len(bb)
        for x, y in zip(ga, gb):
            _close(y, x, impl)
        for x, y in zip(ba, bb):
            _close(y, x, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_training_matches_torch(impl):
    ref = _make_d(_sn_each(TORCH_SN))
    ours = _make_d(_sn_each(lambda m: spectral_norm(m, impl=impl)))
    assert list(ref.state_dict().keys()) == list(ours.state_dict().keys())
    for k, v in ref.state_dict().items():  # the initial buffers (15 iterations) too
        _close(ours.state_dict()[k], v, impl)
    x = torch.randn(2, 3, 8, 8, device=DEV)
    _compare_logs(_train_steps(ref, x), _train_steps(ours, x), impl)


@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_spectral_norm_all_grouped_matches_torch(impl):
    ref = _make_d(_sn_each(TORCH_SN))
    grouped = _make_d(lambda d: spectral_norm_all(d, impl=impl, grouped=True))
    per_weight = _make_d(lambda d: spectral_norm_all(d, impl=impl, grouped=False))
    sns = [m for m in grouped.modules() if isinstance(m, SpectralNorm)]
    assert len(sns) == 4 and all(s.external_update for s in sns)
    assert not any(s.external_update for s in per_weight.modules() if isinstance(s, SpectralNorm))
    x = torch.randn(2, 3, 8, 8, device=DEV)
    la, lg, lp = _train_steps(ref, x), _train_steps(grouped, x), _train_steps(per_weight, x)
    _compare_logs(la, lp, impl)
    _compare_logs(la, lg, impl)


def test_spectral_norm_all_skips_parametrized_and_is_idempotent():
    d = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    TORCH_SN(d[0])
    out = spectral_norm_all(d)
    assert out is d
    assert type(d[0].parametrizations.weight[0]).__name__ == "_SpectralNorm"
    assert isinstance(d[1].parametrizations.weight[0], SpectralNorm)
    spectral_norm_all(d)  # nothing left to add: no second parametrization, no second hook
    assert len(d[1].parametrizations.weight) == 1
    assert len(d._forward_pre_hooks) == 1


def test_grouped_hook_updates_only_through_top_module_and_deepcopy_is_independent():
    d = spectral_norm_all(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).to(DEV))
    u0 = d[0].parametrizations.weight[0]._u.clone()
    d[0](torch.randn(3, 6, device=DEV))  # submodule called directly: documented, no update
    torch.testing.assert_close(d[0].parametrizations.weight[0]._u, u0, rtol=0, atol=0)
    d2 = copy.deepcopy(d)
    d2(torch.randn(3, 6, device=DEV))  # updates the copy's buffers only
    torch.testing.assert_close(d[0].parametrizations.weight[0]._u, u0, rtol=0, atol=0)
    assert not torch.equal(d2[0].parametrizations.weight[0]._u, u0)
    d(torch.randn(3, 6, device=DEV))
    assert not torch.equal(d[0].parametrizations.weight[0]._u, u0)


@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_state_dict_round_trip_both_ways(impl):
    ref = _make_d(_sn_each(TORCH_SN))
    ours = _make_d(_sn_each(lambda m: spectral_norm(m, impl=impl)))
    x = torch.randn(2, 3, 8, 8, device=DEV)
    ref(x), ref(x)  # move the torch buffers away from the shared initial state
    ours.load_state_dict(ref.state_dict())
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
    # ... and back: train ours, load into a fresh torch model
    ours.train()
    ours(x)
    fresh = _make_d(_sn_each(TORCH_SN))
    fresh.load_state_dict(ours.state_dict())
    fresh.eval(), ours.eval()
    torch.testing.assert_close(fresh(x), ours(x), rtol=1e-5, atol=1e-6)
    for a, b in zip(fresh.buffers(), ours.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_eval_does_not_iterate_train_does(impl):
    m = spectral_norm(nn.Conv2d(3, 5, 3), impl=impl).to(DEV)
    p = m.parametrizations.weight[0]
    u0, v0 = p._u.clone(), p._v.clone()
    m.eval()
    w_eval = m.weight
    torch.testing.assert_close(p._u, u0, rtol=0, atol=0)
    torch.testing.assert_close(p._v, v0, rtol=0, atol=0)
    sigma = torch.vdot(u0, m.parametrizations.weight.original.flatten(1) @ v0)
    torch.testing.assert_close(w_eval, m.parametrizations.weight.original / sigma)
    m.train()
    m.weight
    assert not torch.equal(p._u, u0)


@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_sigma_and_weight_same_as_torch_given_same_buffers(impl):
    torch.manual_seed(3)
    for module in (nn.Conv2d(4, 6, 3), nn.ConvTranspose2d(4, 6, 3), nn.Linear(7, 3), nn.Conv1d(2, 5, 4)):
        a = TORCH_SN(copy.deepcopy(module)).to(DEV)
        b = spectral_norm(copy.deepcopy(module), impl=impl, n_power_iterations=3).to(DEV)
        b.parametrizations.weight[0].n_power_iterations = 1
        a.parametrizations.weight[0].n_power_iterations = 1
        b.load_state_dict(a.state_dict())
        _close(b.weight, a.weight, impl)
        _close(b.parametrizations.weight[0]._u, a.parametrizations.weight[0]._u, impl)
        _close(b.parametrizations.weight[0]._v, a.parametrizations.weight[0]._v, impl)


@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_multiple_iterations_and_custom_dim_and_one_d(impl):
    torch.manual_seed(4)
    lin = nn.Linear(9, 5)
    a = TORCH_SN(copy.deepcopy(lin), n_power_iterations=4, dim=1).to(DEV)
    torch.manual_seed(4)
    lin2 = nn.Linear(9, 5)
    b = spectral_norm(lin2, n_power_iterations=4, dim=1, impl=impl).to(DEV)
    b.load_state_dict(a.state_dict())
    _close(b.weight, a.weight, impl)
    # 1-D weights are normalised, no buffers (as torch)
    vec = nn.Module()
    vec.weight = nn.Parameter(torch.randn(6, device=DEV))
    spectral_norm(vec, impl=impl)
    assert len(list(vec.buffers())) == 0
    torch.testing.assert_close(vec.weight, F.normalize(vec.parametrizations.weight.original, dim=0))


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_weight(impl):
    torch.manual_seed(5)
    base = torch.randn(7, 5, device=DEV)
    a, b = nn.Linear(7, 5).to(DEV), nn.Linear(7, 5).to(DEV)
    a.weight = nn.Parameter(base.t())  # (5, 7), non-contiguous
    b.weight = nn.Parameter(base.t())
    assert not b.weight.is_contiguous()
    torch.manual_seed(6)
    TORCH_SN(a)
    torch.manual_seed(6)
    spectral_norm(b, impl=impl)
    for _ in range(2):
        _close(b.weight, a.weight, impl)
    # functional op on a strided view (every other column of a bigger matrix)
    big = torch.randn(6, 22, device=DEV)
    w = big[:, ::2]
    u = F.normalize(torch.randn(6, device=DEV), dim=0)
    v = F.normalize(torch.randn(11, device=DEV), dim=0)
    ur, vr = u.clone(), v.clone()
    for _ in range(3):
        ur = F.normalize(w.contiguous() @ vr, dim=0)
        vr = F.normalize(w.contiguous().t() @ ur, dim=0)
    power_iteration_(w, u, v, 3, impl=impl)
    torch.testing.assert_close(u, ur, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, vr, rtol=1e-5, atol=1e-6)


def _mats(dtype):
    g = torch.Generator().manual_seed(7)
    shapes = [(8, 20), (33, 5), (1, 9), (16, 64)]
    ws = [torch.randn(s, generator=g).to(DEV, dtype) for s in shapes]
    ws.append(torch.randn(12, 6, generator=g).to(DEV, dtype).t())  # non-contiguous view
    us = [F.normalize(torch.randn(w.shape[0], generator=g), dim=0).to(DEV, dtype) for w in ws]
    vs = [F.normalize(torch.randn(w.shape[1], generator=g), dim=0).to(DEV, dtype) for w in ws]
    return ws, us, vs


@pytest.mark.parametrize("impl", ["ref", "auto", "triton"])
def test_grouped_equals_per_weight(impl):
    ws, us, vs = _mats(torch.float32)
    gu, gv = [u.clone() for u in us], [v.clone() for v in vs]
    power_iteration_grouped_(ws, gu, gv, 2, impl=impl)
    for w, u, v, a, b in zip(ws, us, vs, gu, gv):
        power_iteration_(w, u, v, 2, impl=impl)
        torch.testing.assert_close(a, u, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b, v, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_half_precision_within_tolerance(impl, dtype, tol):
    ws, us, vs = _mats(dtype)
    ws32 = [w.float() for w in ws]
    u32, v32 = [u.float() for u in us], [v.float() for v in vs]
    power_iteration_grouped_(ws32, u32, v32, 3, impl="ref")
    power_iteration_grouped_(ws, us, vs, 3, impl=impl)
    for w, u, v, a, b in zip(ws32, us, vs, u32, v32):
        assert u.dtype == dtype and v.dtype == dtype
        torch.testing.assert_close(u.float(), a, rtol=0, atol=tol)
        torch.testing.assert_close(v.float(), b, rtol=0, atol=tol)
        s_half, s_ref = torch.vdot(u.float(), w @ v.float()), torch.vdot(a, w @ b)
        torch.testing.assert_close(s_half, s_ref, rtol=tol, atol=0)
    # module level: a half SN conv gives σ close to the fp32 one
    torch.manual_seed(8)
    conv = nn.Conv2d(4, 8, 3).to(DEV)
    torch.manual_seed(9)
    c32 = spectral_norm(copy.deepcopy(conv), impl=impl)
    torch.manual_seed(9)
    c16 = spectral_norm(copy.deepcopy(conv).to(dtype), impl=impl)
    assert c16.parametrizations.weight[0]._u.dtype == dtype
    w16, w32 = c16.weight, c32.weight
    assert w16.dtype == dtype
    torch.testing.assert_close(w16.float(), w32, rtol=5 * tol, atol=5 * tol)


def test_double_backward_gradgradcheck():
    torch.manual_seed(10)
    p = SpectralNorm(torch.randn(3, 2, 2, 2, dtype=torch.float64), n_power_iterations=1).eval()
    w = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(w, x):
        return F.conv2d(x, p(w))

    assert torch.autograd.gradcheck(f, (w, x))
    assert torch.autograd.gradgradcheck(f, (w, x))


@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_gradient_penalty_double_backward_matches_torch(impl):
    """MA-GP-style penalty: ‖∂D/∂x‖ differentiated again w.r.t. the SN weights, in training mode."""
    ref = _make_d(_sn_each(TORCH_SN))
    ours = _make_d(_sn_each(lambda m: spectral_norm(m, impl=impl)))
    torch.manual_seed(11)
    x = torch.randn(2, 3, 8, 8, device=DEV)
    grads = []
    for d in (ref, ours):
        xi = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(d(xi).sum(), xi, create_graph=True)
        penalty = 2 * g.flatten(1).norm(dim=1).pow(6).mean()
        penalty.backward()
        grads.append([(n, q.grad) for n, q in d.named_parameters() if q.grad is not None])
    assert [n for n, _ in grads[0]] == [n for n, _ in grads[1]] and len(grads[0]) == 7  # all but the last bias
    for (_, a), (_, b) in zip(*grads):
        _close(b, a, impl, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend):
    torch.manual_seed(12)
    eager = nn.Sequential(nn.Linear(6, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
    spectral_norm(eager[0]), spectral_norm(eager[2])
    eager = eager.to(DEV)
    compiled_mod = copy.deepcopy(eager)
    compiled = torch.compile(compiled_mod, fullgraph=True, backend=backend)
    x = torch.randn(4, 6, device=DEV)
    for _ in range(2):
        ye, yc = eager(x), compiled(x)
        ye.square().sum().backward()
        yc.square().sum().backward()
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-6)
    for a, b in zip(eager.buffers(), compiled_mod.buffers()):  # in-place buffer updates survived
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(eager.parameters(), compiled_mod.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)


def _power_method_torch(w_mat, u, v, n_iter, eps=1e-12):
    """torch's own ``_SpectralNorm._power_method`` on copies of u, v: the contract of the reference."""
    sn = torch.nn.utils.parametrizations._SpectralNorm(w_mat.detach().clone(), n_power_iterations=n_iter, eps=eps)
    sn._u.copy_(u)
    sn._v.copy_(v)
    with torch.no_grad():
        sn._power_method(w_mat, n_iter)
    return sn._u, sn._v


def test_power_iteration_ref_is_torchs_power_method():
    w = torch.randn(6, 5, dtype=torch.float64)
    u0, v0 = F.normalize(torch.randn(6, dtype=torch.float64), dim=0), F.normalize(torch.randn(5, dtype=torch.float64), dim=0)
    u, v = u0.clone(), v0.clone()
    power_iteration_ref(w, u, v, 3)
    tu, tv = _power_method_torch(w, u0, v0, 3)
    assert torch.equal(u, tu) and torch.equal(v, tv)
    assert not torch.equal(u, u0)  # it did iterate
    # the leading singular vectors after enough iterations
    power_iteration_ref(w, u, v, 200)
    U, S, Vh = torch.linalg.svd(w)
    torch.testing.assert_close(torch.dot(u, w @ v), S[0])


BACKENDS = ["torch"] + (["triton"] if _impl.triton_runs_on(torch.zeros(1, device=DEV)) else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ops_compute_the_power_iteration_and_pass_opcheck(backend):
    torch.manual_seed(3)
    w = torch.randn(7, 5, device=DEV)
    w2 = torch.randn(4, 3, 2, device=DEV)  # grouped: a 3-D weight with dim=1 (as a ConvTranspose)
    u0, v0 = F.normalize(torch.randn(7, device=DEV), dim=0), F.normalize(torch.randn(5, device=DEV), dim=0)
    u2, v2 = F.normalize(torch.randn(3, device=DEV), dim=0), F.normalize(torch.randn(8, device=DEV), dim=0)
    want_u, want_v = u0.clone(), v0.clone()
    power_iteration_ref(w, want_u, want_v, 2)
    w2_mat = w2.permute(1, 0, 2).flatten(1)
    want_u2, want_v2 = u2.clone(), v2.clone()
    power_iteration_ref(w2_mat, want_u2, want_v2, 2)
    tol = dict(rtol=0, atol=0) if backend == "torch" else dict(rtol=1e-5, atol=1e-6)

    u, v = u0.clone(), v0.clone()
    assert torch.ops.scadfast.power_iteration_(w, u, v, 2, 1e-12, backend) is None
    torch.testing.assert_close(u, want_u, **tol)
    torch.testing.assert_close(v, want_v, **tol)
    us, vs = [u0.clone(), u2.clone()], [v0.clone(), v2.clone()]
    torch.ops.scadfast.power_iteration_grouped_([w, w2], [0, 1], us, vs, 2, 1e-12, backend)
    for got, want in zip(us + vs, [want_u, want_u2, want_v, want_v2]):
        torch.testing.assert_close(got, want, **tol)

    # schema (declared mutations), fake implementation, and tracing by AOT autograd
    torch.library.opcheck(torch.ops.scadfast.power_iteration_.default, (w, u0.clone(), v0.clone(), 2, 1e-12, backend))
    torch.library.opcheck(torch.ops.scadfast.power_iteration_grouped_.default,
                          ([w, w2], [0, 1], [u0.clone(), u2.clone()], [v0.clone(), v2.clone()], 2, 1e-12, backend))


def test_bad_inputs_raise():
    lin = nn.Linear(3, 4)
    with pytest.raises(ValueError, match="no parameter or buffer with name 'kernel'"):
        spectral_norm(lin, name="kernel")
    with pytest.raises(ValueError, match="n_power_iterations"):
        spectral_norm(nn.Linear(3, 4), n_power_iterations=0)
    with pytest.raises(TypeError, match="n_power_iterations"):
        spectral_norm(nn.Linear(3, 4), n_power_iterations=1.5)
    with pytest.raises(SpectralNormDimError, match="Dimension out of range"):
        spectral_norm(nn.Linear(3, 4), dim=2)
    with pytest.raises(ValueError):  # also a ValueError ...
        spectral_norm(nn.Linear(3, 4), dim=-3)
    with pytest.raises(IndexError):  # ... and an IndexError, as torch raises
        spectral_norm(nn.Linear(3, 4), dim=5)
    with pytest.raises(TypeError, match="dim"):
        spectral_norm(nn.Linear(3, 4), dim=0.0)
    with pytest.raises(ValueError, match="impl"):
        spectral_norm(nn.Linear(3, 4), impl="cuda")
    with pytest.raises(ValueError, match="eps"):
        spectral_norm(nn.Linear(3, 4), eps=-1.0)
    with pytest.raises(TypeError, match="module"):
        spectral_norm(torch.randn(3, 3))
    with pytest.raises(TypeError, match="module"):
        spectral_norm_all([nn.Linear(3, 4)])
    with pytest.raises(ValueError, match="impl"):
        spectral_norm_all(nn.Linear(3, 4), impl="fast")
    w, u, v = torch.randn(4, 3), torch.randn(4), torch.randn(3)
    with pytest.raises(ValueError, match=r"u of shape \(4,\)"):
        power_iteration_(w, torch.randn(5), v, 1)
    with pytest.raises(ValueError, match="w_mat must have 2 dims"):
        power_iteration_(torch.randn(4, 3, 2), u, v, 1)
    with pytest.raises(TypeError, match="dtype"):
        power_iteration_(w, u.double(), v, 1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        power_iteration_(w.tolist(), u, v, 1)
    with pytest.raises(ValueError, match="n_iter"):
        power_iteration_(w, u, v, -1)
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        if DEV.type == "cuda":
            power_iteration_(w.double().cuda(), u.double().cuda(), v.double().cuda(), 1, impl="triton")
        else:
            power_iteration_(w.double(), u.double(), v.double(), 1, impl="triton")
    with pytest.raises(ValueError, match="same length"):
        power_iteration_grouped_([w], [u, u], [v], 1)
    with pytest.raises(ValueError, match=r"w_mats\[1\]"):
        power_iteration_grouped_([w, w], [u, torch.randn(2)], [v, v], 1)
    with pytest.raises(TypeError, match="list or tuple"):
        power_iteration_grouped_(w, [u], [v], 1)
    u0 = u.clone()
    power_iteration_(w, u, v, 0)  # n_iter == 0 is a no-op
    assert torch.equal(u, u0)
