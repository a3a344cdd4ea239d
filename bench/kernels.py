#!/usr/bin/env python
"""Microbenchmarks of scadfast's fused ops (docs/design.md §10).

    python bench/kernels.py [--ops OP ...] [--quick] [--out FILE.json] [--dtype fp32|fp16|bf16]
                            [--providers eager compiled fused] [--modes fwd fwd+bwd] [--no-flush]
                            [--kinds model sweep] [--shapes bench/op_shapes.json] [--clip ViT-B-32]

For every op and case three providers run side by side in one process:

``eager``     the pure-PyTorch reference (``impl="ref"``);
``compiled``  ``torch.compile`` of that same reference (``dynamic=False``: one specialised graph per
              shape; forward+backward goes through AOTAutograd);
``fused``     the fused default (``impl="auto"``: Triton / the CUDA extension on a GPU, the fused
              CPU path on a CPU).

in two modes: ``fwd`` (inputs do not require grad) and ``fwd+bwd`` (forward, then
``torch.autograd.grad`` of all outputs w.r.t. the differentiable inputs with fixed random output
gradients). The spectral-norm power iteration has no backward (it runs under no_grad in training).

Cases: the shapes the models use (``model`` rows) and a size sweep where bandwidth matters (``sweep``
rows). The model shapes are read from ``bench/op_shapes.json``, written by ``bench/shapes.py``, which
records with hooks what each fused op sees in the real models of every variant (``--clip ViT-B-32``:
224 px, batch 64, GALIP's widths — the default; ``--clip scadfast-tiny``: the embedded CPU default).
One ``model`` case per distinct call signature: every spectral-normalised weight matrix (each
distinct (rows, cols) once, named after a module holding it and the variants using it), the grouped
update of each model that uses one plus all SCAD discriminator weights as one group, the SAN (h, ω)
pairs and SAN D-loss inputs, every patch-logit map (and weight) of the hinge losses, and the
conditioning-augmentation inputs. ``--kinds`` selects model and/or sweep rows.

Reported per row: median time (ms), speed-up vs eager and vs compiled, bytes moved under the op's
byte model, GB/s, and on a GPU the percentage of the device's peak HBM bandwidth (table in
``bench/common.py``). Byte model (the traffic a perfect implementation cannot avoid): the forward
reads every input once and writes every output once; the backward re-reads the inputs, reads the
output gradients and writes the input gradients. A broadcast (expanded) input counts at its own
size. Per-op refinements are in ``BYTE_MODELS``. Small model shapes are launch-bound: their GB/s
says how far from bandwidth-bound they are, nothing more.

Before timing, every fused result is compared with the eager reference; a mismatch is reported
in the row's note (and the row keeps its time). A provider that is missing (e.g. the CUDA extension
was not built, or an op has no fused path yet) is reported as "not available" instead of failing
the run; an op that cannot be imported at all likewise.

On a CPU the CPU paths run and the output says that the numbers are CPU numbers. Under
``TRITON_INTERPRET=1`` the script refuses to run (the interpreter's timings are meaningless).
``--quick`` uses few repetitions and a short sweep (well under a minute per op on a small CPU,
torch.compile's first compilation included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

OPS = ("power_iteration_", "power_iteration_grouped_", "san_logits", "san_d_loss", "patch_hinge_loss", "cond_aug")
PROVIDERS = ("eager", "compiled", "fused")
MODES = ("fwd", "fwd+bwd")
SCHEMA = "scadfast.bench.kernels/1"

# Shapes the models use: bench/op_shapes.json (bench/shapes.py). Loaded on first use (see _shapes()).
OP_SHAPES_PATH = os.path.join(HERE, "op_shapes.json")
OP_SHAPES_CLIP = "ViT-B-32"
_OP_SHAPES: dict | None = None


def _shapes() -> dict:
    global _OP_SHAPES
    if _OP_SHAPES is None:
        if HERE not in sys.path:
            sys.path.insert(0, HERE)
        import shapes as shapes_mod

        if not os.path.isfile(OP_SHAPES_PATH):
            raise FileNotFoundError(f"{OP_SHAPES_PATH} not found: run `python bench/shapes.py` to record the "
                                    "shapes the models use")
        _OP_SHAPES = shapes_mod.load(OP_SHAPES_PATH)
        _OP_SHAPES["_mod"] = shapes_mod
    return _OP_SHAPES


def _model_cases(op: str) -> list[dict]:
    data = _shapes()
    return data["_mod"].model_cases(data, op, OP_SHAPES_CLIP)


def sn_weights() -> list[tuple[str, tuple[int, int]]]:
    """Every distinct spectral-normalised weight matrix of every variant at the chosen CLIP setup,
    as ``(name, (rows, cols))`` (rows = out, cols = in·kh·kw), largest first."""
    data = _shapes()
    return data["_mod"].sn_weights(data, OP_SHAPES_CLIP, variant_set=None)


def sn_groups() -> list[tuple[str, list[tuple[int, int]]]]:
    """Grouped power-iteration cases: each model's weights updated by one grouped call
    (``spectral_norm_all(grouped=True)``), and all SN weights of the SCAD discriminators as one group."""
    data = _shapes()
    groups = []
    for m in data["models"]:
        if m["clip"] != OP_SHAPES_CLIP:
            continue
        mats = {}
        for c in m["calls"]:
            if c["op"] == "spectral_norm" and c.get("grouped"):
                mats.setdefault(c["module"], tuple(c["shapes"]["matrix"]))
        if mats:
            groups.append((f"{m['variant']} grouped update ({len(mats)} weights)", list(mats.values())))
    scad = [s for _, s in data["_mod"].sn_weights(data, OP_SHAPES_CLIP)]
    if scad:
        groups.append((f"all {len(scad)} SN weights of the SCAD discriminators", scad))
    return groups


BYTE_MODELS = {
    "power_iteration_": "n_iter=1: W read twice (W·v, then Wᵀ·u depends on the normalised u, so a "
                        "weight larger than on-chip memory cannot be read once) + u, v read and written",
    "power_iteration_grouped_": "as power_iteration_, summed over all weights",
    "san_logits": "generic: fwd reads h, ω and writes 3 logits; bwd re-reads h, ω, reads 3 logit grads, writes dh, dω",
    "san_d_loss": "generic: fwd reads the 4 feature tensors, writes a scalar; bwd re-reads them, writes 4 grads",
    "patch_hinge_loss": "generic: fwd reads logits (+ weight at its own size), writes a scalar; bwd re-reads "
                        "logits (+ weight), writes the logits' grad",
    "cond_aug": "generic over the op's tensors: s, weight, bias, eps read; c_hat, mu, logvar, kl written "
                "(the linear layer's GEMM counted by its operands only)",
}


def _refuse_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(
            "bench/kernels.py: refusing to time with TRITON_INTERPRET=1: the Triton interpreter runs "
            "kernels on the CPU in Python, so its timings say nothing about the kernels. Unset "
            "TRITON_INTERPRET (or set it to 0) and run again.",
            file=sys.stderr,
        )
        sys.exit(2)


# ---------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    op: str
    name: str
    kind: str  # "model" | "sweep"
    shape: str
    make: Callable  # (device, dtype, requires_grad) -> list of args
    diff: tuple[int, ...] = ()  # indices of args that are differentiable (fwd+bwd mode)
    modes: tuple[str, ...] = MODES
    inplace: tuple[int, ...] = ()  # indices of args an in-place op writes (its outputs)
    extra_bytes: Callable | None = None  # (args) -> bytes the generic model misses


@dataclass
class OpSpec:
    name: str
    call: Callable  # (args, impl) -> outputs
    cases: list[Case] = field(default_factory=list)
    fused_missing: str | None = None  # reason the fused path is not available
    import_error: str | None = None


def _randn(shape, device, dtype, requires_grad=False, scale=1.0):
    import torch

    t = (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def _sizes(quick: bool, cuda: bool, full_gpu, full_cpu, quick_gpu, quick_cpu):
    if quick:
        return quick_gpu if cuda else quick_cpu
    return full_gpu if cuda else full_cpu


def _hinge_spec(quick: bool, cuda: bool) -> OpSpec:
    from scadfast.ops import patch_hinge_loss

    def call(a, impl):
        return patch_hinge_loss(a[0], True, a[1], impl=impl)

    def mk(shape, wshape=None):
        def make(device, dtype, rg):
            w = None if wshape is None else _randn(wshape, device, torch_f32()).abs_().add_(0.1)
            return [_randn(shape, device, dtype, rg, scale=2.0), w]
        return make

    spec = OpSpec("patch_hinge_loss", call)
    model, seen = [], set()
    for e in _model_cases("patch_hinge_loss"):  # real and fake calls of one shape time the same
        shape, ws = tuple(e["shapes"]["logits"]), e["shapes"]["weight"]
        ws = tuple(ws) if ws else None
        if (shape, ws) in seen:
            continue
        seen.add((shape, ws))
        what = f"patch logits {shape[-2]}x{shape[-1]}" if len(shape) == 4 else "per-sample logits"
        model.append((f"{what}{', weighted' if ws else ''} [{','.join(e['variants'])}]", shape, ws))
    if quick:
        model = model[:1]
    for name, shape, ws in model:
        spec.cases.append(Case(spec.name, name, "model", "x".join(map(str, shape)) + (" w=" + "x".join(map(str, ws)) if ws else ""),
                               mk(shape, ws), diff=(0,)))
    for n in _sizes(quick, cuda, [1 << 20, 1 << 22, 1 << 24, 1 << 26, 1 << 27], [1 << 18, 1 << 22], [1 << 24], [1 << 18]):
        spec.cases.append(Case(spec.name, f"sweep N=2^{n.bit_length() - 1}", "sweep", str(n), mk((n,)), diff=(0,)))
    return spec


def _san_logits_spec(quick: bool, cuda: bool) -> OpSpec:
    from scadfast.ops import san_logits

    def call(a, impl):
        return san_logits(a[0], a[1], impl=impl)

    def mk(b, d):
        return lambda device, dtype, rg: [_randn((b, d), device, dtype, rg), _randn((b, d), device, dtype, rg)]

    spec = OpSpec("san_logits", call)
    model = [(e["shapes"]["h"][0], e["shapes"]["h"][1], e) for e in _model_cases("san_logits")]
    for b, d, e in model[:1] if quick else model:
        spec.cases.append(Case(spec.name, f"SAN head B={b} d_h={d} ({'/'.join(e['phases'])}) [{','.join(e['variants'])}]",
                               "model", f"{b}x{d}", mk(b, d), diff=(0, 1)))
    for b, d in _sizes(quick, cuda, [(1024, 8192), (16384, 8192)], [(1024, 2048)], [(16384, 8192)], [(1024, 2048)]):
        spec.cases.append(Case(spec.name, f"sweep B={b} d_h={d}", "sweep", f"{b}x{d}", mk(b, d), diff=(0, 1)))
    return spec


def _san_d_loss_spec(quick: bool, cuda: bool) -> OpSpec:
    from scadfast.ops import san_d_loss

    def call(a, impl):
        return san_d_loss(a[0], a[1], a[2], a[3], impl=impl)

    def mk(b, d, bf=None):
        # Real pairs (B) and fake + mismatched pairs (2B by default) in one call, as the SCAD D step does.
        bf = 2 * b if bf is None else bf
        return lambda device, dtype, rg: [_randn((b, d), device, dtype, rg), _randn((b, d), device, dtype, rg),
                                          _randn((bf, d), device, dtype, rg), _randn((bf, d), device, dtype, rg)]

    spec = OpSpec("san_d_loss", call)
    model = [(e["shapes"]["h_real"][0], e["shapes"]["h_fake"][0], e["shapes"]["h_real"][1], e)
             for e in _model_cases("san_d_loss")]
    for b, bf, d, e in model[:1] if quick else model:
        spec.cases.append(Case(spec.name, f"SAN D loss B={b}+{bf} d_h={d} [{','.join(e['variants'])}]", "model",
                               f"{b}+{bf}x{d}", mk(b, d, bf), diff=(0, 1, 2, 3)))
    for b, d in _sizes(quick, cuda, [(1024, 8192), (8192, 8192)], [(1024, 2048)], [(8192, 8192)], [(1024, 2048)]):
        spec.cases.append(Case(spec.name, f"sweep B={b}+{2 * b} d_h={d}", "sweep", f"{b}+{2 * b}x{d}", mk(b, d),
                               diff=(0, 1, 2, 3)))
    return spec


def _cond_aug_spec(quick: bool, cuda: bool) -> OpSpec:
    from scadfast.ops import cond_aug

    def call(a, impl, mode):
        return cond_aug(a[0], a[1], a[2], eps=a[3], mode=mode, impl=impl)

    def mk(b, d, e, mode):
        rows = (4 if mode == "glu" else 2) * e

        def make(device, dtype, rg):
            return [_randn((b, d), device, dtype, rg), _randn((rows, d), device, dtype, rg, scale=d ** -0.5),
                    _randn((rows,), device, dtype, rg, scale=0.1), _randn((b, e), device, dtype)]
        return make

    spec = OpSpec("cond_aug", None)
    model = [(e["shapes"]["s"][0], e["shapes"]["s"][1], e["shapes"]["eps"][1], e["mode"]) for e in _model_cases("cond_aug")]
    sweep = _sizes(quick, cuda, [(4096, 512, 128, "glu"), (65536, 512, 128, "glu")], [(4096, 512, 128, "glu")],
                   [(65536, 512, 128, "glu")], [(1024, 512, 128, "glu")])
    for kind, items in (("model", model[:1] if quick else model), ("sweep", sweep)):
        for b, d, e, mode in items:
            name = (f"CA B={b} {d}->{'4' if mode == 'glu' else '2'}x{e} ({mode})" if kind == "model"
                    else f"sweep B={b} ({mode})")
            c = Case(spec.name, name, kind, f"{b}x{d}->{(4 if mode == 'glu' else 2) * e}", mk(b, d, e, mode), diff=(0, 1, 2))
            c.mode_arg = mode  # type: ignore[attr-defined]
            spec.cases.append(c)
    spec.call = lambda a, impl, case=None: call(a, impl, getattr(case, "mode_arg", "glu"))
    spec.call_needs_case = True  # type: ignore[attr-defined]
    return spec


def _sn_spec(quick: bool, cuda: bool) -> OpSpec:
    from scadfast.ops import power_iteration_

    def call(a, impl):
        power_iteration_(a[0], a[1], a[2], 1, 1e-12, impl=impl)
        return None

    def mk(r, c):
        def make(device, dtype, rg):
            import torch

            u = torch.nn.functional.normalize(_randn((r,), device, torch_f32()), dim=0).to(dtype)
            v = torch.nn.functional.normalize(_randn((c,), device, torch_f32()), dim=0).to(dtype)
            return [_randn((r, c), device, dtype, scale=c ** -0.5), u, v]
        return make

    def w_again(a):
        return nbytes_of(a[0])  # the second read of W (see BYTE_MODELS)

    spec = OpSpec("power_iteration_", call)
    weights = sn_weights()
    weights = weights[:1] if quick else weights
    for name, (r, c) in weights:
        spec.cases.append(Case(spec.name, name, "model", f"{r}x{c}", mk(r, c), modes=("fwd",), inplace=(1, 2),
                               extra_bytes=w_again))
    for r, c in _sizes(quick, cuda, [(2048, 2048), (8192, 8192), (16384, 16384)], [(2048, 2048)], [(8192, 8192)], [(1024, 1024)]):
        spec.cases.append(Case(spec.name, f"sweep {r}x{c}", "sweep", f"{r}x{c}", mk(r, c), modes=("fwd",),
                               inplace=(1, 2), extra_bytes=w_again))
    return spec


def _sn_grouped_spec(quick: bool, cuda: bool) -> OpSpec:
    from scadfast.ops import power_iteration_grouped_

    def call(a, impl):
        n = len(a) // 3
        power_iteration_grouped_(list(a[:n]), list(a[n:2 * n]), list(a[2 * n:]), 1, 1e-12, impl=impl)
        return None

    def mk(shapes):
        def make(device, dtype, rg):
            import torch

            ws = [_randn(s, device, dtype, scale=s[1] ** -0.5) for s in shapes]
            us = [torch.nn.functional.normalize(_randn((s[0],), device, torch_f32()), dim=0).to(dtype) for s in shapes]
            vs = [torch.nn.functional.normalize(_randn((s[1],), device, torch_f32()), dim=0).to(dtype) for s in shapes]
            return ws + us + vs
        return make

    def w_again(a):
        return nbytes_of(a[: len(a) // 3])

    spec = OpSpec("power_iteration_grouped_", call)
    groups = sn_groups()
    for name, shapes in groups[-1:] if quick else groups:
        n = len(shapes)
        spec.cases.append(Case(spec.name, name, "model", f"{n} weights", mk(shapes), modes=("fwd",),
                               inplace=tuple(range(n, 3 * n)), extra_bytes=w_again))
    for k, (r, c) in _sizes(quick, cuda, [(32, (1024, 1024)), (16, (4096, 4096))], [(16, (512, 512))],
                            [(16, (4096, 4096))], [(8, (256, 256))]):
        spec.cases.append(Case(spec.name, f"sweep {k} x {r}x{c}", "sweep", f"{k}x({r}x{c})", mk([(r, c)] * k),
                               modes=("fwd",), inplace=tuple(range(k, 3 * k)), extra_bytes=w_again))
    return spec


SPEC_BUILDERS = {
    "power_iteration_": _sn_spec,
    "power_iteration_grouped_": _sn_grouped_spec,
    "san_logits": _san_logits_spec,
    "san_d_loss": _san_d_loss_spec,
    "patch_hinge_loss": _hinge_spec,
    "cond_aug": _cond_aug_spec,
}


def torch_f32():
    import torch

    return torch.float32


def nbytes_of(*ts) -> int:
    from common import nbytes

    return nbytes(*ts)


# ---------------------------------------------------------------------------------------------
# Availability of the fused path


def _fused_missing(op: str, spec: OpSpec, device) -> str | None:
    """Why ``impl="auto"`` would not run a fused path for ``op`` on ``device`` (None if it does)."""
    from scadfast.ops import _impl

    if op == "cond_aug":
        if not _impl.extension_available(cuda=device.type == "cuda"):
            what = "with CUDA kernels " if device.type == "cuda" else ""
            return f"not available: the extension scadfast._C {what}is not built ({_impl.extension_error() or 'no CUDA path'})"
    elif device.type == "cuda" and not _impl.triton_importable():
        return "not available: Triton is not importable"
    # An op that still ignores impl= has no fused path: its impl check must reject a bogus value.
    case = spec.cases[0]
    args = case.make(device, torch_f32(), False)
    try:
        _call(spec, case, args, "__not_an_impl__")
    except ValueError as e:
        if "impl" in str(e):
            return None
        return f"not available: probing impl= raised {e!s}"[:200]
    except Exception as e:  # noqa: BLE001 - report, do not crash
        return f"not available: probing impl= raised {type(e).__name__}: {e!s}"[:200]
    return "not available: the op does not route impl= yet (no fused path)"


def _call(spec: OpSpec, case: Case, args, impl):
    if getattr(spec, "call_needs_case", False):
        return spec.call(args, impl, case)
    return spec.call(args, impl)


# ---------------------------------------------------------------------------------------------
# Running


def _flatten(out):
    import torch

    if out is None:
        return []
    if isinstance(out, torch.Tensor):
        return [out]
    res = []
    for o in out:
        res.extend(_flatten(o))
    return res


def _clone_args(args):
    import torch

    return [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]


def _check(spec: OpSpec, case: Case, args, dtype) -> str | None:
    """Compare the fused result with the eager reference; a note on mismatch, None when they agree."""
    import torch

    a_ref, a_fus = _clone_args(args), _clone_args(args)
    with torch.no_grad():
        o_ref = _call(spec, case, a_ref, "ref")
        o_fus = _call(spec, case, a_fus, "auto")
    if case.inplace:
        o_ref = [a_ref[i] for i in case.inplace]
        o_fus = [a_fus[i] for i in case.inplace]
    rtol = 2e-3 if dtype == torch.float32 else 3e-2
    for r, f in zip(_flatten(o_ref), _flatten(o_fus)):
        r32, f32 = r.detach().double(), f.detach().double()
        if r32.shape != f32.shape:
            return f"MISMATCH: shape {tuple(f32.shape)} vs reference {tuple(r32.shape)}"
        err = (r32 - f32).abs().max().item() if r32.numel() else 0.0
        scale = max(r32.abs().max().item() if r32.numel() else 0.0, 1e-6)
        if not err <= rtol * scale:
            return f"MISMATCH vs reference: max abs err {err:.3g} (scale {scale:.3g})"
    return None


def _make_step(fn, args, mode, diff):
    """A no-argument callable running one forward (and backward) of ``fn`` on ``args``."""
    import torch

    assert mode == "fwd+bwd", mode
    inputs = [args[i] for i in diff]
    outs = [o for o in _flatten(fn(args)) if o.requires_grad]
    grads = [torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in outs]

    def step():
        res = [o for o in _flatten(fn(args)) if o.requires_grad]
        return torch.autograd.grad(res, inputs, grads, allow_unused=True)

    return step, outs, grads


def _bytes(case: Case, args, mode, out_tensors, grads) -> int:
    from common import nbytes

    inputs = [a for a in args if a is not None]
    if case.inplace:
        outs = [args[i] for i in case.inplace]
    else:
        outs = out_tensors
    total = nbytes(inputs) + nbytes(outs)
    if case.extra_bytes is not None:
        total += case.extra_bytes(args)
    if mode == "fwd+bwd":
        diff = [args[i] for i in case.diff]
        total += nbytes(inputs) + nbytes(grads) + nbytes(diff)
    return total


def run(argv=None) -> int:
    _refuse_interpreter()
    p = argparse.ArgumentParser(description="scadfast fused-op microbenchmarks (docs/design.md §10)")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS), metavar="OP",
                   help=f"ops to run (default all): {' '.join(OPS)}")
    p.add_argument("--quick", action="store_true", help="few repetitions and a short sweep (a smoke run)")
    p.add_argument("--out", default=None, help="JSON results file (default bench/results/kernels-<device>.json)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-flush", action="store_true", help="GPU: do not flush the L2 cache before each timed call")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None, help="maximum timed calls per measurement")
    p.add_argument("--kinds", nargs="+", default=["model", "sweep"], choices=["model", "sweep"],
                   help="model shapes (from --shapes) and/or the bandwidth sweep")
    p.add_argument("--shapes", default=None, help="op-shape file of bench/shapes.py (default bench/op_shapes.json)")
    p.add_argument("--clip", default=None, choices=["ViT-B-32", "scadfast-tiny"],
                   help="which setup's model shapes (default ViT-B-32: 224 px, batch 64)")
    args = p.parse_args(argv)
    global OP_SHAPES_PATH, OP_SHAPES_CLIP
    if args.shapes:
        OP_SHAPES_PATH = os.path.abspath(args.shapes)
    if args.clip:
        OP_SHAPES_CLIP = args.clip
    if args.out:  # before any measuring (the default results folder is in the source tree)
        from scadfast.outputs import unwritable_reason

        why = unwritable_reason(args.out)
        if why:
            print(f"bench/kernels.py: --out {args.out}: cannot write there: {why}", file=sys.stderr)
            return 2

    sys.path.insert(0, HERE)
    import torch

    import common

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/kernels.py: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    device = torch.device("cuda" if (args.device != "cpu" and torch.cuda.is_available()) else "cpu")
    cuda = device.type == "cuda"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    warmup = args.warmup if args.warmup is not None else (3 if args.quick else 10) if cuda else (1 if args.quick else 3)
    reps = args.reps if args.reps is not None else (20 if args.quick else 200) if cuda else (5 if args.quick else 30)
    timer = common.Timer(device, warmup=warmup, reps=reps, min_reps=3 if args.quick else 10,
                         budget_s=0.05 if args.quick else 0.5, flush_l2=cuda and not args.no_flush)

    # torch.compile settings: every (op, shape, mode) is its own specialised graph.
    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 1024)
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = 1 << 16
    if (os.cpu_count() or 1) <= 4:
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1  # a worker pool costs more than it saves on a small CPU

    env = common.environment(device)
    banner = (f"scadfast fused-op benchmark on {env['device']['name']} ({device.type}), dtype {args.dtype}, "
              f"torch {env['versions']['torch']}, triton {env['versions']['triton']}, cuda {env['versions']['cuda']}")
    print(banner)
    if not cuda:
        print("*** CPU NUMBERS: no CUDA device; the CPU paths ran and these timings are CPU timings, "
              "not GPU kernel timings. ***")
    else:
        peak = env["device"]["peak_hbm_gbps"]
        print(f"peak HBM bandwidth: {peak if peak else 'unknown'} GB/s ({env['device']['peak_source']}); "
              f"L2 flushed before each call: {timer.flush_l2}")
    sys.stdout.flush()

    out = args.out or os.path.join(HERE, "results", f"kernels-{_slug(env['device']['name'] if cuda else 'cpu')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    torch.manual_seed(0)
    rows: list[dict] = []
    for op in args.ops:
        try:
            spec = SPEC_BUILDERS[op](args.quick, cuda)
        except Exception as e:  # noqa: BLE001 - an op that cannot be imported is reported, not fatal
            msg = f"{type(e).__name__}: {e}"[:300]
            print(f"[{op}] not available: {msg}")
            rows.append({"op": op, "case": None, "kind": None, "shape": None, "dtype": args.dtype, "mode": None,
                         "provider": None, "status": "not available", "note": msg, "ms": None, "ms_min": None,
                         "reps": None, "wall_ms": None, "speedup_vs_eager": None, "speedup_vs_compiled": None, "bytes": None,
                         "gbps": None, "pct_peak": None})
            continue
        try:
            spec.fused_missing = _fused_missing(op, spec, device)
        except Exception as e:  # noqa: BLE001
            spec.fused_missing = f"not available: {type(e).__name__}: {e}"[:300]
        for case in [c for c in spec.cases if c.kind in args.kinds]:
            for mode in [m for m in args.modes if m in case.modes]:
                rows.extend(_run_case(spec, case, mode, device, dtype, args, timer, env))
                sys.stdout.flush()
        # Partial results survive an interrupted run.
        _write(out, _result(env, cuda, args, warmup, reps, timer, _with_speedups(rows), complete=False))

    rows = _with_speedups(rows)
    _print_table(rows, cuda, common)
    _write(out, _result(env, cuda, args, warmup, reps, timer, rows, complete=True))
    print(f"wrote {out}")
    if not cuda:
        print("*** These are CPU numbers (no CUDA device). ***")
    return 0


def _with_speedups(rows: list[dict]) -> list[dict]:
    """Fill speed-ups vs eager and vs compiled within each (op, case, mode)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["op"], r["case"], r["mode"]), []).append(r)
    for grp in groups.values():
        base = {r["provider"]: r["ms"] for r in grp if r["status"] == "ok"}
        for r in grp:
            if r["status"] != "ok":
                continue
            r["speedup_vs_eager"] = base["eager"] / r["ms"] if base.get("eager") else None
            r["speedup_vs_compiled"] = base["compiled"] / r["ms"] if base.get("compiled") else None
    return rows


def _result(env, cuda, args, warmup, reps, timer, rows, complete: bool) -> dict:
    if cuda:
        timing = ("ms: CUDA events around each call, median; L2 " + ("flushed" if timer.flush_l2 else "not flushed")
                  + " and the GPU kept busy (torch.cuda._sleep) before each call so host launch latency is hidden; "
                  "wall_ms: back-to-back calls, perf_counter, host overhead included")
    else:
        timing = "ms: time.perf_counter around each call, median (CPU); wall_ms: back-to-back calls"
    return {
        "schema": SCHEMA,
        **env,
        "complete": complete,
        "cpu_numbers": not cuda,
        "settings": {"quick": args.quick, "dtype": args.dtype, "ops": args.ops, "providers": args.providers, "kinds": args.kinds,
                     "modes": args.modes, "warmup": warmup, "max_reps": reps, "l2_flush": timer.flush_l2},
        "timing": timing,
        "byte_models": {op: BYTE_MODELS[op] for op in args.ops},
        "op_shapes": {"file": os.path.relpath(OP_SHAPES_PATH, ROOT) if OP_SHAPES_PATH.startswith(ROOT) else OP_SHAPES_PATH,
                      "clip": OP_SHAPES_CLIP, "kinds": args.kinds},
        "sn_weights": [{"name": n, "shape": list(s)} for n, s in sn_weights()],
        "rows": rows,
    }


def _write(path: str, result: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s).strip("-").lower()


def _run_case(spec: OpSpec, case: Case, mode: str, device, dtype, args, timer, env) -> list[dict]:
    import torch

    import common

    rows = []
    base = {"op": spec.name, "case": case.name, "kind": case.kind, "shape": case.shape, "dtype": args.dtype,
            "mode": mode}
    torch.manual_seed(0)
    note_check = None
    for provider in args.providers:
        row = dict(base, provider=provider, status="ok", note=None, ms=None, ms_min=None, reps=None, wall_ms=None,
                   speedup_vs_eager=None, speedup_vs_compiled=None, bytes=None, gbps=None, pct_peak=None)
        rows.append(row)
        if provider == "fused" and spec.fused_missing:
            row.update(status="not available", note=spec.fused_missing)
            continue
        try:
            inputs = case.make(device, dtype, mode == "fwd+bwd")
            if provider == "fused" and note_check is None:
                note_check = _check(spec, case, inputs, dtype) or ""
                row["note"] = note_check or None
            if provider == "compiled":
                ref = lambda a, s=spec, c=case: _call(s, c, a, "ref")  # noqa: E731
                fn = torch.compile(ref, dynamic=False)
            else:
                impl = "ref" if provider == "eager" else "auto"
                fn = lambda a, s=spec, c=case, i=impl: _call(s, c, a, i)  # noqa: E731
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if mode == "fwd":
                    out = fn(inputs)
                    step, outs, grads = (lambda: fn(inputs)), _flatten(out), []
                else:
                    step, outs, grads = _make_step(fn, inputs, mode, case.diff)
                timing = timer(step)
                times = timing["ms"]
        except Exception as e:  # noqa: BLE001 - one failing provider must not end the run
            row.update(status="error", note=f"{type(e).__name__}: {e}"[:300])
            continue
        ms = common.median(times)
        nb = _bytes(case, inputs, mode, outs, grads)
        gbps = nb / (ms * 1e-3) / 1e9 if ms > 0 else None
        peak = env["device"]["peak_hbm_gbps"]
        row.update(ms=ms, ms_min=min(times), reps=len(times), wall_ms=timing["wall_ms"], bytes=nb, gbps=gbps,
                   pct_peak=(100.0 * gbps / peak) if (peak and gbps) else None)
        print(f"  {spec.name:24s} {case.name:40s} {mode:7s} {provider:8s} {ms:9.4f} ms (wall {timing['wall_ms']:.4f} ms)"
              + (f"  {row['note']}" if row["note"] else ""))
        del inputs, step, outs, grads
    return rows


def _print_table(rows, cuda, common) -> None:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    headers = ["op", "case", "mode", "provider", "ms", "x eager", "x compiled", "wall ms", "MB", "GB/s"] + (["% peak"] if cuda else []) + ["note"]
    table = []
    for r in rows:
        if r["case"] is None:
            table.append([r["op"], "-", "-", "-", "-", "-", "-", "-", "-", "-"] + (["-"] if cuda else []) + [r["note"] or ""])
            continue
        line = [r["op"], r["case"], r["mode"], r["provider"],
                f(r["ms"], ".4f") if r["status"] == "ok" else r["status"],
                f(r["speedup_vs_eager"], ".2f"), f(r["speedup_vs_compiled"], ".2f"), f(r["wall_ms"], ".4f"),
                f(None if r["bytes"] is None else r["bytes"] / 1e6, ".3f"), f(r["gbps"], ".1f")]
        if cuda:
            line.append(f(r["pct_peak"], ".1f"))
        line.append((r["note"] or "")[:90])
        table.append(line)
    print()
    print(("GPU" if cuda else "CPU") + " results: ms = median " + ("device time per call (host launch latency hidden)"
          if cuda else "time per call") + "; speed-ups and GB/s from ms; wall ms = back-to-back wall time per call "
          "(host overhead included)")
    print(common.format_table(headers, table))


if __name__ == "__main__":
    sys.exit(run())
