"""Run folders: made for one run, never overwritten, resumed only with the same settings, one
writer at a time.

A run folder holds ``config.json``/``config.yaml`` (written before the first step),
``metrics.jsonl`` (one line per ``train.log_every`` steps, plus evaluation records) and
``checkpoints/step_*`` (:mod:`meanflow.runs.checkpoint`), and the lock file ``.meanflow.lock``
(:func:`meanflow.fileio.exclusive`). :func:`hold_run_dir` is how a run takes its folder: the
checks that refuse it, the lock (held until the run ends), the removal of the temporaries that
a killed run left, then :func:`check_run_dir`. The lock file and such temporaries never count
as files of the folder (docs/design.md, Run folders, checkpoints and resume).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any, Iterator

from meanflow.errors import CheckpointError, ConfigError
from meanflow.fileio import (FOLDER_LOCK, atomic_write_text, exclusive, is_temporary,
                             remove_stale_temporaries)
from meanflow.runs.config import RunConfig, apply_overrides

__all__ = ["RESUMABLE_KEYS", "LEGACY_DEFAULTS", "saved_settings", "saved_config",
           "config_differences", "prepare_run_dir", "check_run_dir",
           "write_run_config", "hold_run_dir", "clean_run_dir", "foreign_entries",
           "new_run_dir", "truncate_metrics"]

# the sub-folders of a run where a killed writer may leave temporaries
_WRITTEN_INTO = (".", "checkpoints", "samples")

# Settings that may change between a run and its resumption; anything else must match.
RESUMABLE_KEYS = {("train", k) for k in (
    "steps", "epochs", "images", "log_every", "checkpoint_every", "keep_checkpoints", "device",
    "progress", "compile", "tf32", "sample_every", "sample_count", "sample_steps", "tensorboard",
    "fid_every", "fid_ref", "fid_n", "fid_steps", "fsdp", "energy_every", "energy_n")} | {("model", "jvp_attention"),
                                                            ("objective", "jvp")} | {
    # what a diverged run is resumed with, from its last good checkpoint (train/guard.py)
    ("optim", k) for k in ("lr", "grad_clip", "warmup_steps")}

# Settings added to meanflow after runs were made, and the value each had in such a run
# (its behaviour then): a saved config.json without the key reads as this, not the default.
LEGACY_DEFAULTS = {
    ("data", "order"): "random",        # batches were drawn with replacement
    ("train", "ema_warmup"): False,     # the EMA started from the initial weights
}


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


def foreign_entries(run_dir: Path) -> list[str]:
    """The names in ``run_dir`` that are not ours to ignore: everything but the lock file and
    the temporaries of our writers (:func:`meanflow.fileio.is_temporary`)."""
    return sorted(p.name for p in Path(run_dir).iterdir()
                  if p.name != FOLDER_LOCK and not is_temporary(p.name))


def _refuse_target(run_dir: Path) -> None:
    """What is refused before the folder is even locked (locking writes a file into it)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output path {run_dir} is a file, not a folder: choose a new --out")
    if (run_dir.is_dir() and not (run_dir / "config.json").is_file()
            and foreign_entries(run_dir)):
        raise ConfigError(f"output folder {run_dir} is not empty and holds no meanflow run: "
                          "choose a new or empty --out")


def check_run_dir(cfg: RunConfig, run_dir: Path, resume: bool) -> None:
    """Checks that ``run_dir`` may take this run, writing nothing: a new run needs a folder
    that does not exist or holds nothing of anyone's (our lock file and temporaries aside);
    ``resume`` of a folder that holds a run needs the same settings (``RESUMABLE_KEYS``
    aside). Another run is never overwritten: ConfigError (CheckpointError for a config.json
    that is not a run's)."""
    run_dir = Path(run_dir)
    saved = run_dir / "config.json"
    if not saved.is_file():
        _refuse_target(run_dir)
        return
    if not resume:
        raise ConfigError(f"output folder {run_dir} already holds a run: pass --resume to "
                          "continue it, or choose a new --out")
    old = saved_settings(run_dir)
    try:  # other settings added to meanflow after the run was made take their defaults
        old = RunConfig.from_dict(old).to_dict()
    except (ConfigError, TypeError, ValueError, AttributeError):
        pass  # compare as saved; the differences are reported below
    diff = [d for d in config_differences(old, cfg.to_dict()) if d not in RESUMABLE_KEYS]
    if diff:
        keys = ", ".join(".".join(map(str, d)) for d in diff)
        raise ConfigError(f"cannot resume {run_dir}: its config differs in {keys}; use "
                          "the same settings, or choose a new --out")


def saved_settings(run_dir: Path) -> dict[str, Any]:
    """The settings in ``run_dir/config.json`` as saved, with the values that settings added
    to meanflow since then had in that run (:data:`LEGACY_DEFAULTS`); CheckpointError for a
    file that is not a config."""
    saved = Path(run_dir) / "config.json"
    try:
        old = json.loads(saved.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{saved} is corrupt: restore it, or start a new run in "
                              "another folder") from None
    if not isinstance(old, dict):
        raise CheckpointError(f"{saved} is not a meanflow config (it holds a JSON "
                              f"{type(old).__name__}, not a mapping): restore it, or start a "
                              "new run in another folder")
    for (section, key), value in LEGACY_DEFAULTS.items():
        if isinstance(old.get(section), dict):
            old[section].setdefault(key, value)
    return old


def saved_config(run_dir: Path, overrides: list[str] | None = None) -> RunConfig:
    """The config a run folder was made with (:func:`saved_settings`), with dotted
    ``overrides`` on top, validated: what ``meanflow train --resume --out DIR`` continues
    with when given no --config (docs/design.md, Run folders, checkpoints and resume)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"--resume: {run_dir} holds no run to continue (no config.json); "
                          "check the path, or drop --resume to start a new run there")
    return RunConfig.from_dict(apply_overrides(saved_settings(run_dir),
                                               overrides or [])).validate()


def write_run_config(cfg: RunConfig, run_dir: Path) -> None:
    """Writes ``config.json`` and ``config.yaml`` (atomically) into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.json", cfg.to_json() + "\n")
    atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())


def prepare_run_dir(cfg: RunConfig, run_dir: Path, resume: bool) -> None:
    """Creates the run folder, or checks that ``resume`` continues the same run
    (:func:`check_run_dir`), and writes the config into it."""
    check_run_dir(cfg, run_dir, resume)
    write_run_config(cfg, run_dir)


def clean_run_dir(run_dir: Path) -> list[str]:
    """Removes the temporaries that a killed run left in ``run_dir``, ``checkpoints/`` and
    ``samples/`` (our own names only) and returns their paths relative to ``run_dir``. Call
    it while holding the folder's lock."""
    run_dir = Path(run_dir)
    return [str(Path(sub) / name) for sub in _WRITTEN_INTO
            for name in remove_stale_temporaries(run_dir / sub)]


@contextlib.contextmanager
def hold_run_dir(cfg: RunConfig, run_dir: Path, resume: bool,
                 what: str = "meanflow train") -> Iterator[list[str]]:
    """Takes ``run_dir`` for one run until the block ends: :func:`check_run_dir` refuses it
    before anything is written, then the folder is created and locked (another writer is
    refused in one line; :func:`meanflow.fileio.exclusive`), the stale temporaries are removed
    (:func:`clean_run_dir`) and :func:`check_run_dir` runs again on what the lock protects
    now. Yields what was removed. The
    config is not written here (:func:`write_run_config`): a resume that fails later leaves
    the folder as it was."""
    run_dir = Path(run_dir)
    check_run_dir(cfg, run_dir, resume)     # a refusal leaves even the lock file untouched
    run_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(run_dir, what):
        removed = clean_run_dir(run_dir)
        check_run_dir(cfg, run_dir, resume)
        yield removed


def new_run_dir(cfg: RunConfig, root: str | Path = "runs") -> Path:
    """A fresh run folder named by its content, e.g. ``runs/00003-8gaussians-meanflow-mlp``.
    ``cfg`` as training resolves it (:func:`meanflow.runs.build.resolve_model`, as
    ``meanflow train`` does), so that the name holds the backbone ``model.name: auto`` chose."""
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
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        step = record.get("step", 0) if isinstance(record, dict) else None
        if isinstance(step, (int, float)) and not isinstance(step, bool) and step <= last_step:
            keep.append(line)     # a line that is no record of ours goes too
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))
