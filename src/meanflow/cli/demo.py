"""``meanflow demo``: MeanFlow against flow matching on the 8-Gaussian ring, by
:func:`meanflow.demo.run_demo`."""

from __future__ import annotations

import argparse
from pathlib import Path

from meanflow.cli.common import Subparsers, count_arg, seed_arg
from meanflow.demo import DEFAULT_STEPS, run_demo

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    de = subparsers.add_parser("demo", help="MeanFlow vs flow matching on the 8-Gaussian ring",
                               description="Train MeanFlow and flow matching on the 8-Gaussian "
                               "ring and write figure.png and metrics.json (about a minute on 2 "
                               "cores). The folder is the demo's own: a new or empty one, or "
                               "one an earlier demo made.")
    de.add_argument("--out", type=Path, default=Path("demo"), help="folder (default demo)")
    de.add_argument("--steps", type=count_arg, default=None,
                    help="training steps of each model")
    de.add_argument("--seed", type=seed_arg, default=0, help="training seed of both runs, "
                    "0 <= SEED < 2**64 (default 0)")
    de.add_argument("--no-progress", action="store_true", help="hide progress bars")
    de.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="change a setting of both runs, e.g. "
                    "objective.p=1.0 (repeatable)")
    return de


def run(args: argparse.Namespace) -> int:
    steps = DEFAULT_STEPS if args.steps is None else args.steps
    metrics = run_demo(args.out, steps=steps, seed=args.seed,
                       progress=not args.no_progress, overrides=args.overrides)
    floor = metrics["floor_two_data_samples"]
    print(f"energy distance to the data (floor of two data samples: {floor:.4f}):")
    for name, m in metrics["sets"].items():
        print(f"  {name:24s} {m['energy_distance']:.4f}   on a mode: {m['on_mode']:.1%}")
    print(f"wrote {args.out / 'figure.png'} and {args.out / 'metrics.json'}")
    return 0
