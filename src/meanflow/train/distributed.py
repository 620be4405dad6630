"""Data-parallel training on ``torch.distributed``: one process per GPU (or CPU process).

``meanflow train`` runs unchanged as one process or under ``torchrun``; joining and leaving the
job, and the collectives that are not about training (agreeing on outcomes, gathering rows in
order), are in :mod:`meanflow.world`. This module holds what training adds: DDP and FSDP2
wrapping, the hand all-reduce, full tensors of FSDP shards and the replica check.

How the gradients are synchronised (docs/design.md, Multi-process training: ``torch.func.jvp``
cannot run through ``DistributedDataParallel``, and calling ``.module`` instead trains each
rank alone, silently):

- The split JVP strategy ("split"; what "auto" picks except for U-Net/DiT on the CPU): the
  grad-carrying forward goes through the DDP wrapper, so DDP's hooks all-reduce the gradients
  during backward; du/dt (and the guidance forwards) run without grad on the unwrapped module,
  which DDP never needs to see.
- Joint strategies ("func", "forward_ad": one pass gives u and du/dt): they run on the unwrapped
  module and the gradients are averaged by hand (:func:`all_reduce_grads_`) before the step.

Either way every rank applies the same averaged gradient to the same weights, so the replicas
stay bit-identical; :func:`check_replicas_equal` checks that at every checkpoint and raises
:class:`ReplicaMismatchError` otherwise. tests/train/test_distributed.py proves both designs
against one process training on the concatenated batch, and that a run which takes its grad
pass on ``.module`` diverges and is caught.

``train.compile`` works the same way: the compiled loss calls the DDP wrapper (split) or the
module (joint, all-reduce by hand after the backward). Its start-up check runs on every rank
through :func:`meanflow.world.on_every`, so that all ranks agree on the outcome.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from meanflow.errors import ConfigError
from meanflow.world import World, collective_device

__all__ = ["check_batch_split", "wrap_ddp", "all_reduce_grads_", "shard_fsdp", "full_tensors",
           "shard_like", "load_full_", "check_replicas_equal", "ReplicaMismatchError"]


class ReplicaMismatchError(RuntimeError):
    """The ranks' parameters differ: the gradients were not synchronised."""


def check_batch_split(batch_size: int, grad_accumulation: int, world: World) -> int:
    """Images per micro-batch on one rank; the global batch must split evenly."""
    parts = world.size * grad_accumulation
    if batch_size % parts:
        raise ConfigError(f"train.batch_size={batch_size} (the global batch) does not split "
                          f"into {world.size} rank(s) x {grad_accumulation} micro-batch(es): "
                          f"use a multiple of {parts}")
    return batch_size // parts


def wrap_ddp(module: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The DDP wrapper for the grad-carrying forward (the module itself for one process).

    Buffers are not broadcast at each forward (the backbones' buffers are fixed tables, and a
    broadcast per forward would make every no-grad call a collective); every parameter must
    get a gradient (DDP raises at the next step otherwise), so none are searched for."""
    if not world.enabled:
        return module
    ids = [device.index] if device.type == "cuda" else None
    # newer torch renames the switch (and deprecates the old name)
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=False,
                                   **no_buffer_sync)


def shard_fsdp(module: nn.Module, world: World, device: torch.device) -> nn.Module:
    """FSDP2 (``train.fsdp``): ``fully_shard`` on every block of the backbone's block lists
    (transformer blocks, U-Net ResBlocks, MLP blocks) and on the root, over all ranks. The
    module is sharded in place: its parameters become DTensors (dim-0 shards), gathered in
    each block's forward and reduce-scattered (averaged) in its backward."""
    # FSDP2's and DTensor's modules are imported where used: torch builds without
    # distributed support lack them, and one-process training never needs them
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (world.size,))
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            for block in child:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def full_tensors(tensors: dict[str, Any], cpu: bool = True) -> dict[str, Any]:
    """``tensors`` with every DTensor gathered into the full tensor (on the CPU with ``cpu``),
    one tensor at a time; other values as they are. A collective: every rank must call it."""
    out = {}
    for k, v in tensors.items():
        if _is_dtensor(v):
            v = v.full_tensor()
        if cpu and isinstance(v, Tensor):
            v = v.detach().cpu()
        out[k] = v
    return out


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """This rank's shard of the full tensor ``full``, laid out like the DTensor ``like`` (no
    communication: every rank holds ``full``); ``full`` itself when ``like`` is no DTensor."""
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full.to(like.to_local().device, like.dtype), like.device_mesh,
                             like.placements, src_data_rank=None)


@torch.no_grad()
def load_full_(targets: dict[str, Tensor], full: dict[str, Tensor]) -> None:
    """Copies full tensors into ``targets`` (sharded or not) in place, by name."""
    for k, t in targets.items():
        t.copy_(shard_like(full[k], t))


def all_reduce_grads_(params: Sequence[nn.Parameter], world: World,
                      bucket_bytes: int = 25 * 2 ** 20) -> None:
    """Averages the gradients over the ranks in place (the manual design, for the joint JVP
    strategies that cannot run through DDP). A parameter without a gradient counts as zero."""
    if not world.enabled:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    comm = collective_device(params[0].device) if params else torch.device("cpu")
    bucket: list[Tensor] = []
    size = 0

    def flush() -> None:
        if not bucket:
            return
        flat = torch.cat([g.reshape(-1).to(comm) for g in bucket])
        dist.all_reduce(flat)
        flat.div_(world.size)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        bucket.clear()

    for p in params:
        # one bucket per dtype run: torch.cat needs a common dtype
        if bucket and (size + p.grad.numel() * p.grad.element_size() > bucket_bytes
                       or p.grad.dtype != bucket[0].dtype):
            flush()
            size = 0
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
    flush()


def _fingerprint(module: nn.Module, per_tensor: int = 256) -> Tensor:
    """Up to ``per_tensor`` evenly spaced entries of every parameter and buffer, float64: no
    arithmetic, so identical replicas give bit-identical fingerprints."""
    parts = []
    for t in list(module.parameters()) + list(module.buffers()):
        flat = t.detach().reshape(-1)
        if flat.numel() == 0:
            continue
        step = max(1, flat.numel() // per_tensor)
        parts.append(flat[::step].double())
    if not parts:
        return torch.zeros(1, dtype=torch.float64)
    return torch.nan_to_num(torch.cat(parts), nan=1e300)


def check_replicas_equal(module: nn.Module, world: World, device: torch.device,
                         step: int) -> None:
    """Raises ReplicaMismatchError on every rank when the ranks' weights differ."""
    if not world.enabled:
        return
    fp = _fingerprint(module).to(collective_device(device))
    hi, lo = fp.clone(), fp.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    if not torch.equal(hi, lo):
        raise ReplicaMismatchError(
            f"the parameters differ between the {world.size} ranks at step {step}: the "
            "gradients were not synchronised (a grad pass that bypassed the DDP wrapper?)")
