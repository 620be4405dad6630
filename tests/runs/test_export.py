"""``meanflow.runs.export``: samples to the .npz / .png / .json files of ``meanflow sample``,
on a model made in place (a fixed field, no training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from meanflow.errors import CheckpointError, ConfigError
from meanflow.runs import Model, RunConfig
from meanflow.runs.export import (can_draw, check_vae, record_path, sample_record,
                                  write_samples)


class Shift(nn.Module):
    """u(z, t, h) = 0.5: one step from noise e gives e - 0.5."""

    def forward(self, z, t, h, y=None):
        return torch.full_like(z, 0.5)


def model(shape=(2,), num_classes=None) -> Model:
    return Model(net=Shift(), config=RunConfig(), step=7, shape=shape, num_classes=num_classes,
                 weights="model", checkpoint=Path("run/checkpoints/step_0000007"))


def test_npz_json_and_png_hold_the_samples_and_their_record(tmp_path):
    m = model(num_classes=3)
    out = m.sample(5, seed=2)
    npz, png = tmp_path / "a" / "s.npz", tmp_path / "b" / "s.png"
    record = write_samples(m, out, npz=npz, png=png)
    assert record == {"checkpoint": str(m.checkpoint), "step": 7, "weights": "model",
                      "method": "meanflow", "steps": 1, "schedule": None, "seed": 2, "n": 5,
                      "vae": None, "scale": None, "guidance": None}
    with np.load(npz, allow_pickle=False) as f:
        assert f.files == ["seeds", "labels", "meta", "samples"]
        assert f["seeds"].tolist() == [2, 3, 4, 5, 6] and f["labels"].tolist() == [0, 1, 2, 0, 1]
        assert np.array_equal(f["samples"], out.samples.numpy())
        assert json.loads(str(f["meta"])) == record
    assert json.loads((tmp_path / "a" / "s.json").read_text()) == record
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_image_samples_carry_uint8_images(tmp_path):
    m = model(shape=(1, 4, 4))
    out = m.sample(3)
    write_samples(m, out, npz=tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as f:
        assert f.files == ["seeds", "labels", "meta", "images", "samples"]
        assert f["images"].dtype == np.uint8 and f["images"].shape == (3, 4, 4, 1)
        assert f["labels"].size == 0


def test_record_of_seeds_that_are_not_a_range():
    m = model()
    assert sample_record(m, m.sample(seeds=[4, 1]))["seed"] is None
    assert sample_record(m, m.sample(seeds=[4, 5]))["seed"] == 4


def test_record_path_and_can_draw(tmp_path):
    assert record_path(tmp_path / "s.npz", tmp_path / "p.png") == tmp_path / "s.json"
    assert record_path(None, tmp_path / "p.png") == tmp_path / "p.png.json"
    with pytest.raises(ConfigError):
        record_path(None, None)
    assert can_draw((2,)) and can_draw((3, 8, 8)) and not can_draw((3,))


def test_nothing_is_replaced_without_overwrite(tmp_path):
    m = model()
    out = m.sample(2)
    (tmp_path / "s.json").write_text("mine")
    with pytest.raises(ConfigError, match="s.json"):
        write_samples(m, out, npz=tmp_path / "s.npz")
    assert not (tmp_path / "s.npz").exists() and (tmp_path / "s.json").read_text() == "mine"
    write_samples(m, out, npz=tmp_path / "s.npz", overwrite=True)
    assert (tmp_path / "s.json").read_text() != "mine"


def test_a_png_of_3d_points_is_refused(tmp_path):
    m = model(shape=(3,))
    with pytest.raises(ConfigError, match="shape"):
        write_samples(m, m.sample(2), npz=tmp_path / "s.npz", png=tmp_path / "p.png")
    assert not any(tmp_path.iterdir())


def test_non_finite_samples_are_refused_and_nothing_is_written(tmp_path):
    """Diverged weights give NaN samples: write_samples refuses them in one line, no file."""
    m = model()
    out = m.sample(4, seed=0)
    out.samples[2, 0] = float("nan")
    out.samples[3, 1] = float("inf")
    with pytest.raises(CheckpointError, match=r"2 of 4 samples of .* hold NaN or infinite "
                       r"values .*: nothing written; sample an earlier checkpoint"):
        write_samples(m, out, npz=tmp_path / "s.npz", png=tmp_path / "s.png")
    assert list(tmp_path.iterdir()) == []


def test_a_vae_for_a_model_of_points_is_one_line():
    m = model()
    check_vae(m)                                  # no VAE: nothing to check
    m.vae = {"spec": "somewhere", "scale": 0.18215, "auto": False}
    with pytest.raises(ConfigError, match=r"--vae decodes latents \(C, h, w\); this run's "
                       r"samples have shape \(2,\): drop --vae"):
        check_vae(m)
