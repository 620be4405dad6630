"""The loop's image-scale features: gradient accumulation, bf16 autocast, the compiled-network
check, sample PNGs, training length in epochs/images, augmentation labels, presets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from meanflow import FlowMatchingLoss, MeanFlowLoss
from meanflow.data import build_dataset
from meanflow.errors import ConfigError
from meanflow.models import build_model
from meanflow.presets import preset_names, preset_path
from meanflow.runs.config import RunConfig, load_config
from meanflow.train.loop import (WithAugmentLabels, check_compiled, check_config,
                                 draw_times_and_noise, make_loss_call, total_steps, train)

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


def test_gradient_accumulation_equals_the_whole_batch():
    """Two micro-batches of 8 give the gradient of one batch of 16 (same r, t, e per sample)."""
    torch.manual_seed(0)
    net = build_model("mlp", dim=2, width=16, depth=2, emb_dim=8)
    x = torch.randn(16, 2)
    t = torch.rand(16) * 0.9 + 0.1
    r = t * torch.rand(16)
    e = torch.randn(16, 2)
    loss_fn = MeanFlowLoss(p=0.5)

    def grads(parts: int) -> list[torch.Tensor]:
        net.zero_grad()
        size = 16 // parts
        for i in range(parts):
            s = slice(i * size, (i + 1) * size)
            loss, _ = loss_fn(net, x[s], r=r[s], t=t[s], e=e[s])
            (loss.mean() / parts).backward()
        return [p.grad.clone() for p in net.parameters()]

    for a, b in zip(grads(1), grads(2)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


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


def test_jvp_runs_in_fp32_under_autocast_unless_asked():
    """objective.jvp_precision: by default the split JVP pass leaves autocast (its du/dt equals
    the fp32 one exactly); with "amp" it runs in bf16 and differs."""
    from meanflow.objective.jvp import time_derivative, u_and_dudt
    torch.manual_seed(0)
    net = build_model("mlp", dim=2, width=32, depth=2, emb_dim=16)
    z, v = torch.randn(64, 2), torch.randn(64, 2)
    t = torch.rand(64) * 0.5 + 0.5
    r = t * torch.rand(64)
    ref = time_derivative(net, z, r, t, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u, fp32 = u_and_dudt(net, z, r, t, v)
        _, low = u_and_dudt(net, z, r, t, v, jvp_autocast=True)
    assert u.dtype == torch.bfloat16          # the grad pass did run under autocast
    assert fp32.dtype == torch.float32 and torch.equal(fp32, ref)
    assert low.dtype == torch.bfloat16 and not torch.equal(low.float(), ref)


class _DropsTangents(torch.nn.Module):
    """Stands in for a compiler that loses forward-mode tangents (docs/design.md, torch.compile:
    a compiled graph can drop a custom autograd Function's jvp rule)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, z, t, h, y=None):
        from torch.autograd import forward_ad
        strip = lambda a: forward_ad.unpack_dual(a).primal if a is not None else a  # noqa: E731
        return self.net(strip(z), strip(t), strip(h), y)


@pytest.mark.parametrize("model", ["mlp", "unet"])
def test_compile_check_accepts_eager_and_refuses_lost_tangents(model):
    """The check runs on a perturbed copy: a fresh U-Net's zero output would make du/dt 0 and
    hide a compiler that drops tangents."""
    torch.manual_seed(0)
    if model == "mlp":
        net, x = build_model("mlp", dim=2, width=16, depth=2, emb_dim=8), torch.randn(16, 2)
    else:
        net = build_model("unet-small", in_channels=1, input_size=8, **TINY_UNET)
        x = torch.randn(4, 1, 8, 8)
    loss_fn = MeanFlowLoss()
    assert check_compiled(net, loss_fn, make_loss_call(loss_fn), x, None) == 0.0

    def dropping(net, x, y, aug, generator, draws):
        return loss_fn(_DropsTangents(net), x, y, generator=generator, **draws)
    with pytest.raises(ConfigError, match="compiled JVP is wrong"):
        check_compiled(net, loss_fn, dropping, x, None)


def test_compile_failure_is_one_clear_error():
    net = build_model("mlp", dim=2, width=16, depth=2, emb_dim=8)

    def broken(*args):
        raise RuntimeError("backend exploded\nmore lines")
    with pytest.raises(ConfigError, match="backend exploded.*train.compile=false"):
        check_compiled(net, MeanFlowLoss(), broken, torch.randn(4, 2), None)


def test_pre_drawn_times_and_noise_reproduce_the_loss_own_draws():
    """The compiled path draws (r, t, e) before the loss; the values equal the loss's own."""
    torch.manual_seed(0)
    net = build_model("mlp", dim=2, width=16, depth=2, emb_dim=8)
    x = torch.randn(32, 2)
    for loss_fn in (MeanFlowLoss(fraction_r_neq_t=0.5), FlowMatchingLoss()):
        own = loss_fn(net, x, generator=torch.Generator().manual_seed(3))[0]
        gen = torch.Generator().manual_seed(3)
        draws = draw_times_and_noise(loss_fn, x, gen)
        given = make_loss_call(loss_fn)(net, x, None, None, gen, draws)[0]
        assert torch.equal(own, given)


@pytest.mark.slow
def test_real_torch_compile_passes_the_check_on_cpu(tmp_path):
    """A short compiled run on CPU (needs a C++ compiler; slow): the start-up check passes."""
    cfg = load_config(None, ["train.steps=2", "train.batch_size=16", "train.compile=true",
                             "train.progress=false", "train.sample_count=0",
                             "model.options={width: 16, depth: 1, emb_dim: 8}"])
    train(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "step_0000002").is_dir()


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
    and trains; the wrapper hands each sample its own label, repeated for doubled (guidance)
    batches."""
    seen = []

    def model(z, t, h, y=None, aug=None):
        seen.append(aug)
        return z

    labels = torch.arange(6.).reshape(2, 3)
    wrapped = WithAugmentLabels(model, labels)
    wrapped(torch.zeros(2, 1), torch.zeros(2), torch.zeros(2))
    wrapped(torch.zeros(4, 1), torch.zeros(4), torch.zeros(4))
    assert torch.equal(seen[0], labels) and torch.equal(seen[1], torch.cat([labels, labels]))

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


def test_augmentation_needs_images_and_a_unet(tmp_path):
    with pytest.raises(ConfigError, match="for images"):
        check_config(load_config(None, ["data.augment=0.1"]))
    data = images_npz(tmp_path)
    with pytest.raises(ConfigError, match="only unet"):
        check_config(load_config(None, [f"data.name={data}", "data.augment=0.1",
                                        "model.name=dit-s/4", "train.batch_size=8"]))


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


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_is_a_valid_config(name, tmp_path):
    cfg = load_config(preset_path(name))
    assert cfg.objective.kind == "meanflow"
    if name.startswith("imagenet"):
        # any .npz of latents with labels: the model is built (meta device) for its shape;
        # one global batch of them, which data.order "epochs" needs at the least
        path = tmp_path / "latents.npz"
        n = cfg.train.batch_size
        np.savez(path, x=np.zeros((n, 4, 32, 32), np.float32), y=np.arange(n) % 2)
        cfg = load_config(preset_path(name), [f"data.name={path}"])
        check_config(cfg)
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


def test_compiled_split_with_attention_passes_the_check_and_forward_ad_names_the_fix():
    """Under torch.compile (the "aot_eager" backend: the same traced graphs as inductor) the
    lean autograd.Functions step aside and attention in the JVP pass takes the math path: a
    custom Function's jvp rule would be dropped, and a dual tensor is invisible while tracing
    (the split pass failed with "forward AD with _scaled_dot_product_flash_attention_for_cpu"
    before). The joint forward_ad pass does not compile in this torch: one line names the fix."""
    from meanflow.models.attention import set_jvp_attention
    torch.manual_seed(0)
    net = build_model("dit-s/2", in_channels=3, input_size=8, depth=1, width=32, heads=2)
    set_jvp_attention(net, "chunked")
    x = torch.randn(4, 3, 8, 8)
    torch._dynamo.reset()
    split = MeanFlowLoss(jvp="split")
    assert check_compiled(net, split, make_loss_call(split, True, "aot_eager"), x, None) < 1e-5
    torch._dynamo.reset()
    joint = MeanFlowLoss(jvp="forward_ad")
    with pytest.raises(ConfigError, match="forward_ad does not compile: use split or func"):
        check_compiled(net, joint, make_loss_call(joint, True, "aot_eager"), x, None)
