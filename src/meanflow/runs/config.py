"""Typed run configuration: nested dataclasses, saved as plain JSON/YAML beside each run.

A config is built from defaults, then a YAML/JSON file, then dotted overrides such as
``objective.p=0.5``; ``validate()`` checks every value and raises a one-line ConfigError. The
objective's settings and the augmentation's are checked by constructing what they describe
(:meth:`ObjectiveConfig.build`, :class:`~meanflow.data.EDMAugment`), whose messages are given
with the setting's full name (``objective.p=...``).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from meanflow.data.augment import EDMAugment
from meanflow.errors import ConfigError
from meanflow.models import attention
from meanflow.objective import FlowMatchingLoss, MeanFlowLoss
from meanflow.sampling import SEED_LIMIT  # seeds are 64-bit unsigned in every command

__all__ = ["ModelConfig", "DataConfig", "ObjectiveConfig", "OptimConfig", "TrainConfig",
           "RunConfig", "load_config", "apply_overrides", "train_bytes", "OBJECTIVES",
           "AMP_MODES", "SEED_LIMIT"]

OBJECTIVES = ("meanflow", "flow_matching")
DATA_ORDERS = ("epochs", "random")
AMP_MODES = ("none", "bf16")

# Settings removed from the config: (the one value still read, from the config.json of runs
# made before the removal, where it was the default; where the setting went).
REMOVED = {
    "objective.tangent": ("v01", "the wrong tangents of paper Tab. 1b are "
                          "MeanFlowLoss(tangent=...), given to train(loss_fn=...) in Python "
                          "(experiments/toy_ablations.py)"),
}


@dataclass
class ModelConfig:
    name: str = "mlp"                                      # registry name (meanflow.models)
    options: dict[str, Any] = field(default_factory=dict)  # the backbone's own config fields
    jvp_attention: str | None = None  # attention in the JVP pass (meanflow.models.attention
                                      # JVP_ATTENTION_IMPLS, e.g. "chunked"); None: "math"


@dataclass
class DataConfig:
    name: str = "8gaussians"      # toy name, or the path of a .npy/.npz/.csv file
    class_conditional: bool = False  # feed labels (mixture component / file labels) to the net
    options: dict[str, Any] = field(default_factory=dict)  # dataset keyword arguments
    augment: float = 0.0          # EDM augmentation probability p (images; 0 = off); its
                                  # label conditions the net (U-Net augment_dim)
    augment_options: dict[str, Any] = field(default_factory=dict)  # EDMAugment weights and
                                  # spreads; {} is the official MeanFlow CIFAR-10 set (y-flips
                                  # and rotations off, 6-wide label)
    order: str = "epochs"         # "epochs": a fresh permutation each epoch, batches without
                                  # replacement, the last partial batch dropped (both official
                                  # codes); "random": every batch drawn with replacement.
                                  # Endless toy sources draw fresh points either way


@dataclass
class ObjectiveConfig:
    kind: str = "meanflow"        # "meanflow" or the "flow_matching" baseline
    time_sampler: str = "logit_normal"
    mu: float = -0.4              # LN(mu, sigma) for t and r (paper Tab. 1d)
    sigma: float = 1.0
    mu_r: float = -4.0            # r's LN for the "v1" sampler only
    sigma_r: float = 1.6
    fraction_r_neq_t: float = 0.25  # paper Tab. 1a
    p: float = 1.0                # adaptive-weight power (Tab. 1e)
    c: float = 1e-3               # adaptive-weight offset
    omega: float = 1.0            # guidance in the target; 1 = none
    kappa: float = 0.0
    t_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    label_drop: float = 0.1       # class dropout to the null class (class-conditional only)
    r_eq_t_rows: str = "random"   # "random": each sample keeps r != t with probability
                                  # fraction_r_neq_t (official PyTorch); "first": exactly
                                  # int(B * (1 - fraction_r_neq_t)) rows, the first of each
                                  # batch, get r = t (official JAX)
    label_drop_rows: str = "random"  # "random": each label dropped with probability
                                  # label_drop; "first": Binomial(B, label_drop) labels, those
                                  # of the first rows (official JAX: with r_eq_t_rows "first",
                                  # a dropped label always has r = t)
    jvp: str = "auto"             # du/dt strategy, meanflow.objective.jvp.JVP_CHOICES: "auto"
                                  # (forward_ad on the CPU for U-Net/DiT, else split; resolved
                                  # once when training starts), "split", "func", "forward_ad"
    jvp_precision: str = "fp32"   # under train.amp: "fp32" keeps the JVP pass out of autocast,
                                  # "amp" runs it in bf16 too (a joint strategy's one pass
                                  # then stays under autocast as a whole)

    def build(self, num_classes: int | None = None, *, jvp: str | None = None,
              **changes: Any) -> MeanFlowLoss | FlowMatchingLoss:
        """The loss these settings describe, for ``num_classes`` classes (None:
        unconditional): a :class:`MeanFlowLoss` or a :class:`FlowMatchingLoss`.

        ``jvp`` replaces ``self.jvp`` (MeanFlow only; the training loop passes the strategy
        it resolved "auto" to). ``changes`` are further constructor arguments, e.g.
        ``tangent="v10"`` (a wrong tangent of paper Tab. 1b, for ablations: the config does
        not offer it). The constructors check every value; their one-line ConfigErrors name
        the setting as ``objective.<key>``."""
        try:
            if self.kind == "flow_matching":
                return FlowMatchingLoss(time_sampler=self.time_sampler, mu=self.mu,
                                        sigma=self.sigma, label_drop=self.label_drop,
                                        num_classes=num_classes,
                                        label_drop_rows=self.label_drop_rows, **changes)
            return MeanFlowLoss(time_sampler=self.time_sampler, mu=self.mu, sigma=self.sigma,
                                mu_r=self.mu_r, sigma_r=self.sigma_r,
                                fraction_r_neq_t=self.fraction_r_neq_t, p=self.p, c=self.c,
                                omega=self.omega, kappa=self.kappa,
                                t_interval=self.t_interval,
                                label_drop=self.label_drop, num_classes=num_classes,
                                jvp=self.jvp if jvp is None else jvp,
                                jvp_precision=self.jvp_precision,
                                r_eq_t_rows=self.r_eq_t_rows,
                                label_drop_rows=self.label_drop_rows, **changes)
        except ConfigError as exc:
            keys = [f.name for f in dataclasses.fields(self)] + list(changes)
            raise _named("objective", keys, exc) from None


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 0         # linear warm-up, then constant (the paper's schedules)
    grad_clip: float | None = None  # max global grad norm; None disables clipping


@dataclass
class TrainConfig:
    steps: int = 2000             # training length in optimiser steps, unless one of:
    epochs: float | None = None   #   passes over the dataset (finite datasets), or
    images: int | None = None     #   training images seen; either one overrides steps
    batch_size: int = 256         # global batch per optimiser step
    grad_accumulation: int = 1    # micro-batches per step (batch_size must divide evenly)
    amp: str = "none"             # "bf16": autocast the network (the JVP: objective.jvp_precision)
    compile: bool | str = False   # torch.compile the loss; du/dt is checked against eager.
                                  # "auto": on when the device is CUDA
    tf32: bool = False            # CUDA: TF32 matmuls and convolutions (the official
                                  # PyTorch code's float32_matmul_precision "high")
    fsdp: bool = False            # torchrun: shard weights, gradients and Adam state (FSDP2)
    seed: int = 0
    ema_decays: list[float] = field(default_factory=lambda: [0.999])
    ema_every: int = 1            # update the EMAs every N steps with decay**N (official
                                  # PyTorch CIFAR-10: 16)
    ema_warmup: bool = True       # k-th update's decay min(decay**N, (k-1)/(k+9)), so no EMA
                                  # keeps the initial weights (docs/method.md, EMA warm-up)
    log_every: int = 50           # lines appended to metrics.jsonl
    checkpoint_every: int = 1000  # and always at the last step
    keep_checkpoints: int = 2     # newest periodic checkpoints kept (0 keeps all)
    device: str = "auto"          # "auto" picks CUDA when available
    progress: bool = True         # tqdm bar
    sample_every: int = 0         # PNG of samples from fixed seeds every N steps (0: at the end)
    sample_count: int = 64        # samples in each PNG
    sample_steps: list[int] = field(default_factory=lambda: [1, 2])  # NFEs drawn each time
    tensorboard: bool = False     # also log to run_dir/tensorboard (needs `tensorboard`)
    fid_every: int = 0            # FID/KID of EMA samples every N steps into metrics.jsonl (0 off)
    fid_ref: str | None = None    # reference stats from `meanflow fid ref` (names the extractor)
    fid_n: int = 1000             # samples per evaluation (seeds 0..N-1, the same every time)
    fid_steps: list[int] = field(default_factory=lambda: [1])  # NFEs evaluated
    energy_every: int = 250       # point data: energy distance of energy_n one-step EMA
                                  # samples to held-out data every N steps (0 off)
    energy_n: int = 2000          # samples (seeds 0..N-1) and reference points


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        return _from_dict(cls, d, "")

    def validate(self) -> "RunConfig":
        _validate(self)
        return self


def _from_dict(cls: type, d: Any, prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"config section {prefix or '<root>'!r} must be a mapping, got "
                          f"{type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    d = _without_removed(d, prefix)
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}: "
                          f"valid keys here are {', '.join(prefix + k for k in fields)}")
    kwargs = {}
    for name, value in d.items():
        f = fields[name]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            kwargs[name] = _from_dict(sub, value, f"{prefix}{name}.")
        else:
            if "float" in str(f.type):
                value = _coerce_floats(value)
            elif name in ("options", "augment_options") and isinstance(value, dict):
                value = {k: _coerce_floats(v) for k, v in value.items()}
            kwargs[name] = value
    return cls(**kwargs)


def _without_removed(d: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``d`` without the :data:`REMOVED` settings that hold the value they still read as;
    another value of one is refused."""
    out = {}
    for name, value in d.items():
        if prefix + name in REMOVED:
            kept, where = REMOVED[prefix + name]
            if value == kept:
                continue
            raise ConfigError(f"{prefix}{name}={value!r} is no longer a config setting (only "
                              f"{kept!r} is read, from runs made before): {where}")
        out[name] = value
    return out


def _named(section: str, keys: list[str], exc: ConfigError) -> ConfigError:
    """A constructor's ConfigError, whose message starts with the keyword it checked (or
    "unknown <keyword>"), with that keyword as the setting's full name ``section.keyword``."""
    msg = str(exc)
    names = "|".join(sorted(map(re.escape, keys), key=len, reverse=True))
    named = re.sub(rf"^(unknown )?({names})\b", rf"\g<1>{section}.\g<2>", msg, count=1)
    return ConfigError(named if named != msg else f"{section}: {msg}")


def _coerce_floats(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; read it as the number it means."""
    if isinstance(value, list):
        return [_coerce_floats(v) for v in value]
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = d
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies ``section.key=value`` strings; values are parsed as YAML (numbers, lists, null)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value "
                              "(for example objective.p=0.5)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except (yaml.YAMLError, RecursionError):
            value = raw
        _set_dotted(d, key.strip(), value)
    return d


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML/JSON file <- dotted overrides, validated."""
    d: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}; give the path of a YAML or "
                              "JSON file")
        try:
            loaded = yaml.safe_load(path.read_text())  # JSON is a subset of YAML
        except RecursionError:
            raise ConfigError(f"config file {path} is nested too deeply to read: a config "
                              "has two levels (section.key)") from None
        except yaml.YAMLError as exc:
            line = str(exc).splitlines()[0]
            raise ConfigError(f"config file {path} is not valid YAML/JSON ({line})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not text: give a YAML or JSON "
                              "file") from None
        if loaded is not None:
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {path} must hold a mapping of sections")
            d = loaded
    _drop_foreign_data_options(d, overrides or [])
    apply_overrides(d, overrides or [])
    return RunConfig.from_dict(d).validate()


def _drop_foreign_data_options(d: dict[str, Any], overrides: list[str]) -> None:
    """A file's ``data.options`` are keyword arguments of its ``data.name`` (a preset's
    ``split: train`` for fashion-mnist): overrides naming other data drop them, so
    ``--preset fmnist-unet --data my_folder`` works. Options in the overrides are kept."""
    data, probe = d.get("data"), apply_overrides(copy.deepcopy(d), overrides).get("data")
    if (isinstance(data, dict) and "options" in data and isinstance(probe, dict)
            and probe.get("name") != data.get("name", DataConfig.name)):
        del data["options"]


def _number(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, integer: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name}={value!r} must be {kind}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{name}={value!r} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{name}={value!r} must be <= {hi}")


def _step_counts(name: str, value: Any) -> None:
    if (not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in value)):
        raise ConfigError(f"{name}={value!r} must be a list of positive step counts, "
                          "e.g. [1, 2]")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}: choose one of {', '.join(choices)}")


def _jvp_attention(value: Any) -> None:
    # read at call time: the tuple of implementations may grow (e.g. a GPU kernel)
    impls = attention.JVP_ATTENTION_IMPLS
    if value is not None and value not in impls:
        raise ConfigError(f"unknown model.jvp_attention {value!r}: choose one of "
                          f"{', '.join(impls)}, or null for the default (math)")


def _augment(p: Any, options: Any) -> None:
    """data.augment is EDMAugment's p and data.augment_options its other keyword arguments;
    it checks their values (its messages, "augment <keyword>=...", name the setting)."""
    if not isinstance(options, dict):
        raise ConfigError("data.augment_options must be a mapping of EDMAugment settings, "
                          "e.g. {yflip: 1, rotate_frac: 1}")
    try:
        EDMAugment(p=p, **options)
    except TypeError:
        accepted = [n for n in inspect.signature(EDMAugment).parameters if n != "p"]
        unknown = sorted(set(options) - set(accepted))
        raise ConfigError(f"unknown data.augment_options {', '.join(unknown)}: choose from "
                          f"{', '.join(accepted)}") from None
    except ConfigError as exc:
        msg = re.sub(r"^augment (\w+)", lambda m: "data.augment" if m[1] == "p"
                     else f"data.augment_options.{m[1]}", str(exc), count=1)
        raise ConfigError(msg) from None


def _objective(cfg: RunConfig) -> None:
    """The objective's settings, checked by constructing the loss (every setting of the kind's
    loss, then, for flow matching, the MeanFlow ones it keeps in the run's config too);
    guidance needs labels, which the data gives."""
    o = cfg.objective
    _choice("objective.kind", o.kind, OBJECTIVES)
    # a stand-in class count: the data's is known when training starts
    o.build(num_classes=1)
    if o.kind != "meanflow":
        dataclasses.replace(o, kind="meanflow").build(num_classes=1)
    if (o.omega != 1 or o.kappa != 0) and not cfg.data.class_conditional:
        raise ConfigError("guidance (objective.omega != 1 or kappa != 0) needs labels: set "
                          "data.class_conditional=true, or omega=1 and kappa=0")


def train_bytes(cfg: RunConfig, num_params: int, sample_numel: int, world_size: int = 1) -> int:
    """A lower bound of the memory one process needs to train: float32 weights, gradients,
    Adam's two moments and every EMA (sharded over ``world_size`` under FSDP), plus four
    tensors of a batch (data, noise, z, target) of this process's share of the global batch.
    Compared with the machine's memory before any work starts (docs/design.md, "Inputs")."""
    tr = cfg.train
    copies = 4 + len(tr.ema_decays)
    shards = world_size if tr.fsdp else 1
    per_rank = -(-tr.batch_size // max(1, world_size))
    return 4 * (copies * num_params // shards + 4 * per_rank * sample_numel)


def _validate(cfg: RunConfig) -> None:
    o, opt, tr = cfg.objective, cfg.optim, cfg.train
    if not isinstance(cfg.model.name, str) or not cfg.model.name:
        raise ConfigError(f"model.name={cfg.model.name!r} must be a backbone name, e.g. mlp "
                          "or unet-cifar10")
    if not isinstance(o.kind, str) or not isinstance(o.time_sampler, str):
        raise ConfigError("objective.kind and objective.time_sampler must be names, e.g. "
                          "meanflow and logit_normal")
    _objective(cfg)
    if not isinstance(cfg.data.name, str) or not cfg.data.name:
        raise ConfigError("data.name must be a toy dataset name or a file path")
    if not isinstance(cfg.data.class_conditional, bool):
        raise ConfigError("data.class_conditional must be true or false")
    _jvp_attention(cfg.model.jvp_attention)
    for section, value in (("model.options", cfg.model.options),
                           ("data.options", cfg.data.options),
                           ("data.augment_options", cfg.data.augment_options)):
        if not isinstance(value, dict):
            raise ConfigError(f"{section} must be a mapping of keyword arguments")
    _number("optim.lr", opt.lr, lo=0, lo_open=True)
    if (not isinstance(opt.betas, (list, tuple)) or len(opt.betas) != 2
            or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in opt.betas)):
        raise ConfigError(f"optim.betas={opt.betas!r} must be two numbers in [0, 1), "
                          "e.g. [0.9, 0.999]")
    _number("optim.weight_decay", opt.weight_decay, lo=0)
    _number("optim.warmup_steps", opt.warmup_steps, lo=0, integer=True)
    if opt.grad_clip is not None:
        _number("optim.grad_clip", opt.grad_clip, lo=0, lo_open=True)
    _number("train.steps", tr.steps, lo=1, integer=True)
    if tr.epochs is not None and tr.images is not None:
        raise ConfigError("give the training length once: train.epochs or train.images "
                          "(or neither, to use train.steps), not both")
    if tr.epochs is not None:
        _number("train.epochs", tr.epochs, lo=0, lo_open=True)
    if tr.images is not None:
        _number("train.images", tr.images, lo=1, integer=True)
    _number("train.batch_size", tr.batch_size, lo=1, integer=True)
    _number("train.grad_accumulation", tr.grad_accumulation, lo=1, integer=True)
    if tr.batch_size % tr.grad_accumulation:
        raise ConfigError(f"train.batch_size={tr.batch_size} is not divisible by "
                          f"train.grad_accumulation={tr.grad_accumulation}: the global batch "
                          "is split into equal micro-batches")
    _choice("train.amp", tr.amp, AMP_MODES)
    if not isinstance(tr.compile, bool) and tr.compile != "auto":
        raise ConfigError(f"train.compile={tr.compile!r} must be true, false or auto (on for "
                          "CUDA devices)")
    if not isinstance(tr.tf32, bool):
        raise ConfigError("train.tf32 must be true or false")
    _number("train.ema_every", tr.ema_every, lo=1, integer=True)
    if not isinstance(tr.ema_warmup, bool):
        raise ConfigError("train.ema_warmup must be true or false")
    if not isinstance(tr.fsdp, bool):
        raise ConfigError("train.fsdp must be true or false")
    if tr.fsdp and tr.compile is True:
        raise ConfigError("train.fsdp with train.compile is not supported: set one of them "
                          "to false (compile: auto leaves compilation off under FSDP)")
    if tr.fsdp and o.kind == "meanflow" and o.jvp == "forward_ad":
        raise ConfigError("objective.jvp=forward_ad fails under train.fsdp (FSDP2's post-backward "
                          "hook has no forward-mode rule that torch accepts: 'A custom Function's "
                          "forward is returning a view ... but the jvp is not returning a view'): "
                          "use objective.jvp=split or func")
    if not isinstance(tr.tensorboard, bool):
        raise ConfigError("train.tensorboard must be true or false")
    _number("train.sample_every", tr.sample_every, lo=0, integer=True)
    _number("train.sample_count", tr.sample_count, lo=0, integer=True)
    _step_counts("train.sample_steps", tr.sample_steps)
    _number("train.fid_every", tr.fid_every, lo=0, integer=True)
    _number("train.fid_n", tr.fid_n, lo=2, integer=True)
    _step_counts("train.fid_steps", tr.fid_steps)
    _number("train.energy_every", tr.energy_every, lo=0, integer=True)
    _number("train.energy_n", tr.energy_n, lo=2, hi=100_000, integer=True)
    if tr.fid_every > 0 and not (isinstance(tr.fid_ref, str) and tr.fid_ref):
        raise ConfigError("train.fid_every > 0 needs train.fid_ref: make reference statistics "
                          "with `meanflow fid ref DATA -o stats.npz` and set train.fid_ref")
    _choice("data.order", cfg.data.order, DATA_ORDERS)
    _augment(cfg.data.augment, cfg.data.augment_options)
    _number("train.seed", tr.seed, lo=0, hi=SEED_LIMIT - 1, integer=True)
    _number("train.log_every", tr.log_every, lo=1, integer=True)
    _number("train.checkpoint_every", tr.checkpoint_every, lo=1, integer=True)
    _number("train.keep_checkpoints", tr.keep_checkpoints, lo=0, integer=True)
    if (not isinstance(tr.ema_decays, (list, tuple))
            or not all(isinstance(d, (int, float)) and 0 < d < 1 for d in tr.ema_decays)):
        raise ConfigError(f"train.ema_decays={tr.ema_decays!r} must be a list of decays in "
                          "(0, 1), e.g. [0.999]")
    if not tr.ema_decays:
        raise ConfigError("train.ema_decays is empty: give at least one decay, e.g. [0.999] "
                          "(samplers use EMA weights)")
    if len({f"{d:g}" for d in tr.ema_decays}) != len(tr.ema_decays):
        raise ConfigError(f"train.ema_decays={tr.ema_decays!r} repeats a decay: list each "
                          "once")
    if not isinstance(tr.device, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?",
                                                             tr.device):
        raise ConfigError(f"train.device={tr.device!r} must be auto, cpu, mps, cuda or cuda:N")
