"""One set of a run's weights as a small checkpoint folder to share:
``meanflow export RUN OUT --format meanflow``.

A training checkpoint holds the raw weights, every EMA and the optimiser's moments (about
five times the network). To sample, one set of weights is enough. :func:`export_release`
writes a folder that :func:`meanflow.load`, ``meanflow sample`` and ``meanflow fid calc``
read like any ``checkpoints/step_*`` folder:

- ``ema.safetensors`` holding the one chosen EMA (keys ``ema_<decay>.<param>``), or
  ``model.safetensors`` holding the raw weights when ``ema`` is None;
- ``state.json``: the checkpoint's record (config, data shape and class names, step, loss,
  versions) with ``ema_decays`` naming only the EMA kept, no optimiser or data-order record,
  the SHA-256 of the one tensor file, and ``release``: where it came from (checkpoint, step,
  weights) and, where given, the command that trained it and its measured scores.

The shipped ``fmnist-pretrained`` model (:mod:`meanflow.pretrained`) is such a folder. The
folder is written under a temporary name and renamed into place: OUT is whole or absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from meanflow.errors import ConfigError
from meanflow.fileio import file_sha256, new_folder
from meanflow.runs.checkpoint import (FORMAT_VERSION, check_state, ema_key, find_checkpoint,
                                      load_checkpoint)

__all__ = ["export_release", "RELEASE_DROPS"]

#: state.json fields of a training checkpoint that a release leaves out: they serve resuming
#: training, which a release cannot do (it has no optimiser state).
RELEASE_DROPS = ("optimizer", "data_position", "log_window", "sha256")


def export_release(run_or_checkpoint: str | os.PathLike[str], out: str | os.PathLike[str],
                   ema: float | str | None = "auto",
                   notes: dict[str, Any] | None = None) -> Path:
    """Writes the weights ``ema`` chooses of a run (its newest checkpoint) or a checkpoint
    folder as a release folder ``out`` (see the module docstring) and returns its path.

    Args:
        ema: "auto" (the run's first EMA), a decay, or None for the raw training weights.
        notes: JSON-ready facts to keep under ``release`` (e.g. ``command``, ``scores``).

    ``out`` must not exist, or be an empty folder: nothing is replaced.
    """
    out = Path(out)
    _check_out(out)
    ckpt = find_checkpoint(Path(run_or_checkpoint))
    _, state = load_checkpoint(ckpt, parts=())
    decays = check_state(state, ckpt)["decays"]
    if ema is None or (ema == "auto" and not decays):
        part, kept, weights = "model", [], "model"
    else:
        decay = decays[0] if ema == "auto" else float(ema)
        if decay not in decays:
            raise ConfigError(f"checkpoint {ckpt} has no EMA with decay {ema}: choose one of "
                              f"{', '.join(map(str, decays))} or none")
        part, kept, weights = "ema", [decay], ema_key(decay)
    tensors = load_checkpoint(ckpt, parts=(part,))[0][part]
    if part == "ema":
        tensors = {k: v for k, v in tensors.items() if k.startswith(weights + ".")}
    record = {k: v for k, v in state.items() if k not in RELEASE_DROPS}
    record.update(ema_decays=kept, format_version=FORMAT_VERSION,
                  release={"from": str(ckpt), "step": state["step"], "weights": weights,
                           **(notes or {})})
    with new_folder(out, _check_out) as tmp:   # out is still new or empty when it lands
        fname = f"{part}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / fname))
        record["sha256"] = {fname: file_sha256(tmp / fname)}
        (tmp / "state.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


def _check_out(out: Path) -> None:
    """OUT is new or an empty folder, else a one-line ConfigError."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder: choose a new folder for "
                          "the export")
