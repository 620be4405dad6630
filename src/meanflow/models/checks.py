"""Validation shared by the backbones' config dataclasses (one-line ConfigErrors)."""

from __future__ import annotations

from typing import Any

from meanflow.errors import ConfigError

__all__ = ["check_common"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_common(cfg: Any, positive_ints: tuple[str, ...]) -> None:
    """Checks the named fields are positive integers, and, where the config has them,
    ``num_classes`` (positive integer or None), ``dropout`` (number in [0, 1)) and
    ``attention`` ("auto" or "math")."""
    for name in positive_ints:
        value = getattr(cfg, name)
        if not _is_int(value) or value < 1:
            raise ConfigError(f"model {name}={value!r} must be a positive integer")
    num_classes = getattr(cfg, "num_classes", None)
    if num_classes is not None and (not _is_int(num_classes) or num_classes < 1):
        raise ConfigError(f"model num_classes={num_classes!r} must be a positive integer or "
                          "null")
    if hasattr(cfg, "dropout"):
        dropout = cfg.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
                or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model dropout={dropout!r} must be a number in [0, 1)")
    if hasattr(cfg, "attention") and cfg.attention not in ("auto", "math"):
        raise ConfigError(f"attention {cfg.attention!r} must be 'auto' or 'math'")
