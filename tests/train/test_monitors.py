"""What a run reports while it trains (meanflow.train.monitors): sample grids, TensorBoard, and
FID during training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from meanflow.errors import ConfigError
from meanflow.runs.config import load_config
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
