"""The built-in demo: its settings, and (slow) a short end-to-end run that writes the figure and
the metrics and reuses finished runs when re-run."""

from __future__ import annotations

import json

import pytest
import torch

from meanflow.data import build_dataset
from meanflow.demo import DEFAULT_STEPS, _on_mode, demo_config, run_demo
from meanflow.errors import ConfigError
from meanflow.runs.config import RunConfig


@pytest.mark.parametrize("kind", ["meanflow", "flow_matching"])
def test_demo_config_is_valid(kind):
    """The demo's config validates for both objectives, with the documented settings."""
    cfg = demo_config(kind, steps=123, seed=4)
    assert isinstance(cfg, RunConfig)
    assert cfg.validate() is cfg
    assert cfg.objective.kind == kind and cfg.objective.p == 0.5
    assert cfg.data.name == "8gaussians" and not cfg.data.class_conditional
    assert cfg.train.steps == 123 and cfg.train.seed == 4
    assert cfg.train.checkpoint_every == 123           # one checkpoint, at the end
    assert cfg.train.ema_decays == [0.995]
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_demo_configs_differ_only_in_the_objective():
    """MeanFlow and flow matching are compared under the same model, data and optimiser."""
    a = demo_config("meanflow", 50).to_dict()
    b = demo_config("flow_matching", 50).to_dict()
    assert a["objective"].pop("kind") == "meanflow" and b["objective"].pop("kind") != "meanflow"
    assert a == b


@pytest.mark.parametrize("kind,steps", [("diffusion", 10), ("meanflow", 0)])
def test_demo_config_rejects_bad_arguments(kind, steps):
    """An unknown objective or zero steps is a ConfigError."""
    with pytest.raises(ConfigError):
        demo_config(kind, steps)


def test_default_steps():
    """The documented default budget."""
    assert DEFAULT_STEPS == 2000


def test_on_mode_of_the_data_itself():
    """About 98.9% of 8gaussians points lie within 3 std of a mode; far points are off mode."""
    ds = build_dataset("8gaussians")
    x, _ = ds.batch(4000, torch.Generator().manual_seed(0))
    assert _on_mode(x, ds.centers, ds.std) == pytest.approx(0.989, abs=0.01)
    assert _on_mode(torch.zeros(10, 2), ds.centers, ds.std) == 0.0


@pytest.mark.slow
def test_run_demo_end_to_end(tmp_path, capsys):
    """A 30-step demo writes figure.png and metrics.json (all sample sets, finite distances,
    the floor), and a re-run through the CLI reuses both runs and reproduces the metrics."""
    out = tmp_path / "demo"
    metrics = run_demo(out, steps=30, progress=False)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics["train_steps"] == 30
    assert abs(metrics["floor_two_data_samples"]) < 0.05    # unbiased, may dip below 0
    assert metrics["data_on_mode"] == pytest.approx(0.989, abs=0.01)
    expected = {"meanflow_1step", "meanflow_2step"} | {f"flow_matching_{k}step"
                                                       for k in (1, 2, 10, 100)}
    assert set(metrics["sets"]) == expected
    for m in metrics["sets"].values():
        assert m["energy_distance"] == pytest.approx(m["energy_distance"])   # not NaN
        assert 0.0 <= m["on_mode"] <= 1.0
    ckpts = {kind: out / kind / "checkpoints" / "step_0000030" / "model.safetensors"
             for kind in ("meanflow", "flow_matching")}
    stamps = {kind: p.stat().st_mtime_ns for kind, p in ckpts.items()}

    from meanflow.cli import main
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--steps", "30", "--no-progress"]) == 0
    assert "energy distance" in capsys.readouterr().out
    assert {kind: p.stat().st_mtime_ns for kind, p in ckpts.items()} == stamps
    again = json.loads((out / "metrics.json").read_text())
    assert again["sets"] == json.loads(json.dumps(metrics["sets"]))


@pytest.mark.slow
def test_full_demo_meets_its_claims(tmp_path):
    """The README's claim, checked at the demo's real budget (about 80 s on 2 cores): MeanFlow's
    1-step samples sit on the modes and near the data; one-step flow matching does not."""
    from meanflow.demo import run_demo
    metrics = run_demo(tmp_path / "demo", progress=False)
    mf, fm = metrics["sets"]["meanflow_1step"], metrics["sets"]["flow_matching_1step"]
    assert mf["on_mode"] > 0.9 and mf["energy_distance"] < 0.05, mf
    assert fm["on_mode"] < 0.2 and fm["energy_distance"] > 0.5, fm
    assert abs(metrics["floor_two_data_samples"]) < 0.01
