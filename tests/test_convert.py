"""`meanflow convert`: official py-meanflow checkpoints become meanflow runs, exactly and safely.

Two fixtures come from running the official code (py-meanflow at 1f6d72d) outside the repo:
``py_meanflow_cifar10_unet.json`` lists the names and shapes of its CIFAR-10 U-Net's state,
and ``py_meanflow_tiny_unet.safetensors`` holds a small network of the same class (random
weights), inputs, and the outputs the official network gives for them. The tests write
official-format checkpoints themselves (``torch.save`` of the dict its train.py saves).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from meanflow.convert import (convert_official_checkpoint, official_parameter_names,
                              read_official_checkpoint, run_config_from_args,
                              to_meanflow_weights, unet_config_from_state)
from meanflow.errors import CheckpointError
from meanflow.models.unet import UNET_PRESETS, UNet, UNetConfig, fir_filter

from cli_helpers import cli  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
MARKER_NAME = "pwned.txt"


def official_args(**changes) -> argparse.Namespace:
    """The Namespace py-meanflow's train.py saves for cifar10_v1.sh on 8 GPUs."""
    args = dict(batch_size=128, epochs=16000, lr=0.0006, optimizer_betas=[0.9, 0.999],
                warmup_epochs=200, dropout=0.2, ema_decay=0.9999, ema_decays=[0.99995, 0.9996],
                dataset="cifar10", data_path="./data", output_dir="./tmp", fid_samples=50000,
                device="cuda", seed=0, resume="", start_epoch=0, eval_only=False,
                eval_frequency=50, compute_fid=True, save_fid_samples=False, num_workers=10,
                pin_mem=True, log_per_step=100, world_size=8, local_rank=-1,
                dist_on_itp=False, dist_url="env://", ratio=0.75, tr_sampler="v1",
                P_mean_t=-0.6, P_std_t=1.6, P_mean_r=-4.0, P_std_r=1.6, norm_p=0.75,
                norm_eps=1e-3, arch="unet", use_edm_aug=True, test_run=False, compile=True,
                rank=0, gpu=0, distributed=True, dist_backend="nccl")
    args.update(changes)
    return argparse.Namespace(**args)


def tiny_official() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(official U-Net state, {inputs and official outputs}) of the tiny fixture."""
    data = load_file(str(FIXTURES / "py_meanflow_tiny_unet.safetensors"))
    state = {k[len("weights/"):]: v for k, v in data.items() if k.startswith("weights/")}
    return state, {k: v for k, v in data.items() if not k.startswith("weights/")}


def write_official(path: Path, nets: dict[str, dict[str, torch.Tensor]],
                   args: argparse.Namespace, num_updates: int = 4800, epoch: int = 99) -> Path:
    """A checkpoint as py-meanflow's save_model writes it: the wrapper's state dict (nets
    under their prefixes and num_updates), Adam's and the schedule's state, epoch and args."""
    model = {"num_updates": torch.tensor(num_updates)}
    for prefix, state in nets.items():
        model.update({f"{prefix}.{k}": v for k, v in state.items()})
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([p], lr=6e-4)
    p.grad = torch.ones(3)
    opt.step()
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-5, total_iters=10)
    const = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=100)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, const], milestones=[10])
    torch.save({"model": model, "optimizer": opt.state_dict(),
                "lr_schedule": sched.state_dict(), "epoch": epoch, "args": args}, path)
    return path


def tiny_checkpoint(tmp_path: Path, **arg_changes) -> tuple[Path, dict, dict]:
    state, io = tiny_official()

    def scaled(factor: float) -> dict[str, torch.Tensor]:   # other weights, the same buffers
        return {k: v if k.endswith("resample_filter") else v * factor for k, v in state.items()}
    nets = {"net": state, "net_ema": scaled(0.5), "net_ema1": scaled(0.25),
            "net_ema2": scaled(-1.0)}
    path = write_official(tmp_path / "checkpoint-99.pth", nets, official_args(**arg_changes))
    return path, nets, io


# ---------------------------------------------------------------------- the key mapping

def test_every_key_of_the_official_cifar10_network_is_mapped():
    """The official CIFAR-10 U-Net's state (all 425 entries, listed by the official code) is
    read as exactly meanflow's unet-cifar10 with a 6-wide augmentation label; every parameter
    maps one to one onto meanflow's, and the 8 resampling-filter buffers are checked."""
    listing = json.loads((FIXTURES / "py_meanflow_cifar10_unet.json").read_text())
    fir = fir_filter([1, 3, 3, 1])
    state = {k: (fir.reshape(1, 1, 4, 4).clone() if k.endswith("resample_filter")
                 else torch.empty(shape, device="meta"))
             for k, shape in listing["state"].items()}
    cfg = unet_config_from_state(state, dropout=0.2)
    expected = UNetConfig(in_channels=3, input_size=32, augment_dim=6,
                          **UNET_PRESETS["unet-cifar10"])
    assert cfg == expected
    with torch.device("meta"):
        net = UNet(cfg)
    names = official_parameter_names(net)
    buffers = [k for k in state if k.endswith("resample_filter")]
    assert len(buffers) == 8 and len(state) == 425
    assert sorted(names.values()) == sorted(set(state) - set(buffers))     # a bijection
    weights = to_meanflow_weights(state, net)
    assert set(weights) == {k for k, _ in net.named_parameters()}
    assert sum(v.numel() for v in weights.values()) == listing["parameters"] == 55_932_419


def test_the_converted_network_gives_the_official_networks_outputs(tmp_path):
    """The tiny official-layout network, converted, gives (in float64) the outputs the
    official code computed for the same weights and inputs, with and without an
    augmentation label; a wrong mapping would not. The converted run records the layout it
    read off the weights (here not the official size)."""
    src, nets, io = tiny_checkpoint(tmp_path)
    ckpt = convert_official_checkpoint(src, tmp_path / "run")
    from meanflow.runs.load import load_model
    loaded = load_model(tmp_path / "run", ema=None)
    assert loaded.weights == "model" and loaded.step == 4800 and ckpt.name == "step_0004800"
    assert loaded.config.model.options == {"channels": 8, "channel_mult": [1, 2],
                                           "blocks_per_res": 1, "attn_resolutions": [8],
                                           "dropout": 0.2}
    net = loaded.net.double()
    x, t, h, aug = io["inputs/x"], io["inputs/t"], io["inputs/h"], io["inputs/aug"]
    with torch.no_grad():
        plain, labelled = net(x, t, h), net(x, t, h, aug=aug)
    # to ~1e-10: the official attention computes its softmax in float32 even in float64
    torch.testing.assert_close(plain, io["outputs/plain"], rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(labelled, io["outputs/aug"], rtol=1e-8, atol=1e-9)
    assert (labelled - plain).abs().max() > 1e-3
    # a plausible mapping error (the attention's k and v weights swapped) changes the outputs
    with torch.no_grad():
        qkv = next(b.attn.qkv for b in net.encoder if b.attn is not None)
        C = qkv.weight.shape[1]
        qkv.weight[C:] = torch.cat([qkv.weight[2 * C:], qkv.weight[C:2 * C]])
        assert (net(x, t, h) - plain).abs().max() > 1e-6   # far above the 1e-9 tolerance


def test_every_ema_lands_under_its_decay_bit_for_bit(tmp_path):
    src, nets, _ = tiny_checkpoint(tmp_path)
    convert_official_checkpoint(src, tmp_path / "run")
    from meanflow.runs.load import load_model
    for decay, prefix in ((0.9999, "net_ema"), (0.99995, "net_ema1"), (0.9996, "net_ema2")):
        loaded = load_model(tmp_path / "run", ema=decay)
        names = official_parameter_names(loaded.net)
        for ours, value in loaded.net.state_dict().items():
            if ours in names:
                ref = nets[prefix][names[ours]]
                assert torch.equal(value, ref.reshape(value.shape)), (decay, ours)
    assert load_model(tmp_path / "run").weights == "ema_0.9999"     # auto: args.ema_decay


def test_the_recipe_is_read_from_the_runs_arguments(tmp_path):
    state, _ = tiny_official()
    unet = unet_config_from_state(state, dropout=0.2)
    v1 = run_config_from_args(vars(official_args()), unet)
    o = v1.objective
    assert (o.time_sampler, o.mu, o.sigma, o.mu_r, o.sigma_r) == ("v1", -0.6, 1.6, -4.0, 1.6)
    assert (o.fraction_r_neq_t, o.p, o.c) == (0.75, 0.75, 1e-3)
    assert v1.train.batch_size == 1024 and v1.train.epochs == 16000
    assert v1.train.ema_decays == [0.9999, 0.99995, 0.9996] and v1.train.ema_every == 16
    assert v1.data.augment == 0.12 and v1.model.options["dropout"] == 0.2
    # the official size needs no options beyond the preset's (the official network's)
    full = UNetConfig(in_channels=3, input_size=32, augment_dim=6,
                      **{**UNET_PRESETS["unet-cifar10"], "dropout": 0.2})
    assert run_config_from_args(vars(official_args()), full).model.options == {"dropout": 0.2}
    plain = dataclasses.replace(unet, augment_dim=0)       # trained without augmentation
    v0 = run_config_from_args(vars(official_args(tr_sampler="v0", P_mean_t=-2.0, P_std_t=2.0,
                                                 P_mean_r=-2.0, P_std_r=2.0,
                                                 use_edm_aug=False, world_size=4)), plain)
    assert (v0.objective.time_sampler, v0.objective.mu, v0.objective.sigma) == \
        ("logit_normal", -2.0, 2.0)
    assert v0.data.augment == 0.0 and v0.train.batch_size == 512
    with pytest.raises(CheckpointError, match="cannot express"):
        run_config_from_args(vars(official_args(tr_sampler="v0")), unet)   # LN(-0.6) vs LN(-4)
    with pytest.raises(CheckpointError, match="6-wide augmentation label.*disagree"):
        run_config_from_args(vars(official_args(use_edm_aug=False)), unet)


# ---------------------------------------------------------------------- the command line

def test_convert_then_sample_from_the_command_line(tmp_path, capsys):
    src, _, _ = tiny_checkpoint(tmp_path)
    run = tmp_path / "official"
    assert cli("convert", src, run) == 0
    out = capsys.readouterr().out
    assert "4800 steps" in out and "0.99995" in out
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["name"] == "unet-cifar10" and config["data"]["augment"] == 0.12
    assert cli("sample", run, "--n", 4, "--out", tmp_path / "s.npz", "--ema", "0.99995",
               "--device", "cpu") == 0
    with np.load(tmp_path / "s.npz") as f:
        assert f["images"].shape == (4, 16, 16, 3) and f["images"].dtype == np.uint8


class _RunsCode:
    """Unpickling this writes a marker file: stands for any payload of a hostile pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


@pytest.mark.parametrize("how", ["torch.save", "plain pickle"])
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, capsys, how):
    marker = tmp_path / MARKER_NAME
    payload = {"model": {"num_updates": torch.tensor(1)}, "args": _RunsCode(marker)}
    src = tmp_path / "evil.pth"
    if how == "torch.save":
        torch.save(payload, src)
    else:
        src.write_bytes(pickle.dumps(payload))
    assert cli("convert", src, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("meanflow: error:")
    assert ("refuses to unpickle" in err if how == "torch.save"
            else "not a torch checkpoint" in err)
    assert not marker.exists() and not (tmp_path / "run").exists()
    assert list(tmp_path.iterdir()) == [src]
    # the same object really runs its payload when unpickled without restriction
    pickle.loads(pickle.dumps(_RunsCode(marker)))
    assert marker.read_text() == "ran"


def bad_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    state, _ = tiny_official()
    args = official_args()
    emas = {"net_ema": state, "net_ema1": state, "net_ema2": state}
    cases = {}

    def case(name, nets, match, **kw):
        cases[name] = (write_official(tmp_path / f"{name}.pth", nets, args, **kw), match)
    dit = {"x_embedder.proj.weight": torch.zeros(8, 4, 2, 2), "t_embedder.mlp.0.weight":
           torch.zeros(8, 8), "final_layer.linear.weight": torch.zeros(16, 8)}
    case("dit", {"net": dit, **{k: dit for k in emas}}, "not py-meanflow's U-Net")
    extra = dict(state, **{"enc.16x16_block0.extra.weight": torch.zeros(2)})
    case("extra_key", {"net": extra, **emas}, "enc.16x16_block0.extra.weight")
    missing = {k: v for k, v in state.items() if k != "dec.16x16_block1.conv1.bias"}
    case("missing_key", {"net": missing, **emas}, "dec.16x16_block1.conv1.bias")
    wrong = dict(state, **{"dec.8x8_in0.proj.weight": torch.zeros(16, 16, 3, 3)})
    case("wrong_shape", {"net": wrong, **emas}, "dec.8x8_in0.proj.weight has shape")
    no_ema = {"net": state, "net_ema": state, "net_ema2": state}
    case("missing_ema", no_ema, "no EMA network net_ema1")
    case("unnamed_net", {"net": state, **emas, "net_ema3": state}, "net_ema3")
    filt = {k: (v * 2 if k.endswith("resample_filter") else v) for k, v in state.items()}
    case("wrong_filter", {"net": filt, **emas}, "FIR filter")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    cases["garbage"] = (garbage, "not a torch checkpoint")
    plain = tmp_path / "plain.pth"
    torch.save({"weights": torch.zeros(2)}, plain)
    cases["no_model"] = (plain, "no 'model' state dict")
    return cases


def test_bad_checkpoints_get_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    for name, (src, match) in bad_checkpoints(tmp_path).items():
        out = tmp_path / f"out_{name}"
        assert cli("convert", src, out) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err, (name, err)
        assert not out.exists(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".out_", "out_"))]


def test_an_existing_folder_is_not_overwritten(tmp_path, capsys):
    src, _, _ = tiny_checkpoint(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli("convert", src, out) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    assert cli("convert", tmp_path / "nope.pth", tmp_path / "new") == 2
    assert "no file at" in capsys.readouterr().err


def test_reading_keeps_the_runs_arguments_and_counters(tmp_path):
    src, nets, _ = tiny_checkpoint(tmp_path)
    ckpt = read_official_checkpoint(src)
    assert ckpt.epoch == 99 and ckpt.num_updates == 4800
    assert ckpt.args["tr_sampler"] == "v1" and ckpt.args["ema_decays"] == [0.99995, 0.9996]
    assert sorted(ckpt.nets) == ["net", "net_ema", "net_ema1", "net_ema2"]
    assert all(torch.equal(ckpt.nets["net"][k], v) for k, v in nets["net"].items())
