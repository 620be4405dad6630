"""Training presets shipped with the package: plain YAML config files, one per recipe.

``meanflow train --preset NAME`` loads ``NAME.yaml`` from this folder; ``meanflow presets`` lists
them. Each file's first comment line says what it is; the rest are the paper's numbers
(docs/method.md, docs/fidelity.md) or, for the CPU presets, measured choices (docs/results.md).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from meanflow.errors import ConfigError

__all__ = ["preset_names", "preset_path", "describe_presets"]


def _folder() -> Path:
    return Path(str(resources.files(__name__)))


def preset_names() -> list[str]:
    return sorted(p.stem for p in _folder().glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The config file of preset ``name``; ConfigError listing the names when unknown."""
    path = _folder() / f"{name}.yaml"
    if not isinstance(name, str) or "/" in name or not path.is_file():
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(preset_names())} "
                          "(meanflow presets lists them)")
    return path


def describe_presets() -> dict[str, str]:
    """name -> the first comment line of its file, without the leading '# name:'."""
    out = {}
    for name in preset_names():
        first = preset_path(name).read_text().splitlines()[0].lstrip("# ")
        out[name] = first.split(":", 1)[1].strip() if first.startswith(f"{name}:") else first
    return out
