"""The checks of a run's settings (:meth:`meanflow.runs.config.RunConfig.validate`): each
setting is checked here, once, with a one-line ConfigError naming it and what it accepts.
The objective's and the augmentation's settings are checked by constructing what they
describe, whose own checks then run (docs/design.md, "Inputs")."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from typing import Any

from meanflow.data.augment import EDMAugment
from meanflow.errors import ConfigError
from meanflow.models import attention
from meanflow.sampling import SEED_LIMIT  # seeds are 64-bit unsigned in every command

__all__ = ["validate_run", "OBJECTIVES", "DATA_ORDERS", "AMP_MODES", "SEED_LIMIT"]

OBJECTIVES = ("meanflow", "imf", "flow_matching")
DATA_ORDERS = ("epochs", "random")
AMP_MODES = ("none", "bf16")


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


def _objective(cfg: Any) -> None:
    """The objective's settings, checked by constructing the loss (every setting of the kind's
    loss, then the MeanFlow and iMF ones the run's config keeps too whatever the kind);
    guidance needs labels, which the data gives."""
    o = cfg.objective
    _choice("objective.kind", o.kind, OBJECTIVES)
    # a stand-in class count: the data's is known when training starts
    o.build(num_classes=1)
    if o.kind != "meanflow":
        dataclasses.replace(o, kind="meanflow").build(num_classes=1)
    if o.kind != "imf":     # iMF's own settings (its sampler of t and r is always LN)
        dataclasses.replace(o, kind="imf", time_sampler="logit_normal").build(num_classes=1)
    if o.kind == "imf" and (o.omega != 1 or o.kappa != 0):
        raise ConfigError("objective.omega and kappa are MeanFlow's guidance in the target; "
                          "iMF draws ω per sample (objective.omega_range) and takes the scale "
                          "at sampling time (meanflow sample --guidance): set omega=1, kappa=0")
    if (o.omega != 1 or o.kappa != 0) and not cfg.data.class_conditional:
        raise ConfigError("guidance (objective.omega != 1 or kappa != 0) needs labels: set "
                          "data.class_conditional=true, or omega=1 and kappa=0")


def validate_run(cfg: Any) -> None:
    """Checks every setting of a :class:`~meanflow.runs.config.RunConfig` (what its
    ``validate()`` runs); the first bad one is a one-line ConfigError naming it."""
    o, opt, tr = cfg.objective, cfg.optim, cfg.train
    if not isinstance(cfg.model.name, str) or not cfg.model.name:
        raise ConfigError(f"model.name={cfg.model.name!r} must be a backbone name, e.g. mlp "
                          "or unet-tiny, or auto (the data's: mlp for points, unet-tiny for "
                          "images)")
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
    if tr.fsdp and o.kind != "flow_matching" and o.jvp == "forward_ad":
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
