"""What step k of a run uses, from (seed, rank, k) alone: its seeds, its batch and its
learning rate; and how many steps a run has.

Every random draw of step k on rank r comes from :func:`step_seed` (seed, r, k): the global
RNG is re-seeded with it (dropout masks), a CPU generator draws the batch and the augmentation,
and a generator on the device draws the times, the noise and the label dropout (the loss's own
``draw``), in a fixed order. Resuming from a checkpoint therefore continues exactly where the
run stopped, whatever the number of ranks.

Which samples a step trains on (``data.order``): "epochs" visits a finite dataset epoch by epoch
without replacement (:class:`meanflow.data.EpochOrder`: the global batch of step k depends only
on (seed, k), whatever the number of ranks; each rank takes its contiguous share), "random"
draws each rank's share with replacement from its (seed, rank, k) generator. The endless toy
distributions draw fresh points either way.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from meanflow.data import BatchSource, EpochOrder
from meanflow.errors import ConfigError
from meanflow.runs.config import RunConfig

__all__ = ["step_seed", "seed_step", "take_batch", "lr_at", "epoch_order",
           "data_position", "total_steps"]


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed unique to (seed, rank, step); the same on every machine."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % (2 ** 63 - 1)


def seed_step(seed: int, rank: int, step: int,
              device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """Re-seeds the global RNG (dropout masks) for step ``step`` of rank ``rank`` and returns
    the step's generators, both from :func:`step_seed`: one on the CPU for the batch and its
    augmentation, one on ``device`` for the loss's draws (the same one on a CPU run)."""
    s = step_seed(seed, rank, step)
    torch.manual_seed(s)
    cpu = torch.Generator().manual_seed(s)
    return cpu, (cpu if device.type == "cpu" else torch.Generator(device).manual_seed(s))


def take_batch(ds: BatchSource, order: EpochOrder | None, step: int, rank: int, share: int,
               generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """This rank's ``share`` of the global batch of ``step``: drawn with replacement when
    ``order`` is None, else its contiguous slice of the step's global batch (the same for any
    number of ranks)."""
    if order is None:
        return ds.batch(share, generator)
    return ds.take(order.indices(step, rank * share, (rank + 1) * share), generator)


def lr_at(cfg: RunConfig, step: int) -> float:
    """The learning rate of 0-based step ``step``: a linear warm-up over W = ``warmup_steps``
    steps from lr·s, s = 1e-8 / lr, then constant (the official PyTorch code's LinearLR with
    start_factor s, stepped after each optimiser step): lr·(s + (1 - s)·i / W) at step i < W,
    exactly lr from step W on (and always when W = 0)."""
    lr, warm = cfg.optim.lr, cfg.optim.warmup_steps
    if warm <= 0 or step >= warm:
        return lr
    start = 1e-8 / lr
    return lr * (start + (1.0 - start) * max(step, 0) / warm)


def epoch_order(cfg: RunConfig, ds: BatchSource) -> EpochOrder | None:
    """The :class:`EpochOrder` of ``data.order: epochs`` on a finite dataset; None when each
    batch is drawn with replacement (``data.order: random``) or the data is endless."""
    if cfg.data.order != "epochs" or not hasattr(ds, "__len__"):
        return None
    if not callable(getattr(ds, "take", None)):
        raise ConfigError(f"data.order=epochs needs the dataset's take(indices, generator), "
                          f"which {type(ds).__name__} lacks: add it, or set data.order=random")
    size, batch = len(ds), cfg.train.batch_size
    if size < batch:
        raise ConfigError(f"data.order=epochs drops the last partial batch, and the {size} "
                          f"samples do not fill one of train.batch_size={batch}: lower "
                          "train.batch_size, or set data.order=random")
    return EpochOrder(size, batch, cfg.train.seed)


def data_position(ds: BatchSource, order: EpochOrder | None, done: int) -> dict[str, Any]:
    """Where the data stands after ``done`` steps, as saved in each checkpoint: the order
    ("epochs" or "random"), the dataset size (None when endless) and, for "epochs", the global
    batch, steps per epoch, the ``epoch`` of the next step and the steps of it already done
    (``epoch_step``). A resumed run must find the same
    (:func:`meanflow.train.state.check_position`)."""
    size = len(ds) if hasattr(ds, "__len__") else None
    if order is None:
        return {"order": "random", "size": size}
    epoch, epoch_step = order.position(done)
    return {"order": "epochs", "size": size, "batch_size": order.batch_size,
            "steps_per_epoch": order.steps_per_epoch, "epoch": epoch, "epoch_step": epoch_step}


def total_steps(cfg: RunConfig, ds: BatchSource) -> int:
    """Optimiser steps of the run: from ``train.images`` (rounded up to whole steps of
    ``batch_size`` images) or ``train.epochs`` when given, else ``train.steps``.

    ``train.epochs`` under ``data.order: epochs`` is epochs · S steps rounded up, S = N // B
    steps per epoch (e.g. CIFAR-10 at B = 1024: 48 steps an epoch); under "random" it is
    epochs · N / B rounded up."""
    tr = cfg.train
    order = epoch_order(cfg, ds)          # also refuses data that fills no epoch
    if tr.images is not None:
        return max(1, math.ceil(tr.images / tr.batch_size))
    if tr.epochs is not None:
        if not hasattr(ds, "__len__"):
            raise ConfigError(f"train.epochs needs a dataset of finite size; {cfg.data.name!r} "
                              "is drawn without end: give train.steps or train.images")
        if order is not None:
            # rounded first: 0.1 epoch of 30 steps is 3 steps, not ceil(3.0000000000000004)
            return max(1, math.ceil(round(tr.epochs * order.steps_per_epoch, 9)))
        return max(1, math.ceil(tr.epochs * len(ds) / tr.batch_size))
    return tr.steps
