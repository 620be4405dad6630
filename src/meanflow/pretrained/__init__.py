"""Models trained by the meanflow authors and shipped inside the package, reachable by name.

``meanflow sample fmnist-pretrained --n 64 --png grid.png`` and
``meanflow.load("fmnist-pretrained")`` need no training and no download: each name maps to a
folder of this package holding one checkpoint as ``meanflow export --format meanflow`` writes
it (``state.json`` with the run's config and SHA-256 digests, and the chosen EMA's weights in
``ema.safetensors``; :mod:`meanflow.runs.release`). docs/results.md gives, for each, the
command that trained it and its measured scores.

A path that exists always wins over a name: a run folder a user called ``fmnist-pretrained``
is loaded as that run.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PRETRAINED", "pretrained_folder", "resolve_pretrained"]

_HERE = Path(__file__).resolve().parent

#: name -> (folder inside this package, one line on what it is)
PRETRAINED: dict[str, tuple[str, str]] = {
    "fmnist-pretrained": (
        "fmnist", "class-conditional Fashion-MNIST (28x28, 10 named classes), unet-tiny "
                  "(769,185 parameters), trained with guidance (omega = 2), EMA 0.995"),
}


def pretrained_folder(name: str) -> Path:
    """The package folder of the shipped model ``name`` (a :data:`PRETRAINED` key)."""
    return _HERE / PRETRAINED[name][0]


def resolve_pretrained(path: str | os.PathLike[str]) -> Path:
    """``path`` itself when it exists or is no shipped model's name; else that model's
    folder inside the package."""
    path = Path(path)
    if not path.exists() and str(path) in PRETRAINED:
        return pretrained_folder(str(path))
    return path
