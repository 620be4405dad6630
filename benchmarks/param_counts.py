"""Parameter counts of the registered backbones at the sizes docs/benchmarks.md quotes.

Measures the parameters of each backbone built with ``meanflow.models.build_model`` on the meta
device (so even XL/2 costs no memory or time) and its difference in percent from the reference
count (the paper's, or the official network's): the demo's MLP, ``unet-small`` at 28×28×1,
``unet-cifar10`` with and without the 6-wide augmentation label, and DiT B/4 to XL/2 at
32×32×4 with 1000 classes, and the iMF in-context DiT B/2 to XL/2 likewise (compared: its
inference parameters, without the auxiliary v-head, as the iMF paper quotes them; the total
with the v-head follows). The U-Net with the augmentation label is also broken down by part
(``UNet.parameter_counts``: the mapping network, the input convolution, the encoder and decoder
blocks by the resolution they output, the output layers) against the official CIFAR-10 network
(py-meanflow's SongUNet with its scripts' settings: 55,932,419 parameters, docs/fidelity.md).

    python benchmarks/param_counts.py
"""

from __future__ import annotations

import torch

from meanflow.demo import demo_config
from meanflow.models import build_model

OFFICIAL_CIFAR10 = 55_932_419

# (name, options, the reference count in millions: the paper's, or the official network's)
CASES = [
    ("mlp", dict(demo_config("meanflow", 1).model.options, dim=2), None),  # the demo's MLP
    ("unet-small", {"in_channels": 1, "input_size": 28}, None),
    ("unet-cifar10", {"in_channels": 3, "input_size": 32, "augment_dim": 6}, 55.932419),
    ("unet-cifar10", {"in_channels": 3, "input_size": 32}, None),
    *[(f"dit-{s}", {"in_channels": 4, "input_size": 32, "num_classes": 1000}, m)
      for s, m in (("b/4", 131), ("b/2", 131), ("m/2", 308), ("l/2", 459), ("xl/2", 676))],
    *[(f"imf-dit-{s}", {"in_channels": 4, "input_size": 32, "num_classes": 1000}, m)
      for s, m in (("b/2", 89), ("m/2", 174), ("l/2", 409), ("xl/2", 610))],
]


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> list[tuple[str, dict, int]]:
    """Prints the table and the breakdown; returns (name, options, parameters) per case."""
    print(f"{'model':14s} {'options':28s} {'parameters':>14s} {'ref.':>10s} {'diff':>8s}")
    breakdowns, rows = [], []
    for name, options, paper in CASES:
        with torch.device("meta"):
            net = build_model(name, **options)
        total = count(net)
        # iMF DiTs: the inference parameters (no v-head), the count the paper quotes
        n = net.inference_parameters() if hasattr(net, "inference_parameters") else total
        extra = ", ".join(f"{k}={v}" for k, v in options.items()
                          if k not in ("in_channels", "input_size", "dim"))
        ref = f"{paper:g}M" if paper else "-"
        diff = f"{(n / (paper * 1e6) - 1) * 100:+.2f}%" if paper else "-"
        with_v = f"   (with v-head: {total:,d})" if total != n else ""
        print(f"{name:14s} {extra[:28]:28s} {n:14,d} {ref:>10s} {diff:>8s}{with_v}")
        rows.append((name, options, n))
        if name.startswith("unet-") and "augment_dim" in options:
            breakdowns.append((name, options, net, n))
    for name, options, net, n in breakdowns:
        print(f"\n{name} ({', '.join(f'{k}={v}' for k, v in options.items())}), by part:")
        for part, k in net.parameter_counts().items():
            print(f"  {part:18s} {k:12,d}")
        print(f"  {'total':18s} {n:12,d}   official network: {OFFICIAL_CIFAR10:,d} "
              f"({'equal' if n == OFFICIAL_CIFAR10 else 'DIFFERENT'})")
    return rows


if __name__ == "__main__":
    main()
