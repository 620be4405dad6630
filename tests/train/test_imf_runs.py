"""iMF end to end (docs/imf.md): its settings and their defaults, the backbone it needs, a
tiny class-conditional run that resumes bit for bit, and guidance chosen at sampling time from
one checkpoint, through the Python API and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import cli
from meanflow.errors import ConfigError
from meanflow.runs.config import IMF_DEFAULTS, RunConfig, load_config
from meanflow.runs.load import load
from meanflow.train.loop import train

DIT = {"name": "imf-dit-tiny/2", "options": {}}
UNET = {"name": "unet-tiny", "options": {"guidance_cond": True, "v_head": True,
                                         "channels": 8}}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """64 labelled 8x8 grey images of two classes (dark and light)."""
    rng = np.random.default_rng(0)
    y = np.arange(64) % 2
    x = (rng.random((64, 8, 8, 1)) * 127 + 128 * y[:, None, None, None]).astype(np.uint8)
    path = tmp_path_factory.mktemp("imf") / "d.npz"
    np.savez(path, x=x, y=y)
    return path


def config(data: Path, steps: int, model: dict = DIT, **objective) -> RunConfig:
    return RunConfig.from_dict({
        "model": model,
        "data": {"name": str(data), "class_conditional": True},
        "objective": {"kind": "imf", **IMF_DEFAULTS, **objective},
        "train": {"steps": steps, "batch_size": 8, "checkpoint_every": 2, "log_every": 1,
                  "progress": False, "keep_checkpoints": 0, "sample_count": 0,
                  "ema_decays": [0.9]}}).validate()


def test_kind_imf_takes_its_own_defaults_unless_given():
    cfg = load_config(overrides=["objective.kind=imf"])
    assert {k: getattr(cfg.objective, k) for k in IMF_DEFAULTS} == IMF_DEFAULTS
    assert load_config(overrides=["objective.kind=imf", "objective.c=0.5"]).objective.c == 0.5
    mf = load_config()
    assert (mf.objective.fraction_r_neq_t, mf.objective.c) == (0.25, 1e-3)   # MeanFlow's


@pytest.mark.parametrize("override,match", [
    ("objective.omega=2", "omega and kappa are MeanFlow's"),
    ("objective.omega_range=[0.5,8]", "omega_range"),
    ("objective.t_min_range=[0.6,0.4]", "t_min_range"),
    ("objective.imf_variant=both", "imf_variant"),
])
def test_bad_imf_settings_are_one_line(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=["objective.kind=imf", "data.class_conditional=true", override])


def test_imf_settings_are_checked_whatever_the_kind():
    with pytest.raises(ConfigError, match="omega_range"):
        load_config(overrides=["objective.omega_range=[2,1]"])


@pytest.mark.parametrize("model,objective,match", [
    ({"name": "mlp", "options": {}}, {}, "does not take"),
    ({"name": "unet-tiny", "options": {"v_head": True}}, {}, "guidance_cond=true"),
    ({"name": "unet-tiny", "options": {"guidance_cond": True}}, {}, "v_head=true"),
    (DIT, {"imf_variant": "boundary"}, "v_head=false"),
])
def test_objective_and_backbone_must_fit(images, tmp_path, model, objective, match):
    with pytest.raises(ConfigError, match=match):
        train(config(images, 1, model, **objective), tmp_path / "run")


def test_a_v_head_is_refused_under_meanflow(images, tmp_path):
    cfg = config(images, 1).to_dict()
    cfg["objective"] = {"kind": "meanflow"}
    with pytest.raises(ConfigError, match="only objective.kind=imf trains"):
        train(RunConfig.from_dict(cfg).validate(), tmp_path / "run")


@pytest.mark.parametrize("model", [DIT, UNET], ids=["imf-dit", "unet"])
def test_imf_resume_is_bit_exact(images, tmp_path, model):
    """4 uninterrupted steps == 2 steps, then resume to 4 (weights, EMA, optimiser), and the
    v-head is trained (its weights move)."""
    a, b = tmp_path / "a", tmp_path / "b"
    train(config(images, 4, model), a)
    train(config(images, 2, model), b)
    train(config(images, 4, model), b, resume=True)
    for part in ("model", "ema", "optimizer"):
        ta = load_file(str(a / "checkpoints" / "step_0000004" / f"{part}.safetensors"))
        tb = load_file(str(b / "checkpoints" / "step_0000004" / f"{part}.safetensors"))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), part
    first = load_file(str(b / "checkpoints" / "step_0000002" / "model.safetensors"))
    last = load_file(str(b / "checkpoints" / "step_0000004" / "model.safetensors"))
    v_keys = [k for k in last if k.startswith("v_") or "_v." in k]
    assert v_keys and any(not torch.equal(first[k], last[k]) for k in v_keys)
    logged = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert all(np.isfinite(r["mse_v"]) and 1 <= r["omega"] <= 8 for r in logged)


@pytest.fixture(scope="module")
def imf_run(images, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("imf-run") / "run"
    train(config(images, 3, UNET), run)
    return run


def test_guidance_is_chosen_at_sampling_time(imf_run):
    model = load(imf_run, ema=None)
    plain = model.sample(6, seed=1)
    assert plain.guidance is None
    assert torch.equal(model.sample(6, seed=1, guidance=1.0).samples, plain.samples)
    strong = model.sample(6, seed=1, guidance=4.0, interval=(0.2, 0.8))
    assert strong.guidance == {"omega": 4.0, "interval": [0.2, 0.8]}
    assert not torch.equal(strong.samples, plain.samples)
    # the same as calling the network with those conditions by hand (one step: x = e - u)
    e = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(s))
                     for s in range(1, 7)])
    y, ones = torch.arange(6) % 2, torch.ones(6)
    with torch.no_grad():
        u = model.net(e, ones, ones, y, omega=4.0 * ones, t_min=0.2 * ones, t_max=0.8 * ones)
    torch.testing.assert_close(strong.samples, e - u, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="interval"):
        model.sample(2, guidance=2.0, interval=(0.7, 0.3))
    with pytest.raises(ConfigError, match=">= 1"):
        model.sample(2, guidance=0.5)


def test_cli_samples_one_checkpoint_at_two_scales(imf_run, tmp_path, capsys):
    outs = []
    for k, flags in enumerate((["--guidance", "1.5"], ["--guidance", "6", "--interval",
                                                        "0.3,0.7"])):
        out = tmp_path / f"s{k}.npz"
        assert cli("sample", imf_run, "--n", 4, "--out", out, *flags) == 0
        outs.append(np.load(out)["samples"])
        assert json.loads(out.with_suffix(".json").read_text())["guidance"]["omega"] == \
            float(flags[1])
    assert not np.array_equal(*outs)
    assert cli("sample", imf_run, "--n", 2, "--out", tmp_path / "x.npz",
               "--interval", "0.5") == 2
    assert "two comma-separated times" in capsys.readouterr().err


def test_meanflow_models_refuse_sampling_time_guidance(tmp_path, capsys):
    run = tmp_path / "mf"
    train(RunConfig.from_dict({"model": {"options": {"width": 16, "depth": 1, "emb_dim": 8}},
                               "train": {"steps": 1, "batch_size": 8, "progress": False,
                                         "sample_count": 0}}).validate(), run)
    assert cli("sample", run, "--n", 2, "--out", tmp_path / "s.npz", "--guidance", "2") == 2
    err = capsys.readouterr().err
    assert "not trained with guidance conditioning" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.npz").exists()


def test_cli_scores_one_checkpoint_at_two_scales(imf_run, images, pool_extractor, tmp_path):
    """`fid calc` samples the run with the scale and interval given and records them; two
    scales give two scores (a tiny extractor: the mechanics, not the quality)."""
    ref = tmp_path / "ref.npz"
    assert cli("fid", "ref", images, "-o", ref, "--extractor", pool_extractor) == 0
    scores = []
    for k, flags in enumerate((["--guidance", "1"], ["--guidance", "5", "--interval",
                                                      "0.1,0.9"])):
        out = tmp_path / f"fid{k}.json"
        assert cli("fid", "calc", imf_run, "--ref", ref, "--n", 16, "--out", out, *flags) == 0
        record = json.loads(out.read_text())
        assert record["guidance"]["at"] == "sampling" and record["n"] == 16
        assert record["guidance"]["omega"] == float(flags[1])
        scores.append(record["fid"])
    assert all(np.isfinite(scores)) and scores[0] != scores[1]
