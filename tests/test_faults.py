"""Faults around a run folder (docs/design.md, Run folders, checkpoints and resume): diverged
weights refused, one writer per folder, stale temporaries removed, state.json and config.json
validated, a full disk during a checkpoint write, folders that are not checkpoints, and
checkpoints that do not fit. Each is one line (exit 2 from the CLI) and leaves the user's
files as they were."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import meanflow.runs.checkpoint as ckpt_mod
from meanflow.errors import CheckpointError, ConfigError
from meanflow.fileio import exclusive
from meanflow.runs.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from meanflow.runs.config import RunConfig
from meanflow.runs.load import load_model
from meanflow.train.loop import train

from cli_helpers import cli  # noqa: E402

TINY = {"width": 16, "depth": 1, "emb_dim": 8}


def config(steps: int = 4, width: int = 16, **train_opts) -> RunConfig:
    tr = {"steps": steps, "batch_size": 16, "checkpoint_every": 2, "log_every": 1,
          "progress": False, "keep_checkpoints": 0, "sample_count": 0}
    tr.update(train_opts)
    return RunConfig.from_dict({"model": {"options": {**TINY, "width": width}},
                                "data": {"name": "8gaussians"}, "train": tr}).validate()


def one_line(capsys, code: int, expected: int, *needles: str) -> str:
    """``code`` is ``expected`` and stderr is one ``meanflow: error:`` line with the needles."""
    err = capsys.readouterr().err
    assert code == expected, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("meanflow: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and mtime, but the lock file's (ours, rewritten by each taker)."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".meanflow.lock"}


def rewrite(ckpt: Path, edit) -> None:
    """Rewrites a checkpoint through ``edit(tensors, state)``, with valid hashes."""
    tensors, state = load_checkpoint(ckpt)
    edit(tensors, state)
    save_checkpoint(ckpt, model=tensors["model"], ema=tensors["ema"],
                    optimizer=tensors["optimizer"], state=state)


def edit_state(ckpt: Path, edit) -> None:
    path = ckpt / "state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at 2 and 4."""
    run = tmp_path_factory.mktemp("faults") / "run"
    train(config(), run)
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


# ---------------------------------------------------------------------------- diverged weights

def nan_ema(tensors, state):
    for k in tensors["ema"]:
        tensors["ema"][k] = torch.full_like(tensors["ema"][k], float("nan"))


def test_diverged_weights_are_refused_naming_the_good_checkpoint(run, capsys, tmp_path):
    """EMA weights with NaN in step_4: load refuses them in one line naming step_2, whose
    weights are finite; the raw weights (finite) still load; meanflow sample exits 2 and
    writes nothing. With step_2 diverged too, the line says that none is left."""
    rewrite(run / "checkpoints" / "step_0000004", nan_ema)
    with pytest.raises(CheckpointError) as info:
        load_model(run)
    message = str(info.value)
    assert f"{run / 'checkpoints' / 'step_0000004'} holds non-finite weights (ema_0.999" in message
    assert f"sample the earlier checkpoint {run / 'checkpoints' / 'step_0000002'}" in message
    assert load_model(run, ema=None).step == 4
    out = tmp_path / "s.npz"
    one_line(capsys, cli("sample", run, "--n", 4, "--out", out), 2, "non-finite weights",
             "step_0000002")
    assert not out.exists()
    rewrite(run / "checkpoints" / "step_0000002", nan_ema)
    with pytest.raises(CheckpointError, match="no earlier checkpoint of this run has finite"):
        load_model(run)


# ---------------------------------------------------------------------------- one writer

def test_a_second_writer_is_refused_and_the_lock_is_held_all_run(run, tmp_path):
    """While one process holds the run folder, train --resume is refused in one line naming
    it, and nothing changes; during training the run itself holds the lock (another taker is
    refused mid-run), and after it the lock is free."""
    before = snapshot(run)
    with exclusive(run, "meanflow train"):
        with pytest.raises(ConfigError, match=rf"in use by process {os.getpid()} \(meanflow "
                           r"train\)"):
            train(config(6), run, resume=True)
    assert snapshot(run) == before
    seen = []

    class Probe:
        shape, num_classes = (2,), None

        def batch(self, batch_size, generator):
            try:
                with exclusive(run, "probe"):
                    seen.append("free")
            except ConfigError:
                seen.append("held")
            return torch.randn(batch_size, 2, generator=generator), None

    train(config(6), run, resume=True, dataset=Probe())
    assert seen == ["held", "held"]
    with exclusive(run, "after"):
        pass


# ---------------------------------------------------------------------------- clean-up

def test_stale_temporaries_are_removed_at_the_next_start(run):
    """What a kill -9 leaves (a half-written checkpoint folder, a metrics temporary, a PNG
    temporary) is removed by the next train --resume; files of other names stay."""
    partial = run / "checkpoints" / ".step_0000006.tmp-a1b2c3d4"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    (run / ".metrics.jsonl.x7y8z9w0.tmp.jsonl").write_text("{}")
    (run / "samples").mkdir()
    (run / "samples" / ".step_0000002-nfe1.png.q1w2e3r4.tmp.png").write_bytes(b"png")
    (run / "notes.tmp").write_text("mine")
    (run / "checkpoints" / ".keep-me").write_text("mine")
    train(config(6), run, resume=True)
    hidden = sorted(str(p.relative_to(run)) for p in run.rglob(".*"))
    assert hidden == [".meanflow.lock", "checkpoints/.keep-me"]
    assert (run / "notes.tmp").read_text() == "mine"


def test_a_folder_of_only_our_leftovers_is_empty_to_train(tmp_path, capsys):
    """Killed before the first config.json: the folder holds the lock file and a config
    temporary. train takes it as empty (and removes the temporary); --resume on it says in one
    line what to do; a folder with a user's file is refused without a lock file put in it."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".meanflow.lock").write_text("")
    (out / ".config.json.k3j4h5g6.tmp.json").write_text("{")
    one_line(capsys, cli("train", "--out", out, "--resume", "--steps", 2, "--batch-size", 16,
                         "--set", "train.progress=false"), 2, "holds no run to continue",
             "drop --resume")
    train(config(2), out)
    assert sorted(p.name for p in out.iterdir()) == [".meanflow.lock", "checkpoints",
                                                     "config.json", "config.yaml",
                                                     "metrics.jsonl"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and holds no meanflow run"):
        train(config(2), foreign)
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]


# ---------------------------------------------------------------------------- state.json

BAD_STATES = {
    "negative step": lambda s: s.update(step=-5),
    "fractional step": lambda s: s.update(step=2.5),
    "text step": lambda s: s.update(step="4"),
    "boolean step": lambda s: s.update(step=True),
    "huge shape": lambda s: s["data"].update(shape=[10 ** 6, 10 ** 6]),
    "zero shape": lambda s: s["data"].update(shape=[0]),
    "text shape": lambda s: s["data"].update(shape="2"),
    "huge num_classes": lambda s: s["data"].update(num_classes=10 ** 12),
    "zero num_classes": lambda s: s["data"].update(num_classes=0),
    "config a list": lambda s: s.update(config=[1, 2]),
    "data a list": lambda s: s.update(data=[2]),
    "decays text": lambda s: s.update(ema_decays="0.999"),
    "optimizer a list": lambda s: s.update(optimizer=[]),
    "window tampered": lambda s: s.update(log_window={"sums": {"loss": "x"}}),
}


@pytest.mark.parametrize("edit", list(BAD_STATES), ids=list(BAD_STATES))
def test_a_tampered_state_json_is_one_line_and_deletes_nothing(run, edit):
    """Resume refuses it before anything is written (the metrics history stays), and loading
    it for sampling refuses it before a network is built (no 10^12-row allocation)."""
    edit_state(run / "checkpoints" / "step_0000004", BAD_STATES[edit])
    before = snapshot(run)
    with pytest.raises(CheckpointError) as info:
        train(config(6), run, resume=True)
    assert "step_0000004/state.json" in str(info.value) and "\n" not in str(info.value)
    assert snapshot(run) == before
    if edit not in ("optimizer a list", "window tampered"):
        with pytest.raises(CheckpointError, match="state.json"):
            load_model(run)


@pytest.mark.parametrize("content", ["[1, 2]", '"a run"', "3"])
def test_a_config_json_that_is_not_a_mapping_is_one_line(run, capsys, content):
    (run / "config.json").write_text(content)
    before = snapshot(run)
    code = cli("train", "--config", run / "config.yaml", "--out", run, "--resume")
    one_line(capsys, code, 2, "config.json is not a meanflow config")
    assert snapshot(run) == before


# ---------------------------------------------------------------------------- full disk

@pytest.mark.parametrize("error", [SafetensorError("No space left on device (os error 28)"),
                                   OSError(errno.ENOSPC, "No space left on device")],
                         ids=["safetensors", "oserror"])
def test_a_full_disk_during_a_checkpoint_write(run, capsys, monkeypatch, error):
    """The write fails at its 2nd tensor file: one line naming the cause and the intact
    checkpoint, exit 2, no temporary left, the earlier checkpoints byte-identical; once
    there is space, --resume finishes the run."""
    real, calls = ckpt_mod.save_file, []

    def full(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(*args, **kwargs)

    before = {k: v for k, v in snapshot(run).items() if k.startswith("checkpoints")}
    monkeypatch.setattr(ckpt_mod, "save_file", full)
    code = cli("train", "--config", run / "config.yaml", "--out", run, "--resume", "--steps", 6)
    one_line(capsys, code, 2, "No space left on device",
             f"the newest checkpoint, {run / 'checkpoints' / 'step_0000004'}, is intact")
    assert {k: v for k, v in snapshot(run).items() if k.startswith("checkpoints")} == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002",
                                                                       "step_0000004"]
    monkeypatch.setattr(ckpt_mod, "save_file", real)
    assert cli("train", "--config", run / "config.yaml", "--out", run, "--resume",
               "--steps", 6) == 0
    assert load_model(run).step == 6


# ---------------------------------------------------------------------------- odd folders

def test_a_folder_that_is_not_a_step_number_is_ignored_with_a_warning(run, capsys, tmp_path):
    """A user's checkpoints/step_0000010.bak: sample, load and --resume ignore it with one
    warning line, never prune it, and use the real newest checkpoint."""
    bak = run / "checkpoints" / "step_0000010.bak"
    shutil.copytree(run / "checkpoints" / "step_0000004", bak)
    assert find_checkpoint(run) == run / "checkpoints" / "step_0000004"
    assert capsys.readouterr().err.count("warning: ignoring") == 1
    assert cli("sample", run, "--n", 4, "--out", tmp_path / "s.npz") == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ignoring")
    assert "step_0000010.bak" in err[0]
    train(config(8, keep_checkpoints=1), run, resume=True)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "step_0000010.bak" in err[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000008",
                                                                       "step_0000010.bak"]


# ---------------------------------------------------------------------------- misfit tensors

def drop_model_key(tensors, state):
    tensors["model"].pop(sorted(tensors["model"])[0])


def extra_ema_key(tensors, state):
    tensors["ema"]["ema_0.999.stray"] = torch.zeros(3)


def wrong_optimizer_shape(tensors, state):
    key = next(k for k in tensors["optimizer"] if k.endswith("exp_avg"))
    tensors["optimizer"][key] = torch.zeros(7, 3)


def wrong_ema_shape(tensors, state):
    key = sorted(tensors["ema"])[0]
    tensors["ema"][key] = torch.zeros(1)


MISFITS = {"missing model key": drop_model_key, "extra EMA key": extra_ema_key,
           "Adam state shape": wrong_optimizer_shape, "EMA shape (broadcastable)": wrong_ema_shape}


@pytest.mark.parametrize("misfit", list(MISFITS) + ["another config's checkpoint"])
def test_resume_with_tensors_that_do_not_fit_is_one_line(run, capsys, tmp_path, misfit):
    """Another config's checkpoint (width 32 in a width-16 run), a missing or extra key, an
    Adam or EMA tensor of another shape: --resume refuses it in one line, writes nothing."""
    ckpt = run / "checkpoints" / "step_0000004"
    if misfit in MISFITS:
        rewrite(ckpt, MISFITS[misfit])
    else:
        other = tmp_path / "other"
        train(config(4, width=32), other)
        shutil.rmtree(ckpt)
        shutil.copytree(other / "checkpoints" / "step_0000004", ckpt)
        edit_state(ckpt, lambda s: s.update(config=config().to_dict()))
    before = snapshot(run)
    code = cli("train", "--config", run / "config.yaml", "--out", run, "--resume", "--steps", 6)
    one_line(capsys, code, 2, f"the tensors of {ckpt} do not fit this run's model")
    assert snapshot(run) == before


# ---------------------------------------------------------------------------- the CLI's exits

def test_a_diverged_run_exits_1_with_one_line_and_no_checkpoint_from_the_streak(tmp_path, capsys):
    """The issue's lr of 1e6: exit code 1, one line naming the rate and what to run; no
    checkpoint holds the diverged state, so sample finds none (exit 2, one line)."""
    out = tmp_path / "run"
    code = cli("train", "--out", out, "--steps", 40, "--lr", "1e6", "--batch-size", 16,
               "--set", "model.options={width: 16, depth: 1, emb_dim: 8}",
               "--set", "train.checkpoint_every=5", "--set", "train.progress=false")
    one_line(capsys, code, 1, "training diverged", "at lr 1e+06", "--resume --lr 100000")
    assert not (out / "checkpoints").exists()
    one_line(capsys, cli("sample", out, "--n", 4, "--out", tmp_path / "s.npz"), 2,
             "no checkpoint found")
