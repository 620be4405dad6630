"""This process's place in a ``torchrun`` job and its device, and the few collectives that
everything else needs.

``meanflow train``, ``sample`` and ``fid calc`` run unchanged as one process or under
``torchrun``: :func:`setup` finds the job in the environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``), joins it with NCCL on CUDA and gloo on the CPU, and :func:`teardown` leaves
it (a process group the caller made itself is used as it is and left open). ``World()`` is a
single process, for which every function here is the identity or a plain call.

Work shared out by item (samples, features) goes by :func:`shard`: rank r of W takes items
r, r + W, r + 2W, ...; :func:`gather_sharded` puts such rows back in item order on every rank,
so results never depend on the number of processes.

The data-parallel training itself (DDP and FSDP wrapping, gradient all-reduce, replica
checks) lives in :mod:`meanflow.train.distributed`.
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import pickle
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from meanflow.errors import ConfigError

__all__ = ["World", "resolve_device", "env_world", "setup", "teardown", "collective_device",
           "all_true", "mean_across", "broadcast_object", "on_main", "on_every", "shard",
           "sharded_indices", "gather_sharded", "memory_bytes", "check_fits"]


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


def resolve_device(name: str) -> torch.device:
    """"auto" (CUDA when available, else CPU), "cpu", "mps", "cuda" or "cuda:N", checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        raise ConfigError(f"device {name!r} is not one of auto, cpu, mps, cuda, cuda:N")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} but CUDA is not available: use cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} but only {torch.cuda.device_count()} CUDA "
                              "device(s) exist")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' is not available here: use cpu or auto")
    return torch.device(name)


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


def setup(device: torch.device) -> tuple[World, torch.device, bool]:
    """Joins the job described by the environment (if any) for work on ``device``.

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
    """Leaves the process group when :func:`setup` made it (``owned``).

    First, under any process group, it collects garbage: an FSDP-wrapped model (and what else
    holds the group's pending work) lives on in reference cycles after training returns. Left to
    the interpreter's exit, their destruction runs after the interpreter has begun tearing
    down, and a gloo rank can then abort ("terminate called without an active exception",
    SIGABRT) after all its work succeeded.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        if owned:
            dist.destroy_process_group()


def collective_device(device: torch.device) -> torch.device:
    """Where tensors of a collective must be: NCCL moves CUDA tensors only, gloo CPU ones."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_true(flag: Tensor | bool, world: World, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank (one small all-reduce)."""
    t = torch.as_tensor(flag, dtype=torch.int32).reshape(1)
    if not world.enabled:
        return bool(t.item())
    t = t.to(collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def mean_across(values: dict[str, Tensor], world: World,
                device: torch.device) -> dict[str, Tensor]:
    """Scalar tensors averaged over the ranks (one all-reduce for all of them)."""
    if not world.enabled or not values:
        return values
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().double().reshape(()) for k in keys])
    stacked = stacked.to(collective_device(device))
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


def shard(items: Sequence[Any], world: World) -> list[Any]:
    """Rank r's share: items r, r + W, r + 2W, ..."""
    return list(items[world.rank::world.size])


def sharded_indices(n: int, world: World | None = None) -> list[int]:
    """The item indices this process computes: :func:`shard` of ``range(n)``; all of them for
    one process (``world`` None or a single-process world). Refuses fewer items than ranks,
    which would leave a rank with nothing to compute (e.g. no images to featurise)."""
    if world is None or not world.enabled:
        return list(range(n))
    if n < world.size:
        raise ConfigError(f"{n} samples cannot be shared out over {world.size} processes: "
                          f"raise --n to at least {world.size}, or start fewer processes")
    return shard(range(n), world)


def gather_sharded(local: Tensor, n: int, world: World | None,
                   device: torch.device | str = "cpu") -> Tensor:
    """Reassembles rows sharded by :func:`shard` into their original order, on every rank.

    ``local`` (m, *row) holds this rank's rows (it may have none, shaped (0, *row)); every rank
    must give the same row shape and dtype. Returns (n, *row) on the CPU; ``local`` on the CPU
    for one process (``world`` None or a single-process world)."""
    if world is None or not world.enabled:
        return local.cpu()
    m = math.ceil(n / world.size)
    mine = len(range(world.rank, n, world.size))
    if local.shape[0] != mine:
        raise ValueError(f"rank {world.rank} holds {local.shape[0]} rows, expected {mine}")
    comm = collective_device(torch.device(device))
    padded = torch.zeros((m, *local.shape[1:]), dtype=local.dtype, device=comm)
    padded[:mine] = local.to(comm)
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    # row k of rank r is item k*W + r
    return torch.stack(parts, 1).reshape(m * world.size, *local.shape[1:])[:n].cpu()


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def memory_bytes(device: torch.device | str = "cpu") -> int:
    """The memory a tensor on ``device`` can use: the CUDA device's total, else the machine's
    RAM (physical pages times page size)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 2 ** 40      # unknown: a terabyte, so only absurd sizes are refused


def check_fits(nbytes: float, what: str, fix: str,
               device: torch.device | str = "cpu") -> None:
    """A one-line ConfigError before any work when ``nbytes`` (an estimate, a lower bound of
    what the work needs) exceeds the memory of ``device`` (docs/design.md, "Inputs")."""
    have = memory_bytes(device)
    if nbytes > have:
        where = "the GPU" if torch.device(device).type == "cuda" else "this machine"
        raise ConfigError(f"{what} needs at least {_format_bytes(nbytes)} and {where} has "
                          f"{_format_bytes(have)}: {fix}")
