"""Run folders: made for one run, never overwritten, resumed only with the same settings.

A run folder holds ``config.json``/``config.yaml`` (written before the first step),
``metrics.jsonl`` (one line per ``train.log_every`` steps, plus evaluation records) and
``checkpoints/step_*`` (:mod:`meanflow.runs.checkpoint`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from meanflow.errors import CheckpointError, ConfigError
from meanflow.fileio import atomic_write_text
from meanflow.runs.config import RunConfig

__all__ = ["RESUMABLE_KEYS", "config_differences", "prepare_run_dir", "new_run_dir",
           "truncate_metrics"]

# Settings that may change between a run and its resumption; anything else must match.
RESUMABLE_KEYS = {("train", k) for k in (
    "steps", "epochs", "images", "log_every", "checkpoint_every", "keep_checkpoints", "device",
    "progress", "compile", "tf32", "sample_every", "sample_count", "sample_steps", "tensorboard",
    "fid_every", "fid_ref", "fid_n", "fid_steps", "fsdp")} | {("model", "jvp_attention"),
                                                            ("objective", "jvp")}


def config_differences(a: dict, b: dict, prefix: tuple = ()) -> list[tuple]:
    """The keys (as tuples of nested names, sorted) whose values differ between two config
    dicts; a key present in one only counts as different."""
    keys = set(a) | set(b)
    out = []
    for k in sorted(keys):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += config_differences(a[k], b[k], prefix + (k,))
        elif a.get(k) != b.get(k):
            out.append(prefix + (k,))
    return out


def prepare_run_dir(cfg: RunConfig, run_dir: Path, resume: bool) -> None:
    """Creates the run folder, or checks that ``resume`` continues the same run.

    Never overwrites another run: a folder that holds a different run, or any files but a
    run's, is refused with a ConfigError.
    """
    run_dir = Path(run_dir)
    saved = run_dir / "config.json"
    if saved.is_file():
        if not resume:
            raise ConfigError(f"output folder {run_dir} already holds a run: pass --resume to "
                              "continue it, or choose a new --out")
        try:
            old = json.loads(saved.read_text())
        except json.JSONDecodeError:
            raise CheckpointError(f"{saved} is corrupt: restore it, or start a new run in "
                                  "another folder") from None
        if isinstance(old, dict) and isinstance(old.get("data"), dict):
            # a run saved before data.order existed drew its batches with replacement
            old["data"].setdefault("order", "random")
        try:  # other settings added to meanflow after the run was made take their defaults
            old = RunConfig.from_dict(old).to_dict()
        except ConfigError:
            pass  # compare as saved; the differences are reported below
        diff = [d for d in config_differences(old, cfg.to_dict()) if d not in RESUMABLE_KEYS]
        if diff:
            keys = ", ".join(".".join(d) for d in diff)
            raise ConfigError(f"cannot resume {run_dir}: its config differs in {keys}; use "
                              "the same settings, or choose a new --out")
    elif run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output path {run_dir} is a file, not a folder: choose a new --out")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"output folder {run_dir} is not empty and holds no meanflow run: "
                          "choose a new or empty --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.json", cfg.to_json() + "\n")
    atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())


def new_run_dir(cfg: RunConfig, root: str | Path = "runs") -> Path:
    """A fresh run folder named by its content, e.g. ``runs/00003-8gaussians-meanflow-mlp``."""
    root = Path(root)
    taken = [int(p.name.split("-", 1)[0]) for p in root.glob("[0-9][0-9][0-9][0-9][0-9]-*")
             if p.name.split("-", 1)[0].isdigit()] if root.is_dir() else []
    data = re.sub(r"[^A-Za-z0-9_.]+", "_", Path(cfg.data.name).stem)
    cond = "-cond" if cfg.data.class_conditional else ""
    name = f"{max(taken, default=0) + 1:05d}-{data}{cond}-{cfg.objective.kind}-{cfg.model.name}"
    return root / name


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drops the lines of ``metrics.jsonl`` logged after ``last_step``: a run resumed from the
    checkpoint of that step redoes them."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))
