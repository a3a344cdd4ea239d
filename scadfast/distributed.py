"""Multi-process training on ``torch.distributed`` (launched with ``torchrun``).

Why not ``DistributedDataParallel`` wrappers: a GAN step calls many sub-networks of G and D from the
loss functions (several forward passes per step, a double backward for the MA-GP), which DDP's
one-forward-one-backward reducer does not support. scadfast instead keeps every rank's replicas
identical the way DDP does — identical initialisation (broadcast from rank 0) and gradients averaged
with a bucketed ``all_reduce`` after each backward — which is exactly DDP's arithmetic, and works with
double backward and ``torch.compile``. Buffers that evolve deterministically from the weights (the
spectral-norm u/v vectors) stay identical because the weights do.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank, world, local)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_module(module: torch.nn.Module, info: DistInfo) -> None:
    """Make every rank's parameters and buffers equal to rank 0's."""
    if not info.enabled:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def allreduce_grads(params, info: DistInfo, bucket_bytes: int = 25 << 20) -> None:
    """Average ``.grad`` over ranks in buckets of about ``bucket_bytes`` (DDP's reduction)."""
    if not info.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket, size = [], 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= bucket_bytes):
            by_dtype: dict = {}
            for b in bucket:
                by_dtype.setdefault(b.dtype, []).append(b)
            for same in by_dtype.values():
                flat = torch.cat([b.reshape(-1) for b in same])
                dist.all_reduce(flat)
                flat /= info.world_size
                off = 0
                for b in same:
                    n = b.numel()
                    b.copy_(flat[off:off + n].view_as(b))
                    off += n
            bucket, size = [], 0


def all_mean(values: dict, info: DistInfo) -> dict:
    """Average a dict of scalar tensors over ranks (at log points only)."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    dist.all_reduce(t)
    t /= info.world_size
    return dict(zip(keys, t.unbind()))


def check_in_sync(modules, info: DistInfo) -> None:
    """Raise if any rank's parameters/buffers differ from rank 0's (checked at checkpoints)."""
    if not info.enabled:
        return
    with torch.no_grad():
        sums = []
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                if t.is_floating_point():
                    sums.append(t.double().sum())
                    sums.append(t.double().abs().sum())
        local = torch.stack(sums)
        ref = local.clone()
        dist.broadcast(ref, src=0)
        if not torch.equal(local, ref):
            n = int((local != ref).sum())
            raise RuntimeError(f"rank {info.rank}: model replicas diverged from rank 0 ({n} tensor checksums differ)")


def all_true(flag: bool, info: DistInfo) -> bool:
    """Whether ``flag`` is true on every rank (a collective: every rank must call it; it also acts as
    a barrier). Used to agree on one-time setup work (caches) so no rank waits for a step that
    another rank skipped."""
    if not info.enabled:
        return bool(flag)
    device = "cpu"
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([0 if flag else 1], dtype=torch.int32, device=device)
    dist.all_reduce(t)
    return int(t.item()) == 0
