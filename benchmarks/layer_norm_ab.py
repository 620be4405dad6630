"""The DiT's LayerNorm in JVP passes: the lean forward-AD rule (``layers.layer_norm``) against
PyTorch's own rule for ``F.layer_norm``, A/B in one process.

Each round times, for both rules one after the other, (a) the no-grad JVP pass of the split
strategies (``torch.func.jvp`` under ``no_grad``) and (b) the joint ``forward_ad`` pass with the
backward of ‖u‖². Medians over the rounds; the ratio is native / lean (> 1: the lean rule is
faster). Weights are drawn N(0, 0.02²) because adaLN-Zero would make the output 0.

    python benchmarks/layer_norm_ab.py [--model dit-s/2] [--batch 16] [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

import meanflow.models.dit as dit_module
from meanflow.models import build_model


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
    B, shape = args.batch, (args.batch, 4, args.input_size, args.input_size)
    z, tz = torch.randn(shape), torch.randn(shape)
    t = torch.rand(B)
    h = torch.rand(B) * t
    dt, dh = torch.ones(B), torch.zeros(B)

    def jvp_pass() -> None:
        with torch.no_grad():
            torch.func.jvp(net, (z, t, h), (tz, dt, dh))

    def joint_pass() -> None:
        with forward_ad.dual_level():
            out = net(forward_ad.make_dual(z, tz), forward_ad.make_dual(t, dt),
                      forward_ad.make_dual(h, dh))
            u = forward_ad.unpack_dual(out).primal
        u.square().mean().backward()
        net.zero_grad(set_to_none=True)

    lean = dit_module.layer_norm
    rules = {"lean": lean,
             "native": lambda x, eps: F.layer_norm(x, x.shape[-1:], eps=eps)}
    print(f"# {args.model}, batch {B}, {args.input_size}x{args.input_size} latents, "
          f"{args.threads} thread(s), torch {torch.__version__}, {args.rounds} rounds")
    records = []
    try:
        for name, fn in (("no-grad JVP pass", jvp_pass), ("forward_ad + backward", joint_pass)):
            times: dict[str, list[float]] = {k: [] for k in rules}
            for _ in range(args.rounds):
                for key, rule in rules.items():
                    dit_module.layer_norm = rule
                    fn()                                   # warm-up of this rule
                    start = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - start)
            dit_module.layer_norm = lean
            a, b = (statistics.median(times[k]) * 1e3 for k in ("lean", "native"))
            print(f"{name:22s} lean {a:8.1f} ms  native {b:8.1f} ms  native/lean {b / a:.3f}")
            records.append({"pass": name, "lean_ms": a, "native_ms": b})
    finally:
        dit_module.layer_norm = lean
    return records


if __name__ == "__main__":
    main()
