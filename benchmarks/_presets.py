"""The backbones the benchmark scripts measure, at the sizes docs/benchmarks.md quotes.

``mlp``, ``dit-s/2`` and ``unet-small`` are CPU sizes; ``unet-cifar10`` (3x32x32, batch 128,
the CIFAR-10 objective: 75 % r != t, LN(-2, 2), p 0.75, c 1e-3) and ``dit-b/2`` (4x32x32
latents, batch 64, the ImageNet objective: 25 % r != t, LN(-0.4, 1), p 1, c 0.01) are the
paper's. Built with the public ``meanflow.models.build_model``.
"""

from __future__ import annotations

import dataclasses

import torch

from meanflow.models import build_model
from meanflow.models.layers import Linear


@dataclasses.dataclass(frozen=True)
class Preset:
    options: dict            # build_model options
    shape: tuple             # one sample
    batch: int               # default training batch
    objective: dict          # MeanFlowLoss options (the time sampler shared with FM)
    big: bool = False        # GPU sizes: no CPU-only extras (matrix-product counts)
    num_classes: int = 10    # with --guided


_CPU = {"fraction_r_neq_t": 1.0}
_CIFAR10 = {"fraction_r_neq_t": 0.75, "mu": -2.0, "sigma": 2.0, "p": 0.75, "c": 1e-3}
_IMAGENET = {"fraction_r_neq_t": 0.25, "mu": -0.4, "sigma": 1.0, "p": 1.0, "c": 0.01}

PRESETS = {
    "mlp": Preset({"dim": 2, "width": 256, "depth": 4, "emb_dim": 64}, (2,), 256, _CPU),
    "dit-s/2": Preset({"in_channels": 4, "input_size": 8}, (4, 8, 8), 16, _CPU),
    "unet-small": Preset({"in_channels": 1, "input_size": 28}, (1, 28, 28), 16, _CPU),
    "unet-cifar10": Preset({"in_channels": 3, "input_size": 32}, (3, 32, 32), 128, _CIFAR10,
                           big=True),
    "dit-b/2": Preset({"in_channels": 4, "input_size": 32}, (4, 32, 32), 64, _IMAGENET,
                      big=True, num_classes=1000),
}


def native_linear(net: torch.nn.Module) -> torch.nn.Module:
    """Replaces every ``meanflow.models.layers.Linear`` of ``net`` by a ``torch.nn.Linear``
    holding the same parameters: the backbone as if built with PyTorch's Linear, whose
    forward-AD rule multiplies by a zero tangent of the weights (``--native-linear``)."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                plain = torch.nn.Linear(child.in_features, child.out_features,
                                        bias=child.bias is not None, device="meta")
                plain.weight = child.weight
                if child.bias is not None:
                    plain.bias = child.bias
                setattr(parent, name, plain)
    return net


def build(name: str, device: torch.device, guided: bool = False,
          native: bool = False) -> torch.nn.Module:
    """The preset's backbone on ``device``, seeded, with non-trivial outputs: ``dit-s/2`` and
    ``unet-small`` draw all weights N(0, 0.02²) as the recorded CPU runs did (zero-initialised
    outputs give u = 0); the GPU presets keep the real initialisation but give the
    zero-initialised layers (adaLN-Zero, residual branch ends, output) small weights."""
    preset = PRESETS[name]
    opts = dict(preset.options, **({"num_classes": preset.num_classes} if guided else {}))
    torch.manual_seed(0)
    net = build_model(name, **opts).to(device)
    with torch.no_grad():
        for p in net.parameters():
            if name in ("dit-s/2", "unet-small") or (name != "mlp" and not p.any()):
                p.normal_(0.0, 0.02)
    return native_linear(net) if native else net


def batch(name: str, size: int, device: torch.device, guided: bool = False,
          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, y): a seeded batch of data-shaped inputs and, when guided, labels."""
    preset = PRESETS[name]
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(size, *preset.shape, device=device, generator=gen)
    y = (torch.randint(0, preset.num_classes, (size,), device=device, generator=gen)
         if guided else None)
    return x, y


def has_dropout(net: torch.nn.Module) -> bool:
    cfg = getattr(net, "cfg", None)
    return float(getattr(cfg, "dropout", 0.0) or 0.0) > 0 or any(
        isinstance(m, torch.nn.Dropout) and m.p > 0 for m in net.modules())
