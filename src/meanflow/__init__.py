"""meanflow: train, sample and evaluate MeanFlow one-step generative models.

Time convention: **t = 0 is data, t = 1 is noise**; z_t = (1 - t)·x + t·e, v = e - x.

A trained run samples with ``meanflow.load("runs/00001-...").sample(16)`` (:mod:`meanflow.runs`);
``meanflow.export_diffusers(run, out)`` writes it as a diffusers pipeline folder
(:mod:`meanflow.pipeline`).
"""

from meanflow.diffusers_export import export_diffusers
from meanflow.errors import CheckpointError, ConfigError, DataError, MeanFlowError
from meanflow.objective import (JVP_STRATEGIES, TIME_SAMPLERS, FlowMatchingLoss, MeanFlowLoss,
                                TimeSampler, average_velocity, guided_velocity, time_derivative,
                                u_and_dudt)
from meanflow.runs.load import load
from meanflow.sampling import (euler_sample, make_schedule, sample, sample_seeded,
                               seeded_noise)

__version__ = "0.1.0"

__all__ = [
    "MeanFlowLoss", "FlowMatchingLoss", "TimeSampler", "TIME_SAMPLERS", "JVP_STRATEGIES",
    "average_velocity", "guided_velocity", "time_derivative", "u_and_dudt",
    "sample", "euler_sample", "sample_seeded", "seeded_noise", "make_schedule", "load",
    "export_diffusers", "MeanFlowError", "ConfigError", "DataError", "CheckpointError",
    "__version__",
]
