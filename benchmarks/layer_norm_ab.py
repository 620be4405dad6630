"""The DiT's LayerNorm in JVP passes: the lean forward-AD rule against PyTorch's, A/B.

The DiT normalises with ``meanflow.models.layers.layer_norm`` (an exact, cheaper forward-AD
rule, docs/design.md) in its JVP passes. This script times, in each round and for both rules
one after the other, (a) the split strategy's no-grad JVP pass (``time_derivative(...,
strategy="split")``) and (b) the joint ``forward_ad`` pass with the backward of ‖u‖²
(``u_and_dudt(..., strategy="forward_ad")``), each once after an untimed call, and prints the
medians over the rounds and native/lean (> 1: the lean rule is faster). The native rule is
``F.layer_norm``, swapped in for the duration of its measurement only. Weights are drawn
N(0, 0.02²) because adaLN-Zero would make the output 0. The command of docs/benchmarks.md:

    OMP_NUM_THREADS=1 python benchmarks/layer_norm_ab.py [--model dit-s/2] [--batch 16]
        [--input-size 8] [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing as tm  # noqa: E402  (benchmarks/: the scripts' shared helpers)

import meanflow.models.dit as dit_module  # noqa: E402
from meanflow.models import build_model  # noqa: E402
from meanflow.objective import time_derivative, u_and_dudt  # noqa: E402


@contextlib.contextmanager
def layer_norm_rule(name: str) -> Iterator[None]:
    """The DiT's JVP passes take the ``lean`` rule (as built) or the ``native`` one inside.
    The DiT calls the ``layer_norm`` of its module (``meanflow.models.layers.layer_norm``);
    no public switch selects the rule, so the name is rebound there and always restored."""
    lean = dit_module.layer_norm
    if name == "native":
        dit_module.layer_norm = lambda x, eps: F.layer_norm(x, x.shape[-1:], eps=eps)
    try:
        yield
    finally:
        dit_module.layer_norm = lean


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dit-s/2")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--input-size", type=int, default=8, help="latent side (default 8: 16 tokens)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build_model(args.model, in_channels=4, input_size=args.input_size)
    with torch.no_grad():
        for param in net.parameters():
            param.normal_(0.0, 0.02)
    B, cpu = args.batch, torch.device("cpu")
    shape = (B, 4, args.input_size, args.input_size)
    z, v, t = torch.randn(shape), torch.randn(shape), torch.rand(B)
    r = t * torch.rand(B)

    def jvp_pass() -> None:
        time_derivative(net, z, r, t, v, strategy="split")

    def joint_pass() -> None:
        u, _ = u_and_dudt(net, z, r, t, v, strategy="forward_ad")
        u.square().mean().backward()
        net.zero_grad(set_to_none=True)

    print(f"# {args.model}, batch {B}, {args.input_size}x{args.input_size} latents, "
          f"{args.threads} thread(s), torch {torch.__version__}, {args.rounds} rounds")
    records = []
    for name, fn in (("no-grad JVP pass", jvp_pass), ("forward_ad + backward", joint_pass)):
        times: dict[str, list[float]] = {"lean": [], "native": []}
        for _ in range(args.rounds):
            for rule in times:
                with layer_norm_rule(rule):
                    fn()                                   # warm-up of this rule
                    times[rule].append(tm.seconds(fn, cpu))
        a, b = (statistics.median(times[k]) * 1e3 for k in ("lean", "native"))
        print(f"{name:22s} lean {a:8.1f} ms  native {b:8.1f} ms  native/lean {b / a:.3f}")
        records.append({"pass": name, "lean_ms": a, "native_ms": b})
    return records


if __name__ == "__main__":
    main()
