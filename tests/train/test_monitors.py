"""What a run reports while it trains (meanflow.train.monitors): sample grids, TensorBoard, and
FID during training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import meanflow
from meanflow.data import build_dataset
from meanflow.errors import ConfigError
from meanflow.metrics.distances import energy_distance
from meanflow.runs.config import load_config
from meanflow.train.energy import REFERENCE_SEED
from meanflow.train.loop import train

from test_loop_features import image_config, images_npz  # noqa: E402


def test_image_run_writes_sample_grids_at_intervals(tmp_path):
    data = images_npz(tmp_path)
    cfg = image_config(data, steps=4, sample_every=2, sample_count=6, sample_steps=[1, 2])
    train(cfg, tmp_path / "run")
    names = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert names == ["step_0000002-nfe1.png", "step_0000002-nfe2.png",
                     "step_0000004-nfe1.png", "step_0000004-nfe2.png"]
    import matplotlib.image as mpimg
    grid = mpimg.imread(tmp_path / "run" / "samples" / "step_0000004-nfe1.png")
    assert grid.shape[0] > 8 and grid.shape[1] > 8


def test_missing_tensorboard_is_one_clear_error(tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__

    def no_tb(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_tb)
    cfg = load_config(None, ["train.tensorboard=true", "train.progress=false"])
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()   # refused before anything was written


def test_tensorboard_gets_the_logged_scalars_and_grids(tmp_path, monkeypatch):
    """With train.tensorboard the loop writes each metrics.jsonl record and every sample grid
    to a SummaryWriter in run_dir/tensorboard (a recording stand-in: tensorboard is optional)."""
    import sys
    import types
    calls = {"scalar": [], "image": [], "dirs": [], "closed": 0}

    class Writer:
        def __init__(self, log_dir):
            calls["dirs"].append(log_dir)

        def add_scalar(self, tag, value, step):
            calls["scalar"].append((tag, float(value), step))

        def add_image(self, tag, image, step):
            calls["image"].append((tag, tuple(image.shape), step))

        def close(self):
            calls["closed"] += 1

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=Writer))
    data = images_npz(tmp_path)
    cfg = image_config(data, steps=2, log_every=1, tensorboard=True, sample_count=4,
                       sample_steps=[1])
    train(cfg, tmp_path / "run")
    assert calls["dirs"] == [str(tmp_path / "run" / "tensorboard")] and calls["closed"] == 1
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        for key in ("loss", "mse", "images", "lr"):
            assert (f"train/{key}", pytest.approx(record[key]), record["step"]) in [
                (t, v, s) for t, v, s in calls["scalar"]]
    assert calls["image"] == [("samples/nfe1", (1, 2 * (8 + 2) + 2, 2 * (8 + 2) + 2), 2)]


def _tiny_extractor_ref(tmp_path: Path, data: Path, extractor: Path) -> Path:
    from meanflow.metrics.fid import reference_stats
    ref = tmp_path / "ref.npz"
    reference_stats(str(data), ref, extractor=str(extractor), device="cpu", progress=False)
    return ref


def test_periodic_fid_is_logged_and_equals_fid_calc(tmp_path, pool_extractor):
    """train.fid_every writes FID/KID lines to metrics.jsonl; the last one equals what
    `meanflow fid calc` gives for the final checkpoint (same seeds, EMA, extractor)."""
    from meanflow.metrics.fid import fid_of
    data = images_npz(tmp_path)
    ref = _tiny_extractor_ref(tmp_path, data, pool_extractor)
    cfg = image_config(data, steps=4, fid_every=2, fid_ref=str(ref), fid_n=8,
                       fid_steps=[1, 2], ema_decays=[0.5])
    train(cfg, tmp_path / "run")
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [d for d in lines if d.get("eval") == "fid"]
    assert [d["step"] for d in evals] == [2, 4]
    for d in evals:
        assert d["fid_n"] == 8 and d["fid_weights"] == "ema_0.5"
        assert {"fid_nfe1", "fid_nfe2", "kid_nfe1", "kid_se_nfe2"} <= set(d)
        assert all(np.isfinite(d[k]) for k in ("fid_nfe1", "fid_nfe2"))
    for k in (1, 2):
        record = fid_of(tmp_path / "run", ref, n=8, steps=k, seed=0, device="cpu",
                        progress=False)
        assert record["fid"] == pytest.approx(evals[-1][f"fid_nfe{k}"], rel=1e-9, abs=1e-12)
        assert record["kid"] == pytest.approx(evals[-1][f"kid_nfe{k}"], rel=1e-9, abs=1e-12)


def test_periodic_fid_bad_settings_stop_before_the_run(tmp_path):
    data = images_npz(tmp_path)
    with pytest.raises(ConfigError, match="fid_ref"):
        image_config(data, fid_every=2)
    with pytest.raises(Exception, match="does not exist"):
        train(image_config(data, fid_every=2, fid_ref=str(tmp_path / "nope.npz")),
              tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # fmnist statistics cannot score 8×8 images
    from meanflow.metrics import FeatureStats
    FeatureStats.from_features(np.random.default_rng(0).normal(size=(10, 128)),
                               meta={"extractor": "fmnist"}).save(tmp_path / "fm.npz")
    with pytest.raises(ConfigError, match="cannot read this data"):
        train(image_config(data, fid_every=2, fid_ref=str(tmp_path / "fm.npz")),
              tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _points_config(steps: int, **train_opts):
    return load_config(None, [
        "model.options={width: 32, depth: 2, emb_dim: 8}", f"train.steps={steps}",
        "train.batch_size=64", "train.progress=false", "train.sample_count=0",
        f"train.log_every={steps}", f"train.checkpoint_every={steps}",
        "train.keep_checkpoints=0",
        *[f"train.{k}={v}" for k, v in train_opts.items()]])


def test_point_runs_log_the_energy_distance_of_their_ema_samples(tmp_path):
    """Every train.energy_every steps one metrics.jsonl record: the energy distance of
    energy_n one-step samples of the first EMA (seeds 0..N-1) to energy_n points drawn with
    the reference seed; the value is what meanflow.load of that checkpoint gives."""
    run = tmp_path / "run"
    train(_points_config(8, energy_every=4, energy_n=300, checkpoint_every=4), run)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if r.get("eval") == "energy"]
    assert [r["step"] for r in evals] == [4, 8]
    assert all(r["energy_n"] == 300 and r["energy_weights"] == "ema_0.999" for r in evals)
    ref, _ = build_dataset("8gaussians").batch(
        300, torch.Generator().manual_seed(REFERENCE_SEED + 0))
    for r in evals:
        model = meanflow.load(run / "checkpoints" / f"step_{r['step']:07d}")
        expected = energy_distance(model.sample(300, seed=0).samples, ref)
        assert r["energy_nfe1"] == expected and expected > 0


def test_no_energy_evaluation_for_images_or_when_off(tmp_path):
    run = tmp_path / "off"
    train(_points_config(4, energy_every=0, log_every=1), run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    data = images_npz(tmp_path)
    train(image_config(data, steps=2, sample_count=0, energy_every=1), tmp_path / "img")
    assert "energy" not in (tmp_path / "img" / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_the_energy_distance_falls_as_a_point_run_learns(tmp_path):
    """Checkerboard, 400 steps: the logged distance at the end is well below the first one
    (step 10), where the issue saw only a flat loss and a rising mse."""
    run = tmp_path / "run"
    train(load_config(None, ["data.name=checkerboard", "train.steps=400",
                             "train.batch_size=128", "train.progress=false",
                             "train.sample_count=0", "train.energy_every=10",
                             "train.energy_n=1000", "train.log_every=100",
                             "model.options={width: 128, depth: 3, emb_dim: 32}"]), run)
    values = [json.loads(line)["energy_nfe1"] for line in
              (run / "metrics.jsonl").read_text().splitlines() if "energy_nfe1" in line]
    assert len(values) == 40 and max(values[-5:]) < 0.25 * values[0], values
