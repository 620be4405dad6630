"""Exceptions raised for bad input.

Every error meant for a user derives from :class:`MeanFlowError`. The CLI turns it into one
line on stderr and exit code 2; the message must name the problem *and* the fix.
"""

from __future__ import annotations

__all__ = ["MeanFlowError", "ConfigError", "DataError", "CheckpointError"]


class MeanFlowError(Exception):
    """Base class of all user-facing errors of meanflow."""


class ConfigError(MeanFlowError, ValueError):
    """An invalid configuration value or argument (bad range, unknown name, wrong shape)."""


class DataError(MeanFlowError, ValueError):
    """A dataset that is missing, unreadable or malformed."""


class CheckpointError(MeanFlowError, ValueError):
    """A checkpoint or run folder that is missing, truncated, tampered with or incompatible."""
