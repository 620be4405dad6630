"""Divergence: what a run does when its steps stop being finite, or its error explodes
(docs/design.md, Run folders, checkpoints and resume).

A step is applied only when its weighted loss, its raw error (``mse``, ``u_minus_v``) and its
gradient norm are all finite (:class:`meanflow.train.step.TrainStep`); the weighted loss alone
cannot tell, being about 1 by design with ``objective.p`` = 1. :class:`DivergenceGuard` counts
the skipped steps in a row: no checkpoint is written from a step inside such a streak (a due
checkpoint waits for the next finite step), the last one written before it is never pruned,
and ``MAX_NONFINITE_IN_A_ROW`` of them stop the run with one line (FloatingPointError, exit
code 1) that names what was observed and the checkpoint to resume from.

A run whose error grows without bound but stays finite gets one warning line
(:func:`explosion_warning`): the mean raw error of a logging window above ``EXPLOSION_FACTOR``
times the lowest raw error of the run so far, which starts as the error of its first step
(the untrained network's, about the data's own scale) and then takes the window means.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from meanflow.runs.config import RunConfig
from meanflow.train.schedule import lr_at

__all__ = ["MAX_NONFINITE_IN_A_ROW", "EXPLOSION_FACTOR", "DivergenceGuard", "describe_lr",
           "explosion_warning"]

#: Skipped (non-finite) steps in a row that stop a run as diverged.
MAX_NONFINITE_IN_A_ROW = 10
#: A logging window whose mean raw error (mse) exceeds this many times the lowest of the run
#: (its first step's, or a lower window mean) gets a warning: training reduces the error, and
#: a thousandfold rise is no noise.
EXPLOSION_FACTOR = 1000.0
#: Data beyond this magnitude is named as the likely cause of a divergence.
LARGE_DATA = 100.0


def describe_lr(cfg: RunConfig, step: int) -> str:
    """The learning rate at 0-based ``step``, and whether the warm-up was still ramping."""
    lr, warm = cfg.optim.lr, cfg.optim.warmup_steps
    if warm > 0 and step < warm:
        return f"lr {lr_at(cfg, step):.3g} at step {step + 1}, warm-up still ramping to {lr:g}"
    return f"lr {lr:g}"


def _fix(cfg: RunConfig, run_dir: Path, resume: bool) -> str:
    out = f"--out {run_dir} --resume" if resume else f"--out {run_dir.parent / 'NEW_FOLDER'}"
    return (f"a lower optim.lr, e.g. meanflow train --config {run_dir / 'config.yaml'} {out} "
            f"--lr {cfg.optim.lr / 10:g} (or set optim.grad_clip, or a longer "
            "optim.warmup_steps)")


class DivergenceGuard:
    """Counts the skipped steps in a row, decides when a checkpoint may be written, and stops a
    diverged run. ``good``: the last checkpoint written from a finite step (a resumed run's
    checkpoint), which pruning must keep."""

    def __init__(self, cfg: RunConfig, run_dir: Path, good: Path | None = None) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.good, self.in_a_row, self.pending = good, 0, False
        self.first: int | None = None               # first step of the streak (0-based)
        self.data_bad, self.data_max = False, 0.0   # what the streak's batches held
        self.last_mse: tuple[Tensor, int] | None = None   # of the last applied step

    def step(self, step: int, stats: dict[str, Tensor] | None, x: Tensor, reason: str,
             lowest: tuple[float, int] | None = None) -> None:
        """After 0-based ``step``: its stats, or None when it was skipped (``reason``: what
        was non-finite; ``x``: the step's batch). Raises FloatingPointError at the
        ``MAX_NONFINITE_IN_A_ROW``-th skipped step in a row (``lowest``: the run's lowest raw
        error and its step, :class:`meanflow.train.monitors.TrainLog`)."""
        if stats is not None:
            self.in_a_row, self.first = 0, None
            self.data_bad, self.data_max = False, 0.0
            if "mse" in stats:
                self.last_mse = (stats["mse"], step)     # read only if the run diverges
            return
        if self.in_a_row == 0:
            self.first = step
        self.in_a_row += 1
        x = x.detach().float()
        finite = torch.isfinite(x)
        self.data_bad |= not bool(finite.all())
        if bool(finite.any()):
            self.data_max = max(self.data_max, float(x[finite].abs().max()))
        if self.in_a_row >= MAX_NONFINITE_IN_A_ROW:
            raise FloatingPointError(self.message(step, reason, lowest))

    def checkpoint_now(self, due: bool, last: bool) -> bool:
        """Whether to write a checkpoint after this step: a due one waits while the run is
        inside a non-finite streak, and is written at the next finite step. The last step is
        written in any case: a skipped step changes no weight, so it holds the weights of
        the last applied step, and :meth:`keep` still protects the one before the streak."""
        due = due or last
        if due and self.in_a_row:
            self.pending = True
            return last
        if self.pending and not self.in_a_row:
            return True
        return due

    def written(self, path: Path) -> None:
        """A checkpoint was written after this step."""
        self.pending = False
        if not self.in_a_row:
            self.good = path

    def keep(self) -> Path | None:
        """The checkpoint that ``train.keep_checkpoints`` must not prune: inside a streak (the
        last step's checkpoint), the last one written before it."""
        return self.good if self.in_a_row else None

    def message(self, step: int, reason: str,
                lowest: tuple[float, int] | None = None) -> str:
        """The one line of a run stopped for divergence."""
        cfg = self.cfg
        first = self.first if self.first is not None else step
        said = (f"training diverged: {reason} was non-finite for {self.in_a_row} steps in a "
                f"row (steps {first + 1} to {step + 1}), at {describe_lr(cfg, first)}")
        before = None if self.last_mse is None else float(self.last_mse[0])
        if before is not None:
            said += f", after a raw error (mse) of {before:.3g} at step {self.last_mse[1] + 1}"
        if self.data_bad:
            cause = "the data holds NaN or inf values: clean it"
        elif self.data_max > LARGE_DATA:
            cause = (f"the data is large (|x| up to {self.data_max:.3g}): scale it to about "
                     "[-1, 1], or lower optim.lr")
        else:
            cause = "the learning rate is likely too high"
            if cfg.objective.kind == "meanflow":
                cause += (f" for objective.p={cfg.objective.p:g}, objective.c="
                          f"{cfg.objective.c:g} (raising c also damps the step)")
        exploded = (before is not None and lowest is not None
                    and before > EXPLOSION_FACTOR * lowest[0])
        if self.good is None:
            resume = (f"no checkpoint was written before it diverged; start again with "
                      f"{_fix(cfg, self.run_dir, resume=True)}")
        elif exploded:
            resume = (f"the last checkpoint before it, {self.good}, holds weights whose raw "
                      f"error had already exploded (from {lowest[0]:.3g} at step {lowest[1]}); "
                      f"start a new run with {_fix(cfg, self.run_dir, resume=False)}")
        else:
            resume = (f"the last good checkpoint is {self.good}; resume from it with "
                      f"{_fix(cfg, self.run_dir, resume=True)}")
        return f"{said}; {cause}; {resume}"


def explosion_warning(cfg: RunConfig, record: dict[str, Any],
                      lowest: tuple[float, int] | None) -> str | None:
    """The warning line for a logging window whose mean raw error (``record["mse"]``) is above
    ``EXPLOSION_FACTOR`` times the lowest window mean of the run so far (``lowest``: (mean,
    step)), else None."""
    mse = record.get("mse")
    if lowest is None or not isinstance(mse, float) or not mse > EXPLOSION_FACTOR * lowest[0]:
        return None
    done = int(record["step"])
    return (f"warning: training is diverging: the raw error (mse) averaged {mse:.3g} up to step "
            f"{done}, over {EXPLOSION_FACTOR:g}x its lowest ({lowest[0]:.3g} up to step "
            f"{lowest[1]}), at {describe_lr(cfg, done - 1)}; the run goes on, but its samples "
            "will be poor: lower optim.lr, or set optim.grad_clip")
