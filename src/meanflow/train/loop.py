"""The training loop: readable top to bottom, shared by the toy and (later) image runs.

A run folder (:mod:`meanflow.runs.folder`) holds ``config.json``/``config.yaml`` (written before
the first step), ``metrics.jsonl`` (one line per ``log_every`` steps) and ``checkpoints/step_*``
(:mod:`meanflow.runs.checkpoint`); :func:`meanflow.load` samples a run again.

Under ``torchrun`` the same loop runs data-parallel (:mod:`meanflow.train.distributed`): each of
the W ranks trains on ``batch_size / W`` images per step, the grad pass goes through DDP and the
JVP through the unwrapped module; rank 0 alone writes the run folder, logs all-reduced means and
writes checkpoints (the others wait for it); samples for PNGs and FID are shared out over
the ranks by seed. With ``train.fsdp`` the model is sharded by FSDP2 instead (every pass on the
sharded module, gradients reduce-scattered by it); checkpoints are gathered to full tensors.

Every random draw of step k comes from seeds derived from (seed, rank, k): the batch, the times,
the noise and label dropout from an explicit generator, dropout from the global RNG re-seeded at
each step. Resuming from a checkpoint therefore continues exactly where the run stopped.

Which samples a step trains on (``data.order``): "epochs" visits a finite dataset epoch by epoch
without replacement (:class:`meanflow.data.EpochOrder`: the global batch of step k depends only
on (seed, k), whatever the number of ranks; each rank takes its contiguous share), "random"
draws each rank's share with replacement from its (seed, rank, k) generator. The endless toy
distributions draw fresh points either way.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from meanflow import __version__
from meanflow.data import BatchSource, EpochOrder, build_dataset
from meanflow.errors import CheckpointError, ConfigError, DataError
from meanflow.latents.vae import decode_latents, load_vae
from meanflow.metrics.fid import load_reference, sample_features, score_features
from meanflow.models.attention import set_jvp_attention
from meanflow.objective import FlowMatchingLoss, MeanFlowLoss
from meanflow.runs.build import build_augment, build_network
from meanflow.runs.checkpoint import (find_checkpoint, list_checkpoints, load_checkpoint,
                                      load_optimizer_tensors, optimizer_tensors,
                                      save_checkpoint)
from meanflow.runs.config import RunConfig
from meanflow.runs.folder import prepare_run_dir, truncate_metrics
from meanflow.sampling import generate, sampling_method
from meanflow.train import distributed as dist_
from meanflow.train.ema import EMA
from meanflow.viz import image_grid, save_samples_png
from meanflow.world import (World, all_true, broadcast_object, env_world, mean_across, on_every,
                            on_main, resolve_device, setup, teardown)

__all__ = ["train", "check_config", "build_loss", "step_seed", "total_steps", "check_compiled",
           "WithAugmentLabels", "make_loss_call", "draw_times_and_noise", "epoch_order",
           "data_position", "resolve_compile", "tf32_mode", "lr_at", "FIDMonitor",
           "latent_decoder"]

MAX_NONFINITE_IN_A_ROW = 10


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed unique to (seed, rank, step); the same on every machine."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % (2 ** 63 - 1)


def resolve_compile(value: bool | str, device: torch.device, fsdp: bool = False) -> bool:
    """``train.compile`` for a run on ``device``: "auto" is on for CUDA devices, except under
    ``train.fsdp``, which does not compile (``compile: true`` with it is refused)."""
    if value == "auto":
        return torch.device(device).type == "cuda" and not fsdp
    return bool(value)


@contextlib.contextmanager
def tf32_mode(enabled: bool, device: torch.device):  # noqa: ANN201 (a context manager)
    """With ``enabled`` on a CUDA device: float32 matmuls and cuDNN convolutions may use TF32
    (``torch.set_float32_matmul_precision("high")``, as the official PyTorch code) until the
    block ends, when the previous settings come back. Otherwise nothing changes."""
    if not enabled or torch.device(device).type != "cuda":
        yield
        return
    try:
        saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        # The process set TF32 with torch's newer per-backend flags, and reading the legacy
        # ones now raises: use the newer flags alone.
        matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
        old = (matmul.fp32_precision, conv.fp32_precision)
        matmul.fp32_precision = conv.fp32_precision = "tf32"
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = old
        return
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def build_loss(cfg: RunConfig, num_classes: int | None) -> Callable:
    o = cfg.objective
    if o.kind == "flow_matching":
        return FlowMatchingLoss(time_sampler=o.time_sampler, mu=o.mu, sigma=o.sigma,
                                label_drop=o.label_drop, num_classes=num_classes,
                                label_drop_rows=o.label_drop_rows)
    return MeanFlowLoss(time_sampler=o.time_sampler, mu=o.mu, sigma=o.sigma, mu_r=o.mu_r,
                        sigma_r=o.sigma_r, fraction_r_neq_t=o.fraction_r_neq_t, p=o.p, c=o.c,
                        omega=o.omega, kappa=o.kappa, t_interval=tuple(o.t_interval),
                        label_drop=o.label_drop, num_classes=num_classes, jvp=o.jvp,
                        jvp_precision=o.jvp_precision, tangent=o.tangent,
                        r_eq_t_rows=o.r_eq_t_rows, label_drop_rows=o.label_drop_rows)


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


def _save(run_dir: Path, step: int, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer,
          cfg: RunConfig, data_info: dict[str, Any], world_size: int = 1,
          full: tuple[dict, dict, Any] | None = None,
          position: dict[str, Any] | None = None) -> Path:
    """``full``: (model, EMA, optimizer) state gathered from FSDP shards (:func:`_full_states`),
    saved instead of the objects' own. ``position``: :func:`data_position` after ``step``."""
    model_sd, ema_sd = (model.state_dict(), ema.state_dict()) if full is None else full[:2]
    opt_tensors, opt_meta = optimizer_tensors(opt if full is None else full[2])
    state = {"step": step, "optimizer": opt_meta, "config": cfg.to_dict(), "data": data_info,
             "ema_decays": ema.decays, "meanflow_version": __version__,
             "torch_version": torch.__version__, "world_size": world_size}
    if position is not None:
        state["data_position"] = position
    path = save_checkpoint(run_dir / "checkpoints" / f"step_{step:07d}",
                           model=model_sd, ema=ema_sd, optimizer=opt_tensors, state=state)
    keep = cfg.train.keep_checkpoints
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


class _StateOf:
    """Stands for an optimiser whose ``state_dict()`` is given (gathered FSDP state)."""

    def __init__(self, sd: dict) -> None:
        self.sd = sd

    def state_dict(self) -> dict:
        return self.sd


def _full_states(model: nn.Module, ema: EMA,
                 opt: torch.optim.Optimizer) -> tuple[dict, dict, _StateOf]:
    """train.fsdp: the model, EMA and Adam state with every shard gathered into full CPU
    tensors, so that checkpoints hold what a DDP or one-process run saves (a collective)."""
    opt_sd = opt.state_dict()
    opt_sd = {**opt_sd, "state": {i: dist_.full_tensors(st) for i, st in opt_sd["state"].items()}}
    return (dist_.full_tensors(model.state_dict()), dist_.full_tensors(ema.state_dict()),
            _StateOf(opt_sd))


def _load_sharded(model: nn.Module, ema: EMA, opt: torch.optim.Optimizer,
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


class _FirstEMA:
    """The first EMA's weights as full tensors (gathered from FSDP shards), for sampling."""

    def __init__(self, ema: EMA) -> None:
        self.decays = ema.decays
        key = EMA.key(ema.decays[0])
        self.shadows = {key: dist_.full_tensors(ema.shadows[key], cpu=False)}


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
    (``epoch_step``). A resumed run must find the same (:func:`_check_position`)."""
    size = len(ds) if hasattr(ds, "__len__") else None
    if order is None:
        return {"order": "random", "size": size}
    epoch, epoch_step = order.position(done)
    return {"order": "epochs", "size": size, "batch_size": order.batch_size,
            "steps_per_epoch": order.steps_per_epoch, "epoch": epoch, "epoch_step": epoch_step}


def _check_position(saved: Any, now: dict[str, Any], ckpt: Path, run_dir: Path) -> None:
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


def _tensorboard_writer(run_dir: Path | None):  # noqa: ANN202 (SummaryWriter is optional)
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.tensorboard needs the tensorboard package: pip install "
                          "tensorboard, or set train.tensorboard=false") from None
    return None if run_dir is None else SummaryWriter(str(run_dir / "tensorboard"))


def check_config(cfg: RunConfig) -> None:
    """Everything ``train`` checks before it writes anything: values, data, model and loss.

    The model is built on the meta device, so this is cheap even for large backbones.
    """
    cfg.validate()
    resolve_device(cfg.train.device)
    _check_world(cfg, env_world())
    ds = build_dataset(cfg.data.name, **cfg.data.options)
    num_classes = ds.num_classes if cfg.data.class_conditional else None
    if cfg.data.class_conditional and num_classes is None:
        raise ConfigError(f"data.class_conditional is true but {cfg.data.name!r} has no "
                          "labels: give labelled data or set it to false")
    total_steps(cfg, ds)                  # and the data order's checks
    with torch.device("meta"):
        build_network(cfg, tuple(ds.shape), num_classes)
    build_loss(cfg, num_classes)
    if cfg.train.tensorboard:
        _tensorboard_writer(None)
    if cfg.train.fid_every > 0:
        device = resolve_device(cfg.train.device)
        FIDMonitor(cfg, tuple(ds.shape), num_classes, device, _fid_decoder(ds, device))


def _check_world(cfg: RunConfig, world: World) -> int:
    """Images per micro-batch on each rank; refuses what distributed training does not do."""
    if cfg.train.fsdp and not world.enabled:
        raise ConfigError("train.fsdp shards the model over the processes of a torchrun job, "
                          "and this is one process: launch with torchrun, or set "
                          "train.fsdp=false")
    return dist_.check_batch_split(cfg.train.batch_size, cfg.train.grad_accumulation, world)


class FIDMonitor:
    """FID / KID of samples from the first EMA, on fixed seeds, at each ``train.fid_steps`` NFE,
    against ``train.fid_ref``. Built before the run starts, so that a missing or mismatched
    reference file or extractor stops the run before it writes anything."""

    def __init__(self, cfg: RunConfig, shape: tuple[int, ...], num_classes: int | None,
                 device: torch.device,
                 decode: Callable[[Tensor], Tensor] | None = None) -> None:
        tr = cfg.train
        self.ref, self.extractor = load_reference(tr.fid_ref, device)
        if len(shape) != 3:
            raise ConfigError(f"train.fid_every needs image data; this data has samples of shape "
                              f"{shape}: set train.fid_every=0")
        self.decode = decode
        probe = torch.zeros(2, *shape) if decode is None else decode(torch.zeros(2, *shape))
        try:
            dim = self.extractor.features(probe).shape[1]
        except ConfigError as exc:
            raise ConfigError(f"train.fid_ref's extractor cannot read this data: {exc}") from None
        if dim != self.ref.dim:
            raise ConfigError(f"train.fid_ref holds {self.ref.dim}-d features but its extractor "
                              f"gives {dim}-d ones: recompute it with meanflow fid ref")
        self.cfg, self.shape, self.num_classes, self.device = cfg, shape, num_classes, device

    def __call__(self, sampler_net: nn.Module, ema: EMA, step: int,
                 world: World = World()) -> dict[str, Any] | None:
        """The record for metrics.jsonl. Under torchrun every rank samples and extracts the
        features of its share of the seeds; rank 0 gets them all and returns the record, the
        others None. Sample i depends only on seed i, so the rank count does not matter."""
        tr = self.cfg.train
        sampler_net.load_state_dict(ema.shadows[EMA.key(ema.decays[0])])
        y = None if self.num_classes is None else torch.arange(tr.fid_n) % self.num_classes
        record: dict[str, Any] = {"step": step, "eval": "fid", "fid_n": tr.fid_n,
                                  "fid_extractor": self.extractor.name,
                                  "fid_weights": EMA.key(ema.decays[0])}
        for k in tr.fid_steps:
            feats = sample_features(sampler_net, list(range(tr.fid_n)), self.shape,
                                    self.extractor, labels=y, steps=k,
                                    method=sampling_method(self.cfg.objective.kind),
                                    decode=self.decode, batch_size=500, device=self.device,
                                    world=world)
            if not world.is_main:
                continue
            scores = score_features(feats, self.ref)
            for name, value in scores.items():
                if name != "kid_subset":
                    record[f"{name}_nfe{k}"] = value
        return record if world.is_main else None


class WithAugmentLabels:
    """``net(z, t, h, y)`` -> ``model(z, t, h, y, aug=labels)``: hands the EDM augmentation label
    of each sample to the network inside the loss. Batches that the loss doubles (guidance)
    get the labels repeated."""

    def __init__(self, model: Callable[..., Tensor], labels: Tensor) -> None:
        self.model, self.labels = model, labels

    def __call__(self, z: Tensor, t: Tensor, h: Tensor, y: Tensor | None = None) -> Tensor:
        labels = self.labels
        if z.shape[0] != labels.shape[0]:
            labels = labels.repeat(z.shape[0] // labels.shape[0], 1)
        return self.model(z, t, h, y, aug=labels)


# torch.compile backend of train.compile. Tests on the CPU set "aot_eager" (the same traced
# graphs and autograd, without inductor's C++ code generation, which takes minutes there).
COMPILE_BACKEND = "inductor"


def make_loss_call(loss_fn: Callable, compile_: bool = False,
                   backend: str | None = None) -> Callable:
    """``call(net, x, y, aug, generator, draws) -> (loss, stats)``: one loss evaluation, with
    the augmentation labels handed to the net and the times/noise ``draws`` (r, t, e) given or,
    when empty, drawn by the loss. With ``compile_`` the whole evaluation (both passes of the
    JVP strategy and the target) is one ``torch.compile`` call: compiling only the network
    loses forward-mode tangents (benchmarks/step_cost.py --compile-scope model). ``backend``
    defaults to ``COMPILE_BACKEND``."""
    def call(net: Callable, x: Tensor, y: Tensor | None, aug: Tensor | None,
             generator: torch.Generator | None, draws: dict[str, Tensor],
             jvp_net: Callable | None = None) -> tuple:
        # jvp_net: the unwrapped module for the no-grad passes when net is a DDP wrapper
        if aug is not None:
            net = WithAugmentLabels(net, aug)
            if jvp_net is not None:
                jvp_net = WithAugmentLabels(jvp_net, aug)
        extra = {} if jvp_net is None else {"jvp_net": jvp_net}
        return loss_fn(net, x, y, generator=generator, **draws, **extra)
    return torch.compile(call, backend=backend or COMPILE_BACKEND) if compile_ else call


def draw_times_and_noise(loss_fn: Callable, x: Tensor,
                         generator: torch.Generator | None) -> dict[str, Tensor]:
    """(r, t) and e drawn in the order the loss itself draws them, so that a compiled run
    consumes the generator exactly as an eager one does."""
    B = x.shape[0]
    if isinstance(loss_fn, MeanFlowLoss):
        r, t = loss_fn.sampler(B, x.device, generator)
        draws = {"r": r, "t": t}
    else:
        draws = {"t": loss_fn.sampler.sample_t(B, x.device, generator)}
    draws["e"] = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return draws


def check_compiled(model: nn.Module, loss_fn: Callable, compiled_call: Callable, x: Tensor,
                   y: Tensor | None, aug: Tensor | None = None, rtol: float = 1e-3,
                   autocast: Any = None,
                   wrap: Callable[[nn.Module], nn.Module] | None = None) -> float:
    """Checks a compiled loss evaluation against eager before training starts.

    Compiled code can drop forward-mode tangents silently (docs/design.md, torch.compile). A
    fresh network's zero-initialised output makes du/dt zero, which would hide that, so the
    check runs on a copy of the network with perturbed weights, in eval mode, with r = 0 and
    t in [0.5, 1] so that every target leans on du/dt. It compares the raw squared error and
    the gradient. Returns the larger relative error; raises ConfigError above ``rtol`` or on
    any failure.

    ``wrap`` (under torchrun with a split strategy: the DDP wrapper) wraps the probe for the
    grad pass, as in training (the probe itself takes the JVP, ``jvp_net``). With a different
    batch on each rank the compared gradients are then the averages over the ranks, so a
    compiled grad pass that skipped DDP's all-reduce would fail the check too.
    """
    probe = copy.deepcopy(model).eval()
    gen = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        for p in probe.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.device, p.dtype))
    B = x.shape[0]
    t = (0.5 + 0.5 * torch.rand(B, generator=gen)).to(x.device)
    draws = {"r": torch.zeros_like(t), "t": t,
             "e": torch.randn(x.shape, generator=gen).to(x.device, x.dtype)}
    if not isinstance(loss_fn, MeanFlowLoss):
        draws.pop("r")
    strategy = getattr(loss_fn, "jvp", "-")
    net = probe if wrap is None else wrap(probe)
    # jvp_net: the unwrapped probe, for MeanFlow's no-grad passes (flow matching has none)
    extra = (probe,) if wrap is not None and isinstance(loss_fn, MeanFlowLoss) else ()

    def run(call: Callable) -> tuple[Tensor, Tensor]:
        probe.zero_grad(set_to_none=True)
        with (autocast if autocast is not None else contextlib.nullcontext()):
            loss, stats = call(net, x, y, aug, torch.Generator(x.device).manual_seed(7),
                               draws, *extra)
        loss.float().mean().backward()
        grad = torch.cat([p.grad.flatten() for p in probe.parameters() if p.grad is not None])
        return stats["mse"].detach().float(), grad

    try:
        ref_mse, ref_grad = run(make_loss_call(loss_fn))
        got_mse, got_grad = run(compiled_call)
    except Exception as exc:  # noqa: BLE001 (any compiler failure becomes one clear line)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        hint = "set train.compile=false or try another objective.jvp"
        if getattr(loss_fn, "jvp", None) == "forward_ad":
            # torch 2.13: the joint dual-tensor pass cannot be compiled (a compiled graph's
            # autograd Function has no jvp rule); the split passes and func.jvp can
            hint = "objective.jvp=forward_ad does not compile: use split or func, or " \
                   "set train.compile=false"
        raise ConfigError(f"train.compile: the compiled loss failed its start-up check "
                          f"({type(exc).__name__}: {first}); {hint}") from None
    errors = {"squared error": float((got_mse - ref_mse).abs() / ref_mse.abs().clamp_min(1e-12)),
              "gradient": float((got_grad - ref_grad).norm() / ref_grad.norm().clamp_min(1e-12))}
    worst = max(errors, key=errors.get)
    if not errors[worst] <= rtol:  # also catches NaN
        raise ConfigError(f"train.compile changed the {worst} by {errors[worst]:.2e} (relative) "
                          f"against eager with objective.jvp={strategy}: the compiled JVP is "
                          "wrong; set train.compile=false or try another objective.jvp")
    return errors[worst]


def latent_decoder(ds: Any, device: torch.device) -> Callable[[Tensor], Tensor] | None:
    """For latent data that records its VAE (``meanflow prepare-latents``): a function from
    model-space latents to images in [-1, 1] (CPU), so that sample PNGs and FID during
    training see pictures, not latents. None for other data. Raises DataError (with the fix)
    when the VAE cannot be loaded."""
    vae = getattr(ds, "vae", None)
    if not (isinstance(vae, dict) and vae.get("spec")):
        return None
    model = load_vae(vae["spec"], device)
    scale = float(getattr(ds, "scale"))
    return lambda z: decode_latents(model, z, scale)


def _fid_decoder(ds: Any, device: torch.device) -> Callable[[Tensor], Tensor] | None:
    """:func:`latent_decoder` for ``train.fid_every``, which cannot do without it."""
    try:
        return latent_decoder(ds, device)
    except (DataError, ConfigError) as exc:
        raise ConfigError(f"train.fid_every on latents needs their VAE: {exc}") from None


def _sample_pngs(run_dir: Path, step: int, sampler_net: nn.Module, ema: EMA, cfg: RunConfig,
                 shape: tuple[int, ...], num_classes: int | None, device: torch.device,
                 writer: Any, world: World = World(),
                 decode: Callable[[Tensor], Tensor] | None = None) -> None:
    """PNGs of samples from fixed seeds with the first EMA's weights, one per NFE (sampled by
    all ranks, drawn by rank 0); latents are decoded by ``decode`` (the VAE) first."""
    if len(shape) != 3 and math.prod(shape) != 2:
        return  # neither images nor 2-D points: nothing to draw
    sampler_net.load_state_dict(ema.shadows[EMA.key(ema.decays[0])])
    n = cfg.train.sample_count
    y = None if num_classes is None else torch.arange(n) % num_classes
    method = sampling_method(cfg.objective.kind)
    for k in cfg.train.sample_steps:
        x, decoded = generate(sampler_net, range(n), shape, labels=y, steps=k, method=method,
                              decode=decode, batch_size=256, device=device, world=world,
                              keep_samples=decode is None)
        if not world.is_main:
            continue
        x = x if decoded is None else decoded
        path = run_dir / "samples" / f"step_{step:07d}-nfe{k}.png"
        title = f"{method}, {k} step(s), EMA {ema.decays[0]:g}, step {step}"
        # a class-conditional image grid gets one class per column
        nrow = num_classes if (num_classes and len(shape) == 3 and num_classes <= 16) else None
        save_samples_png(x, path, labels=y, title=title, nrow=nrow)
        if writer is not None and len(shape) == 3:
            grid = torch.from_numpy(image_grid(x, nrow))
            grid = grid[None] if grid.ndim == 2 else grid.permute(2, 0, 1)
            writer.add_image(f"samples/nfe{k}", grid, step)


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False,
          dataset: BatchSource | None = None) -> Path:
    """Trains the configured model and returns the path of the last checkpoint.

    ``dataset`` overrides ``cfg.data`` (for Python users with data in memory).

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every rank calls this: it joins
    the process group (NCCL on ``cuda:LOCAL_RANK``, gloo on the CPU) and leaves it on return or
    error. A process group the caller made already is used as it is and left open.
    """
    cfg.validate()
    world, device, owned = setup(resolve_device(cfg.train.device))
    try:
        with tf32_mode(cfg.train.tf32, device):
            return _train(cfg, Path(run_dir), resume, dataset, world, device)
    finally:
        teardown(owned)


def _train(cfg: RunConfig, run_dir: Path, resume: bool, dataset: BatchSource | None,
           world: World, device: torch.device) -> Path:
    micro = _check_world(cfg, world)          # images per micro-batch on this rank
    ds = dataset if dataset is not None else build_dataset(cfg.data.name, **cfg.data.options)
    num_classes = ds.num_classes if cfg.data.class_conditional else None
    if cfg.data.class_conditional and num_classes is None:
        raise ConfigError(f"data.class_conditional is true but {cfg.data.name!r} has no "
                          "labels: give labelled data or set it to false")
    shape = tuple(ds.shape)
    data_info: dict[str, Any] = {"shape": list(shape), "num_classes": num_classes}
    class_names = getattr(ds, "class_names", None)
    if num_classes is not None and class_names is not None and len(class_names) == num_classes:
        # what meanflow.load names the classes of its samples by (image folders' sub-folders)
        data_info["class_names"] = [str(name) for name in class_names]
    steps = total_steps(cfg, ds)
    order = epoch_order(cfg, ds)
    tr = cfg.train
    compile_ = resolve_compile(tr.compile, device, tr.fsdp)   # the one place "auto" is decided
    # One run folder for every rank: rank 0's (a CLI without --out names one on each rank).
    run_dir = Path(broadcast_object(str(run_dir), world))

    # Everything that can reject the config is built before the run folder is written.
    torch.manual_seed(tr.seed)
    model = build_network(cfg, shape, num_classes).to(device)
    # the JVP pass's attention: not a weight, so a resumed run may choose another one
    set_jvp_attention(model, cfg.model.jvp_attention)
    if tr.fsdp:   # before the optimiser and the EMA, which then hold shards too
        dist_.shard_fsdp(model, world, device)
    loss_fn = build_loss(cfg, num_classes)
    # "func"/"forward_ad" give u and du/dt in one pass, which cannot go through DDP: under
    # torchrun they run on the module and the gradients are averaged by hand.
    joint = isinstance(loss_fn, MeanFlowLoss) and loss_fn.jvp in ("func", "forward_ad")
    augment = build_augment(cfg)
    if tr.tensorboard:
        _tensorboard_writer(None)
    decode, pngs = None, tr.sample_count > 0
    if tr.fid_every > 0:
        decode = _fid_decoder(ds, device)
    elif pngs:
        try:
            decode = latent_decoder(ds, device)
        except (DataError, ConfigError) as exc:
            if world.is_main:
                print(f"warning: sample PNGs are off, the latents' VAE does not load ({exc})",
                      file=sys.stderr)
            pngs = False
    fid_monitor = (FIDMonitor(cfg, shape, num_classes, device, decode) if tr.fid_every > 0
                   else None)
    on_main(world, prepare_run_dir, cfg, run_dir, resume)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                           weight_decay=cfg.optim.weight_decay, foreach=True)
    ema = EMA(model, tr.ema_decays, every=tr.ema_every)

    start, main_name = 0, None
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        # Every rank loads the checkpoint rank 0 found (the state is replicated, so the number
        # of ranks may differ from the run's); the run folder must be shared by every node.
        found = list_checkpoints(run_dir)
        name = found[-1].name if found else None
        main_name = broadcast_object(name, world)
        if not all_true(name == main_name, world, device):
            raise ConfigError(f"the ranks see different checkpoints in {run_dir} (rank 0: "
                              f"{main_name}): put the run folder on a file system that every "
                              "node shares")
    if resume and main_name is not None:
        ckpt = run_dir / "checkpoints" / main_name
        tensors, state = load_checkpoint(ckpt, device)
        if not tr.fsdp:
            model.load_state_dict(tensors["model"])
            ema.load_state_dict(tensors["ema"])
        try:
            if tr.fsdp:
                _load_sharded(model, ema, opt, tensors, state["optimizer"])
            else:
                load_optimizer_tensors(opt, tensors["optimizer"], state["optimizer"])
            start = int(state["step"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{ckpt / 'state.json'} does not fit this run ({exc}); "
                                  "restore it or resume from an earlier checkpoint") from None
        _check_position(state.get("data_position"), data_position(ds, order, start), ckpt,
                        run_dir)
    if resume and world.is_main:
        truncate_metrics(metrics_path, start)  # drop lines the resumed steps will redo
    if start >= steps:
        return find_checkpoint(run_dir)

    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if tr.amp == "bf16"
                else contextlib.nullcontext())
    loss_call = make_loss_call(loss_fn, compile_=compile_)
    if compile_:
        # Every rank checks the compiled loss on a batch of its own, the way it will train:
        # under DDP (split strategies) the grad pass goes through a DDP copy of the probe.
        # The ranks agree on the outcome (one failing rank stops them all).
        check_seed = tr.seed + 1_000_003 * world.rank
        x0, y0 = ds.batch(min(tr.batch_size, 16), torch.Generator().manual_seed(check_seed))
        x0 = x0.to(device)
        y0 = y0.to(device) if (y0 is not None and num_classes is not None) else None
        aug0 = (augment(x0, torch.Generator().manual_seed(check_seed))[1] if augment
                else None)
        wrap = ((lambda m: dist_.wrap_ddp(m, world, device)) if world.enabled and not joint
                else None)
        on_every(world, check_compiled, model, loss_fn, loss_call, x0, y0, aug0,
                       rtol=3e-2 if tr.amp == "bf16" else 1e-3, autocast=autocast, wrap=wrap)
    sampler_net = None
    if pngs or fid_monitor is not None:
        sampler_net = (build_network(cfg, shape, num_classes).to(device).eval()
                       if tr.fsdp else copy.deepcopy(model).eval())
    writer = _tensorboard_writer(run_dir) if (tr.tensorboard and world.is_main) else None

    # The grad-carrying forward goes through DDP (its backward all-reduces the gradients);
    # the no-grad passes (JVP, guidance) take the unwrapped module. One process: the module.
    # FSDP: the sharded module itself, for every pass (its backward reduce-scatters).
    train_net: nn.Module = (model if joint or tr.fsdp
                            else dist_.wrap_ddp(model, world, device))
    jvp_net = model if (train_net is not model and isinstance(loss_fn, MeanFlowLoss)) else None
    sync_by_hand = world.enabled and joint and not tr.fsdp
    ddp_no_sync = getattr(train_net, "no_sync", None) if train_net is not model else None

    bar = None
    if tr.progress and world.is_main:
        bar = tqdm(total=steps, initial=start, desc=f"{cfg.objective.kind}",
                   unit="step", dynamic_ncols=True, disable=None)  # None: off when not a tty
    sums: dict[str, Tensor] = {}  # summed on the device; read back only when logging
    count, nonfinite_run, skipped = 0, 0, 0
    t_log = time.perf_counter()
    last_ckpt: Path | None = None
    model.train()
    try:
        for step in range(start, steps):
            seed = step_seed(tr.seed, world.rank, step)
            torch.manual_seed(seed)                      # dropout masks
            gen_cpu = torch.Generator().manual_seed(seed)
            gen = gen_cpu if device.type == "cpu" else torch.Generator(device).manual_seed(seed)
            share = micro * tr.grad_accumulation                    # this rank's images
            if order is None:
                x, y = ds.batch(share, gen_cpu)
            else:   # its contiguous slice of the step's global batch, the same for any W
                x, y = ds.take(order.indices(step, world.rank * share,
                                             (world.rank + 1) * share), gen_cpu)
            x = x.to(device, non_blocking=True)
            y = y.to(device) if (y is not None and num_classes is not None) else None
            aug = None
            if augment is not None:
                x, aug = augment(x, gen_cpu)

            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step)
            finite, step_stats = True, {}
            all_finite = (torch.ones((), dtype=torch.bool, device=device) if world.enabled
                          else None)
            for i in range(tr.grad_accumulation):
                part = slice(i * micro, (i + 1) * micro)
                # DDP all-reduces in the backward of the last micro-batch only
                last = i == tr.grad_accumulation - 1
                sync = (ddp_no_sync() if ddp_no_sync is not None and not last
                        else contextlib.nullcontext())
                with sync:
                    # compiled: times and noise drawn outside the compiled region, same order
                    draws = draw_times_and_noise(loss_fn, x[part], gen) if compile_ else {}
                    with autocast:
                        loss, stats = loss_call(train_net, x[part],
                                                None if y is None else y[part],
                                                None if aug is None else aug[part], gen, draws,
                                                jvp_net)
                    loss = loss.float().mean() / tr.grad_accumulation
                    if world.enabled:
                        # every rank runs every backward (DDP's all-reduce waits for all);
                        # a non-finite loss anywhere skips the step everywhere, below
                        all_finite &= torch.isfinite(loss)
                    elif not torch.isfinite(loss):
                        finite = False
                        break
                    loss.backward()
                for k, v in stats.items():
                    v = v.detach().float() / tr.grad_accumulation
                    step_stats[k] = step_stats[k] + v if k in step_stats else v
            if world.enabled:
                finite = all_true(all_finite, world, device)
                if finite and sync_by_hand:
                    dist_.all_reduce_grads_(list(model.parameters()), world)
            if finite:
                nonfinite_run = 0
                max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                step_stats["grad_norm"] = (dist_.full_tensors({"n": norm}, cpu=False)["n"]
                                           if tr.fsdp else norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                # every train.ema_every steps (by the step number, so a resumed run keeps the
                # schedule); a skipped step below updates nothing, not even on a multiple
                ema.step(model, step + 1)
                for k, v in step_stats.items():
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
                if done % max(1, min(tr.log_every, 10)) == 0 and "loss" in step_stats:
                    rate = bar.format_dict.get("rate") or 0.0
                    bar.set_postfix(loss=f"{float(step_stats['loss']):.4g}",
                                    mse=f"{float(step_stats['mse']):.4g}",
                                    img_s=f"{rate * tr.batch_size:.0f}", refresh=False)
            if done % tr.log_every == 0 or done == steps:
                sums = mean_across(sums, world, device)   # the mean over the ranks
                now = time.perf_counter()
                record: dict[str, Any] = {"step": done, "images": done * tr.batch_size}
                record.update({k: float(v) / max(count, 1) for k, v in sums.items()})
                record["lr"] = lr_at(cfg, step)
                record["samples_per_s"] = count * tr.batch_size / max(now - t_log, 1e-9)
                record["skipped_nonfinite"] = skipped
                if world.is_main:
                    with open(metrics_path, "a") as fh:
                        fh.write(json.dumps(record) + "\n")
                if writer is not None:
                    for k, v in record.items():
                        if k != "step":
                            writer.add_scalar(f"train/{k}", v, done)
                sums, count, t_log = {}, 0, now
            if done % tr.checkpoint_every == 0 or done == steps:
                # the replicas must be identical: this catches unsynchronised gradients
                # (FSDP holds no replicas: each rank has its own shard)
                full = _full_states(model, ema, opt) if tr.fsdp else None
                if not tr.fsdp:
                    dist_.check_replicas_equal(model, world, device, done)
                # rank 0 writes; the others wait for it (on_main's broadcast is the barrier)
                last_ckpt = on_main(world, _save, run_dir, done, model, ema, opt, cfg,
                                          data_info, world.size, full,
                                          data_position(ds, order, done))
            if fid_monitor is not None and (done == steps or done % tr.fid_every == 0):
                t_eval = time.perf_counter()
                if bar is not None:
                    bar.set_description(f"{cfg.objective.kind} (FID)")
                record = fid_monitor(sampler_net, _FirstEMA(ema) if tr.fsdp else ema, done,
                                     world)  # None off rank 0
                if record is not None:
                    with open(metrics_path, "a") as fh:
                        fh.write(json.dumps(record) + "\n")
                if writer is not None and record is not None:
                    for k, v in record.items():
                        if k.startswith(("fid_nfe", "kid_nfe")):
                            writer.add_scalar(f"eval/{k}", v, done)
                if bar is not None and record is not None:
                    bar.set_description(f"{cfg.objective.kind}")
                    bar.write(f"step {done}: " + ", ".join(
                        f"{k} {v:.4g}" for k, v in record.items() if k.startswith("fid_nfe")))
                t_log += time.perf_counter() - t_eval  # not training time: off the rate
            if pngs and (done == steps or (
                    tr.sample_every > 0 and done % tr.sample_every == 0)):
                t_sample = time.perf_counter()
                _sample_pngs(run_dir, done, sampler_net, _FirstEMA(ema) if tr.fsdp else ema,
                             cfg, shape, num_classes, device, writer, world, decode)
                t_log += time.perf_counter() - t_sample  # not training time: off the rate
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    return last_ckpt if last_ckpt is not None else find_checkpoint(run_dir)
