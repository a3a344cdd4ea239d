"""Spectral normalisation with a fused power iteration (docs/design.md §7, §5.3).

:func:`spectral_norm` is a drop-in for :func:`torch.nn.utils.parametrizations.spectral_norm`:

* it registers a parametrization with :func:`torch.nn.utils.parametrize.register_parametrization`,
  so the ``state_dict`` keys are the same (``parametrizations.weight.original``,
  ``parametrizations.weight.0._u``, ``parametrizations.weight.0._v``) and a state dict saved by
  either implementation loads into the other;
* ``u`` (rows) and ``v`` (columns) are buffers of the weight's dtype, initialised from
  ``normal_(0, 1)`` exactly as torch does (same RNG draws, same order) and refined by 15 power
  iterations; in training mode every access of the weight runs ``n_power_iterations`` iterations
  *in place* on the buffers; eval mode never iterates;
* the weight is ``W / σ`` with ``σ = uᵀ W v`` computed from *clones* of ``u``, ``v`` in plain
  autograd-visible torch ops, so gradients flow through ``W`` only and double backward (the MA-GP of
  docs/design.md §5.5) works unchanged; for fp16/bf16 weights ``σ`` and ``W / σ`` are computed in fp32 (rounded
  once to the weight's dtype), so large weights do not overflow;
* the matrix is ``weight.permute(dim, …).flatten(1)``; ``dim`` defaults to 1 for ``ConvTranspose``
  and 0 otherwise; 1-D weights are simply ``F.normalize``-d, as torch does.

Only the no-grad power iteration is fused (:func:`power_iteration_`: one launch per weight on a GPU,
:func:`power_iteration_grouped_`: one launch for many weights). :func:`spectral_norm_all` applies
the parametrization to a whole model and, optionally, updates all its weights with one grouped
launch per forward call.

``impl`` (see :mod:`scadfast.ops._impl`): ``"auto"`` — the Triton kernel on CUDA (fp16/bf16/fp32;
fp64 uses the PyTorch path), the PyTorch path (backend ``"torch"``) otherwise, bit-identical to
torch for fp32/fp64 and computing in fp32 for fp16/bf16; ``"ref"`` — :func:`power_iteration_ref`,
torch's own ``_power_method`` math; ``"triton"`` — the kernel (CPU tensors only under
``TRITON_INTERPRET=1``). The power iteration runs without gradient, so its custom ops have no
autograd; the differentiable part (σ = uᵀWv and W / σ) is plain torch.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ._impl import check_impl, check_same_device, check_tensor, kernels, resolve_impl, triton_runs_on, warn_once

__all__ = [
    "spectral_norm", "spectral_norm_all", "power_iteration_", "power_iteration_grouped_", "power_iteration_ref",
    "SpectralNorm", "SpectralNormDimError",
]

_FUSED = ("triton",)
_IMPLS = ("auto", "ref") + _FUSED
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SN_MODULE_TYPES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear,
)
_TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_INIT_ITERATIONS = 15  # torch's number of power iterations at construction


class SpectralNormDimError(IndexError, ValueError):
    """``dim`` out of range: an ``IndexError`` as torch raises, and a ``ValueError``."""


# ---------------------------------------------------------------------------------------------
# Validation


def _check_n_iter(op: str, name: str, n, minimum: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(n).__name__}")
    if n < minimum:
        raise ValueError(
            f"{op}: expected {name} to be {'positive' if minimum > 0 else 'non-negative'}, "
            f"but got {name}={n}"
        )
    return n


def _check_eps(op: str, eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{op}: eps must be a float, got {type(eps).__name__}")
    if not eps >= 0:  # also rejects NaN
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")
    return float(eps)


def _check_triple(op: str, w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, w_name: str = "w_mat") -> None:
    check_tensor(op, w_name, w, ndim=2)
    check_tensor(op, "u", u, ndim=1)
    check_tensor(op, "v", v, ndim=1)
    check_same_device(op, **{w_name: w, "u": u, "v": v})
    if u.dtype != w.dtype or v.dtype != w.dtype:
        raise TypeError(f"{op}: u and v must have {w_name}'s dtype {w.dtype}, got u {u.dtype}, v {v.dtype}")
    R, C = w.shape
    if u.shape[0] != R or v.shape[0] != C:
        raise ValueError(
            f"{op}: {w_name} of shape {tuple(w.shape)} needs u of shape ({R},) and v of shape ({C},), "
            f"got u {tuple(u.shape)} and v {tuple(v.shape)}"
        )


# ---------------------------------------------------------------------------------------------
# Reference


def _reshape_to_matrix(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """torch's ``_SpectralNorm._reshape_weight_to_matrix``: ``dim`` to the front, flatten the rest."""
    if dim != 0:
        weight = weight.permute(dim, *(d for d in range(weight.dim()) if d != dim))
    return weight.flatten(1)


def power_iteration_ref(w_mat: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n_iter: int,
                        eps: float = 1e-12) -> None:
    """Reference of :func:`power_iteration_`: torch's ``_power_method``, operation for operation.

    ``n_iter`` times ``u ← normalize(W v)``, ``v ← normalize(Wᵀ u)`` (``F.normalize`` with ``eps``),
    in place on ``u`` and ``v``, without gradient.
    """
    with torch.no_grad():
        for _ in range(n_iter):
            F.normalize(torch.mv(w_mat, v), dim=0, eps=eps, out=u)
            F.normalize(torch.mv(w_mat.H, u), dim=0, eps=eps, out=v)


# ---------------------------------------------------------------------------------------------
# The op's math in PyTorch (backend "torch")


def _power_iteration_torch(w_mat: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n_iter: int, eps: float) -> None:
    """The ``"torch"`` backend (``impl="auto"`` off the Triton kernel).

    fp32/fp64: torch's own sequence (bit-identical). fp16/bf16: the matrix is upcast once, products
    and norms are computed in fp32, and each normalised vector is rounded to the buffer dtype and
    re-read in that rounding, as torch does (the kernel keeps ``W v`` in fp32 instead; both are
    within the documented fp16/bf16 tolerances of fp32 math).
    """
    if w_mat.dtype not in (torch.float16, torch.bfloat16):
        power_iteration_ref(w_mat, u, v, n_iter, eps)
        return
    w32 = w_mat.float()
    tu = torch.empty(u.shape, dtype=torch.float32, device=u.device)
    tv = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    v32 = v.float()
    for _ in range(n_iter):
        torch.mv(w32, v32, out=tu)
        u.copy_(tu.div_(torch.linalg.vector_norm(tu).clamp_min(eps)))
        u32 = u.float()
        torch.mv(w32.T, u32, out=tv)
        v.copy_(tv.div_(torch.linalg.vector_norm(tv).clamp_min(eps)))
        v32 = v.float()


# ---------------------------------------------------------------------------------------------
# Backend "triton": group the weights by device and dtype, then scadfast.kernels.spectral


def _contiguous_vectors(us: Sequence[torch.Tensor]):
    """Contiguous stand-ins for ``us`` (the kernel indexes with stride 1) and a copy-back list."""
    out, back = [], []
    for u in us:
        if u.is_contiguous():
            out.append(u)
        else:
            c = u.contiguous()
            out.append(c)
            back.append((u, c))
    return out, back


def _triton_grouped(weights, dims, us, vs, n_iter, eps) -> None:
    launch = kernels("spectral")
    cu, back_u = _contiguous_vectors(us)
    cv, back_v = _contiguous_vectors(vs)
    groups: dict = {}
    for i, w in enumerate(weights):
        groups.setdefault((w.device, w.dtype), []).append(i)
    for idx in groups.values():
        # A strided view whenever flatten can give one (contiguous conv / linear weights, any 2-D
        # view); otherwise (e.g. a ConvTranspose weight with dim=1) flatten copies once.
        mats = [_reshape_to_matrix(weights[i], dims[i]) for i in idx]
        if len(idx) == 1:
            launch.power_iteration(mats[0], cu[idx[0]], cv[idx[0]], n_iter, eps)
        else:
            launch.power_iteration_grouped(mats, [cu[i] for i in idx], [cv[i] for i in idx], n_iter, eps)
    for dst, src in back_u + back_v:
        dst.copy_(src)


# ---------------------------------------------------------------------------------------------
# Custom ops: in-place and without gradient, so a fake implementation and no autograd. They are
# custom ops so that torch.compile(fullgraph=True) sees one opaque, in-place node instead of
# tracing into Triton launches or breaking the graph.


@torch.library.custom_op("scadfast::power_iteration_", mutates_args=("u", "v"))
def _power_iteration_op(w_mat: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n_iter: int, eps: float,
                        backend: str) -> None:
    """``backend``: "triton" or "torch" (see :func:`scadfast.ops._impl.resolve_impl`)."""
    if backend == "triton":
        _triton_grouped([w_mat], [0], [u], [v], n_iter, eps)
    else:
        _power_iteration_torch(w_mat, u, v, n_iter, eps)


@_power_iteration_op.register_fake
def _power_iteration_fake(w_mat, u, v, n_iter, eps, backend) -> None:
    return None


@torch.library.custom_op("scadfast::power_iteration_grouped_", mutates_args=("us", "vs"))
def _power_iteration_grouped_op(weights: List[torch.Tensor], dims: List[int], us: List[torch.Tensor],
                                vs: List[torch.Tensor], n_iter: int, eps: float, backend: str) -> None:
    if backend == "triton":
        _triton_grouped(weights, dims, us, vs, n_iter, eps)
    else:
        for w, d, u, v in zip(weights, dims, us, vs):
            _power_iteration_torch(_reshape_to_matrix(w, d), u, v, n_iter, eps)


@_power_iteration_grouped_op.register_fake
def _power_iteration_grouped_fake(weights, dims, us, vs, n_iter, eps, backend) -> None:
    return None


def _run(op: str, weights, dims, us, vs, n_iter: int, eps: float, impl: str) -> None:
    """Dispatch validated, detached inputs to their backends (one grouped call per backend)."""
    by_backend: dict = {}
    for i, w in enumerate(weights):
        by_backend.setdefault(resolve_impl(impl, op, w, _FUSED, kernel_dtypes=_KERNEL_DTYPES), []).append(i)
    for backend, idx in by_backend.items():
        if backend == "ref":
            for i in idx:
                power_iteration_ref(_reshape_to_matrix(weights[i], dims[i]), us[i], vs[i], n_iter, eps)
        elif len(idx) == 1 and dims[idx[0]] == 0 and weights[idx[0]].dim() == 2:
            i = idx[0]
            _power_iteration_op(weights[i], us[i], vs[i], n_iter, eps, backend)
        else:
            _power_iteration_grouped_op([weights[i] for i in idx], [dims[i] for i in idx],
                                        [us[i] for i in idx], [vs[i] for i in idx], n_iter, eps, backend)


# ---------------------------------------------------------------------------------------------
# Public API


def power_iteration_(w_mat: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n_iter: int, eps: float = 1e-12,
                     impl: str = "auto") -> None:
    """Run ``n_iter`` power iterations on ``w_mat`` (R × C), updating ``u`` (R,) and ``v`` (C,) in place.

    Each iteration is ``u ← W v / max(‖W v‖, eps)`` then ``v ← Wᵀ u / max(‖Wᵀ u‖, eps)`` (torch's
    ``_power_method`` order and ``F.normalize`` eps rule). No gradient is recorded. ``u``/``v`` must
    have ``w_mat``'s dtype and device; ``w_mat`` may be any strided 2-D view. On a GPU this is one
    Triton launch (all ``n_iter`` iterations in one program, fp32 accumulation), and a
    ``torch.library`` custom op (``scadfast::power_iteration_``) that ``torch.compile`` keeps whole.
    ``n_iter == 0`` is a no-op.
    """
    op = "power_iteration_"
    check_impl(impl, op, _IMPLS)
    _check_triple(op, w_mat, u, v)
    n_iter = _check_n_iter(op, "n_iter", n_iter, 0)
    eps = _check_eps(op, eps)
    if n_iter == 0:
        return
    with torch.no_grad():
        _run(op, [w_mat.detach()], [0], [u], [v], n_iter, eps, impl)


def power_iteration_grouped_(w_mats: Sequence[torch.Tensor], us: Sequence[torch.Tensor], vs: Sequence[torch.Tensor],
                             n_iter: int, eps: float = 1e-12, impl: str = "auto") -> None:
    """:func:`power_iteration_` for many weights at once: ONE Triton launch per (device, dtype)
    group on a GPU (one program per weight, weights in parallel); a loop of the PyTorch path
    otherwise. The results equal per-weight :func:`power_iteration_` calls.
    """
    op = "power_iteration_grouped_"
    check_impl(impl, op, _IMPLS)
    for name, seq in (("w_mats", w_mats), ("us", us), ("vs", vs)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{op}: {name} must be a list or tuple of tensors, got {type(seq).__name__}")
    if not len(w_mats) == len(us) == len(vs):
        raise ValueError(f"{op}: w_mats, us and vs must have the same length, got {len(w_mats)}, {len(us)}, {len(vs)}")
    for i, (w, u, v) in enumerate(zip(w_mats, us, vs)):
        _check_triple(op, w, u, v, w_name=f"w_mats[{i}]")
    n_iter = _check_n_iter(op, "n_iter", n_iter, 0)
    eps = _check_eps(op, eps)
    if n_iter == 0 or len(w_mats) == 0:
        return
    with torch.no_grad():
        _run(op, [w.detach() for w in w_mats], [0] * len(w_mats), list(us), list(vs), n_iter, eps, impl)


# ---------------------------------------------------------------------------------------------
# The parametrization


class SpectralNorm(nn.Module):
    """Parametrization ``W ↦ W / σ(W)``; the same state and semantics as torch's ``_SpectralNorm``.

    Buffers ``_u`` (rows of the matrix) and ``_v`` (columns) exist for weights of ≥ 2 dims. With
    ``external_update = True`` (set by :func:`spectral_norm_all` with ``grouped=True``) the forward
    never iterates: the owner of the group updates the buffers instead.
    """

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12,
                 impl: str = "auto") -> None:
        super().__init__()
        op = "spectral_norm"
        check_impl(impl, op, _IMPLS)
        check_tensor(op, "weight", weight)
        ndim = weight.ndim
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"{op}: dim must be an int or None, got {type(dim).__name__}")
        if dim >= ndim or dim < -ndim:
            raise SpectralNormDimError(
                f"{op}: Dimension out of range (expected to be in range of [-{ndim}, {ndim - 1}] but got {dim})"
            )
        _check_n_iter(op, "n_power_iterations", n_power_iterations, 1)
        self.dim = dim if dim >= 0 else dim + ndim
        self.eps = _check_eps(op, eps)
        self.impl = impl
        self.external_update = False
        if ndim > 1:
            self.n_power_iterations = n_power_iterations
            weight_mat = _reshape_to_matrix(weight, self.dim)
            h, w = weight_mat.size()
            u = weight_mat.new_empty(h).normal_(0, 1)
            v = weight_mat.new_empty(w).normal_(0, 1)
            self.register_buffer("_u", F.normalize(u, dim=0, eps=self.eps))
            self.register_buffer("_v", F.normalize(v, dim=0, eps=self.eps))
            with torch.no_grad():
                _run(op, [weight_mat.detach()], [0], [self._u], [self._v], _INIT_ITERATIONS, self.eps,
                     self._impl_for(weight))

    def _impl_for(self, weight: torch.Tensor) -> str:
        """The impl to use for ``weight`` where it is now.

        A model is usually built on the CPU and moved to the GPU afterwards, and
        ``register_parametrization`` already evaluates the parametrization once: so a parametrization
        created with ``impl="triton"`` uses the automatic choice (with a one-time warning) while its
        weight is on a device the kernel cannot run on. The functional ops raise instead.
        """
        if self.impl == "triton" and not triton_runs_on(weight):
            warn_once("spectral_norm.triton_fallback",
                      f"spectral_norm: impl='triton' cannot run on a {weight.device.type} weight here; "
                      "using impl='auto' until the module is moved to a CUDA device")
            return "auto"
        return self.impl

    def _reshape_weight_to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return _reshape_to_matrix(weight, self.dim)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.ndim == 1:
            return F.normalize(weight, dim=0, eps=self.eps)
        weight_mat = self._reshape_weight_to_matrix(weight)
        if self.training and not self.external_update:
            with torch.no_grad():
                _run("spectral_norm", [weight_mat.detach()], [0], [self._u], [self._v],
                     self.n_power_iterations, self.eps, self._impl_for(weight))
        # Clones: the buffers change in place at the next forward, while autograd may still need
        # the values of this one (D(real) and D(fake) in one graph). σ = uᵀWv stays differentiable
        # in W (and twice differentiable) because it is plain torch.
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        if weight.dtype in (torch.float16, torch.bfloat16):
            # σ = uᵀWv in fp32: W v overflows fp16 for large weights (|w| ~ 6e4), which made σ = inf
            # and the weight all zeros; W / σ is then rounded once to the weight's dtype.
            sigma = torch.vdot(u.float(), torch.mv(weight_mat.float(), v.float()))
            return (weight.float() / sigma).to(weight.dtype)
        sigma = torch.vdot(u, torch.mv(weight_mat, v))
        return weight / sigma

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}, impl={self.impl!r}" + (", external_update" if self.external_update else "")


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12,
                  dim: int | None = None, impl: str = "auto") -> nn.Module:
    """Apply spectral normalisation to ``module.<name>``; a drop-in for
    :func:`torch.nn.utils.parametrizations.spectral_norm` (same state dict, same numerics, see the
    module docstring) with a fused power iteration. Returns ``module``.

    Raises ``TypeError`` if ``module`` is not an ``nn.Module`` or an argument has the wrong type,
    ``ValueError`` if the module has no tensor called ``name``, ``n_power_iterations < 1``,
    ``eps < 0`` or ``impl`` is unknown, and :class:`SpectralNormDimError` (an ``IndexError`` and a
    ``ValueError``) if ``dim`` is out of range.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"spectral_norm: module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"spectral_norm: name must be a str, got {type(name).__name__}")
    check_impl(impl, "spectral_norm", _IMPLS)
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"spectral_norm: module {type(module).__name__} has no parameter or buffer with name {name!r}")
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"spectral_norm: {type(module).__name__}.{name} is not initialised yet (lazy module); "
            "run a forward pass first"
        )
    if dim is None:
        dim = 1 if isinstance(module, _TRANSPOSED_TYPES) else 0
    parametrize.register_parametrization(module, name, SpectralNorm(weight, n_power_iterations, dim, eps, impl))
    return module


# ---------------------------------------------------------------------------------------------
# Whole-model application with one grouped update per forward call

_GROUP_ATTR = "_scadfast_sn_group"


def _grouped_pre_hook(module: nn.Module, args) -> None:
    """Forward pre-hook of the top module: one grouped power iteration for its SN weights.

    The entries live on the module (not in a closure) so that ``copy.deepcopy`` of the model maps
    them to the copy's own submodules.
    """
    batches: dict = {}
    for m, name, sn in getattr(module, _GROUP_ATTR, ()):
        if not (sn.training and sn.external_update and hasattr(sn, "_u")):
            continue
        if not parametrize.is_parametrized(m, name):
            continue
        weight = m.parametrizations[name].original
        batches.setdefault((sn.n_power_iterations, sn.eps, sn._impl_for(weight)), []).append((weight, sn))
    if not batches:
        return
    with torch.no_grad():
        for (n_iter, eps, impl), items in batches.items():
            _run("spectral_norm_all", [w.detach() for w, _ in items], [sn.dim for _, sn in items],
                 [sn._u for _, sn in items], [sn._v for _, sn in items], n_iter, eps, impl)


def spectral_norm_all(module: nn.Module, n_power_iterations: int = 1, eps: float = 1e-12, impl: str = "auto",
                      grouped: bool = True) -> nn.Module:
    """Apply :func:`spectral_norm` to every Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear of
    ``module`` (itself included) whose ``weight`` has no parametrization yet. Returns ``module``.

    ``grouped=True``: the per-weight parametrizations do not iterate themselves; instead a forward
    pre-hook on ``module`` runs ONE grouped update (one launch per device/dtype on a GPU) for every
    SN weight in training mode, each time ``module`` is called. Semantic difference from torch's
    per-access updates: torch iterates each time a weight is *read* — so a layer used k times in
    one forward (or whose ``.weight`` is read outside the forward) iterates k times, and a
    submodule called directly iterates too — whereas the grouped update iterates once per call of
    ``module``. For the usual network that reads each SN weight once per forward, the buffers, σ
    and all outputs are identical. Calling submodules directly (not through ``module``) does not
    update their buffers in grouped mode. Calling ``spectral_norm_all`` again adds new layers to the
    same group.
    """
    op = "spectral_norm_all"
    if not isinstance(module, nn.Module):
        raise TypeError(f"{op}: module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(grouped, bool):
        raise TypeError(f"{op}: grouped must be a bool, got {type(grouped).__name__}")
    check_impl(impl, op, _IMPLS)
    _check_n_iter(op, "n_power_iterations", n_power_iterations, 1)
    _check_eps(op, eps)
    targets = [m for m in module.modules()
               if isinstance(m, _SN_MODULE_TYPES) and not parametrize.is_parametrized(m, "weight")]
    entries = []
    for m in targets:
        spectral_norm(m, "weight", n_power_iterations, eps, None, impl)
        sn = m.parametrizations["weight"][0]
        if grouped:
            sn.external_update = True
            entries.append((m, "weight", sn))
    if grouped and entries:
        group = getattr(module, _GROUP_ATTR, None)
        if group is None:
            group = []
            object.__setattr__(module, _GROUP_ATTR, group)
            module.register_forward_pre_hook(_grouped_pre_hook)
        group.extend(entries)
    return module
