"""``meanflow export --format meanflow``: one set of a run's weights as a small checkpoint
folder that samples bit for bit like the run, refuses what it does not hold, and replaces
nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import cli
from meanflow.errors import CheckpointError, ConfigError
from meanflow.runs.config import RunConfig
from meanflow.runs.load import load
from meanflow.runs.release import RELEASE_DROPS, export_release
from meanflow.train.loop import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A 4-step MeanFlow run on points with two EMA decays."""
    run = tmp_path_factory.mktemp("release") / "run"
    cfg = RunConfig.from_dict({
        "model": {"options": {"width": 16, "depth": 1, "emb_dim": 8}},
        "train": {"steps": 4, "batch_size": 16, "checkpoint_every": 2, "log_every": 2,
                  "progress": False, "ema_decays": [0.999, 0.9], "keep_checkpoints": 0}})
    train(cfg.validate(), run)
    return run


@pytest.mark.parametrize("ema", ["auto", 0.9, None])
def test_release_samples_as_the_run_does(trained_run, tmp_path, ema):
    out = export_release(trained_run, tmp_path / "rel", ema=ema, notes={"command": "x"})
    files = sorted(p.name for p in out.iterdir())
    part = "model" if ema is None else "ema"
    assert files == [f"{part}.safetensors", "state.json"]
    state = json.loads((out / "state.json").read_text())
    assert not set(RELEASE_DROPS[:-1]) & set(state)
    assert state["ema_decays"] == ([] if ema is None else [0.999 if ema == "auto" else 0.9])
    assert state["release"]["command"] == "x" and state["release"]["step"] == 4
    choice = ema if ema != "auto" else 0.999
    a = load(trained_run, ema=choice).sample(32, seed=5, steps=2)
    b = load(out, ema="auto").sample(32, seed=5, steps=2)
    assert torch.equal(a.samples, b.samples)
    assert b.seeds == a.seeds


def test_release_is_a_fraction_of_the_checkpoint(trained_run, tmp_path):
    out = export_release(trained_run, tmp_path / "rel")
    ckpt = trained_run / "checkpoints" / "step_0000004"
    whole = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    kept = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    # one copy of the weights against five (raw, two EMAs, two Adam moments)
    assert kept < whole / 4


def test_release_refuses_weights_it_does_not_hold(trained_run, tmp_path):
    out = export_release(trained_run, tmp_path / "rel", ema=0.9)
    with pytest.raises(ConfigError, match="choose --ema 0.9$"):
        load(out, ema=None)
    with pytest.raises(ConfigError, match="no EMA with decay 0.999"):
        load(out, ema=0.999)
    with pytest.raises(ConfigError, match="no EMA with decay 0.5"):
        export_release(trained_run, tmp_path / "other", ema=0.5)
    assert not (tmp_path / "other").exists()


def test_release_never_replaces_a_folder(trained_run, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not an empty folder"):
        export_release(trained_run, taken)
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]
    assert export_release(trained_run, tmp_path / "empty-ok") == tmp_path / "empty-ok"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporaries


def test_tampered_release_is_refused(trained_run, tmp_path):
    out = export_release(trained_run, tmp_path / "rel")
    path = out / "ema.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load(out)


def test_cli_export_meanflow_then_sample(trained_run, tmp_path, capsys):
    out = tmp_path / "rel"
    assert cli("export", trained_run, out, "--format", "meanflow", "--ema", "0.9") == 0
    assert f"meanflow sample {out}" in capsys.readouterr().out
    assert cli("sample", out, "--n", 8, "--out", tmp_path / "s.npz") == 0
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["weights"] == "ema_0.9" and record["checkpoint"] == str(out)
    assert cli("export", trained_run, tmp_path / "r2", "--format", "meanflow",
               "--vae", "x") == 2
    assert "drop --vae" in capsys.readouterr().err
    assert cli("export", trained_run, tmp_path / "r3", "--format", "onnx") == 2
    assert "diffusers, meanflow" in capsys.readouterr().err
