"""``meanflow presets``: the shipped training presets, one line each."""

from __future__ import annotations

import argparse

from meanflow.cli.common import Subparsers
from meanflow.presets import describe_presets

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    return subparsers.add_parser("presets", help="list the shipped training presets",
                                 description="List the presets `meanflow train --preset NAME` "
                                 "accepts.")


def run(args: argparse.Namespace) -> int:
    for name, summary in describe_presets().items():
        print(f"{name:22s} {summary}")
    return 0
