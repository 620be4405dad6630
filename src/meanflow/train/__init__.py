"""Training: the loop and its parts (the schedule of seeds, batches and learning rate, one
optimiser step, logging and evaluations, checkpoints), the EMA of the weights and
data-parallel training.

A run's config, checkpoints and folder, and loading a trained run to sample it, are in
:mod:`meanflow.runs`; training builds on them, and nothing outside training imports this
package.
"""

from meanflow.train.ema import EMA
from meanflow.train.interrupt import Interrupted
from meanflow.train.loop import check_config, train
from meanflow.train.schedule import step_seed

__all__ = ["train", "check_config", "EMA", "Interrupted", "step_seed"]
