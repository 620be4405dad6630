"""Training: typed config, the loop, EMA and checkpoints."""

from meanflow.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from meanflow.train.config import RunConfig, load_config
from meanflow.train.ema import EMA
from meanflow.train.loop import LoadedModel, load_model, step_seed, train

__all__ = ["RunConfig", "load_config", "train", "load_model", "LoadedModel", "EMA",
           "step_seed", "save_checkpoint", "load_checkpoint", "find_checkpoint"]
