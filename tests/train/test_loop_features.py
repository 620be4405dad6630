"""The loop's image-scale features: runs with gradient accumulation and bf16 autocast,
training length in epochs/images, augmentation labels, presets. The step itself is tested in
test_step.py, sample grids, TensorBoard and FID in test_monitors.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from meanflow.data import build_dataset
from meanflow.errors import ConfigError
from meanflow.presets import preset_names, preset_path
from meanflow.runs.config import RunConfig, load_config
from meanflow.train.loop import check_config, train
from meanflow.train.schedule import total_steps

TINY_UNET = {"channels": 8, "channel_mult": [1, 2], "blocks_per_res": 1,
             "attn_resolutions": [], "dropout": 0.0}


def images_npz(tmp_path: Path, n: int = 40, size: int = 8, channels: int = 1) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "imgs.npz"
    np.savez(path, x=rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8),
             y=rng.integers(0, 3, n))
    return path


def image_config(data: Path, **train_opts) -> RunConfig:
    tr = {"steps": 3, "batch_size": 8, "log_every": 1, "checkpoint_every": 100,
          "progress": False, "sample_count": 0}
    tr.update(train_opts)
    return RunConfig.from_dict({
        "model": {"name": "unet-small", "options": dict(TINY_UNET)},
        "data": {"name": str(data)},
        "objective": {"fraction_r_neq_t": 0.5, "p": 0.5},
        "train": tr}).validate()


def test_accumulating_run_trains_and_logs_the_global_batch(tmp_path):
    cfg = load_config(None, ["train.steps=3", "train.batch_size=16", "train.grad_accumulation=4",
                             "train.progress=false", "train.log_every=1", "train.sample_count=0",
                             "model.options={width: 16, depth: 1, emb_dim: 8}"])
    train(cfg, tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["images"] for r in lines] == [16, 32, 48]
    assert all(np.isfinite(r["loss"]) for r in lines)


def test_batch_must_split_evenly():
    with pytest.raises(ConfigError, match="not divisible by train.grad_accumulation"):
        load_config(None, ["train.batch_size=10", "train.grad_accumulation=4"])


def test_bf16_run_keeps_fp32_weights_and_finite_loss(tmp_path):
    cfg = load_config(None, ["train.steps=3", "train.batch_size=32", "train.amp=bf16",
                             "train.progress=false", "train.log_every=1", "train.sample_count=0",
                             "model.options={width: 16, depth: 1, emb_dim: 8}"])
    train(cfg, tmp_path / "run")
    from safetensors.torch import load_file
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "step_0000003" /
                            "model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert all(np.isfinite(json.loads(x)["loss"]) for x in lines)


def test_length_in_epochs_and_images(tmp_path):
    data = images_npz(tmp_path, n=40)
    ds = build_dataset(str(data))
    assert total_steps(image_config(data, epochs=1.0), ds) == 5          # 40 / 8
    assert total_steps(image_config(data, epochs=0.5), ds) == 3          # ceil(2.5)
    assert total_steps(image_config(data, images=20), ds) == 3
    assert total_steps(image_config(data, steps=7), ds) == 7
    with pytest.raises(ConfigError, match="not both"):
        image_config(data, epochs=1.0, images=10)
    toy = build_dataset("8gaussians")
    cfg = load_config(None, ["train.epochs=2"])
    with pytest.raises(ConfigError, match="finite size"):
        total_steps(cfg, toy)
    run = tmp_path / "run"
    train(image_config(data, images=24), run)
    assert (run / "checkpoints" / "step_0000003").is_dir()


def test_augmentation_labels_reach_the_unet(tmp_path):
    """With data.augment the U-Net is built with augment_dim = the augmentation's label_dim
    and trains."""
    data = images_npz(tmp_path)
    cfg = RunConfig.from_dict({**image_config(data).to_dict(),
                               "data": {"name": str(data), "augment": 0.5}}).validate()
    train(cfg, tmp_path / "run")
    from safetensors.torch import load_file
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "step_0000003" /
                            "model.safetensors"))
    from meanflow.data import EDMAugment
    aug = [w for name, w in weights.items() if "aug" in name]
    assert len(aug) == 1 and aug[0].shape[1] == EDMAugment(p=0.5).label_dim


def test_auto_jvp_is_forward_ad_for_a_unet_on_the_cpu(tmp_path):
    """objective.jvp "auto" (the default) resolves to forward_ad for the U-Net on the CPU, and
    the run records it; a strategy that is named runs as named."""
    data = images_npz(tmp_path)
    for jvp, expected in (("auto", "forward_ad"), ("split", "split")):
        cfg = image_config(data, steps=1)
        cfg.objective.jvp = jvp
        train(cfg, tmp_path / jvp)
        first = json.loads((tmp_path / jvp / "metrics.jsonl").read_text().splitlines()[0])
        state = json.loads((tmp_path / jvp / "checkpoints" / "step_0000001" / "state.json")
                           .read_text())
        assert first["jvp"] == state["loss"]["jvp"] == expected


def test_the_jvp_strategy_is_resolved_once_for_the_run(tmp_path):
    """resolve_loss builds the loss with the strategy "auto" resolves to where the run trains
    (split when compiled, forward_ad for a U-Net on the CPU); forward_ad with train.compile is
    one line before anything is written."""
    from meanflow.train.loop import resolve_loss
    data = images_npz(tmp_path)
    cfg = image_config(data)
    cpu = torch.device("cpu")
    assert resolve_loss(cfg, None, cpu, compiled=False).jvp == "forward_ad"
    assert resolve_loss(cfg, None, cpu, compiled=True).jvp == "split"
    assert resolve_loss(cfg, None, torch.device("cuda"), compiled=False).jvp == "split"
    cfg.objective.jvp, cfg.train.compile = "forward_ad", True
    with pytest.raises(ConfigError, match="objective.jvp=forward_ad: .*does not compile"):
        check_config(cfg)
    with pytest.raises(ConfigError, match="does not compile"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_augmentation_needs_images_and_a_unet(tmp_path):
    with pytest.raises(ConfigError, match="for images"):
        check_config(load_config(None, ["data.augment=0.1"]))
    data = images_npz(tmp_path)
    with pytest.raises(ConfigError, match="only unet"):
        check_config(load_config(None, [f"data.name={data}", "data.augment=0.1",
                                        "model.name=dit-s/4", "train.batch_size=8"]))


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_is_a_valid_config(name, tmp_path):
    cfg = load_config(preset_path(name))
    assert cfg.objective.kind == ("imf" if name.startswith("imagenet-imf-") else "meanflow")
    if name.startswith("imagenet"):
        # any .npz of latents with labels: the model is built (meta device) for its shape;
        # one global batch of them, which data.order "epochs" needs at the least
        path = tmp_path / "latents.npz"
        n = cfg.train.batch_size
        np.savez(path, x=np.zeros((n, 4, 32, 32), np.float32), y=np.arange(n) % 2)
        cfg = load_config(preset_path(name), [f"data.name={path}"])
        check_config(cfg)
        if cfg.objective.kind == "imf":     # guidance is drawn per sample (test_imf_presets.py)
            return
        eff = cfg.objective.omega / (1 - cfg.objective.kappa)
        assert eff == pytest.approx({"b4": 1.0, "b4-cfg": 2.0, "b2": 2.0, "m2": 2.0, "l2": 2.5,
                                     "xl2": 2.5, "xl2-plus": 2.0}[name.split("dit-")[1]])


# The official values each preset follows (py-meanflow cifar10_v0.sh / cifar10_v1.sh with the
# defaults of its train_arg_parser.py, model_configs.py, train_loop.py, ema.py and train.py;
# the JAX code's configs/default.py and run_b4.yml). docs/fidelity.md maps them.
OFFICIAL_CIFAR10 = {
    "model.name": "unet-cifar10", "model.options": {"dropout": 0.2},
    "data.name": "cifar10", "data.augment": 0.12, "data.augment_options": {},
    "data.order": "epochs", "objective.fraction_r_neq_t": 0.75,
    "objective.r_eq_t_rows": "random", "objective.p": 0.75, "objective.c": 1e-3,
    "optim.lr": 6e-4, "optim.betas": [0.9, 0.999], "optim.weight_decay": 0.0,
    "optim.warmup_steps": 200 * (50000 // 1024), "train.epochs": 16000,
    "train.batch_size": 8 * 128, "train.seed": 0, "train.ema_decays": [0.9999, 0.99995, 0.9996],
    "train.ema_every": 16, "train.tf32": True, "train.compile": "auto",
}
OFFICIAL_SAMPLERS = {
    "cifar10-unet": {"objective.time_sampler": "logit_normal", "objective.mu": -2.0,
                     "objective.sigma": 2.0},
    "cifar10-unet-v1": {"objective.time_sampler": "v1", "objective.mu": -0.6,
                        "objective.sigma": 1.6, "objective.mu_r": -4.0, "objective.sigma_r": 1.6},
}
OFFICIAL_IMAGENET = {
    "data.order": "epochs", "objective.time_sampler": "logit_normal", "objective.mu": -0.4,
    "objective.sigma": 1.0, "objective.fraction_r_neq_t": 0.25, "objective.r_eq_t_rows": "first",
    "objective.label_drop": 0.1, "objective.label_drop_rows": "first", "objective.p": 1.0,
    "objective.c": 0.01, "optim.lr": 1e-4, "optim.betas": [0.9, 0.95],
    "optim.weight_decay": 0.0, "optim.warmup_steps": 0, "train.batch_size": 256,
    "train.seed": 42, "train.amp": "none", "train.ema_decays": [0.9999], "train.ema_every": 1,
    "train.tf32": True, "train.compile": "auto",
}
# model, epochs, omega, kappa, t-interval (run_b4.yml for b4-cfg, the paper for the others)
IMAGENET_MODELS = {
    "b4": ("dit-b/4", 80, 1.0, 0.0, [0.0, 1.0]), "b4-cfg": ("dit-b/4", 240, 1.0, 0.5, [0.0, 1.0]),
    "b2": ("dit-b/2", 240, 1.0, 0.5, [0.0, 1.0]), "m2": ("dit-m/2", 240, 1.0, 0.5, [0.0, 1.0]),
    "l2": ("dit-l/2", 240, 0.2, 0.92, [0.0, 0.8]), "xl2": ("dit-xl/2", 240, 0.2, 0.92, [0.0, 0.75]),
    "xl2-plus": ("dit-xl/2", 1000, 1.0, 0.5, [0.3, 0.8]),
}


def _value(cfg, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


@pytest.mark.parametrize("name", ["cifar10-unet", "cifar10-unet-v1"])
def test_the_cifar10_presets_hold_the_official_values(name):
    cfg = load_config(preset_path(name))
    expected = {**OFFICIAL_CIFAR10, **OFFICIAL_SAMPLERS[name]}
    got = {k: _value(cfg, k) for k in expected}
    assert got == expected
    assert cfg.data.options["hflip"] is True            # torchvision's RandomHorizontalFlip

    class CIFAR10Train:                                   # 50,000 images, as the real set
        def __len__(self) -> int:
            return 50000

        def take(self, indices, generator):               # never called: only the length
            raise AssertionError
    assert total_steps(cfg, CIFAR10Train()) == 768_000   # 16,000 epochs x 48 steps
    assert preset_path(name).read_text().count(
        "cifar10_v0.sh" if name == "cifar10-unet" else "cifar10_v1.sh") == 1


@pytest.mark.parametrize("size", sorted(IMAGENET_MODELS))
def test_the_imagenet_presets_hold_the_official_values(size):
    name = f"imagenet-dit-{size}"
    cfg = load_config(preset_path(name))
    assert {k: _value(cfg, k) for k in OFFICIAL_IMAGENET} == OFFICIAL_IMAGENET
    o = cfg.objective
    assert (cfg.model.name, cfg.train.epochs, o.omega, o.kappa, o.t_interval) == \
        IMAGENET_MODELS[size]
    text = preset_path(name).read_text()
    assert "configs/default.py" in text and ("run_b4.yml" in text) == size.startswith("b4")


def test_unknown_preset_lists_the_names():
    with pytest.raises(ConfigError, match="fmnist-unet"):
        preset_path("nope")


