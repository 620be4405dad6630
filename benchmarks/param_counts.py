"""Parameter counts of the registered backbones at the sizes the README quotes.

Models are built on the meta device, so even XL/2 costs no memory or time.

    python benchmarks/param_counts.py
"""

from __future__ import annotations

import torch

from meanflow.demo import demo_config
from meanflow.models import build_model

# (name, options, the paper's count in millions where it gives one)
CASES = [
    ("mlp", dict(demo_config("meanflow", 1).model.options, dim=2), None),  # the demo's MLP
    ("unet-small", {"in_channels": 1, "input_size": 28}, None),
    ("unet-cifar10", {"in_channels": 3, "input_size": 32}, 55),
    *[(f"dit-{s}", {"in_channels": 4, "input_size": 32, "num_classes": 1000}, m)
      for s, m in (("b/4", 131), ("b/2", 131), ("m/2", 308), ("l/2", 459), ("xl/2", 676))],
]


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    print(f"{'model':14s} {'parameters':>14s} {'paper':>8s} {'diff':>8s}   of which t+h embedders")
    for name, options, paper in CASES:
        with torch.device("meta"):
            net = build_model(name, **options)
        n = count(net)
        emb = count(net.t_embed) + count(net.h_embed)
        ref = f"{paper}M" if paper else "-"
        diff = f"{(n / (paper * 1e6) - 1) * 100:+.2f}%" if paper else "-"
        print(f"{name:14s} {n:14,d} {ref:>8s} {diff:>8s}   {emb:,d}")


if __name__ == "__main__":
    main()
