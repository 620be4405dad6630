"""The training loop: readable top to bottom, shared by the toy and (later) image runs.

A run folder holds ``config.json``/``config.yaml`` (written before the first step),
``metrics.jsonl`` (one line per ``log_every`` steps) and ``checkpoints/step_*``.

Every random draw of step k comes from seeds derived from (seed, rank, k): the batch, the times,
the noise and label dropout from an explicit generator, dropout from the global RNG re-seeded at
each step. Resuming from a checkpoint therefore continues exactly where the run stopped.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from meanflow import __version__
from meanflow.data import BatchSource, build_dataset
from meanflow.errors import CheckpointError, ConfigError
from meanflow.models import build_model_for_data
from meanflow.objective import FlowMatchingLoss, MeanFlowLoss
from meanflow.train.checkpoint import (atomic_write_text, find_checkpoint, list_checkpoints,
                                       load_checkpoint, load_optimizer_tensors,
                                       optimizer_tensors, save_checkpoint)
from meanflow.train.config import RunConfig
from meanflow.train.ema import EMA

__all__ = ["train", "check_config", "new_run_dir", "build_loss", "step_seed", "resolve_device",
           "load_model", "LoadedModel",
           "prepare_run_dir"]

# Settings that may change between a run and its resumption; anything else must match.
RESUMABLE_KEYS = {("train", "steps"), ("train", "log_every"), ("train", "checkpoint_every"),
                  ("train", "keep_checkpoints"), ("train", "device"), ("train", "progress")}
MAX_NONFINITE_IN_A_ROW = 10


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed unique to (seed, rank, step); the same on every machine."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % (2 ** 63 - 1)


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


def build_loss(cfg: RunConfig, num_classes: int | None) -> Callable:
    o = cfg.objective
    if o.kind == "flow_matching":
        return FlowMatchingLoss(time_sampler=o.time_sampler, mu=o.mu, sigma=o.sigma,
                                label_drop=o.label_drop, num_classes=num_classes)
    return MeanFlowLoss(time_sampler=o.time_sampler, mu=o.mu, sigma=o.sigma, mu_r=o.mu_r,
                        sigma_r=o.sigma_r, fraction_r_neq_t=o.fraction_r_neq_t, p=o.p, c=o.c,
                        omega=o.omega, kappa=o.kappa, t_interval=tuple(o.t_interval),
                        label_drop=o.label_drop, num_classes=num_classes, jvp=o.jvp)


def _differences(a: dict, b: dict, prefix: tuple = ()) -> list[tuple]:
    keys = set(a) | set(b)
    out = []
    for k in sorted(keys):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _differences(a[k], b[k], prefix + (k,))
        elif a.get(k) != b.get(k):
            out.append(prefix + (k,))
    return out


def prepare_run_dir(cfg: RunConfig, run_dir: Path, resume: bool) -> None:
    """Creates the run folder, or checks that ``resume`` continues the same run.

    Never overwrites another run: a folder that holds a different run, or any files but a
    run's, is refused with a ConfigError.
    """
    run_dir = Path(run_dir)
    saved = run_dir / "config.json"
    if saved.is_file():
        if not resume:
            raise ConfigError(f"output folder {run_dir} already holds a run: pass --resume to "
                              "continue it, or choose a new --out")
        try:
            old = json.loads(saved.read_text())
        except json.JSONDecodeError:
            raise CheckpointError(f"{saved} is corrupt: restore it, or start a new run in "
                                  "another folder") from None
        diff = [d for d in _differences(old, cfg.to_dict()) if d not in RESUMABLE_KEYS]
        if diff:
            keys = ", ".join(".".join(d) for d in diff)
            raise ConfigError(f"cannot resume {run_dir}: its config differs in {keys}; use "
                              "the same settings, or choose a new --out")
    elif run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output path {run_dir} is a file, not a folder: choose a new --out")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"output folder {run_dir} is not empty and holds no meanflow run: "
                          "choose a new or empty --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.json", cfg.to_json() + "\n")
    atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())


def new_run_dir(cfg: RunConfig, root: str | Path = "runs") -> Path:
    """A fresh run folder named by its content, e.g. ``runs/00003-8gaussians-meanflow-mlp``."""
    root = Path(root)
    taken = [int(p.name.split("-", 1)[0]) for p in root.glob("[0-9][0-9][0-9][0-9][0-9]-*")
             if p.name.split("-", 1)[0].isdigit()] if root.is_dir() else []
    data = re.sub(r"[^A-Za-z0-9_.]+", "_", Path(cfg.data.name).stem)
    cond = "-cond" if cfg.data.class_conditional else ""
    name = f"{max(taken, default=0) + 1:05d}-{data}{cond}-{cfg.objective.kind}-{cfg.model.name}"
    return root / name


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drops log lines written after the checkpoint we resume from (they will be redone)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))


def _lr_at(cfg: RunConfig, step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then constant (the paper's schedules)."""
    warm = cfg.optim.warmup_steps
    return cfg.optim.lr * (min(1.0, (step + 1) / warm) if warm > 0 else 1.0)


def _save(run_dir: Path, step: int, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer,
          cfg: RunConfig, data_info: dict[str, Any]) -> Path:
    opt_tensors, opt_meta = optimizer_tensors(opt)
    state = {"step": step, "optimizer": opt_meta, "config": cfg.to_dict(), "data": data_info,
             "ema_decays": ema.decays, "meanflow_version": __version__,
             "torch_version": torch.__version__}
    path = save_checkpoint(run_dir / "checkpoints" / f"step_{step:07d}",
                           model=model.state_dict(), ema=ema.state_dict(),
                           optimizer=opt_tensors, state=state)
    keep = cfg.train.keep_checkpoints
    if keep > 0:
        import shutil
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def check_config(cfg: RunConfig) -> None:
    """Everything ``train`` checks before it writes anything: values, data, model and loss.

    The model is built on the meta device, so this is cheap even for large backbones.
    """
    cfg.validate()
    resolve_device(cfg.train.device)
    ds = build_dataset(cfg.data.name, **cfg.data.options)
    num_classes = ds.num_classes if cfg.data.class_conditional else None
    if cfg.data.class_conditional and num_classes is None:
        raise ConfigError(f"data.class_conditional is true but {cfg.data.name!r} has no "
                          "labels: give labelled data or set it to false")
    with torch.device("meta"):
        build_model_for_data(cfg.model.name, tuple(ds.shape), num_classes, cfg.model.options)
    build_loss(cfg, num_classes)


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False,
          dataset: BatchSource | None = None) -> Path:
    """Trains the configured model and returns the path of the last checkpoint.

    ``dataset`` overrides ``cfg.data`` (for Python users with data in memory).
    """
    cfg.validate()
    run_dir = Path(run_dir)
    device = resolve_device(cfg.train.device)
    ds = dataset if dataset is not None else build_dataset(cfg.data.name, **cfg.data.options)
    num_classes = ds.num_classes if cfg.data.class_conditional else None
    if cfg.data.class_conditional and num_classes is None:
        raise ConfigError(f"data.class_conditional is true but {cfg.data.name!r} has no "
                          "labels: give labelled data or set it to false")
    data_info = {"shape": list(ds.shape), "num_classes": num_classes}

    # Everything that can reject the config is built before the run folder is written.
    torch.manual_seed(cfg.train.seed)
    model = build_model_for_data(cfg.model.name, tuple(ds.shape), num_classes,
                                 cfg.model.options).to(device)
    loss_fn = build_loss(cfg, num_classes)
    prepare_run_dir(cfg, run_dir, resume)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                           weight_decay=cfg.optim.weight_decay, foreach=True)
    ema = EMA(model, cfg.train.ema_decays)

    start = 0
    metrics_path = run_dir / "metrics.jsonl"
    if resume and list_checkpoints(run_dir):
        ckpt = find_checkpoint(run_dir)
        tensors, state = load_checkpoint(ckpt, device)
        model.load_state_dict(tensors["model"])
        ema.load_state_dict(tensors["ema"])
        try:
            load_optimizer_tensors(opt, tensors["optimizer"], state["optimizer"])
            start = int(state["step"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{ckpt / 'state.json'} does not fit this run ({exc}); "
                                  "restore it or resume from an earlier checkpoint") from None
    if resume:
        _truncate_metrics(metrics_path, start)  # drop lines the resumed steps will redo
    if start >= cfg.train.steps:
        return find_checkpoint(run_dir)

    bar = None
    if cfg.train.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.train.steps, initial=start, desc=f"{cfg.objective.kind}",
                   unit="step", dynamic_ncols=True, disable=None)  # None: off when not a tty
    sums: dict[str, Tensor] = {}  # summed on the device; read back only when logging
    count, nonfinite_run, skipped = 0, 0, 0
    t_log = time.perf_counter()
    last_ckpt: Path | None = None
    model.train()
    try:
        for step in range(start, cfg.train.steps):
            seed = step_seed(cfg.train.seed, 0, step)
            torch.manual_seed(seed)                      # dropout masks
            gen_cpu = torch.Generator().manual_seed(seed)
            gen = gen_cpu if device.type == "cpu" else torch.Generator(device).manual_seed(seed)
            x, y = ds.batch(cfg.train.batch_size, gen_cpu)
            x = x.to(device, non_blocking=True)
            y = y.to(device) if (y is not None and num_classes is not None) else None

            for group in opt.param_groups:
                group["lr"] = _lr_at(cfg, step)
            loss, stats = loss_fn(model, x, y, generator=gen)
            loss = loss.mean()
            if torch.isfinite(loss):
                nonfinite_run = 0
                loss.backward()
                max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
                stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                ema.update(model)
                for k, v in stats.items():
                    sums[k] = sums[k] + v.detach() if k in sums else v.detach()
                count += 1
            else:
                # Skip the update but keep the bookkeeping; a run of these means divergence.
                opt.zero_grad(set_to_none=True)
                nonfinite_run += 1
                skipped += 1
                if nonfinite_run >= MAX_NONFINITE_IN_A_ROW:
                    raise FloatingPointError(
                        f"loss was non-finite for {nonfinite_run} steps in a row (last at step "
                        f"{step}): lower optim.lr, set optim.grad_clip, or raise objective.c")
            done = step + 1
            if bar is not None:
                bar.update(1)
                if done % max(1, min(cfg.train.log_every, 10)) == 0:
                    bar.set_postfix(loss=f"{float(stats['loss']):.4g}",
                                    mse=f"{float(stats['mse']):.4g}", refresh=False)
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                now = time.perf_counter()
                record: dict[str, Any] = {"step": done}
                record.update({k: float(v) / max(count, 1) for k, v in sums.items()})
                record["lr"] = _lr_at(cfg, step)
                record["samples_per_s"] = count * cfg.train.batch_size / max(now - t_log, 1e-9)
                record["skipped_nonfinite"] = skipped
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                sums, count, t_log = {}, 0, now
            if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
                last_ckpt = _save(run_dir, done, model, ema, opt, cfg, data_info)
    finally:
        if bar is not None:
            bar.close()
    return last_ckpt if last_ckpt is not None else find_checkpoint(run_dir)


@dataclass
class LoadedModel:
    """A backbone restored from a checkpoint, in eval mode, with what is needed to sample it."""
    net: nn.Module
    config: RunConfig
    step: int
    shape: tuple[int, ...]
    num_classes: int | None
    weights: str            # "model" or the EMA key used, e.g. "ema_0.999"
    checkpoint: Path


def load_model(path: str | Path, ema: float | str | None = "auto",
               device: torch.device | str = "cpu") -> LoadedModel:
    """Restores a backbone from a run folder (newest checkpoint) or a checkpoint folder.

    ``ema="auto"`` takes the first EMA decay of the run (samplers should use EMA weights,
    SPEC §1); a float picks that decay; None takes the raw training weights.
    """
    ckpt = find_checkpoint(Path(path))
    tensors, state = load_checkpoint(ckpt, device, parts=("model", "ema"))
    try:
        cfg = RunConfig.from_dict(state["config"])
        shape = tuple(int(n) for n in state["data"]["shape"])
        num_classes = state["data"]["num_classes"]
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise TypeError
        decays = [float(d) for d in state["ema_decays"]]
        step = int(state["step"])
    except (KeyError, TypeError, ValueError, ConfigError):
        raise CheckpointError(f"{ckpt / 'state.json'} lacks the config, data or EMA fields of a "
                              "meanflow checkpoint: restore it or use another checkpoint") from None
    net = build_model_for_data(cfg.model.name, shape, num_classes, cfg.model.options)
    if ema is None:
        weights, sd = "model", tensors["model"]
    elif ema == "auto" and not decays:
        weights, sd = "model", tensors["model"]
    else:
        decay = decays[0] if ema == "auto" else float(ema)
        key = EMA.key(decay)
        if decay not in decays:
            raise ConfigError(f"checkpoint {ckpt} has no EMA with decay {ema}: choose one of "
                              f"{', '.join(map(str, decays))} or none")
        prefix = key + "."
        sd = {k[len(prefix):]: v for k, v in tensors["ema"].items() if k.startswith(prefix)}
        weights = key
    try:
        net.load_state_dict(sd)
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {ckpt} do not fit the configured model "
                              f"({str(exc).splitlines()[0]})") from None
    net.to(device).eval()
    return LoadedModel(net=net, config=cfg, step=step, shape=shape,
                       num_classes=num_classes, weights=weights, checkpoint=ckpt)
