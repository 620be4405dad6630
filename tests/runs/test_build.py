"""A run's network from its config (meanflow.runs.build): ``model.name: auto``, the default,
resolved from the sample shape (mlp for points, unet-tiny for images and latents) in one
place, an explicit name kept, and the resolved name recorded by training and loading
(docs/design.md, Backbones)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from meanflow.data import ArraySamples
from meanflow.errors import ConfigError
from meanflow.models import MLP, UNet
from meanflow.presets import preset_names, preset_path
from meanflow.runs.build import (AUTO_MODEL, auto_model_name, build_network, model_options,
                                 resolve_model)
from meanflow.runs.config import RunConfig, load_config
from meanflow.runs.load import load_model
from meanflow.train import check_config, train

TINY = {"width": 16, "depth": 1, "emb_dim": 8}


def test_the_default_is_auto_and_validates():
    assert RunConfig().model.name == AUTO_MODEL == "auto"
    assert load_config(None).model.name == "auto"
    assert load_config(None, ["model.name=auto"]).model.name == "auto"


@pytest.mark.parametrize("shape,name", [
    ((2,), "mlp"), ((3,), "mlp"), ((64,), "mlp"), ((8, 8), "mlp"),       # points, 2-D arrays
    ((1, 28, 28), "unet-tiny"), ((3, 32, 32), "unet-tiny"), ((4, 32, 32), "unet-tiny"),
])
def test_auto_follows_the_sample_shape(shape, name):
    assert auto_model_name(shape) == name
    cfg = RunConfig()
    resolved = resolve_model(cfg, shape)
    assert resolved.model.name == name
    assert cfg.model.name == "auto"                 # a copy: the given config is unchanged
    assert resolved.to_dict() == {**cfg.to_dict(),
                                  "model": {**cfg.to_dict()["model"], "name": name}}


@pytest.mark.parametrize("name", ["mlp", "unet-small", "dit-s/4", "no-such-net"])
def test_an_explicit_name_is_kept(name):
    cfg = RunConfig.from_dict({"model": {"name": name}})
    for shape in ((2,), (1, 8, 8)):
        assert resolve_model(cfg, shape) is cfg


def test_every_preset_names_its_backbone():
    """Presets are recipes for one network: none leaves it to the data."""
    for name in preset_names():
        model = yaml.safe_load(preset_path(name).read_text())["model"]["name"]
        assert model != "auto" and load_config(preset_path(name)).model.name == model


def test_build_network_resolves_auto():
    """auto on points builds exactly the MLP (same weights from the same seed), on images the
    U-Net unet-tiny names; model_options resolves too (an augmented image run's label width
    goes to the U-Net that auto chose)."""
    auto, mlp = RunConfig.from_dict({"model": {"options": TINY}}), \
        RunConfig.from_dict({"model": {"name": "mlp", "options": TINY}})
    torch.manual_seed(0)
    a = build_network(auto, (2,), None)
    torch.manual_seed(0)
    b = build_network(mlp, (2,), None)
    assert isinstance(a, MLP)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.device("meta"):
        net = build_network(RunConfig(), (1, 8, 8), 3)
    assert isinstance(net, UNet) and net.cfg.channels == 16 and net.cfg.num_classes == 3
    augmented = load_config(None, ["data.augment=0.1"])
    assert model_options(augmented, (1, 8, 8))["augment_dim"] > 0


def test_an_unknown_name_is_still_one_line():
    cfg = load_config(None, ["model.name=nope"])         # validation accepts any name ...
    with pytest.raises(ConfigError, match=r"^unknown model 'nope': choose one of mlp, "):
        build_network(cfg, (2,), None)                   # ... the registry refuses it
    with pytest.raises(ConfigError, match="must be a backbone name.*or auto"):
        load_config(None, ["model.name=''"])


def test_train_in_python_records_the_resolved_name(tmp_path):
    """train() on in-memory (C, H, W) samples with the default config: the run folder, the
    checkpoint and the loaded model say unet-tiny; a checkpoint whose config says "auto" (a
    hand-made one) loads as the backbone its recorded shape resolves to."""
    cfg = load_config(None, ["train.steps=1", "train.batch_size=4", "train.progress=false",
                             "train.sample_count=0"])
    assert cfg.model.name == "auto"
    data = ArraySamples(torch.randn(8, 1, 8, 8))
    run = tmp_path / "run"
    ckpt = train(cfg, run, dataset=data)
    assert json.loads((run / "config.json").read_text())["model"]["name"] == "unet-tiny"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["config"]["model"]["name"] == "unet-tiny"
    assert load_model(run).config.model.name == "unet-tiny"
    state["config"]["model"]["name"] = "auto"
    (ckpt / "state.json").write_text(json.dumps(state))
    loaded = load_model(run)
    assert loaded.config.model.name == "unet-tiny" and isinstance(loaded.net, UNet)


def test_check_config_resolves_before_building(tmp_path):
    """The dry run's checks build the backbone auto chooses: an augmented image run is a
    U-Net run, not refused as an MLP one."""
    path = tmp_path / "imgs.npz"
    np.savez(path, x=np.zeros((8, 1, 8, 8), np.uint8))
    check_config(load_config(None, [f"data.name={path}", "data.augment=0.1",
                                    "train.batch_size=4"]))
