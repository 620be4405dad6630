"""Data-parallel training on ``torch.distributed``: one process per GPU (or CPU process).

``meanflow train`` runs unchanged as one process or under ``torchrun``; it finds the world in
the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), joins it with NCCL on CUDA and
gloo on the CPU, and leaves the process group at the end (also on error). A process group that
the caller made itself is used as it is and left open.

How the gradients are synchronised (SPEC §4: ``torch.func.jvp`` cannot run through
``DistributedDataParallel``, and calling ``.module`` instead trains each rank alone, silently):

- Split JVP strategies ("split", "split_func", the default): the grad-carrying forward goes
  through the DDP wrapper, so DDP's hooks all-reduce the gradients during backward; du/dt (and
  the guidance forwards) run without grad on the unwrapped module, which DDP never needs to see.
- Joint strategies ("func", "forward_ad": one pass gives u and du/dt): they run on the unwrapped
  module and the gradients are averaged by hand (:func:`all_reduce_grads_`) before the step.

Either way every rank applies the same averaged gradient to the same weights, so the replicas
stay bit-identical; :func:`check_replicas_equal` checks that at every checkpoint and raises
:class:`ReplicaMismatchError` otherwise. tests/train/test_distributed.py proves both designs
against one process training on the concatenated batch, and that a run which takes its grad
pass on ``.module`` diverges and is caught.

``train.compile`` works the same way: the compiled loss calls the DDP wrapper (split) or the
module (joint, all-reduce by hand after the backward). Its start-up check runs on every rank
through :func:`on_every`, so that all ranks agree on the outcome.
"""

from __future__ import annotations

import datetime
import math
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from meanflow.errors import ConfigError

__all__ = ["World", "env_world", "setup", "teardown", "check_batch_split", "wrap_ddp",
           "all_reduce_grads_", "all_true", "mean_across", "broadcast_object", "on_main",
           "on_every", "shard_fsdp", "full_tensors", "shard_like", "load_full_",
           "check_replicas_equal", "ReplicaMismatchError", "shard", "gather_sharded",
           "sample_seeded_sharded"]


class ReplicaMismatchError(RuntimeError):
    """The ranks' parameters differ: the gradients were not synchronised."""


@dataclass(frozen=True)
class World:
    """This process's place in the job; ``World()`` is a single process."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer: launch "
                          "with torchrun, or unset it") from None


def env_world() -> World:
    """The world torchrun describes in the environment (one process when it does not)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if size < 1 or not 0 <= rank < size or local < 0:
        raise ConfigError(f"WORLD_SIZE={size}, RANK={rank}, LOCAL_RANK={local} do not describe "
                          "a job: launch with torchrun, or unset them")
    return World(rank, size, local)


def check_batch_split(batch_size: int, grad_accumulation: int, world: World) -> int:
    """Images per micro-batch on one rank; the global batch must split evenly."""
    parts = world.size * grad_accumulation
    if batch_size % parts:
        raise ConfigError(f"train.batch_size={batch_size} (the global batch) does not split "
                          f"into {world.size} rank(s) x {grad_accumulation} micro-batch(es): "
                          f"use a multiple of {parts}")
    return batch_size // parts


def setup(device: torch.device) -> tuple[World, torch.device, bool]:
    """Joins the job described by the environment (if any) for training on ``device``.

    Returns ``(world, device, owned)``: the device of this rank (``cuda:LOCAL_RANK`` for any
    CUDA device under torchrun) and whether this call made the process group (then
    :func:`teardown` must destroy it).
    """
    world = env_world()
    if not world.enabled:
        return world, device, False
    if device.type == "mps":
        raise ConfigError("distributed training runs on CUDA (NCCL) or the CPU (gloo), not "
                          "mps: set train.device to cuda, cpu or auto")
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={world.local_rank} but this node has "
                              f"{torch.cuda.device_count()} CUDA device(s): start at most that "
                              "many processes per node (torchrun --nproc_per_node)")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    owned = False
    if not dist.is_initialized():
        if not dist.is_available():
            raise ConfigError("this torch build has no torch.distributed: run one process")
        backend = "nccl" if device.type == "cuda" else "gloo"
        minutes = float(os.environ.get("MEANFLOW_DIST_TIMEOUT_MIN", "30"))
        dist.init_process_group(backend=backend,
                                timeout=datetime.timedelta(minutes=minutes))
        owned = True
    world = World(dist.get_rank(), dist.get_world_size(), world.local_rank)
    return world, device, owned


def teardown(owned: bool) -> None:
    if owned and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device(device: torch.device) -> torch.device:
    """NCCL moves CUDA tensors only; gloo takes CPU tensors."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def wrap_ddp(module: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The DDP wrapper for the grad-carrying forward (the module itself for one process).

    Buffers are not broadcast at each forward (the backbones' buffers are fixed tables, and a
    broadcast per forward would make every no-grad call a collective); every parameter must
    get a gradient (DDP raises at the next step otherwise), so none are searched for."""
    if not world.enabled:
        return module
    import inspect

    from torch.nn.parallel import DistributedDataParallel
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
    comm = _collective_device(params[0].device) if params else torch.device("cpu")
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


def all_true(flag: Tensor | bool, world: World, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank (one small all-reduce)."""
    t = torch.as_tensor(flag, dtype=torch.int32).reshape(1)
    if not world.enabled:
        return bool(t.item())
    t = t.to(_collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def mean_across(values: dict[str, Tensor], world: World,
                device: torch.device) -> dict[str, Tensor]:
    """Scalar tensors averaged over the ranks (one all-reduce for all of them)."""
    if not world.enabled or not values:
        return values
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().double().reshape(()) for k in keys])
    stacked = stacked.to(_collective_device(device))
    dist.all_reduce(stacked)
    stacked = stacked / world.size
    return {k: stacked[i] for i, k in enumerate(keys)}


def broadcast_object(obj: Any, world: World, src: int = 0) -> Any:
    """Rank ``src``'s (picklable) object on every rank."""
    if not world.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(world: World, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Runs ``fn`` on rank 0 only; its result, or its exception, reaches every rank (so that a
    refusal on rank 0 stops all ranks with the same message instead of leaving them waiting).
    The other ranks wait for rank 0 to finish: this is also the barrier after a checkpoint."""
    result, error = None, None
    if world.is_main:
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 (re-raised below, on every rank)
            error = exc
    if world.enabled:
        sent = None if error is None else _sendable(error)
        result, sent = broadcast_object((result, sent), world)
        if error is None:
            error = sent
    if error is not None:
        raise error
    return result


def _sendable(error: BaseException) -> BaseException:
    try:
        pickle.dumps(error)
        return error
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(error).__name__}: {error}")


def on_every(world: World, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Runs ``fn`` on every rank and makes the ranks agree on the outcome: when it raised on
    any rank, every rank raises the lowest such rank's exception (so that a check that fails
    on one rank stops all of them, instead of leaving the others waiting in a collective).
    Returns this rank's result otherwise. ``fn`` itself must not fail halfway through a
    collective on some ranks only."""
    result, error = None, None
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 (re-raised below, on every rank)
        error = exc
    if world.enabled:
        errors: list[Any] = [None] * world.size
        dist.all_gather_object(errors, None if error is None else _sendable(error))
        failed = [r for r, e in enumerate(errors) if e is not None]
        if failed and failed[0] != world.rank:
            error = errors[failed[0]]
    if error is not None:
        raise error
    return result


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
    fp = _fingerprint(module).to(_collective_device(device))
    hi, lo = fp.clone(), fp.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    if not torch.equal(hi, lo):
        raise ReplicaMismatchError(
            f"the parameters differ between the {world.size} ranks at step {step}: the "
            "gradients were not synchronised (a grad pass that bypassed the DDP wrapper?)")


def shard(items: Sequence[Any], world: World) -> list[Any]:
    """Rank r's share: items r, r + W, r + 2W, ..."""
    return list(items[world.rank::world.size])


def gather_sharded(local: Tensor, n: int, world: World, device: torch.device) -> Tensor:
    """Reassembles rows sharded by :func:`shard` into their original order, on every rank.

    ``local`` holds this rank's rows (it may have none, shaped (0, *row)); every rank must
    give the same row shape and dtype. Returns (n, *row) on the CPU."""
    if not world.enabled:
        return local.cpu()
    m = math.ceil(n / world.size)
    mine = len(range(world.rank, n, world.size))
    if local.shape[0] != mine:
        raise ValueError(f"rank {world.rank} holds {local.shape[0]} rows, expected {mine}")
    comm = _collective_device(device)
    padded = torch.zeros((m, *local.shape[1:]), dtype=local.dtype, device=comm)
    padded[:mine] = local.to(comm)
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    # row k of rank r is item k*W + r
    return torch.stack(parts, 1).reshape(m * world.size, *local.shape[1:])[:n].cpu()


def sample_seeded_sharded(net: Callable[..., Tensor], seeds: Sequence[int],
                          shape: Sequence[int], world: World, device: torch.device,
                          y: Tensor | None = None, **kwargs: Any) -> Tensor:
    """:func:`meanflow.sampling.sample_seeded` with the seeds shared out over the ranks (rank
    r draws seeds r, r + W, ...) and the samples gathered to every rank, in seed order. Sample
    i depends only on seeds[i] (and y[i]), so the result does not depend on the rank count."""
    from meanflow.sampling import sample_seeded
    seeds = list(seeds)
    if not world.enabled:
        return sample_seeded(net, seeds, shape, y=y, device=device, **kwargs)
    index = shard(range(len(seeds)), world)
    dtype = kwargs.get("dtype")
    if dtype is None:
        first = next(iter(net.parameters()), None) if isinstance(net, nn.Module) else None
        dtype = first.dtype if first is not None else torch.float32
    if index:
        local = sample_seeded(net, [seeds[i] for i in index], shape,
                              y=None if y is None else y[index], device=device, **kwargs)
    else:
        local = torch.zeros((0, *shape), dtype=dtype)
    return gather_sharded(local, len(seeds), world, device)
