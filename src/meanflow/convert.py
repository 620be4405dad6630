"""Import of the official PyTorch MeanFlow checkpoints (py-meanflow, CIFAR-10) as meanflow runs.

A py-meanflow checkpoint (``checkpoint-*.pth``, written by ``torch.save``) is a dict:

    model          the training wrapper's state: ``net.*`` (the online U-Net), ``net_ema.*``
                   (the EMA of decay ``args.ema_decay``), ``net_ema1.*``, ``net_ema2.*``, ...
                   (those of ``args.ema_decays``, in order) and ``num_updates`` (optimiser
                   steps taken)
    optimizer, lr_schedule   Adam's and the scheduler's state (not converted: see below)
    epoch          the last finished epoch
    args           the run's ``argparse.Namespace``

The file is read by ``torch.load(weights_only=True)`` with ``argparse.Namespace`` as the only
class allowed beyond tensors and plain containers: a file that needs any other global (which
could run code while unpickling) is refused before anything in it is used.

The U-Net's layout is read off the weight names and shapes (resolution, widths, blocks,
attention, embedding and augmentation-label widths), the official names of every parameter
are derived from that layout, and each one is mapped to meanflow's :class:`UNet`; a key that
maps nowhere, a missing one or a shape that differs is an error, so nothing is skipped
silently. The FIR resampling filters, stored by the official network as buffers, are checked
against meanflow's filter. The result is a run folder that ``meanflow sample`` and
``meanflow fid calc`` take as they are: ``config.json``/``config.yaml`` (the official run's
recipe, read from ``args``) and ``checkpoints/step_<num_updates>/`` with the online weights
and every EMA. Adam's state is left out, so the folder is for sampling and evaluation, not
for ``--resume``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from meanflow import __version__
from meanflow.data.augment import EDMAugment
from meanflow.errors import CheckpointError, ConfigError
from meanflow.models.unet import UNET_PRESETS, UNet, UNetConfig, fir_filter
from meanflow.presets import preset_path
from meanflow.runs.checkpoint import ema_key, save_checkpoint
from meanflow.runs.config import RunConfig, load_config

__all__ = ["OfficialCheckpoint", "read_official_checkpoint", "unet_config_from_state",
           "official_parameter_names", "to_meanflow_weights", "run_config_from_args",
           "convert_official_checkpoint"]

# our parameter name inside a block -> the official one
_BLOCK_NAMES = {"norm0": "norm0", "conv0": "conv0", "emb_proj": "affine", "norm1": "norm1",
                "conv1": "conv1", "skip": "skip", "norm2": "norm2", "attn.qkv": "qkv",
                "attn.proj": "proj"}
_TOP_NAMES = ("map_augment", "map_layer0", "map_layer1")
_NET_PREFIX = re.compile(r"^(net(?:_ema\d*)?)\.(.+)$")


@dataclass
class OfficialCheckpoint:
    """What a py-meanflow checkpoint holds, read safely.

    nets: ``{"net": state, "net_ema": state, "net_ema1": state, ...}`` (official key names).
    args: the run's arguments as a plain dict. epoch: last finished epoch (or None).
    num_updates: optimiser steps taken (or None).
    """
    nets: dict[str, dict[str, Tensor]]
    args: dict[str, Any]
    epoch: int | None
    num_updates: int | None


def _refusal(message: str) -> tuple[str | None, str]:
    """(the global torch's weights-only reader refused, or None; its one-line reason)."""
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", message)
    reason = re.search(r"WeightsUnpickler error:\s*(.+)", message)
    if reason:
        detail = reason.group(1).strip()
    elif "trusted source." in message:   # torch's paragraph on its defaults, then the reason
        detail = message.split("trusted source.", 1)[1]
    else:
        detail = (message.strip().splitlines() or ["?"])[0]
    detail = " ".join(detail.split()).split(" Check the doc")[0].rstrip(".")
    if len(detail) > 160:       # cut at a word, and say so
        detail = detail[:detail.rfind(" ", 0, 160)] + " ..."
    return (found.group(1) if found else None), detail


def read_official_checkpoint(path: str | os.PathLike[str]) -> OfficialCheckpoint:
    """Reads a py-meanflow ``checkpoint-*.pth`` without executing anything in it.

    Raises:
        CheckpointError: the file is missing, not a torch checkpoint, needs a global other
            than ``argparse.Namespace``, or lacks the official keys.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no file at {path}: give the path of a py-meanflow "
                              "checkpoint-*.pth")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")   # e.g. torch's note on unusual pickle protocols
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        name, detail = _refusal(str(exc))
        if name is not None:
            raise CheckpointError(f"{path} holds the global {name}, which meanflow refuses to "
                                  "unpickle (it could run code): only checkpoints of tensors, "
                                  "plain data and argparse.Namespace are read") from None
        raise CheckpointError(f"{path} is not a torch checkpoint that can be read without "
                              f"running code ({detail}): give a py-meanflow checkpoint-*.pth") \
            from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"{path} is not a torch checkpoint that can be read ({first}): "
                              "give a py-meanflow checkpoint-*.pth") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise CheckpointError(f"{path} is not a py-meanflow checkpoint (no 'model' state "
                              "dict): give a checkpoint-*.pth written by its train.py")
    nets: dict[str, dict[str, Tensor]] = {}
    num_updates = None
    for key, value in raw["model"].items():
        if key == "num_updates":
            num_updates = int(value)
            continue
        found = _NET_PREFIX.match(str(key))
        if found is None or not isinstance(value, Tensor):
            raise CheckpointError(f"{path}: unexpected entry {key!r} in its model state (a "
                                  "py-meanflow checkpoint holds net.*, net_ema*.* and "
                                  "num_updates only)")
        nets.setdefault(found.group(1), {})[found.group(2)] = value
    if "net" not in nets:
        raise CheckpointError(f"{path} has no online network (net.*): give a py-meanflow "
                              "checkpoint-*.pth")
    args = raw.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    epoch = raw.get("epoch")
    return OfficialCheckpoint(nets=nets, args=args,
                              epoch=int(epoch) if isinstance(epoch, int) else None,
                              num_updates=num_updates)


def _shape(state: dict[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"the network has no {key}: it is not py-meanflow's U-Net "
                              "(SongUNet, DDPM++ layout)")
    return tuple(state[key].shape)


def unet_config_from_state(state: dict[str, Tensor], dropout: float = 0.0) -> UNetConfig:
    """The :class:`UNetConfig` of an official U-Net, read off its weight names and shapes.

    Raises:
        CheckpointError: for weights of another architecture.
    """
    convs = [m for k in state if (m := re.fullmatch(r"enc\.(\d+)x\1_conv\.weight", k))]
    if len(convs) != 1:
        raise CheckpointError("the network has no single input convolution enc.RxR_conv: it "
                              "is not py-meanflow's U-Net (SongUNet, DDPM++ layout)")
    if any(k.startswith("map_label") for k in state):
        raise CheckpointError("the network is class-conditional (map_label), which py-meanflow "
                              "does not implement: meanflow converts its unconditional U-Net "
                              "only")
    size = int(convs[0].group(1))
    c0, in_channels = _shape(state, f"enc.{size}x{size}_conv.weight")[:2]
    mult, level = [], 0
    while f"enc.{size >> level}x{size >> level}_block0.conv0.weight" in state:
        res = size >> level
        mult.append(_shape(state, f"enc.{res}x{res}_block0.conv0.weight")[0] // c0)
        level += 1
    if not mult:
        raise CheckpointError("the network has no encoder blocks enc.RxR_block0: it is not "
                              "py-meanflow's U-Net")
    blocks = 0
    while f"enc.{size}x{size}_block{blocks}.conv0.weight" in state:
        blocks += 1
    attn = [size >> lv for lv in range(len(mult))
            if f"enc.{size >> lv}x{size >> lv}_block0.qkv.weight" in state]
    emb_dim, two_time = _shape(state, "map_layer0.weight")
    augment_dim = _shape(state, "map_augment.weight")[1] if "map_augment.weight" in state else 0
    taps = [1, 1]
    filters = [v for k, v in state.items() if k.endswith("resample_filter")]
    if filters and filters[0].shape[-1] == 4:
        taps = [1, 3, 3, 1]
    try:
        return UNetConfig(in_channels=in_channels, input_size=size, channels=c0,
                          channel_mult=mult, blocks_per_res=blocks, attn_resolutions=attn,
                          emb_mult=emb_dim // c0, time_mult=two_time // 2 // c0,
                          dropout=float(dropout), resample_filter=taps,
                          augment_dim=augment_dim)
    except ConfigError as exc:
        raise CheckpointError(f"the network's layout is not a U-Net meanflow can build "
                              f"({exc})") from None


def _official_block_names(cfg: UNetConfig) -> tuple[list[str], list[str]]:
    """The official names of the encoder and decoder blocks, in the order they run (the order
    of ``UNet.encoder`` and ``UNet.decoder``)."""
    enc, dec = [], []
    low = len(cfg.channel_mult) - 1
    for level in range(len(cfg.channel_mult)):
        res = cfg.input_size >> level
        if level > 0:
            enc.append(f"enc.{res}x{res}_down")
        enc += [f"enc.{res}x{res}_block{i}" for i in range(cfg.blocks_per_res)]
    for level in reversed(range(len(cfg.channel_mult))):
        res = cfg.input_size >> level
        dec += ([f"dec.{res}x{res}_in0", f"dec.{res}x{res}_in1"] if level == low
                else [f"dec.{res}x{res}_up"])
        dec += [f"dec.{res}x{res}_block{i}" for i in range(cfg.blocks_per_res + 1)]
    return enc, dec


def official_parameter_names(net: UNet) -> dict[str, str]:
    """``{meanflow parameter name: official parameter name}`` for every parameter of ``net``.

    Raises:
        CheckpointError: if a parameter has no official counterpart (a class-conditional
            ``map_label``, which the official network lacks).
    """
    cfg = net.cfg
    res0 = cfg.input_size
    prefix = {"conv_in": f"enc.{res0}x{res0}_conv", "norm_out": f"dec.{res0}x{res0}_aux_norm",
              "conv_out": f"dec.{res0}x{res0}_aux_conv", **{n: n for n in _TOP_NAMES}}
    enc, dec = _official_block_names(cfg)
    blocks = [(f"encoder.{i}", n) for i, n in enumerate(enc)]
    blocks += [(f"decoder.{i}", n) for i, n in enumerate(dec)]
    names = {}
    for ours, _ in net.named_parameters():
        head = ours.rsplit(".", 1)[0]
        if head in prefix:
            names[ours] = prefix[head] + ours[len(head):]
            continue
        for block, official in blocks:
            if ours.startswith(block + "."):
                inner, leaf = ours[len(block) + 1:].rsplit(".", 1)
                if inner in _BLOCK_NAMES:
                    names[ours] = f"{official}.{_BLOCK_NAMES[inner]}.{leaf}"
                break
        if ours not in names:
            raise CheckpointError(f"meanflow parameter {ours} has no counterpart in the "
                                  "official U-Net")
    return names


def to_meanflow_weights(state: dict[str, Tensor], net: UNet) -> dict[str, Tensor]:
    """Maps one official U-Net state dict onto ``net``'s parameter names (strictly).

    Every official key must be used: parameters are mapped (1x1 attention convolutions become
    linear weights), resampling-filter buffers must equal meanflow's filter. Raises
    CheckpointError naming the first offending keys otherwise.
    """
    names = official_parameter_names(net)
    ours_shapes = {k: tuple(p.shape) for k, p in net.named_parameters()}
    fir = fir_filter(net.cfg.resample_filter)
    out, used = {}, set()
    for ours, official in names.items():
        if official not in state:
            missing = [o for o in names.values() if o not in state]
            raise CheckpointError(f"the official network lacks {len(missing)} weight(s) of the "
                                  f"layout it was read as (first: {missing[0]}): it is not "
                                  "py-meanflow's U-Net, or the file is damaged")
        value = state[official]
        if value.ndim == 4 and len(ours_shapes[ours]) == 2 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]                  # 1x1 conv (qkv, proj) -> linear
        if tuple(value.shape) != ours_shapes[ours]:
            raise CheckpointError(f"{official} has shape {tuple(value.shape)}, the U-Net read "
                                  f"off the file needs {ours_shapes[ours]}: the file is not a "
                                  "consistent py-meanflow U-Net")
        out[ours] = value.detach().clone().contiguous()
        used.add(official)
    for key, value in state.items():
        if key in used:
            continue
        if key.endswith("resample_filter"):
            if tuple(value.shape[-2:]) != tuple(fir.shape) or not torch.allclose(
                    value.reshape(fir.shape).float(), fir, rtol=0, atol=1e-7):
                raise CheckpointError(f"{key} is not the [1, 3, 3, 1] or [1, 1] FIR filter "
                                      "meanflow's U-Net uses: the network is not one meanflow "
                                      "can reproduce")
            continue
        unknown = [k for k in state if k not in used and not k.endswith("resample_filter")]
        raise CheckpointError(f"{len(unknown)} weight(s) of the file map to no part of the U-Net "
                              f"read off it (first: {unknown[0]}): it is not py-meanflow's "
                              "U-Net (SongUNet, DDPM++ layout)")
    return out


def _arg(args: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = args.get(name, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CheckpointError(f"the checkpoint's args.{name}={value!r} is not a {kind.__name__}: "
                              "the file is not from py-meanflow's train.py")
    return value


def run_config_from_args(args: dict[str, Any], unet: UNetConfig) -> RunConfig:
    """The meanflow recipe of a py-meanflow run: its preset (``cifar10-unet`` for the
    paper's sampler "v0", ``cifar10-unet-v1`` for "v1"), with every value the run's
    arguments set."""
    sampler = _arg(args, "tr_sampler", str, "v1")
    if sampler not in ("v0", "v1"):
        raise CheckpointError(f"the checkpoint's args.tr_sampler={sampler!r} is not v0 or v1")
    cfg = load_config(preset_path("cifar10-unet" if sampler == "v0" else "cifar10-unet-v1"))
    o = cfg.objective
    mu_t, sigma_t = _arg(args, "P_mean_t", float, o.mu), _arg(args, "P_std_t", float, o.sigma)
    mu_r, sigma_r = _arg(args, "P_mean_r", float, o.mu_r), _arg(args, "P_std_r", float,
                                                                o.sigma_r)
    if sampler == "v0" and (mu_t, sigma_t) != (mu_r, sigma_r):
        raise CheckpointError(f"the run drew t from LN({mu_t}, {sigma_t}) and r from "
                              f"LN({mu_r}, {sigma_r}) with sampler v0, which meanflow's "
                              "logit_normal sampler (one LN for both) cannot express")
    o.mu, o.sigma, o.mu_r, o.sigma_r = mu_t, sigma_t, mu_r, sigma_r
    o.fraction_r_neq_t = _arg(args, "ratio", float, o.fraction_r_neq_t)
    o.p = _arg(args, "norm_p", float, o.p)
    o.c = _arg(args, "norm_eps", float, o.c)
    # the layout read off the weights, where it is not the preset's (the official network's)
    preset = UNetConfig(**UNET_PRESETS[cfg.model.name])
    from_data = ("in_channels", "input_size", "num_classes", "augment_dim")
    cfg.model.options = {f.name: getattr(unet, f.name) for f in dataclasses.fields(UNetConfig)
                         if f.name not in from_data
                         and getattr(unet, f.name) != getattr(preset, f.name)}
    cfg.model.options["dropout"] = unet.dropout
    cfg.data.augment = cfg.data.augment if _arg(args, "use_edm_aug", bool, False) else 0.0
    width = (EDMAugment(p=cfg.data.augment, **cfg.data.augment_options).label_dim
             if cfg.data.augment > 0 else 0)
    if width != unet.augment_dim:
        raise CheckpointError(f"the network takes a {unet.augment_dim}-wide augmentation label "
                              f"but its args (use_edm_aug={args.get('use_edm_aug')}) make a "
                              f"{width}-wide one: the file and its args disagree")
    world = _arg(args, "world_size", int, 1)
    cfg.train.batch_size = _arg(args, "batch_size", int, cfg.train.batch_size) * world
    cfg.train.epochs = _arg(args, "epochs", int, cfg.train.epochs)
    cfg.train.seed = _arg(args, "seed", int, cfg.train.seed)
    decays = [_arg(args, "ema_decay", float, 0.9999)]
    decays += [float(d) for d in args.get("ema_decays", [])]
    cfg.train.ema_decays = decays
    cfg.optim.lr = _arg(args, "lr", float, cfg.optim.lr)
    cfg.optim.betas = [float(b) for b in args.get("optimizer_betas", cfg.optim.betas)]
    try:
        return cfg.validate()
    except ConfigError as exc:
        raise CheckpointError(f"the checkpoint's args do not make a valid recipe ({exc})") \
            from None


def convert_official_checkpoint(src: str | os.PathLike[str],
                                out: str | os.PathLike[str]) -> Path:
    """Converts a py-meanflow checkpoint into the meanflow run folder ``out`` and returns the
    checkpoint folder written. Everything is read and checked before anything is written, and
    the folder appears whole or not at all.

    Raises:
        CheckpointError: for an unreadable or unsafe file, another architecture, a missing
            EMA network, or an ``out`` that exists and is not empty.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not empty: choose a new folder for the "
                              "converted run")
    ckpt = read_official_checkpoint(src)
    args = ckpt.args
    decays = [_arg(args, "ema_decay", float, 0.9999)]
    decays += [float(d) for d in args.get("ema_decays", [])]
    ema_names = ["net_ema"] + [f"net_ema{i + 1}" for i in range(len(decays) - 1)]
    for name, decay in zip(ema_names, decays):
        if name not in ckpt.nets:
            raise CheckpointError(f"{src} has no EMA network {name} (decay {decay:g}) although "
                                  "its args list it: the file is incomplete")
    extra = sorted(set(ckpt.nets) - {"net", *ema_names})
    if extra:
        raise CheckpointError(f"{src} holds network(s) {', '.join(extra)} that its args do not "
                              "name (ema_decay, ema_decays): the file and its args disagree")
    unet = unet_config_from_state(ckpt.nets["net"], _arg(args, "dropout", float, 0.2))
    cfg = run_config_from_args(args, unet)
    with torch.device("meta"):
        net = UNet(unet)
    model = to_meanflow_weights(ckpt.nets["net"], net)
    ema = {}
    for name, decay in zip(ema_names, decays):
        for key, value in to_meanflow_weights(ckpt.nets[name], net).items():
            ema[f"{ema_key(decay)}.{key}"] = value
    step = ckpt.num_updates if ckpt.num_updates is not None else 0
    shape = [unet.in_channels, unet.input_size, unet.input_size]
    state = {"step": step, "optimizer": None, "config": cfg.to_dict(),
             "data": {"shape": shape, "num_classes": None}, "ema_decays": decays,
             "meanflow_version": __version__, "torch_version": torch.__version__,
             "world_size": _arg(args, "world_size", int, 1),
             "converted_from": {"file": os.fspath(src), "format": "py-meanflow",
                                "epoch": ckpt.epoch, "num_updates": ckpt.num_updates}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        (tmp / "config.json").write_text(cfg.to_json() + "\n")
        (tmp / "config.yaml").write_text(cfg.to_yaml())
        save_checkpoint(tmp / "checkpoints" / f"step_{step:07d}", model=model, ema=ema,
                        optimizer={}, state=state)
        if out.exists():
            out.rmdir()          # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "checkpoints" / f"step_{step:07d}"
