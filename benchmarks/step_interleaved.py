"""MeanFlow/FM step-time ratios that survive a noisy, shared CPU: interleaved rounds.

``step_cost.py`` times flow matching first and then each strategy, so a load change between
the two (another job starting) moves the ratio by tens of percent on a shared machine. This
script runs, in every round, one flow-matching step and one step (loss + backward) of each
configuration back to back, the order rotated per round, and reports per configuration the
median over rounds of the *per-round* ratio MF/FM, its range (min–max), the ratio to the 4/3
floor, and images/s. A configuration is a du/dt strategy (``MeanFlowLoss(jvp=...)``) × the JVP
attention (``set_jvp_attention``: ``math``, ``chunked``); the backbone, weights, batch and
objective are the presets of ``benchmarks/_presets.py``, as in ``step_cost.py``. The command
of docs/benchmarks.md:

    OMP_NUM_THREADS=1 python benchmarks/step_interleaved.py --model unet-small --threads 1 \\
        --rounds 7 [--strategies split forward_ad] [--jvp-attention math chunked] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _presets  # noqa: E402  (benchmarks/: the scripts' shared helpers)
import _timing as tm  # noqa: E402

from meanflow.models.attention import check_attention_jvp, set_jvp_attention  # noqa: E402
from meanflow.objective import JVP_STRATEGIES, FlowMatchingLoss, MeanFlowLoss  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unet-small", choices=sorted(_presets.PRESETS))
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--strategies", nargs="+", default=["split", "forward_ad"],
                        choices=JVP_STRATEGIES)
    parser.add_argument("--jvp-attention", nargs="+", default=["math", "chunked"],
                        choices=("math", "chunked"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = tm.get_device(args.device)
    batch = args.batch or _presets.PRESETS[args.model].batch
    net = _presets.build(args.model, device)
    x, _ = _presets.batch(args.model, batch, device)
    if "chunked" in args.jvp_attention:
        check_attention_jvp(device=device)
    objective = dict(_presets.PRESETS[args.model].objective)
    sampler = {k: v for k, v in objective.items() if k in ("mu", "sigma")}
    configs = {"fm": (FlowMatchingLoss(**sampler), None)}
    for strategy in args.strategies:
        for attn in args.jvp_attention:
            configs[f"{strategy}/{attn}"] = (MeanFlowLoss(jvp=strategy, **objective), attn)

    def step(name: str) -> None:
        loss_fn, attn = configs[name]
        if attn is not None:
            set_jvp_attention(net, attn)
        loss, _ = loss_fn(net, x)
        loss.mean().backward()
        net.zero_grad(set_to_none=True)

    names = list(configs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(args.warmup + args.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        got = {n: tm.seconds(lambda n=n: step(n), device) for n in order}
        if rnd >= args.warmup:
            for n in names:
                times[n].append(got[n])
    load, fm = tm.loadavg(), times["fm"]
    fm_ms = statistics.median(fm) * 1e3
    print(f"# {args.model}, batch {batch}, {tm.device_name(device)}, torch {torch.__version__}, "
          f"{args.rounds} interleaved rounds, load average at the end {' '.join(load)}")
    print(f"flow matching: median {fm_ms:.1f} ms (min {min(fm) * 1e3:.1f}, "
          f"max {max(fm) * 1e3:.1f})")
    print(f"{'strategy/attention':22s} {'ms median':>9s} {'MF/FM':>6s} {'range':>11s} "
          f"{'/(4/3)':>6s} {'img/s':>6s}")
    records = []
    for n in names[1:]:
        ratios = [m / f for m, f in zip(times[n], fm)]
        med, ms = statistics.median(ratios), statistics.median(times[n]) * 1e3
        print(f"{n:22s} {ms:9.1f} {med:6.2f} {min(ratios):5.2f}–{max(ratios):<5.2f} "
              f"{med / tm.FLOOR:6.2f} {batch / ms * 1e3:6.1f}")
        rec = {"bench": "step_interleaved", "model": args.model, "batch": batch, "config": n,
               "ratio_median": med, "ratio_min": min(ratios), "ratio_max": max(ratios),
               "mf_ms": ms, "fm_ms": fm_ms, "loadavg": load, "device": tm.device_name(device),
               "torch": torch.__version__}
        tm.append_json(args.json, rec)
        records.append(rec)
    return records


if __name__ == "__main__":
    main()
