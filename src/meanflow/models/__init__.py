"""Backbones, each in its own file, behind one registry.

Every backbone honours ``net(z, t, h, y=None) -> tensor shaped like z``. A U-Net built with
``augment_dim > 0`` also takes ``aug=`` (B, augment_dim), the EDM augmentation label; ``None``
means not augmented.

iMF backbones (docs/imf.md) have ``takes_guidance = True`` and also take the keywords
``omega``, ``t_min``, ``t_max`` ((B,) tensors; None: ω = 1 and the interval [0, 1]); with
``has_v_head = True`` they take ``v_head=True`` and return (u, v). The ``imf-dit-*`` networks
are both; a U-Net is one with ``guidance_cond`` (and ``v_head``) on.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from torch import nn

from meanflow.errors import ConfigError
from meanflow.models.dit import DIT_SIZES, DiT, DiTConfig
from meanflow.models.imf_dit import IMF_DIT_SIZES, IMFDiT, IMFDiTConfig
from meanflow.models.mlp import MLP, MLPConfig
from meanflow.models.unet import UNET_PRESETS, UNet, UNetConfig

__all__ = ["MODELS", "build_model", "build_model_for_data", "backbone_family", "MLP",
           "MLPConfig", "DiT", "DiTConfig", "IMFDiT", "IMFDiTConfig", "UNet", "UNetConfig"]

# name -> (config dataclass, module class, preset values of the config)
MODELS: dict[str, tuple[type, Callable[[Any], nn.Module], dict[str, Any]]] = {
    "mlp": (MLPConfig, MLP, {}),
}
for _size, (_depth, _width, _heads) in DIT_SIZES.items():
    for _patch in (2, 4, 8):
        MODELS[f"dit-{_size}/{_patch}"] = (DiTConfig, DiT, {
            "depth": _depth, "width": _width, "heads": _heads, "patch": _patch})
# the iMF paper's B, M, L, XL at patch 2; the small sizes also at patch 4 (e.g. 28x28 images)
for _size, (_depth, _head_depth, _width, _heads) in IMF_DIT_SIZES.items():
    for _patch in ((2, 4) if _size in ("tiny", "s") else (2,)):
        MODELS[f"imf-dit-{_size}/{_patch}"] = (IMFDiTConfig, IMFDiT, {
            "depth": _depth, "head_depth": _head_depth, "width": _width, "heads": _heads,
            "patch": _patch})
for _name, _preset in UNET_PRESETS.items():
    MODELS[_name] = (UNetConfig, UNet, dict(_preset))
# The U-Net of the fmnist-unet preset as a name for any image data on a CPU: one block per
# level, no attention, 16 channels (769,185 parameters at 28x28x1; images whose side
# divides by 4). docs/results.md measures it on Fashion-MNIST.
MODELS["unet-tiny"] = (UNetConfig, UNet, dict(channels=16, channel_mult=[1, 2, 4],
                                               blocks_per_res=1, attn_resolutions=[],
                                               emb_mult=8, time_mult=2, dropout=0.0))


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds a registered backbone from keyword arguments of its config dataclass."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    cfg_cls, model_cls, preset = MODELS[name]
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for model {name!r}: "
                          f"valid ones are {', '.join(sorted(fields))}")
    try:
        cfg = cfg_cls(**{**preset, **kwargs})
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"bad option for model {name!r}: {exc}") from None
    return model_cls(cfg)


def build_model_for_data(name: str, sample_shape: tuple[int, ...], num_classes: int | None,
                         options: dict[str, Any]) -> nn.Module:
    """Builds a backbone sized for data of ``sample_shape`` (one sample) and ``num_classes``.

    The data decide the input size and the label table; ``options`` set everything else and may
    not contradict the data.
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    derived: dict[str, Any] = {"num_classes": num_classes}
    if name == "mlp":
        derived["dim"] = math.prod(sample_shape)
    elif name.startswith(("dit-", "imf-dit-", "unet-")):
        if len(sample_shape) != 3 or sample_shape[1] != sample_shape[2]:
            raise ConfigError(f"model {name!r} needs square images (C, H, H); the data have "
                              f"shape {tuple(sample_shape)}")
        derived["in_channels"], derived["input_size"] = sample_shape[0], sample_shape[1]
    for key, value in derived.items():
        if key in options and options[key] != value:
            raise ConfigError(f"model option {key}={options[key]!r} contradicts the data "
                              f"({key}={value!r}): remove it from model.options")
    return build_model(name, **{**options, **derived})


def backbone_family(net: object) -> str | None:
    """"unet", "dit", "imf-dit" or "mlp" for a backbone of this package, also inside a
    DDP/FSDP wrapper (``.module``) or a ``torch.compile``'d module (``._orig_mod``); None for
    anything else."""
    for _ in range(4):                                   # wrappers nest a few levels at most
        for cls, family in ((UNet, "unet"), (DiT, "dit"), (IMFDiT, "imf-dit"), (MLP, "mlp")):
            if isinstance(net, cls):
                return family
        inner = getattr(net, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(net, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return None
        net = inner
    return None
