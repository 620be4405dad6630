"""Validation of the objective's settings, shared by the constructors of ``TimeSampler``,
``MeanFlowLoss`` and ``FlowMatchingLoss``: each raises a one-line ConfigError that names the
setting by its keyword (the config layer's ``objective.<keyword>``) and the fix."""

from __future__ import annotations

import math

from meanflow.errors import ConfigError

__all__ = ["check_number", "check_choice", "check_row_layout", "check_interval",
           "check_num_classes", "ROW_LAYOUTS"]

# Which rows of a batch get r = t (or a dropped label): "random" decides each sample on its own
# (the official PyTorch code); "first" gives it to a prefix of the batch (the official JAX code).
ROW_LAYOUTS = ("random", "first")


def check_number(name: str, value: object, *, lo: float | None = None,
                 hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
                 hint: str = "") -> float:
    """``value`` as a float after checking it is a finite real number (not a bool) within
    [lo, hi] (open ends where asked); ``hint`` ends the message with the fix."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        where = ""
        if lo is not None or hi is not None:
            left = "-inf" if lo is None else f"{lo:g}"
            right = "inf" if hi is None else f"{hi:g}"
            where = (f" in {'(' if lo_open or lo is None else '['}{left}, {right}"
                     f"{')' if hi_open or hi is None else ']'}")
        raise ConfigError(f"{name}={value!r} must be a finite number{where}"
                          + (f": {hint}" if hint else ""))
    return float(value)


def check_choice(name: str, value: object, choices: tuple[str, ...], hint: str = "") -> str:
    """``value`` after checking it is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"unknown {name} {value!r}: choose one of {', '.join(choices)}"
                          + (f" ({hint})" if hint else ""))
    return value


def check_row_layout(name: str, value: object) -> str:
    """Raises ConfigError unless ``value`` is one of :data:`ROW_LAYOUTS`."""
    if not isinstance(value, str) or value not in ROW_LAYOUTS:
        raise ConfigError(f"{name}={value!r}: choose 'random' (each sample decided on its own) "
                          "or 'first' (the first rows of the batch, as in the official JAX code)")
    return value


def check_interval(name: str, value: object) -> tuple[float, float]:
    """(t_min, t_max) after checking ``value`` is two numbers with 0 <= t_min <= t_max <= 1."""
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(a, (int, float)) and not isinstance(a, bool) for a in value)
    if not ok or not 0.0 <= value[0] <= value[1] <= 1.0:
        raise ConfigError(f"{name}={value!r} must be [t_min, t_max] with "
                          "0 <= t_min <= t_max <= 1, e.g. [0, 1]")
    return float(value[0]), float(value[1])


def check_num_classes(num_classes: object) -> int | None:
    """``num_classes`` after checking it is a positive integer (not a bool) or None."""
    if num_classes is not None and (not isinstance(num_classes, int)
                                    or isinstance(num_classes, bool) or num_classes < 1):
        raise ConfigError(f"num_classes={num_classes!r} must be a positive integer or None "
                          "(None: unconditional)")
    return num_classes
