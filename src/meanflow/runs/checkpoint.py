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

The folder is written under a temporary name (:func:`meanflow.fileio.temporary_dir`) and renamed
into place, so a kill mid-write leaves either the old set of checkpoints or the new one, never
half of one; the next ``train`` removes what such a kill left (docs/design.md, Run folders,
checkpoints and resume). A write that fails (a full disk) is one CheckpointError, and the
checkpoints before it stay as they were.

:func:`check_state` bounds what ``state.json`` says before anything is built from it, and
:func:`list_checkpoints` ignores folders whose name is not ``step_<number>`` (with a warning).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from meanflow.errors import CheckpointError
from meanflow.fileio import file_sha256, temporary_dir
from meanflow.pretrained import PRETRAINED, resolve_pretrained

__all__ = ["save_checkpoint", "load_checkpoint", "find_checkpoint", "list_checkpoints",
           "optimizer_tensors", "load_optimizer_tensors", "ema_key", "check_state",
           "MAX_NUM_CLASSES", "MAX_SAMPLE_SIZE", "checkpoint_step"]

TENSOR_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")
FORMAT_VERSION = 1
#: Bounds on what a state.json may describe, checked before a network is built from it: one
#: sample of at most 2^26 numbers (e.g. 3 x 4096 x 4096), at most 10^6 classes.
MAX_SAMPLE_SIZE = 2 ** 26
MAX_NUM_CLASSES = 10 ** 6
_STEP_NAME = re.compile(r"^step_(\d+)$")


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
    """Writes one checkpoint folder atomically and returns its path.

    A write that fails (``OSError`` or ``SafetensorError``: a full disk, a read-only folder)
    removes the temporary folder and raises a CheckpointError naming the newest checkpoint
    left intact beside it."""
    ckpt_dir = Path(ckpt_dir)
    tmp = temporary_dir(ckpt_dir)
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
            old = temporary_dir(ckpt_dir)   # an empty folder, which a rename may replace
            os.replace(ckpt_dir, old)
        os.replace(tmp, ckpt_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(ckpt_dir.parent.parent, quiet=True)
        left = (f"the newest checkpoint, {kept[-1]}, is intact" if kept
                else "no earlier checkpoint exists")
        reason = (getattr(exc, "strerror", None) or str(exc)).splitlines()[0] if str(exc) \
            else type(exc).__name__
        raise CheckpointError(f"could not write the checkpoint {ckpt_dir} ({reason}); {left}: "
                              "free disk space, then continue with --resume") from None
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_state(state: Any, ckpt: Path, optimizer: bool = False) -> dict[str, Any]:
    """The fields of a checkpoint's ``state.json`` that a run is rebuilt from, checked before
    anything is built or allocated from them: ``step`` (a whole number >= 0), ``config`` (a
    mapping), ``data`` (``shape``: positive whole numbers, at most ``MAX_SAMPLE_SIZE`` in all;
    ``num_classes``: null or 1 .. ``MAX_NUM_CLASSES``), ``ema_decays`` (numbers in [0, 1))
    and, with ``optimizer``, the optimiser record. Returns ``{"step", "config", "shape",
    "num_classes", "decays"}``; raises one CheckpointError naming the file and the field."""
    where = Path(ckpt) / "state.json"

    def bad(field: str, value: Any, why: str) -> CheckpointError:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return CheckpointError(f"{where} has {field} = {shown}, which {why}: it was not written "
                               "by meanflow train as it is; restore it or use an earlier "
                               "checkpoint")

    if not isinstance(state, dict):
        raise bad("its content", state, "is not a mapping")
    step = state.get("step")
    if not _is_int(step) or step < 0:
        raise bad("step", step, "is not a whole number of steps >= 0")
    config = state.get("config")
    if not isinstance(config, dict):
        raise bad("config", config, "is not a mapping of settings")
    data = state.get("data")
    if not isinstance(data, dict):
        raise bad("data", data, "is not a mapping")
    shape = data.get("shape")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 4
            or not all(_is_int(n) and n >= 1 for n in shape)):
        raise bad("data.shape", shape, "is not the shape of one sample (1 to 4 positive "
                  "whole numbers)")
    if math.prod(shape) > MAX_SAMPLE_SIZE:
        raise bad("data.shape", shape, f"holds more than {MAX_SAMPLE_SIZE} numbers per sample")
    classes = data.get("num_classes")
    if classes is not None and not (_is_int(classes) and 1 <= classes <= MAX_NUM_CLASSES):
        raise bad("data.num_classes", classes, f"is not null or a number of classes from 1 to "
                  f"{MAX_NUM_CLASSES}")
    decays = state.get("ema_decays")
    if not isinstance(decays, list) or not all(
            isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d < 1
            for d in decays):
        raise bad("ema_decays", decays, "is not a list of decays in [0, 1)")
    record = state.get("optimizer")
    if optimizer and not (isinstance(record, dict) and isinstance(record.get("param_groups"), list)
                          and isinstance(record.get("scalars"), dict)):
        raise bad("optimizer", record, "is not the record of an optimiser (param_groups, "
                  "scalars)")
    return {"step": step, "config": config, "shape": tuple(shape), "num_classes": classes,
            "decays": [float(d) for d in decays]}


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``step_<number>`` folder name, None for any other name."""
    match = _STEP_NAME.match(Path(path).name)
    return int(match[1]) if match else None


def list_checkpoints(run_dir: Path, quiet: bool = False) -> list[Path]:
    """Completed checkpoint folders of a run, oldest first. A ``step_*`` folder whose suffix
    is not a number (a user's ``step_0000010.bak``) is not one of them: it is left alone, with
    a warning line on stderr unless ``quiet``."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.glob("step_*"):
        if not (p.is_dir() and (p / "state.json").is_file()):
            continue
        if checkpoint_step(p) is None:
            if not quiet:
                print(f"warning: ignoring {p}: not a checkpoint folder name (step_<number>)",
                      file=sys.stderr)
            continue
        found.append(p)
    return sorted(found, key=checkpoint_step)


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder itself, the newest one of a run folder, or the folder of a model
    shipped with meanflow given by name (:mod:`meanflow.pretrained`; a path that exists wins)."""
    path = resolve_pretrained(path)
    if (path / "state.json").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"no checkpoint found in {path}: give a run folder written by "
                              "meanflow train (it holds checkpoints/step_*), a step folder, "
                              f"or a shipped model ({', '.join(PRETRAINED)})")
    return found[-1]
