"""What a run reports while it trains: ``metrics.jsonl``, TensorBoard, the progress bar, sample
PNGs and FID during training.

- :class:`TrainLog`: every ``train.log_every`` steps one line in ``metrics.jsonl`` (rank 0) with
  the means of the step stats over the window and the ranks, the learning rate, images/s and
  the skipped steps; the same scalars to TensorBoard (``train.tensorboard``); the tqdm bar.
- :class:`Evaluations`: FID/KID (:class:`FIDMonitor`, ``train.fid_every``) and sample grids
  (``train.sample_every``, always at the end) from the first EMA on fixed seeds, shared out
  over the ranks; latents are decoded by their VAE first (:func:`latent_decoder`). Their time
  is kept out of the logged images/s.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from meanflow.errors import ConfigError, DataError
from meanflow.latents.vae import decode_latents, load_vae
from meanflow.metrics.fid import load_reference, sample_features, score_features
from meanflow.runs.config import RunConfig
from meanflow.sampling import generate, sampling_method
from meanflow.train.ema import EMA
from meanflow.train.energy import EnergyMonitor
from meanflow.train.guard import explosion_warning
from meanflow.train.state import sampling_ema
from meanflow.viz import grid_columns, image_grid, save_samples_png
from meanflow.world import World, mean_across

__all__ = ["tensorboard_writer", "latent_decoder", "fid_decoder", "FIDMonitor", "sample_pngs",
           "TrainLog", "Evaluations", "startup_summary", "SPEED_STEPS"]


def tensorboard_writer(run_dir: Path | None):  # noqa: ANN201 (SummaryWriter is optional)
    """A SummaryWriter into ``run_dir/tensorboard``; with ``run_dir`` None only checks that
    tensorboard imports (a one-line ConfigError with the fix otherwise)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.tensorboard needs the tensorboard package: pip install "
                          "tensorboard, or set train.tensorboard=false") from None
    return None if run_dir is None else SummaryWriter(str(run_dir / "tensorboard"))


def latent_decoder(ds: Any, device: torch.device) -> Callable[[Tensor], Tensor] | None:
    """For latent data that records its VAE (``meanflow prepare-latents``): a function from
    model-space latents to images in [-1, 1] (CPU), so that sample PNGs and FID during
    training see pictures, not latents. None for other data. Raises DataError (with the fix)
    when the VAE cannot be loaded."""
    vae = getattr(ds, "vae", None)
    if not (isinstance(vae, dict) and vae.get("spec")):
        return None
    model = load_vae(vae["spec"], device)
    # per-channel (data.options.channel_norm): scale and shift are tuples, the shift the
    # data's own; otherwise the VAE's own shift, as prepare-latents subtracted it
    scale = ds.scale
    shift = ds.shift if getattr(ds, "channel_norm", None) else None
    return lambda z: decode_latents(model, z, scale, shift=shift)


def fid_decoder(ds: Any, device: torch.device) -> Callable[[Tensor], Tensor] | None:
    """:func:`latent_decoder` for ``train.fid_every``, which cannot do without it."""
    try:
        return latent_decoder(ds, device)
    except (DataError, ConfigError) as exc:
        raise ConfigError(f"train.fid_every on latents needs their VAE: {exc}") from None


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


def sample_pngs(run_dir: Path, step: int, sampler_net: nn.Module, ema: EMA, cfg: RunConfig,
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
        # square-ish; a class-conditional grid keeps one class per column
        nrow = grid_columns(n, num_classes if num_classes and num_classes <= 16 else None)
        save_samples_png(x, path, labels=y, title=title, nrow=nrow)
        if writer is not None and len(shape) == 3:
            grid = torch.from_numpy(image_grid(x, nrow))
            grid = grid[None] if grid.ndim == 2 else grid.permute(2, 0, 1)
            writer.add_image(f"samples/nfe{k}", grid, step)


#: Steps timed (after the first, which pays for warm-up work) for the start-up summary's speed.
SPEED_STEPS = 5


def startup_summary(cfg: RunConfig, run_dir: Path, ds: Any, shape: tuple[int, ...],
                    num_classes: int | None, class_names: list[str] | None, model: nn.Module,
                    loss_info: dict[str, Any], start: int, steps: int,
                    device: torch.device) -> str:
    """The lines printed once when a run starts (``train.progress``): the folder, the data
    (count, shape, classes), the model (parameters), the objective, the steps and the EMA.
    The measured time per step follows a few steps later (:meth:`TrainLog.step`)."""
    tr, o = cfg.train, cfg.objective
    count = f"{len(ds):,} samples" if hasattr(ds, "__len__") else "drawn without end"
    if num_classes is None:
        classes = "unconditional"
    else:
        names = f": {', '.join(class_names[:8])}{', ...' if num_classes > 8 else ''}" \
            if class_names else ""
        classes = f"{num_classes} classes{names}"
    params = sum(p.numel() for p in model.parameters())
    objective = o.kind if o.kind != "meanflow" else (
        f"meanflow (p={o.p:g}, c={o.c:g}, r != t for {o.fraction_r_neq_t:.0%}, du/dt "
        f"{loss_info.get('jvp', o.jvp)})")
    ema = ", ".join(f"{d:g}" for d in tr.ema_decays)
    begun = f"from step {start} to {steps}" if start else f"{steps:,}"
    return "\n".join([
        f"meanflow train: {run_dir}",
        f"  data       {cfg.data.name}: {count} of shape {tuple(shape)}, {classes}",
        f"  model      {cfg.model.name}: {params:,} parameters, on {device}",
        f"  objective  {objective}",
        f"  steps      {begun}, batch {tr.batch_size}, lr {cfg.optim.lr:g}"
        f"{f' (warm-up {cfg.optim.warmup_steps})' if cfg.optim.warmup_steps else ''}, "
        f"EMA {ema}{' with warm-up' if tr.ema_warmup else ''} (sampling uses "
        f"{tr.ema_decays[0]:g})",
    ])


class TrainLog:
    """metrics.jsonl (rank 0 writes), TensorBoard (rank 0, ``train.tensorboard``) and the
    progress bar (rank 0, ``train.progress``) of a run that starts at step ``start`` of
    ``steps``. ``first`` is added to the first line this process writes (e.g. the du/dt
    strategy that ran).

    The running window (the stats summed since the last line, the steps in it, the skipped
    steps of the run and the lowest window mean of the raw error) is part of each checkpoint
    (:meth:`state`; ``window`` restores it), so the lines of a resumed run are those of an
    uninterrupted one (docs/design.md, Run folders, checkpoints and resume)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, world: World, device: torch.device,
                 start: int, steps: int, first: dict[str, Any] | None = None,
                 window: dict[str, Any] | None = None) -> None:
        tr = cfg.train
        self.cfg, self.world, self.device = cfg, world, device
        self.path = run_dir / "metrics.jsonl"
        self.first = dict(first or {})
        self.writer = tensorboard_writer(run_dir) if (tr.tensorboard and world.is_main) else None
        self.bar = None
        if tr.progress and world.is_main:
            self.bar = tqdm(total=steps, initial=start, desc=cfg.objective.kind, unit="step",
                            dynamic_ncols=True, disable=None)  # None: off when not a tty
        self.sums: dict[str, Tensor] = {}   # summed on the device; read back only when logging
        self.count, self.skipped = 0, 0
        self.lowest: tuple[float, int] | None = None    # (lowest window mean of mse, its step)
        self.warned = False
        self.postfix: dict[str, str] = {}   # the latest evaluation, on the bar
        if window is not None:
            self.sums = {k: torch.tensor(v, dtype=getattr(torch, window["dtypes"][k]),
                                         device=device) for k, v in window["sums"].items()}
            self.count, self.skipped = window["count"], window["skipped"]
            self.lowest = None if window["lowest"] is None else tuple(window["lowest"])
        self.timed = 0                      # steps of the window timed by this process
        self.t_window = time.perf_counter()
        # the summary's speed: timed from the end of the first step (train.progress only)
        self.start, self.steps, self.t_first = start, steps, None
        self.speed = tr.progress and world.is_main and steps - start > SPEED_STEPS + 1

    def step(self, done: int, stats: dict[str, Tensor] | None) -> None:
        """After each step: its stats (None: skipped, non-finite) into the window's sums."""
        if stats is None:
            self.skipped += 1
        else:
            if self.lowest is None and "mse" in stats:
                # the raw error of the untrained network: the run's first reference
                self.lowest = (float(mean_across({"mse": stats["mse"]}, self.world,
                                                 self.device)["mse"]), done)
            for k, v in stats.items():
                self.sums[k] = self.sums[k] + v.detach() if k in self.sums else v.detach()
            self.count += 1
            self.timed += 1
        if self.speed:
            self._time(done)
        if self.bar is None:
            return
        self.bar.update(1)
        if stats is not None and done % max(1, min(self.cfg.train.log_every, 10)) == 0:
            rate = self.bar.format_dict.get("rate") or 0.0
            self.bar.set_postfix(loss=f"{float(stats['loss']):.4g}",
                                 mse=f"{float(stats['mse']):.4g}",
                                 img_s=f"{rate * self.cfg.train.batch_size:.0f}",
                                 **self.postfix, refresh=False)

    def _time(self, done: int) -> None:
        """The start-up summary's last line, once: the time per step measured over the
        ``SPEED_STEPS`` steps after the first, and what the rest of the run should take."""
        now = time.perf_counter()
        if done == self.start + 1:
            self.t_first = now
        elif done == self.start + 1 + SPEED_STEPS and self.t_first is not None:
            per_step = (now - self.t_first) / SPEED_STEPS
            left = self.steps - done
            tqdm.write(f"  speed      {per_step:.3g} s/step (steps {self.start + 2} to {done}): "
                       f"about {_duration(per_step * left)} for the {left:,} steps left",
                       file=sys.stderr)
            self.speed = False

    def state(self) -> dict[str, Any]:
        """The running window, for ``state.json`` (a collective: every rank calls it; the
        sums are the means over the ranks, which every rank restores)."""
        sums = mean_across(self.sums, self.world, self.device)
        return {"sums": {k: float(v) for k, v in sums.items()},
                "dtypes": {k: str(self.sums[k].dtype).removeprefix("torch.") for k in sums},
                "count": self.count, "skipped": self.skipped,
                "lowest": None if self.lowest is None else list(self.lowest)}

    def window(self, done: int, lr: float) -> None:
        """The line of the window that ends after step ``done`` (a collective: every rank
        calls it); the window restarts. A raw error far above the run's lowest gets one
        warning line (:func:`meanflow.train.guard.explosion_warning`)."""
        sums = mean_across(self.sums, self.world, self.device)   # the mean over the ranks
        now = time.perf_counter()
        batch = self.cfg.train.batch_size
        record: dict[str, Any] = {"step": done, "images": done * batch}
        record.update({k: float(v) / max(self.count, 1) for k, v in sums.items()})
        record["lr"] = lr
        record["samples_per_s"] = self.timed * batch / max(now - self.t_window, 1e-9)
        record["skipped_nonfinite"] = self.skipped
        record.update(self.first)
        self.first = {}
        self._write(record)
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, done)
        self._watch(record)
        self.sums, self.count, self.timed, self.t_window = {}, 0, 0, now

    def _watch(self, record: dict[str, Any]) -> None:
        if self.count == 0 or not isinstance(record.get("mse"), float):
            return
        warning = explosion_warning(self.cfg, record, self.lowest)
        if warning is not None and not self.warned and self.world.is_main:
            tqdm.write(warning, file=sys.stderr)
            self.warned = True
        if self.lowest is None or record["mse"] < self.lowest[0]:
            self.lowest = (record["mse"], record["step"])

    def evaluation(self, record: dict[str, Any] | None) -> None:
        """An evaluation record (FID; None off rank 0) into metrics.jsonl and TensorBoard."""
        if record is None:
            return
        self._write(record)
        done = record["step"]
        scores = {k: v for k, v in record.items()
                  if k.startswith(("fid_nfe", "kid_nfe", "energy_nfe")) and v is not None}
        if self.writer is not None:
            for k, v in scores.items():
                self.writer.add_scalar(f"eval/{k}", v, done)
        if "energy_nfe1" in record:    # shown beside the loss until the next evaluation
            value = scores.get("energy_nfe1")
            self.postfix["energy"] = "nan" if value is None else f"{value:.3g}"
        if self.bar is not None:
            self.bar.write(f"step {done}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in scores.items() if not k.startswith("kid")))

    def describe(self, what: str | None) -> None:
        """The bar's description: the objective, and what runs now (e.g. "FID")."""
        if self.bar is not None:
            kind = self.cfg.objective.kind
            self.bar.set_description(kind if what is None else f"{kind} ({what})")

    def not_training(self, seconds: float) -> None:
        """Keeps ``seconds`` (sampling, FID) out of the window's images/s."""
        self.t_window += seconds

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()

    def _write(self, record: dict[str, Any]) -> None:
        if self.world.is_main:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Evaluations:
    """FID during training and the sample PNGs of a run, from the first EMA. Built before the
    run folder is written: a missing FID reference or extractor stops the run; a latent VAE
    that does not load turns the PNGs off with a warning (FID cannot do without it)."""

    def __init__(self, cfg: RunConfig, ds: Any, shape: tuple[int, ...],
                 num_classes: int | None, device: torch.device, world: World) -> None:
        tr = cfg.train
        self.cfg, self.shape, self.num_classes, self.device = cfg, shape, num_classes, device
        self.decode, self.pngs = None, tr.sample_count > 0
        if tr.fid_every > 0:
            self.decode = fid_decoder(ds, device)
        elif self.pngs:
            try:
                self.decode = latent_decoder(ds, device)
            except (DataError, ConfigError) as exc:
                if world.is_main:
                    print(f"warning: sample PNGs are off, the latents' VAE does not load "
                          f"({exc})", file=sys.stderr)
                self.pngs = False
        self.fid = (FIDMonitor(cfg, shape, num_classes, device, self.decode)
                    if tr.fid_every > 0 else None)
        # point data: the energy distance to data it does not train on (train/energy.py)
        self.energy = (EnergyMonitor(cfg, ds, shape, num_classes)
                       if tr.energy_every > 0 and len(shape) == 1 else None)

    @property
    def active(self) -> bool:
        """Whether the run samples at all (and so needs a sampling copy of the network)."""
        return self.pngs or self.fid is not None or self.energy is not None

    def __call__(self, done: int, steps: int, sampler_net: nn.Module | None, ema: EMA,
                 run_dir: Path, world: World, log: TrainLog) -> None:
        """After step ``done``: what is due of FID (every ``fid_every`` and at the end) and the
        PNGs (every ``sample_every`` and at the end), on ``sampler_net`` with the weights of
        ``ema``'s first average (under FSDP gathered from the shards); a collective (every
        rank samples its share)."""
        tr, last = self.cfg.train, done == steps
        fid = self.fid is not None and (last or done % tr.fid_every == 0)
        pngs = self.pngs and (last or (tr.sample_every > 0 and done % tr.sample_every == 0))
        energy = self.energy is not None and done % tr.energy_every == 0
        if not (fid or pngs or energy):
            return
        weights = sampling_ema(ema, tr.fsdp)
        if energy:
            t0 = time.perf_counter()
            log.evaluation(self.energy(sampler_net, weights, done, self.device, world))
            log.not_training(time.perf_counter() - t0)
        if fid:
            t0 = time.perf_counter()
            log.describe("FID")
            log.evaluation(self.fid(sampler_net, weights, done, world))   # None off rank 0
            log.describe(None)
            log.not_training(time.perf_counter() - t0)
        if pngs:
            t0 = time.perf_counter()
            sample_pngs(run_dir, done, sampler_net, weights, self.cfg, self.shape,
                        self.num_classes, self.device, log.writer, world, self.decode)
            log.not_training(time.perf_counter() - t0)
