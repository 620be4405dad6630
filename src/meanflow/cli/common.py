"""What every command of the CLI shares: the parser whose errors are one line, joining a
torchrun job, the ``--ema`` choice, the test for rank 0, and the argument types that bound
seeds (``0 <= seed < 2**64`` in every command) and read counts; sizes are checked against
memory by :func:`meanflow.world.check_fits` (docs/design.md, "Inputs").

Every user error prints one line ``meanflow: error: ...`` and exits with status 2
(docs/design.md, "Rules the layout keeps").
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from typing import Any, Iterator

import torch

from meanflow.errors import ConfigError
from meanflow.fileio import refuse_existing
from meanflow.sampling import SEED_LIMIT
from meanflow.world import check_fits
from meanflow.world import World, resolve_device, setup, teardown

__all__ = ["Subparsers", "OneLineParser", "joined", "ema_choice", "is_rank_zero",
           "refuse_existing", "seed_arg", "count_arg", "check_fits", "SEED_LIMIT",
           "parse_interval"]

# what ``ArgumentParser.add_subparsers`` returns; each command's ``add_parser`` adds to it
Subparsers = Any


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line with exit code 2, like every other error."""

    def error(self, message: str) -> None:
        self.exit(2, f"meanflow: error: {message} (see `{self.prog} --help`)\n")


@contextlib.contextmanager
def joined(device_name: str) -> Iterator[tuple[World, torch.device]]:
    """(world, device) of this process: under torchrun it joins the job (NCCL on CUDA, gloo
    on the CPU; rank r gets cuda:LOCAL_RANK) and leaves it afterwards; alone, one process."""
    world, device, owned = setup(resolve_device(device_name))
    try:
        yield world, device
    finally:
        teardown(owned)


def ema_choice(text: str) -> float | str | None:
    """--ema: "auto" (the run's first EMA), "none" (training weights) or a decay."""
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--ema {text!r} must be auto, none or a decay") from None


def is_rank_zero() -> bool:
    """Whether this process reports: alone, or rank 0 of a torchrun job (read from RANK, so
    it holds before and after the job is joined)."""
    return os.environ.get("RANK", "0") == "0"


def seed_arg(text: str) -> int:
    """--seed: an integer in [0, 2**64), the same bound in every command."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer seed") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"seed {text} must be in [0, 2**64)")
    return value


def count_arg(text: str) -> int:
    """A count flag (--n, --batch-size, --steps, ...): an integer; written ``1e6`` it is read
    when whole. The command checks its range (and its memory) itself."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not math.isfinite(value) or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    return int(value)


def parse_interval(text: str | None) -> tuple[float, float] | None:
    """--interval "0.4,0.65" -> (0.4, 0.65); None -> None. Checked by
    :func:`meanflow.sampling.check_guidance`."""
    if text is None:
        return None
    try:
        pair = tuple(float(s) for s in text.split(","))
    except ValueError:
        pair = ()
    if len(pair) != 2:
        raise ConfigError(f"--interval {text!r} must be two comma-separated times, e.g. "
                          "0.4,0.65")
    return pair
