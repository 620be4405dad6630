"""Ctrl-C and SIGTERM keep the work done: the step that runs ends, a checkpoint of it is
written, then the run stops with :class:`Interrupted` (docs/design.md, Run folders,
checkpoints and resume).

:class:`StopSignals` replaces the handlers of SIGINT and SIGTERM while the steps run (main
thread only; elsewhere signals keep their handlers and a KeyboardInterrupt stops the run as
before, without a checkpoint). The first signal only sets a flag, read after each step;
a second one raises KeyboardInterrupt at once (the checkpoint is given up). Under torchrun the
ranks may receive the signal at different steps: after every step they agree, in one small
all-reduce, on whether any rank was signalled, so all of them write the checkpoint of the
same step (the write is a collective).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from meanflow.world import World, all_true

__all__ = ["Interrupted", "StopSignals", "EXIT_CODES"]

#: The exit status of a run stopped by each signal: 128 + the signal's number, as a shell
#: reports a process killed by it.
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM after writing the checkpoint of its last step.

    ``signum``: the signal; ``step``: the last completed step; ``checkpoint``: its path;
    ``run_dir``: the run folder; :attr:`exit_code` and :meth:`message` for the CLI."""

    def __init__(self, signum: int, step: int, checkpoint: Path, run_dir: Path) -> None:
        super().__init__(signum, step, str(checkpoint))
        self.signum, self.step, self.checkpoint = int(signum), step, checkpoint
        self.run_dir = run_dir

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 130)

    def message(self) -> str:
        """The one line the CLI prints."""
        name = signal.Signals(self.signum).name
        return (f"meanflow: {name} at step {self.step}: checkpoint written to "
                f"{self.checkpoint}; continue with: meanflow train --resume --out "
                f"{self.run_dir}")


class StopSignals:
    """While entered, SIGINT and SIGTERM set :attr:`signum` instead of stopping the process
    (only in the main thread, where Python runs handlers). :meth:`requested` tells, after a
    step, whether the run stops there, the same on every rank (a collective under
    torchrun)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_CODES:
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:          # the second signal: stop now, no checkpoint
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, world: World, device: torch.device) -> int | None:
        """The signal to stop for after this step, or None to go on; under torchrun every
        rank gets the same answer (a rank not signalled itself stops for SIGTERM)."""
        if not world.enabled:
            return self.signum
        if all_true(self.signum is None, world, device):
            return None
        return self.signum if self.signum is not None else signal.SIGTERM
