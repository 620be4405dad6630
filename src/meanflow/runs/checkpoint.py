"""Checkpoints that are never unpickled: safetensors tensors plus JSON, written atomically.

Layout of one checkpoint folder ``checkpoints/step_000100/``:

    model.safetensors       training weights
    ema.safetensors         every EMA copy, keys ``ema_<decay>.<param>`` (:func:`ema_key`)
    optimizer.safetensors   the optimiser's per-parameter tensors, keys ``<index>.<name>``
    state.json              step, optimiser scalars, config, data shape/classes, EMA decays,
                            library and torch versions, world size, the loss that ran
                            (``loss``: class, tangent, resolved du/dt strategy), where the data
                            order stands (``data_position``: epoch and batch within it), and
                            the SHA-256 of each tensor file (a truncated or tampered file is
                            refused); docs/design.md lists every field

The folder is written under a temporary name and renamed into place, so a kill mid-write leaves
either the old set of checkpoints or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from meanflow.errors import CheckpointError
from meanflow.fileio import file_sha256

__all__ = ["save_checkpoint", "load_checkpoint", "find_checkpoint", "list_checkpoints",
           "optimizer_tensors", "load_optimizer_tensors", "ema_key"]

TENSOR_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")
FORMAT_VERSION = 1


def ema_key(decay: float) -> str:
    """The name of the EMA with ``decay`` in checkpoints and logs, e.g. ``ema_0.9999``."""
    return f"ema_{decay:g}"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Splits ``optimizer.state_dict()`` into flat tensors and JSON-safe scalars."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"{idx}.{name}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor],
                           meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, extra in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(extra)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(ckpt_dir: Path, *, model: dict[str, Tensor], ema: dict[str, Tensor],
                    optimizer: dict[str, Tensor], state: dict[str, Any]) -> Path:
    """Writes one checkpoint folder atomically and returns its path."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=ckpt_dir.parent, prefix=f".{ckpt_dir.name}.tmp-"))
    try:
        hashes = {}
        for fname, tensors in zip(TENSOR_FILES, (model, ema, optimizer)):
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      str(tmp / fname))
            hashes[fname] = file_sha256(tmp / fname)
        meta = dict(state, format_version=FORMAT_VERSION, sha256=hashes)
        (tmp / "state.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        old = None
        if ckpt_dir.exists():  # re-saving a step: move the old copy aside, never leave a gap
            old = ckpt_dir.with_name(f".{ckpt_dir.name}.old-{os.getpid()}")
            os.replace(ckpt_dir, old)
        os.replace(tmp, ckpt_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ckpt_dir


def load_checkpoint(ckpt_dir: Path, device: torch.device | str = "cpu",
                    parts: tuple[str, ...] = ("model", "ema", "optimizer")
                    ) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """Reads and verifies a checkpoint folder: ``({part: tensors}, state)``.

    Raises CheckpointError naming the file when anything is missing, truncated or altered.
    """
    ckpt_dir = Path(ckpt_dir)
    state_path = ckpt_dir / "state.json"
    if not state_path.is_file():
        raise CheckpointError(f"no checkpoint at {ckpt_dir} (state.json missing): give a run "
                              "folder or a checkpoints/step_* folder written by meanflow train")
    try:
        state = json.loads(state_path.read_text())
        hashes = state["sha256"]
        if not isinstance(hashes, dict):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"{state_path} is corrupt (not meanflow checkpoint JSON); "
                              "restore it or resume from an earlier checkpoint") from None
    tensors = {}
    for part in parts:
        fname = f"{part}.safetensors"
        path = ckpt_dir / fname
        if not path.is_file():
            raise CheckpointError(f"checkpoint file missing: {path}; resume from an earlier "
                                  "checkpoint")
        if file_sha256(path) != hashes.get(fname):
            raise CheckpointError(f"checkpoint file {path} is truncated or was modified "
                                  "(SHA-256 mismatch); resume from an earlier checkpoint")
        try:
            tensors[part] = load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {path} ({exc})") from None
    return tensors, state


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Completed checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder itself, or the newest one of a run folder."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"no checkpoint found in {path}: give a run folder written by "
                              "meanflow train (it holds checkpoints/step_*) or a step folder")
    return found[-1]
