"""A run's network and augmentation from its config: built the same way when it trains and
when it is loaded again to sample, so that the saved weights always fit."""

from __future__ import annotations

from typing import Any

from torch import nn

from meanflow.data.augment import EDMAugment
from meanflow.errors import ConfigError
from meanflow.models import build_model_for_data
from meanflow.runs.config import RunConfig

__all__ = ["build_augment", "model_options", "build_network"]


def build_augment(cfg: RunConfig) -> EDMAugment | None:
    """The run's EDM augmentation, ``EDMAugment(p=data.augment, **data.augment_options)``, or
    None when ``data.augment`` is 0."""
    if cfg.data.augment <= 0:
        return None
    return EDMAugment(p=cfg.data.augment, **cfg.data.augment_options)


def model_options(cfg: RunConfig, shape: tuple[int, ...]) -> dict[str, Any]:
    """The backbone options of a run on samples of ``shape``: ``model.options``, plus
    ``augment_dim`` (the augmentation's ``label_dim``) when EDM augmentation is on. Training
    and :func:`meanflow.runs.load.load_model` build the network from these."""
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
    ``shape`` (one sample, e.g. (C, H, W)) and ``num_classes`` (None: unconditional)."""
    return build_model_for_data(cfg.model.name, tuple(shape), num_classes,
                                model_options(cfg, tuple(shape)))
