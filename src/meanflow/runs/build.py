"""A run's network and augmentation from its config: built the same way when it trains and
when it is loaded again to sample, so that the saved weights always fit.

``model.name: auto`` (the default) is decided here, from the shape of one sample
(:func:`resolve_model`): training resolves it once it has the data, and the run folder, its
name and its checkpoints record the backbone it chose (docs/design.md, Backbones)."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from meanflow.data.augment import EDMAugment
from meanflow.errors import ConfigError
from meanflow.models import build_model_for_data
from meanflow.runs.config import RunConfig

__all__ = ["AUTO_MODEL", "auto_model_name", "resolve_model", "build_augment", "model_options",
           "build_network", "check_pairing"]

#: The ``model.name`` that leaves the backbone to the data (:func:`auto_model_name`).
AUTO_MODEL = "auto"


def auto_model_name(shape: tuple[int, ...]) -> str:
    """The backbone ``model.name: auto`` stands for on samples of ``shape`` (one sample):
    ``unet-tiny`` for images and latents (C, H, W), ``mlp`` for anything else (points)."""
    return "unet-tiny" if len(shape) == 3 else "mlp"


def resolve_model(cfg: RunConfig, shape: tuple[int, ...]) -> RunConfig:
    """``cfg`` with ``model.name: auto`` replaced by the backbone it stands for on samples of
    ``shape`` (:func:`auto_model_name`), as a copy; any other name returns ``cfg`` itself."""
    if cfg.model.name != AUTO_MODEL:
        return cfg
    resolved = copy.deepcopy(cfg)
    resolved.model.name = auto_model_name(tuple(shape))
    return resolved


def build_augment(cfg: RunConfig) -> EDMAugment | None:
    """The run's EDM augmentation, ``EDMAugment(p=data.augment, **data.augment_options)``, or
    None when ``data.augment`` is 0."""
    if cfg.data.augment <= 0:
        return None
    return EDMAugment(p=cfg.data.augment, **cfg.data.augment_options)


def model_options(cfg: RunConfig, shape: tuple[int, ...]) -> dict[str, Any]:
    """The backbone options of a run on samples of ``shape``: ``model.options``, plus
    ``augment_dim`` (the augmentation's ``label_dim``) when EDM augmentation is on. Training
    and :func:`meanflow.runs.load.load_model` build the network from these (``model.name:
    auto`` resolved for ``shape`` first)."""
    cfg = resolve_model(cfg, shape)
    options = dict(cfg.model.options)
    augment = build_augment(cfg)
    if augment is not None:
        if len(shape) != 3:
            raise ConfigError(f"data.augment is for images (C, H, W); {cfg.data.name!r} has "
                              f"samples of shape {shape}: set data.augment=0")
        if not cfg.model.name.startswith("unet"):
            raise ConfigError(f"data.augment feeds the augmentation label to the network, and "
                              f"only unet-* backbones take it (model {cfg.model.name!r}): set "
                              "data.augment=0 or use a U-Net")
        options["augment_dim"] = int(augment.label_dim)
    return options


def build_network(cfg: RunConfig, shape: tuple[int, ...], num_classes: int | None) -> nn.Module:
    """The run's backbone (fresh weights, on the current default device) for samples of
    ``shape`` (one sample, e.g. (C, H, W)) and ``num_classes`` (None: unconditional);
    ``model.name: auto`` is resolved for ``shape`` (:func:`resolve_model`)."""
    cfg = resolve_model(cfg, tuple(shape))
    net = build_model_for_data(cfg.model.name, tuple(shape), num_classes,
                               model_options(cfg, tuple(shape)))
    check_pairing(cfg, net, num_classes)
    return net


def check_pairing(cfg: RunConfig, net: nn.Module, num_classes: int | None) -> None:
    """The objective and the backbone fit (docs/imf.md §1): iMF's guidance conditions need a
    network that takes them (class-conditional runs) and its v-head variant a second head;
    a v-head is trained by iMF alone (any other objective would leave it without gradients).
    One-line ConfigError naming the setting to change."""
    o, name = cfg.objective, cfg.model.name
    takes, v_head = getattr(net, "takes_guidance", False), getattr(net, "has_v_head", False)
    if o.kind == "imf":
        unet = name.startswith("unet")
        if num_classes is not None and not takes:
            fix = ("set model.options.guidance_cond=true" if unet
                   else "use an imf-dit-* model or a U-Net with model.options.guidance_cond")
            raise ConfigError(f"objective.kind=imf conditions the network on the guidance "
                              f"scale and interval, which model {name!r} does not take: {fix}")
        if o.imf_variant == "v_head" and not v_head:
            fix = ("set model.options.v_head=true" if unet or name.startswith("imf-dit")
                   else "use an imf-dit-* model or a U-Net with model.options.v_head")
            raise ConfigError(f"objective.imf_variant=v_head trains a second (v) head, which "
                              f"model {name!r} lacks: {fix}, or set imf_variant=boundary")
        if o.imf_variant == "boundary" and v_head:
            raise ConfigError(f"objective.imf_variant=boundary trains no v-head, and model "
                              f"{name!r} has one: set model.options.v_head=false")
    elif v_head:
        raise ConfigError(f"model {name!r} has a v-head, which only objective.kind=imf trains: "
                          "set model.options.v_head=false")
