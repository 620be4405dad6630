"""Runs: what a training run is made of and leaves behind, and how it is loaded again.

The layer above models, data and the objective, below training, metrics and the CLI:

- :mod:`~meanflow.runs.config`: the typed run configuration (defaults, files, overrides);
- :mod:`~meanflow.runs.checkpoint`: checkpoints as safetensors plus JSON, written atomically;
- :mod:`~meanflow.runs.folder`: run folders (create, refuse to overwrite, name, resume checks);
- :mod:`~meanflow.runs.build`: a run's network and augmentation from its config;
- :mod:`~meanflow.runs.load`: the inference API, ``meanflow.load(run).sample(n)``.
"""

from meanflow.runs.build import build_augment, build_network, model_options
from meanflow.runs.checkpoint import (ema_key, find_checkpoint, list_checkpoints,
                                      load_checkpoint, save_checkpoint)
from meanflow.runs.config import RunConfig, apply_overrides, load_config
from meanflow.runs.folder import new_run_dir, prepare_run_dir
from meanflow.runs.load import LoadedModel, Model, Samples, load, load_model, resolve_vae

__all__ = ["RunConfig", "load_config", "apply_overrides", "save_checkpoint", "load_checkpoint",
           "find_checkpoint", "list_checkpoints", "ema_key", "new_run_dir", "prepare_run_dir",
           "build_network", "model_options", "build_augment", "load", "Model", "Samples",
           "load_model", "LoadedModel", "resolve_vae"]
