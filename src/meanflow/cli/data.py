"""``meanflow data NAME``: put the official files of an IDX image set (fashion-mnist, mnist)
in a folder, by :func:`meanflow.data.idx_sets.fetch_idx_set`: copied from ``--from DIR`` or
the Debian package, else downloaded with SHA-256 checks (docs/design.md, "Data sets you can
fetch")."""

from __future__ import annotations

import argparse
from pathlib import Path

from meanflow.cli.common import Subparsers
from meanflow.data.idx_sets import IDX_FILES, IDX_SETS, default_root, fetch_idx_set

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    pd = subparsers.add_parser(
        "data", help="download (or copy) Fashion-MNIST or MNIST",
        description="Put the four official files of an image set "
        f"({', '.join(IDX_FILES)}) in a folder, each checked against its SHA-256: copied from "
        "--from DIR, else from the Debian package dataset-fashion-mnist where installed, else "
        f"downloaded. Training with --data NAME then reads them from the default folder "
        f"({default_root('NAME')}; set MEANFLOW_DATA to move it), or from "
        "data.options.root=DIR with --out DIR.")
    pd.add_argument("name", choices=list(IDX_SETS), help="the image set")
    pd.add_argument("--out", type=Path, help="folder to fill (default: the folder training "
                    "reads, $MEANFLOW_DATA/NAME or ~/.cache/meanflow/data/NAME)")
    pd.add_argument("--from", dest="source", type=Path, metavar="DIR", help="copy the files "
                    "from this folder instead of downloading them (no network needed)")
    return pd


def run(args: argparse.Namespace) -> int:
    folder = fetch_idx_set(args.name, args.out, args.source, report=print)
    hint = ("" if args.out is None else
            f"; train with --data {args.name} --set data.options.root={folder}")
    print(f"{IDX_SETS[args.name].title} is in {folder}{hint}")
    return 0
