"""MeanFlow/FM step-time ratios that survive a noisy, shared CPU: interleaved rounds.

``step_cost.py`` times flow matching first and then each strategy, so a load change between
the two (another job starting) moves the ratio by tens of percent on a shared VM. This script
runs, in every round, one flow-matching step and one step of each configuration back to back
(order rotated per round), and reports per configuration the median over rounds of the
*per-round* ratio MF/FM, its spread (min–max), the ratio to the 4/3 floor, and images/s.
Configurations are strategy × JVP attention (``math``, ``chunked``); the model is built as in
``step_cost.py`` (same presets, weights, batch and objective).

    python benchmarks/step_interleaved.py --model unet-small [--rounds 8] [--threads 1]
        [--strategies split forward_ad] [--jvp-attention math chunked] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_cost as sc  # noqa: E402

from meanflow import FlowMatchingLoss, MeanFlowLoss  # noqa: E402
try:  # absent from older trees: then only --jvp-attention math (to compare before/after)
    from meanflow.models.attention import check_attention_jvp, set_jvp_attention  # noqa: E402
except ImportError:
    check_attention_jvp = set_jvp_attention = None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unet-small", choices=sorted(sc.PRESETS))
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--strategies", nargs="+", default=["split", "forward_ad"])
    parser.add_argument("--jvp-attention", nargs="+", default=["math", "chunked"],
                        choices=("math", "chunked"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset = sc.PRESETS[args.model]
    batch = args.batch or preset.batch
    torch.manual_seed(0)
    net = sc.build(args.model, device)
    if set_jvp_attention is None:
        if args.jvp_attention != ["math"]:
            raise SystemExit("this meanflow has no chunked JVP attention: --jvp-attention math")
    elif "chunked" in args.jvp_attention:
        check_attention_jvp(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, *preset.shape, device=device, generator=gen)
    objective = dict(preset.objective)
    sampler = {k: objective[k] for k in ("mu", "sigma") if k in objective}
    configs = {"fm": (FlowMatchingLoss(**sampler), None)}
    for strategy in args.strategies:
        for attn in args.jvp_attention:
            configs[f"{strategy}/{attn}"] = (MeanFlowLoss(jvp=strategy, **objective), attn)

    def step(name: str) -> float:
        loss_fn, attn = configs[name]
        if attn is not None and set_jvp_attention is not None:
            set_jvp_attention(net, attn)
        sc.sync(device)
        start = time.perf_counter()
        loss, _ = loss_fn(net, x)
        loss.mean().backward()
        sc.sync(device)
        elapsed = time.perf_counter() - start
        net.zero_grad(set_to_none=True)
        return elapsed

    names = list(configs)
    times = {n: [] for n in names}
    for rnd in range(args.warmup + args.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        got = {n: step(n) for n in order}
        if rnd >= args.warmup:
            for n in names:
                times[n].append(got[n])
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else []
    fm = times["fm"]
    print(f"# {args.model}, batch {batch}, {sc.device_name(device)}, torch {torch.__version__}, "
          f"{args.rounds} interleaved rounds, load average at the end {' '.join(load)}")
    print(f"flow matching: median {statistics.median(fm) * 1e3:.1f} ms "
          f"(min {min(fm) * 1e3:.1f}, max {max(fm) * 1e3:.1f})")
    print(f"{'strategy/attention':22s} {'ms median':>9s} {'MF/FM':>6s} {'range':>11s} "
          f"{'/(4/3)':>6s} {'img/s':>6s}")
    for n in names[1:]:
        ratios = [m / f for m, f in zip(times[n], fm)]
        med = statistics.median(ratios)
        ms = statistics.median(times[n]) * 1e3
        print(f"{n:22s} {ms:9.1f} {med:6.2f} {min(ratios):5.2f}–{max(ratios):<5.2f} "
              f"{med / sc.FLOOR:6.2f} {batch / ms * 1e3:6.1f}")
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps({"bench": "step_interleaved", "model": args.model,
                                     "batch": batch, "config": n, "ratio_median": med,
                                     "ratio_min": min(ratios), "ratio_max": max(ratios),
                                     "mf_ms": ms, "fm_ms": statistics.median(fm) * 1e3,
                                     "loadavg": load, "device": sc.device_name(device)})
                         + "\n")


if __name__ == "__main__":
    main()
