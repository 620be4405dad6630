"""A run's training state in checkpoints: writing it, finding and loading it again to resume,
and, under FSDP2, gathering its shards into full tensors and sharding them back.

A checkpoint (:mod:`meanflow.runs.checkpoint`) holds the model, every EMA, the Adam state and
``state.json``: the step, the optimiser scalars, the config, the data shape and classes, the
EMA decays, the versions, the world size, the data position
(:func:`meanflow.train.schedule.data_position`) and the loss that ran (:func:`loss_record`:
its class, its tangent and the du/dt strategy, so that users see what "auto" chose). Under FSDP
the state is gathered one tensor at a time and written by rank 0 in the format of a DDP run, so
FSDP, DDP and one-process runs resume each other's checkpoints.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from meanflow import __version__
from meanflow.errors import CheckpointError, ConfigError
from meanflow.runs.checkpoint import (check_state, list_checkpoints, load_checkpoint,
                                      load_optimizer_tensors, optimizer_tensors,
                                      save_checkpoint)
from meanflow.runs.config import RunConfig
from meanflow.train import distributed as dist_
from meanflow.train.ema import EMA
from meanflow.world import World, all_true, broadcast_object, on_main

__all__ = ["GatheredOptimizer", "full_states", "load_sharded", "FirstEMA", "sampling_ema",
           "loss_record", "save_state", "write_checkpoint", "agreed_checkpoint", "restore",
           "check_position", "check_loss", "check_optimizer_fits", "check_window"]


class GatheredOptimizer:
    """Stands for an optimiser whose ``state_dict()`` is given (gathered FSDP state)."""

    def __init__(self, sd: dict) -> None:
        self.sd = sd

    def state_dict(self) -> dict:
        return self.sd


def full_states(model: nn.Module, ema: EMA,
                opt: torch.optim.Optimizer) -> tuple[dict, dict, GatheredOptimizer]:
    """train.fsdp: the model, EMA and Adam state with every shard gathered into full CPU
    tensors, so that checkpoints hold what a DDP or one-process run saves (a collective)."""
    opt_sd = opt.state_dict()
    opt_sd = {**opt_sd, "state": {i: dist_.full_tensors(st) for i, st in opt_sd["state"].items()}}
    return (dist_.full_tensors(model.state_dict()), dist_.full_tensors(ema.state_dict()),
            GatheredOptimizer(opt_sd))


def load_sharded(model: nn.Module, ema: EMA, opt: torch.optim.Optimizer,
                 tensors: dict[str, dict[str, Tensor]], opt_meta: dict) -> None:
    """train.fsdp: loads a checkpoint's full tensors into the sharded model, EMA and Adam
    state (each rank keeps its shard of them)."""
    dist_.load_full_(model.state_dict(), tensors["model"])
    dist_.load_full_(ema.state_dict(), tensors["ema"])
    params = list(model.parameters())
    sharded = {}
    for key, value in tensors["optimizer"].items():
        p = params[int(key.split(".", 1)[0])]
        sharded[key] = (dist_.shard_like(value, p) if tuple(value.shape) == tuple(p.shape)
                        else value)
    load_optimizer_tensors(opt, sharded, opt_meta)


class FirstEMA:
    """The first EMA's weights as full tensors (gathered from FSDP shards), for sampling."""

    def __init__(self, ema: EMA) -> None:
        self.decays = ema.decays
        key = EMA.key(ema.decays[0])
        self.shadows = {key: dist_.full_tensors(ema.shadows[key], cpu=False)}


def sampling_ema(ema: EMA, fsdp: bool) -> EMA | FirstEMA:
    """What sample PNGs and FID load their weights from: the EMA itself, or under FSDP its
    first average gathered into full tensors (a collective)."""
    return FirstEMA(ema) if fsdp else ema


def loss_record(loss_fn: Any, given: bool) -> dict[str, Any]:
    """What ``state.json`` records of the loss that ran: its class, its tangent and du/dt
    strategy (MeanFlow; the strategy is the one the run resolved "auto" to), and whether it
    was given to ``train(loss_fn=...)`` instead of built from the config's objective."""
    record: dict[str, Any] = {"class": type(loss_fn).__name__, "given": given}
    for key in ("jvp", "tangent"):
        if hasattr(loss_fn, key):
            record[key] = getattr(loss_fn, key)
    return record


def save_state(run_dir: Path, step: int, model: nn.Module, ema: EMA,
               opt: torch.optim.Optimizer, cfg: RunConfig, data_info: dict[str, Any],
               world_size: int = 1, full: tuple[dict, dict, Any] | None = None,
               position: dict[str, Any] | None = None,
               loss: dict[str, Any] | None = None, window: dict[str, Any] | None = None,
               keep: Path | None = None) -> Path:
    """Writes the checkpoint of ``step`` and drops the periodic ones beyond
    ``train.keep_checkpoints``, never ``keep`` (the last one written before a non-finite
    streak). ``full``: (model, EMA, optimizer) state gathered from FSDP shards
    (:func:`full_states`), saved instead of the objects' own. ``position``: the data position
    after ``step``; ``loss``: :func:`loss_record`; ``window``: the metrics log's running
    window (:meth:`meanflow.train.monitors.TrainLog.state`)."""
    model_sd, ema_sd = (model.state_dict(), ema.state_dict()) if full is None else full[:2]
    opt_tensors, opt_meta = optimizer_tensors(opt if full is None else full[2])
    state = {"step": step, "optimizer": opt_meta, "config": cfg.to_dict(), "data": data_info,
             "ema_decays": ema.decays, "meanflow_version": __version__,
             "torch_version": torch.__version__, "world_size": world_size}
    if position is not None:
        state["data_position"] = position
    if loss is not None:
        state["loss"] = loss
    if window is not None:
        state["log_window"] = window
    path = save_checkpoint(run_dir / "checkpoints" / f"step_{step:07d}",
                           model=model_sd, ema=ema_sd, optimizer=opt_tensors, state=state)
    n = cfg.train.keep_checkpoints
    if n > 0:
        for old in list_checkpoints(run_dir, quiet=True)[:-n]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
    return path


def write_checkpoint(run_dir: Path, step: int, model: nn.Module, ema: EMA,
                     opt: torch.optim.Optimizer, cfg: RunConfig, data_info: dict[str, Any],
                     world: World, device: torch.device, position: dict[str, Any],
                     loss: dict[str, Any], window: dict[str, Any] | None = None,
                     keep: Path | None = None) -> Path:
    """The checkpoint after ``step`` on every rank (a collective): the replicas must be
    identical, which catches unsynchronised gradients (FSDP holds no replicas: its shards are
    gathered instead); rank 0 writes and the others wait for it. Returns its path.
    ``window`` and ``keep``: see :func:`save_state`."""
    fsdp = cfg.train.fsdp
    full = full_states(model, ema, opt) if fsdp else None
    if not fsdp:
        dist_.check_replicas_equal(model, world, device, step)
    # on_main's broadcast is the barrier
    return on_main(world, save_state, run_dir, step, model, ema, opt, cfg, data_info,
                   world.size, full, position, loss, window, keep)


def agreed_checkpoint(run_dir: Path, world: World, device: torch.device) -> Path | None:
    """The newest checkpoint of ``run_dir`` that rank 0 sees, which every rank loads (the state
    is replicated, so the number of ranks may differ from the run's); None when there is
    none. The run folder must be shared by every node."""
    found = list_checkpoints(run_dir, quiet=not world.is_main)
    name = found[-1].name if found else None
    main_name = broadcast_object(name, world)
    if not all_true(name == main_name, world, device):
        raise ConfigError(f"the ranks see different checkpoints in {run_dir} (rank 0: "
                          f"{main_name}): put the run folder on a file system that every "
                          "node shares")
    return None if main_name is None else run_dir / "checkpoints" / main_name


def restore(ckpt: Path, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer,
            device: torch.device, fsdp: bool) -> tuple[int, dict[str, Any]]:
    """Loads a checkpoint into the model, EMA and Adam state (sharded under ``fsdp``);
    returns its step and its ``state.json``. Its fields are checked first
    (:func:`meanflow.runs.checkpoint.check_state`, :func:`check_window`), and tensors that do
    not fit the model (another config's, missing or extra keys, other shapes, Adam state of
    other shapes) are one CheckpointError; nothing is written either way."""
    tensors, state = load_checkpoint(ckpt, device)
    step = check_state(state, ckpt, optimizer=True)["step"]
    check_window(state.get("log_window"), ckpt)
    try:
        if fsdp:
            check_optimizer_fits(opt, tensors["optimizer"])
            load_sharded(model, ema, opt, tensors, state["optimizer"])
        else:
            model.load_state_dict(tensors["model"])
            ema.load_state_dict(tensors["ema"])
            check_optimizer_fits(opt, tensors["optimizer"])
            load_optimizer_tensors(opt, tensors["optimizer"], state["optimizer"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        said = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        said = (said or type(exc).__name__)[:300].strip("'")
        raise CheckpointError(f"the tensors of {ckpt} do not fit this run's model ({said}): "
                              "it was written by another config or altered; resume it with "
                              "the config that made it, or choose a new --out") from None
    return step, state


def check_optimizer_fits(opt: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    """Raises ValueError when the saved Adam tensors (``<index>.<name>``) do not fit the
    parameters: an index beyond them, or a per-parameter tensor of another shape (Adam's own
    ``load_state_dict`` does not check, and the first step would fail)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or int(index) >= len(params):
            raise ValueError(f"optimizer tensor {key!r} belongs to no parameter of this model")
        shape = tuple(params[int(index)].shape)
        if value.ndim and tuple(value.shape) != shape:
            raise ValueError(f"optimizer tensor {key!r} has shape {tuple(value.shape)}, its "
                             f"parameter {shape}")


def check_window(saved: Any, ckpt: Path) -> None:
    """Checks the metrics log's window that a checkpoint holds (absent in checkpoints of a
    meanflow that did not save it: those resume with an empty window)."""
    if saved is None:
        return
    numbers = (int, float)
    ok = (isinstance(saved, dict) and isinstance(saved.get("sums"), dict)
          and isinstance(saved.get("dtypes"), dict) and set(saved["dtypes"]) == set(saved["sums"])
          and all(isinstance(v, numbers) and not isinstance(v, bool)
                  for v in saved["sums"].values())
          and all(v in ("float32", "float64", "float16", "bfloat16")
                  for v in saved["dtypes"].values())
          and all(isinstance(saved.get(k), int) and not isinstance(saved.get(k), bool)
                  and saved[k] >= 0 for k in ("count", "skipped"))
          and (saved.get("lowest") is None or (
              isinstance(saved["lowest"], list) and len(saved["lowest"]) == 2
              and all(isinstance(v, numbers) for v in saved["lowest"]))))
    if not ok:
        raise CheckpointError(f"{ckpt / 'state.json'} has a log_window that is not the one "
                              "meanflow train writes; restore it or resume from an earlier "
                              "checkpoint")


def check_position(saved: Any, now: dict[str, Any], ckpt: Path, run_dir: Path) -> None:
    """Refuses to resume on data of another size, or from a position that does not fit."""
    if not isinstance(saved, dict):
        return              # a checkpoint of a meanflow that did not record it
    if saved.get("size") != now["size"]:
        raise ConfigError(f"cannot resume {run_dir}: it trained on {saved.get('size')} samples "
                          f"and this data holds {now['size']}: give it the same data, or "
                          "choose a new --out")
    if saved != now:
        keys = ", ".join(sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k)))
        raise CheckpointError(f"{ckpt / 'state.json'} records a data position that does not "
                              f"fit this run ({keys}); restore it or resume from an earlier "
                              "checkpoint")


def check_loss(saved: Any, now: dict[str, Any], run_dir: Path) -> None:
    """Refuses to resume with a loss of another class or tangent than the run's (a
    ``train(loss_fn=...)`` that differs); the du/dt strategy may change (they are exact)."""
    if not isinstance(saved, dict):
        return              # a checkpoint of a meanflow that did not record it
    keys = [k for k in ("class", "tangent") if k in saved and saved[k] != now.get(k)]
    if keys:
        said = ", ".join(f"{k} {saved[k]!r}" for k in keys)
        given = ", ".join(f"{k} {now.get(k)!r}" for k in keys)
        raise ConfigError(f"cannot resume {run_dir}: it trained with a loss of {said} and "
                          f"this run's loss has {given}: give train() the same loss_fn, or "
                          "choose a new --out")
