"""The four iMF presets (imagenet-imf-b2, -m2, -l2, -xl2) load, validate and hold the official
values; their sampling lines are valid ``meanflow sample`` commands; ``meanflow train --preset
imagenet-imf-b2 --dry-run`` builds data, network and loss and prints those values."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from safetensors.torch import save_file

from meanflow.cli import build_parser
from meanflow.data.latents import (INDEX_NAME, LATENT_FORMAT, LATENT_VERSION,
                                   SD_VAE_IMF_CHANNEL_NORM, shard_name)
from meanflow.presets import describe_presets, preset_path
from meanflow.runs.config import load_config
from meanflow.train.schedule import total_steps

from cli_helpers import cli

IMAGENET_TRAIN = 1_281_167
STEPS_PER_EPOCH = IMAGENET_TRAIN // 1024          # 1,251: DataLoader(drop_last) at batch 1024

# The official values (Lyy-iiis/imeanflow): configs/train_config.yml on top of
# configs/default.py; imf.py (s_max 7, the interval ranges, data_proportion, the dropout and
# weight), utils/trainstate_util.py (optax.adamw, weight_decay 0), utils/lr_utils.py
# (warmup_const, warm-up in epochs), utils/ema_util.py (const 0.9999), utils/vae_util.py
# (the per-channel latent statistics). The release ships one training config, for B/2; the
# larger presets follow it with their own network.
OFFICIAL = {
    "data.class_conditional": True, "data.order": "epochs",
    "data.options": {"channel_norm": {
        "mean": [0.86488, -0.27787343, 0.21616915, 0.3738409],
        "std": [4.85503674, 5.31922414, 3.93725398, 3.9870003]}},
    "objective.kind": "imf", "objective.imf_variant": "v_head",
    "objective.time_sampler": "logit_normal", "objective.mu": -0.4, "objective.sigma": 1.0,
    "objective.fraction_r_neq_t": 0.5, "objective.r_eq_t_rows": "first",
    "objective.omega_range": [1.0, 8.0], "objective.omega_beta": 1.0,
    "objective.t_min_range": [0.0, 0.5], "objective.t_max_range": [0.5, 1.0],
    "objective.label_drop": 0.1, "objective.label_drop_rows": "first",
    "objective.p": 1.0, "objective.c": 0.01, "objective.omega": 1.0, "objective.kappa": 0.0,
    "optim.lr": 1e-4, "optim.betas": [0.9, 0.95], "optim.weight_decay": 0.0,
    "optim.warmup_steps": 10 * STEPS_PER_EPOCH, "optim.grad_clip": None,
    "train.epochs": 640, "train.batch_size": 1024, "train.seed": 42, "train.amp": "none",
    "train.ema_decays": [0.9999], "train.ema_every": 1, "train.ema_warmup": False,
    "train.checkpoint_every": 20 * STEPS_PER_EPOCH, "train.sample_every": 20 * STEPS_PER_EPOCH,
}
# size -> (network, the paper's 1-NFE FID, the released checkpoints' sampling settings of
# configs/eval_config.yml as (NFE, omega, t_min, t_max))
SIZES = {
    "b2": ("imf-dit-b/2", "3.39", [(1, 8.0, 0.4, 0.65)]),
    "m2": ("imf-dit-m/2", "2.27", [(1, 10.5, 0.4, 0.6)]),
    "l2": ("imf-dit-l/2", "1.86", [(1, 10.5, 0.4, 0.6)]),
    "xl2": ("imf-dit-xl/2", "1.72", [(1, 8.0, 0.42, 0.62), (2, 4.0, 0.36, 0.64)]),
}


def _value(cfg: dict, dotted: str):
    section, key = dotted.split(".")
    return cfg[section][key]


@pytest.mark.parametrize("size", sorted(SIZES))
def test_the_imf_presets_hold_the_official_values(size):
    name = f"imagenet-imf-{size}"
    cfg = load_config(preset_path(name))            # validated, IMFLoss settings included
    d = cfg.to_dict()
    assert {k: _value(d, k) for k in OFFICIAL} == OFFICIAL
    assert cfg.data.options["channel_norm"] == SD_VAE_IMF_CHANNEL_NORM
    assert cfg.model.name == SIZES[size][0] and cfg.model.options == {}   # v_head on

    class ImageNetTrain:                            # 1,281,167 images, as the real set
        def __len__(self) -> int:
            return IMAGENET_TRAIN

        def take(self, indices, generator):         # never called: only the length
            raise AssertionError
    assert total_steps(cfg, ImageNetTrain()) == 640 * 1251 == 800_640
    text = preset_path(name).read_text()
    assert "configs/train_config.yml" in text and "configs/default.py" in text
    first = describe_presets()[name]
    assert f"imf-dit-{size[:-1]}/2" in first and f"1-NFE FID {SIZES[size][1]}" in first


@pytest.mark.parametrize("size", sorted(SIZES))
def test_the_sampling_lines_are_meanflow_sample_commands(size):
    """Each '# meanflow sample ...' line of the header parses with the real CLI parser and
    carries the official NFE, omega and interval."""
    text = preset_path(f"imagenet-imf-{size}").read_text()
    lines = re.findall(r"^#.*?: (meanflow sample .*)$", text, flags=re.M)
    got = []
    for line in lines:
        args = build_parser().parse_args(line.split()[1:])
        t_min, t_max = map(float, args.interval.split(","))
        got.append((args.steps, args.guidance, t_min, t_max))
        assert args.n == 50000
    assert got == SIZES[size][2]


def test_channel_norm_stays_with_another_latent_folder(tmp_path):
    """--data naming another latent folder keeps the recipe's channel_norm (training on raw,
    unnormalised latents would be silently wrong); other data leave every option behind, and
    --set data.options.channel_norm=... gives it explicitly."""
    path = preset_path("imagenet-imf-b2")
    assert load_config(path, [f"data.name={tmp_path}"]).data.options == {}
    folder = tmp_path / "mine"
    _imagenet_like_folder(folder, n=8, classes=4)
    assert load_config(path, [f"data.name={folder}"]).data.options == OFFICIAL["data.options"]
    norm = json.dumps(SD_VAE_IMF_CHANNEL_NORM)
    cfg = load_config(path, [f"data.name={tmp_path}", f"data.options.channel_norm={norm}"])
    assert cfg.data.options == OFFICIAL["data.options"]


def _imagenet_like_folder(root, n: int = 1024, classes: int = 1000) -> None:
    """A latent folder of n (4, 8, 8) latents of 1000 classes, in prepare-latents' format:
    enough for one global batch of 1024 (data.order epochs), small enough to write at once."""
    g = torch.Generator().manual_seed(0)
    (root / "shards").mkdir(parents=True)
    save_file({"mean": torch.randn(n, 4, 8, 8, generator=g),
               "std": torch.rand(n, 4, 8, 8, generator=g) + 0.1,
               "index": torch.arange(n), "label": torch.arange(n) % classes},
              str(root / shard_name(0)), metadata={"plan_id": "p", "shard": "0"})
    index = {"format": LATENT_FORMAT, "version": LATENT_VERSION, "complete": True,
             "plan_id": "p", "num_images": n, "shard_size": n, "num_shards": 1,
             "latent_shape": [4, 8, 8], "dtype": "float32", "scale": 0.18215, "shift": 0.0,
             "vae": {}, "num_classes": classes, "class_names": None}
    (root / INDEX_NAME).write_text(json.dumps(index))


def test_the_b2_preset_dry_runs_on_its_own_data_path(tmp_path, monkeypatch, capsys):
    """`meanflow train --preset imagenet-imf-b2 --dry-run` from a folder holding
    latents/imagenet256 (a stand-in of 1024 small latents, not ImageNet): the data is built
    with the preset's channel_norm, the network (meta device) and the iMF loss too, and the
    printed config holds the official values. What it cannot check: the real latent shape
    (4, 32, 32) and ImageNet's size."""
    monkeypatch.chdir(tmp_path)
    _imagenet_like_folder(tmp_path / "latents" / "imagenet256")
    assert cli("train", "--preset", "imagenet-imf-b2", "--dry-run", "--device", "cpu") == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert {k: _value(printed, k) for k in OFFICIAL} == OFFICIAL
    assert printed["model"]["name"] == "imf-dit-b/2"
    assert printed["data"]["name"] == "latents/imagenet256"
