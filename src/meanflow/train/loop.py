"""The training loop, top to bottom: :func:`train` sets the run up, resumes it, then runs its
steps, each a batch, one optimiser step, logging, checkpoints and evaluations.

The parts live beside it: :mod:`~meanflow.train.schedule` (each step's seeds, batch and
learning rate, the run's length), :mod:`~meanflow.train.step` (one optimiser step, eager or
compiled, and the compiled-loss check), :mod:`~meanflow.train.monitors` (metrics.jsonl,
TensorBoard, the progress bar, sample PNGs, FID), :mod:`~meanflow.train.state` (checkpoints
and resuming), :mod:`~meanflow.train.guard` (non-finite streaks, divergence, explosions),
:mod:`~meanflow.train.ema` and :mod:`~meanflow.train.distributed`.

A run folder (:mod:`meanflow.runs.folder`) holds ``config.json``/``config.yaml`` (written before
the first step), ``metrics.jsonl`` (one line per ``log_every`` steps) and ``checkpoints/step_*``
(:mod:`meanflow.runs.checkpoint`); :func:`meanflow.load` samples a run again. The run holds the
folder's lock from before its first write to its end (``runs.folder.hold_run_dir``), and a
resume writes nothing until its checkpoint has loaded and fits.

Under ``torchrun`` the same loop runs data-parallel (:mod:`meanflow.train.distributed`): each of
the W ranks trains on ``batch_size / W`` images per step, the grad pass goes through DDP and the
JVP through the unwrapped module; rank 0 alone writes the run folder, logs all-reduced means and
writes checkpoints (the others wait for it); samples for PNGs and FID are shared out over
the ranks by seed. With ``train.fsdp`` the model is sharded by FSDP2 instead (every pass on the
sharded module, gradients reduce-scattered by it); checkpoints are gathered to full tensors.

Every random draw of step k comes from seeds derived from (seed, rank, k)
(:mod:`~meanflow.train.schedule`), so resuming from a checkpoint continues exactly where the
run stopped. Ctrl-C and SIGTERM end the step in progress, checkpoint it on every rank and stop
with :class:`~meanflow.train.interrupt.Interrupted` (:mod:`~meanflow.train.interrupt`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from meanflow.data import BatchSource, EpochOrder, build_dataset
from meanflow.errors import ConfigError
from meanflow.models.attention import set_jvp_attention
from meanflow.objective import FlowMatchingLoss, IMFLoss, MeanFlowLoss, resolve_jvp
from meanflow.runs.build import build_augment, build_network, resolve_model
from meanflow.runs.checkpoint import find_checkpoint
from meanflow.runs.config import RunConfig
from meanflow.runs.folder import hold_run_dir, truncate_metrics, write_run_config
from meanflow.train import distributed as dist_
from meanflow.train.ema import EMA
from meanflow.train.guard import MAX_NONFINITE_IN_A_ROW, DivergenceGuard
from meanflow.train.interrupt import Interrupted, StopSignals
from meanflow.train.monitors import (Evaluations, FIDMonitor, TrainLog, fid_decoder,
                                     startup_summary, tensorboard_writer)
from meanflow.train.schedule import (data_position, epoch_order, lr_at, seed_step,
                                     take_batch, total_steps)
from meanflow.train.state import (agreed_checkpoint, check_loss, check_position, loss_record,
                                  restore, write_checkpoint)
from meanflow.train.step import (JOINT_STRATEGIES, TrainStep, amp_context, check_compiled,
                                 make_loss_call, resolve_compile, tf32_mode)
from meanflow.world import (World, broadcast_object, env_world, on_every, on_main,
                            resolve_device, setup, teardown)

__all__ = ["train", "check_config", "resolve_loss", "MAX_NONFINITE_IN_A_ROW"]


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False,
          dataset: BatchSource | None = None, loss_fn: Any = None) -> Path:
    """Trains the configured model and returns the path of the last checkpoint.

    ``dataset`` overrides ``cfg.data`` (for Python users with data in memory). ``model.name:
    auto`` is resolved from the data's sample shape (:func:`meanflow.runs.build.resolve_model`)
    before anything is built, and the run folder holds the resolved config.

    ``loss_fn`` overrides the loss that ``cfg.objective`` describes: a constructed
    :class:`~meanflow.objective.MeanFlowLoss` (``objective.kind: meanflow``),
    :class:`~meanflow.objective.IMFLoss` (``imf``) or
    :class:`~meanflow.objective.FlowMatchingLoss` (``flow_matching``) with the data's
    ``num_classes``, for what the config does not offer, e.g. the wrong JVP tangents of paper
    Tab. 1b: ``train(cfg, out, loss_fn=cfg.objective.build(None, tangent="v10"))``. It runs as
    it is (its ``jvp`` "auto", if so, is resolved by the loss at each call). The run folder
    still holds ``cfg``; the checkpoints record the loss's class, tangent and du/dt strategy,
    and a resume with a loss of another class or tangent is refused.

    The du/dt strategy that runs (``objective.jvp``, "auto" resolved once here: see
    :func:`meanflow.objective.resolve_jvp`) is recorded as ``"jvp"`` in the first line this
    call writes to ``metrics.jsonl`` and in every checkpoint's ``state.json`` (``"loss"``).

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every rank calls this: it joins
    the process group (NCCL on ``cuda:LOCAL_RANK``, gloo on the CPU) and leaves it on return or
    error. A process group the caller made already is used as it is and left open.
    """
    cfg.validate()
    world, device, owned = setup(resolve_device(cfg.train.device))
    try:
        with tf32_mode(cfg.train.tf32, device):
            return _train(cfg, Path(run_dir), resume, dataset, loss_fn, world, device)
    finally:
        teardown(owned)


def check_config(cfg: RunConfig) -> None:
    """Everything ``train`` checks before it writes anything: values, data, model and loss.

    The model is built on the meta device, so this is cheap even for large backbones.
    """
    cfg.validate()
    device = resolve_device(cfg.train.device)
    _check_world(cfg, env_world())
    data = _load_data(cfg, None)
    cfg = resolve_model(cfg, data.shape)
    with torch.device("meta"):
        build_network(cfg, data.shape, data.num_classes)
    resolve_loss(cfg, data.num_classes, device,
                 resolve_compile(cfg.train.compile, device, cfg.train.fsdp))
    if cfg.train.tensorboard:
        tensorboard_writer(None)
    if cfg.train.fid_every > 0:
        FIDMonitor(cfg, data.shape, data.num_classes, device, fid_decoder(data.ds, device))


def resolve_loss(cfg: RunConfig, num_classes: int | None, device: torch.device,
                 compiled: bool, given: Any = None) -> Any:
    """The loss a run trains with: ``given`` (``train(loss_fn=...)``) after checking that it
    fits the run, or the one ``cfg.objective`` describes, built with the du/dt strategy that
    ``objective.jvp`` resolves to for this device, backbone, FSDP and compile (the one place
    "auto" is decided). ConfigError for what cannot run (forward_ad under FSDP or compile)."""
    o = cfg.objective
    if given is None:
        jvp = _strategy(o.jvp, cfg, device, compiled) if o.kind != "flow_matching" else None
        return o.build(num_classes, jvp=jvp)
    kind = {"meanflow": MeanFlowLoss, "imf": IMFLoss}.get(o.kind, FlowMatchingLoss)
    if not isinstance(given, kind):
        raise ConfigError(f"loss_fn is a {type(given).__name__} and objective.kind is "
                          f"{o.kind!r} (which decides how the run samples): give a "
                          f"{kind.__name__}, or set objective.kind")
    if given.num_classes != num_classes:
        raise ConfigError(f"loss_fn has num_classes={given.num_classes} and the data gives "
                          f"{num_classes} (data.class_conditional={cfg.data.class_conditional}): "
                          f"build the loss with num_classes={num_classes}")
    if isinstance(given, (MeanFlowLoss, IMFLoss)):
        jvp = _strategy(given.jvp, cfg, device, compiled)   # refuses what cannot run here
        if jvp != given.jvp:      # "auto": resolved as for the config's loss, on a copy
            given = copy.copy(given)
            given.dudt = dataclasses.replace(given.dudt, strategy=jvp)
            given.jvp = jvp
    return given


def _strategy(jvp: str, cfg: RunConfig, device: torch.device, compiled: bool) -> str:
    try:
        return resolve_jvp(jvp, device_type=device.type, backbone=cfg.model.name,
                           fsdp=cfg.train.fsdp, compiled=compiled)
    except ConfigError as exc:
        raise ConfigError(f"objective.jvp={jvp}: {exc}") from None


def _check_world(cfg: RunConfig, world: World) -> int:
    """Images per micro-batch on each rank; refuses what distributed training does not do."""
    if cfg.train.fsdp and not world.enabled:
        raise ConfigError("train.fsdp shards the model over the processes of a torchrun job, "
                          "and this is one process: launch with torchrun, or set "
                          "train.fsdp=false")
    return dist_.check_batch_split(cfg.train.batch_size, cfg.train.grad_accumulation, world)


@dataclass
class _Data:
    """The run's data: the source, one sample's shape, the classes (None: unconditional), what
    checkpoints record of it, its order (None: drawn with replacement) and the run's steps."""
    ds: BatchSource
    shape: tuple[int, ...]
    num_classes: int | None
    info: dict[str, Any]
    order: EpochOrder | None
    steps: int


def _load_data(cfg: RunConfig, dataset: BatchSource | None) -> _Data:
    ds = dataset if dataset is not None else build_dataset(cfg.data.name, **cfg.data.options)
    num_classes = ds.num_classes if cfg.data.class_conditional else None
    if cfg.data.class_conditional and num_classes is None:
        raise ConfigError(f"data.class_conditional is true but {cfg.data.name!r} has no "
                          "labels: give labelled data or set it to false")
    shape = tuple(ds.shape)
    info: dict[str, Any] = {"shape": list(shape), "num_classes": num_classes}
    class_names = getattr(ds, "class_names", None)
    if num_classes is not None and class_names is not None and len(class_names) == num_classes:
        # what meanflow.load names the classes of its samples by (image folders' sub-folders)
        info["class_names"] = [str(name) for name in class_names]
    steps = total_steps(cfg, ds)            # also the data order's checks
    return _Data(ds, shape, num_classes, info, epoch_order(cfg, ds), steps)


def _train(cfg: RunConfig, run_dir: Path, resume: bool, dataset: BatchSource | None,
           given_loss: Any, world: World, device: torch.device) -> Path:
    tr = cfg.train
    micro = _check_world(cfg, world)          # images per micro-batch on this rank
    data = _load_data(cfg, dataset)
    cfg = resolve_model(cfg, data.shape)      # model.name auto: the folder records the choice
    compile_ = resolve_compile(tr.compile, device, tr.fsdp)   # the one place "auto" is decided
    # One run folder for every rank: rank 0's (a CLI without --out names one on each rank).
    run_dir = Path(broadcast_object(str(run_dir), world))

    # Everything that can reject the config is built before the run folder is written.
    model = _build_model(cfg, data, world, device)
    loss_fn = resolve_loss(cfg, data.num_classes, device, compile_, given_loss)
    loss_info = loss_record(loss_fn, given=given_loss is not None)
    augment = build_augment(cfg)
    if tr.tensorboard:
        tensorboard_writer(None)              # only checks that tensorboard imports
    evals = Evaluations(cfg, data.ds, data.shape, data.num_classes, device, world)
    with contextlib.ExitStack() as held:
        # rank 0 holds the run folder's lock until the run ends, and removes what a killed
        # run left; a refusal reaches every rank (docs/design.md, Run folders, ...)
        on_main(world, held.enter_context, hold_run_dir(cfg, run_dir, resume))
        opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr,
                               betas=tuple(cfg.optim.betas),
                               weight_decay=cfg.optim.weight_decay, foreach=True)
        ema = EMA(model, tr.ema_decays, every=tr.ema_every, warmup=tr.ema_warmup)
        ckpt, start, saved = (_resume(run_dir, model, ema, opt, data, loss_info, world, device,
                                      tr.fsdp) if resume else (None, 0, {}))
        # the first write into the folder, once nothing can refuse the run any more
        on_main(world, _begin, cfg, run_dir, resume, start)
        if start >= data.steps:
            return find_checkpoint(run_dir)
        run = _Run(model, loss_fn, loss_info, augment, evals, opt, ema, ckpt, start, saved)
        return _loop(cfg, run_dir, data, run, micro, compile_, world, device)


@dataclass
class _Run:
    """What the steps of a run work on: built, and restored from ``ckpt`` when resumed (its
    step ``start`` and ``state.json``, ``saved``)."""
    model: nn.Module
    loss_fn: Any
    loss_info: dict[str, Any]
    augment: Any
    evals: Evaluations
    opt: torch.optim.Optimizer
    ema: EMA
    ckpt: Path | None
    start: int
    saved: dict[str, Any]


def _loop(cfg: RunConfig, run_dir: Path, data: _Data, run: _Run, micro: int, compile_: bool,
          world: World, device: torch.device) -> Path:
    """The steps from ``run.start`` on; returns the last checkpoint."""
    tr, model = cfg.train, run.model
    autocast = amp_context(tr.amp, device)
    loss_call = make_loss_call(run.loss_fn, compile_=compile_)
    if compile_:
        _check_compiled_loss(cfg, data, model, run.loss_fn, loss_call, run.augment, autocast,
                             world, device)
    sampler_net = _sampler_net(cfg, data, model, device) if run.evals.active else None
    train_step = TrainStep(model, run.loss_fn, loss_call, run.opt, run.ema, world=world,
                           device=device, micro=micro, accumulation=tr.grad_accumulation,
                           compiled=compile_, autocast=autocast, grad_clip=cfg.optim.grad_clip,
                           fsdp=tr.fsdp)
    info = run.loss_info
    if tr.progress and world.is_main:     # once per run, before the bar
        print(startup_summary(cfg, run_dir, data.ds, data.shape, data.num_classes,
                              data.info.get("class_names"), model, info, run.start,
                              data.steps, device), file=sys.stderr)
    log = TrainLog(cfg, run_dir, world, device, run.start, data.steps,
                   first={"jvp": info["jvp"]} if "jvp" in info else None,
                   window=run.saved.get("log_window"))
    guard = DivergenceGuard(cfg, run_dir, good=run.ckpt)
    last_ckpt: Path | None = None
    model.train()

    def checkpoint(done: int) -> Path:
        path = write_checkpoint(run_dir, done, model, run.ema, run.opt, cfg, data.info, world,
                                device, data_position(data.ds, data.order, done), info,
                                log.state(), guard.keep())
        guard.written(path)
        return path

    # Ctrl-C and SIGTERM end the step that runs and checkpoint it (train/interrupt.py)
    with StopSignals() as signals:
        try:
            for step in range(run.start, data.steps):
                x, y, aug, gen = _batch(cfg, data, run.augment, step, micro, world, device)
                stats = train_step(step, x, y, aug, gen, lr_at(cfg, step))
                guard.step(step, stats, x, train_step.skipped, log.lowest)   # raises: diverged
                done = step + 1
                log.step(done, stats)
                if done % tr.log_every == 0 or done == data.steps:
                    log.window(done, lr_at(cfg, step))
                due = guard.checkpoint_now(done % tr.checkpoint_every == 0, done == data.steps)
                if due:
                    last_ckpt = checkpoint(done)
                signum = signals.requested(world, device)
                if signum is not None:
                    raise Interrupted(signum, done, last_ckpt if due else checkpoint(done),
                                      run_dir)
                if run.evals.active:
                    run.evals(done, data.steps, sampler_net, run.ema, run_dir, world, log)
        finally:
            log.close()
    return last_ckpt if last_ckpt is not None else find_checkpoint(run_dir)


def _build_model(cfg: RunConfig, data: _Data, world: World, device: torch.device) -> nn.Module:
    torch.manual_seed(cfg.train.seed)
    model = build_network(cfg, data.shape, data.num_classes).to(device)
    # the JVP pass's attention: not a weight, so a resumed run may choose another one
    set_jvp_attention(model, cfg.model.jvp_attention)
    if cfg.train.fsdp:   # before the optimiser and the EMA, which then hold shards too
        dist_.shard_fsdp(model, world, device)
    return model


def _resume(run_dir: Path, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer,
            data: _Data, loss_info: dict[str, Any], world: World, device: torch.device,
            fsdp: bool) -> tuple[Path | None, int, dict[str, Any]]:
    """Loads the newest checkpoint (every rank the one rank 0 found) and checks that it fits
    the run, writing nothing: returns it, its step and its ``state.json`` (None, 0 and {}
    when there is none yet)."""
    ckpt = agreed_checkpoint(run_dir, world, device)
    if ckpt is None:     # e.g. a run that diverged before its first checkpoint
        if world.is_main and (run_dir / "config.json").is_file():
            print(f"meanflow: {run_dir} holds no checkpoint yet: the run starts again from "
                  "step 0", file=sys.stderr)
        return None, 0, {}
    start, state = restore(ckpt, model, ema, opt, device, fsdp)
    check_position(state.get("data_position"), data_position(data.ds, data.order, start),
                   ckpt, run_dir)
    check_loss(state.get("loss"), loss_info, run_dir)
    return ckpt, start, state


def _begin(cfg: RunConfig, run_dir: Path, resume: bool, start: int) -> None:
    """Writes the run's config; a resumed run's metrics.jsonl loses the lines that the resumed
    steps redo (all of them when no checkpoint was written)."""
    write_run_config(cfg, run_dir)
    if resume:
        truncate_metrics(run_dir / "metrics.jsonl", start)


def _check_compiled_loss(cfg: RunConfig, data: _Data, model: nn.Module, loss_fn: Any,
                         loss_call: Any, augment: Any, autocast: Any, world: World,
                         device: torch.device) -> None:
    """Every rank checks the compiled loss on a batch of its own, the way it will train:
    under DDP (split strategies) the grad pass goes through a DDP copy of the probe. The
    ranks agree on the outcome (one failing rank stops them all)."""
    tr = cfg.train
    seed = tr.seed + 1_000_003 * world.rank
    x0, y0 = data.ds.batch(min(tr.batch_size, 16), torch.Generator().manual_seed(seed))
    x0 = x0.to(device)
    y0 = y0.to(device) if (y0 is not None and data.num_classes is not None) else None
    aug0 = augment(x0, torch.Generator().manual_seed(seed))[1] if augment else None
    joint = getattr(loss_fn, "jvp", None) in JOINT_STRATEGIES
    wrap = (lambda m: dist_.wrap_ddp(m, world, device)) if world.enabled and not joint else None
    on_every(world, check_compiled, model, loss_fn, loss_call, x0, y0, aug0,
             rtol=3e-2 if tr.amp == "bf16" else 1e-3, autocast=autocast, wrap=wrap)


def _sampler_net(cfg: RunConfig, data: _Data, model: nn.Module,
                 device: torch.device) -> nn.Module:
    """The network that sample PNGs and FID load the EMA weights into: a copy of the model
    (under FSDP, whose model holds shards, a fresh full one)."""
    if cfg.train.fsdp:
        return build_network(cfg, data.shape, data.num_classes).to(device).eval()
    return copy.deepcopy(model).eval()


def _batch(cfg: RunConfig, data: _Data, augment: Any, step: int, micro: int, world: World,
           device: torch.device) -> tuple[Tensor, Tensor | None, Tensor | None,
                                          torch.Generator]:
    """Step ``step``'s seeds, and this rank's share of its global batch on the device with
    the labels (None: unconditional) and the augmentation labels (None: not augmented); with
    the generator of the loss's draws."""
    gen_cpu, gen = seed_step(cfg.train.seed, world.rank, step, device)
    share = micro * cfg.train.grad_accumulation
    x, y = take_batch(data.ds, data.order, step, world.rank, share, gen_cpu)
    x = x.to(device, non_blocking=True)
    y = y.to(device) if (y is not None and data.num_classes is not None) else None
    aug = None
    if augment is not None:
        x, aug = augment(x, gen_cpu)
    return x, y, aug, gen
