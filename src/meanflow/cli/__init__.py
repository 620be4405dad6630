"""Command-line interface. It only parses, validates and calls the library.

    meanflow train   [--preset NAME | --config FILE] [--out DIR] [flags] [--set key=value ...]
    meanflow sample  RUN_OR_CHECKPOINT [--n N] [--steps K] [--out FILE.npz] [--png FILE.png]
    meanflow presets
    meanflow prepare-latents IMAGE_DIR OUT_DIR --vae PATH_OR_ID [--resolution 256]
    meanflow fid     ref DATA -o STATS.npz | calc SAMPLES_OR_RUN --ref STATS.npz
    meanflow convert OFFICIAL_CHECKPOINT.pth OUT_DIR
    meanflow demo    [--out DIR] [--steps N]
    meanflow data    fashion-mnist|mnist [--out DIR] [--from DIR]
    meanflow export  RUN OUT [--format diffusers] [--ema auto] [--vae auto]

One module per command (``train``, ``sample``, ``fid``, ``latents`` for prepare-latents,
``convert``, ``presets``, ``demo``), each with ``add_parser(subparsers)`` and ``run(args)``;
what they share is in :mod:`meanflow.cli.common`. Every user error prints one line
``meanflow: error: ...`` and exits with status 2 (docs/design.md, "Rules the layout keeps").
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from meanflow import __version__
from meanflow.cli import convert, demo, fid, latents, presets, sample, train
from meanflow.cli import data
from meanflow.cli import export
from meanflow.cli.common import OneLineParser
from meanflow.errors import MeanFlowError

__all__ = ["main", "build_parser", "COMMANDS"]

# subcommand -> its module (add_parser, run), in the order `meanflow --help` lists them
COMMANDS = {"train": train, "sample": sample, "fid": fid, "prepare-latents": latents,
            "convert": convert, "presets": presets, "demo": demo, "data": data,
            "export": export}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="meanflow", description="Train, sample and evaluate MeanFlow "
                           "one-step generative models (t = 0 data, t = 1 noise).")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(__version__)
        return 0
    if args.command is None:   # one line, like every other error
        print("meanflow: error: no command given; choose one of "
              f"{', '.join(COMMANDS)} (see `meanflow --help`)", file=sys.stderr)
        return 2
    run: Callable[[argparse.Namespace], int] = COMMANDS[args.command].run
    try:
        return run(args)
    except MeanFlowError as exc:
        print(f"meanflow: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # training diverged: not bad input, but no traceback
        print(f"meanflow: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, UnicodeDecodeError) as exc:  # unreadable/unwritable paths and the like
        print(f"meanflow: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:    # a size no check foresaw: still one line
        print("meanflow: error: out of memory; lower --n, --batch-size or the model's size",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("meanflow: interrupted", file=sys.stderr)
        return 130
