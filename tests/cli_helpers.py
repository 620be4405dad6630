"""Running ``meanflow`` in-process from the tests (tests/ is on the path through conftest.py)."""

from __future__ import annotations

from meanflow.cli import main


def cli(*args) -> int:
    """Exit code of ``meanflow ARGS`` run in-process (argparse exits via SystemExit)."""
    try:
        return main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code
