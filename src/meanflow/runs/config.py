"""Typed run configuration: nested dataclasses, saved as plain JSON/YAML beside each run.

A config is built from defaults, then a YAML/JSON file, then dotted overrides such as
``objective.p=0.5``; ``validate()`` checks every value and raises a one-line ConfigError. The
objective's settings and the augmentation's are checked by constructing what they describe
(:meth:`ObjectiveConfig.build`, :class:`~meanflow.data.EDMAugment`), whose messages are given
with the setting's full name (``objective.p=...``); :mod:`meanflow.runs.checks` holds the
checks, this module the settings and their defaults.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from meanflow.data.latents import is_latent_folder
from meanflow.errors import ConfigError
from meanflow.objective import FlowMatchingLoss, IMFLoss, MeanFlowLoss
from meanflow.runs.checks import AMP_MODES, OBJECTIVES, SEED_LIMIT, validate_run

__all__ = ["ModelConfig", "DataConfig", "ObjectiveConfig", "OptimConfig", "TrainConfig",
           "RunConfig", "load_config", "apply_overrides", "train_bytes", "OBJECTIVES",
           "AMP_MODES", "SEED_LIMIT"]


# Settings removed from the config: (the one value still read, from the config.json of runs
# made before the removal, where it was the default; where the setting went).
REMOVED = {
    "objective.tangent": ("v01", "the wrong tangents of paper Tab. 1b are "
                          "MeanFlowLoss(tangent=...), given to train(loss_fn=...) in Python "
                          "(experiments/toy_ablations.py)"),
}


#: What ``objective.kind: imf`` changes in the defaults of the settings it shares with
#: MeanFlow (official iMF code, docs/imf.md §7): half the rows with r = t, the first ones, the
#: dropped labels among them, and the adaptive weight's offset 0.01.
IMF_DEFAULTS = {"fraction_r_neq_t": 0.5, "c": 0.01, "r_eq_t_rows": "first",
                "label_drop_rows": "first"}


@dataclass
class ModelConfig:
    name: str = "auto"            # registry name (meanflow.models), or "auto": mlp for
                                  # points, unet-tiny for images (C, H, W), resolved from the
                                  # data when training starts (runs.build.resolve_model)
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
    kind: str = "meanflow"        # "meanflow", "imf" (improved MeanFlow, docs/imf.md) or
                                  # the "flow_matching" baseline
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
    # imf only (docs/imf.md §3); kind imf also changes the defaults of fraction_r_neq_t, c
    # and the row layouts to its own (IMF_DEFAULTS) unless they are given
    imf_variant: str = "v_head"   # "v_head" (a second head predicts v) or "boundary" (v̂ is u
                                  # at h = 0: no extra parameters)
    omega_range: list[float] = field(default_factory=lambda: [1.0, 8.0])  # ω drawn per sample
    omega_beta: float = 1.0       # ω's density ∝ ω^-beta on omega_range (1: log-uniform)
    t_min_range: list[float] = field(default_factory=lambda: [0.0, 0.5])  # guidance interval
    t_max_range: list[float] = field(default_factory=lambda: [0.5, 1.0])  # ends, uniform

    def build(self, num_classes: int | None = None, *, jvp: str | None = None,
              **changes: Any) -> MeanFlowLoss | IMFLoss | FlowMatchingLoss:
        """The loss these settings describe, for ``num_classes`` classes (None:
        unconditional): a :class:`MeanFlowLoss`, :class:`IMFLoss` or
        :class:`FlowMatchingLoss`.

        ``jvp`` replaces ``self.jvp`` (not flow matching; the training loop passes the strategy
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
            if self.kind == "imf":
                return IMFLoss(variant=self.imf_variant, time_sampler=self.time_sampler,
                               mu=self.mu, sigma=self.sigma,
                               fraction_r_neq_t=self.fraction_r_neq_t,
                               r_eq_t_rows=self.r_eq_t_rows,
                               omega_range=tuple(self.omega_range), beta=self.omega_beta,
                               t_min_range=tuple(self.t_min_range),
                               t_max_range=tuple(self.t_max_range),
                               label_drop=self.label_drop,
                               label_drop_rows=self.label_drop_rows, num_classes=num_classes,
                               p=self.p, c=self.c, jvp=self.jvp if jvp is None else jvp,
                               jvp_precision=self.jvp_precision, **changes)
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
            # IMFLoss calls two settings by shorter names than the config
            aliases = {"variant": "imf_variant", "beta": "omega_beta"} if self.kind == "imf" \
                else {}
            raise _named("objective", keys, exc, aliases) from None


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
        validate_run(self)
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


def _named(section: str, keys: list[str], exc: ConfigError,
           aliases: dict[str, str] | None = None) -> ConfigError:
    """A constructor's ConfigError, whose message starts with the keyword it checked (or
    "unknown <keyword>"), with that keyword as the setting's full name ``section.keyword``;
    ``aliases`` maps a constructor's keyword to the setting's name where they differ."""
    msg = str(exc)
    aliases = aliases or {}
    names = "|".join(sorted(map(re.escape, [*keys, *aliases]), key=len, reverse=True))
    named = re.sub(rf"^(unknown )?({names})\b",
                   lambda m: f"{m[1] or ''}{section}.{aliases.get(m[2], m[2])}", msg, count=1)
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
    objective = d.get("objective")
    if isinstance(objective, dict) and objective.get("kind") == "imf":
        for key, value in IMF_DEFAULTS.items():     # iMF's own, where not given
            objective.setdefault(key, value)
    return RunConfig.from_dict(d).validate()


def _drop_foreign_data_options(d: dict[str, Any], overrides: list[str]) -> None:
    """A file's ``data.options`` are keyword arguments of its ``data.name`` (a preset's
    ``split: train`` for fashion-mnist): overrides naming other data drop them, so
    ``--preset fmnist-unet --data my_folder`` works. Options in the overrides are kept, and so
    is ``channel_norm`` when the other data is a latent folder too: it belongs to the recipe
    (the iMF presets' latent normalisation), not to one folder."""
    data, probe = d.get("data"), apply_overrides(copy.deepcopy(d), overrides).get("data")
    if (isinstance(data, dict) and "options" in data and isinstance(probe, dict)
            and probe.get("name") != data.get("name", DataConfig.name)):
        options, name = data.pop("options"), probe.get("name")
        if (isinstance(options, dict) and "channel_norm" in options and isinstance(name, str)
                and is_latent_folder(name)):
            data["options"] = {"channel_norm": options["channel_norm"]}


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
