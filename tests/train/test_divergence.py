"""Divergence (meanflow.train.guard, docs/design.md, Run folders, checkpoints and resume): a step
with a non-finite loss, raw error or gradient norm is never applied, no checkpoint is written
inside a non-finite streak, the last good one is never pruned, a diverged run stops with one
line naming the cause and the checkpoint to resume from, a finite explosion gets one warning;
and the metrics log's running window survives a resume exactly."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from meanflow.data import build_dataset
from meanflow.models import build_model
from meanflow.runs.config import RunConfig
from meanflow.runs.load import load_model
from meanflow.train.ema import EMA
from meanflow.train.guard import EXPLOSION_FACTOR, DivergenceGuard, explosion_warning
from meanflow.train.loop import train
from meanflow.train.step import TrainStep
from meanflow.world import World

TINY = {"width": 16, "depth": 1, "emb_dim": 8}


def config(steps: int, lr: float = 1e-3, warmup: int = 0, **train_opts) -> RunConfig:
    tr = {"steps": steps, "batch_size": 16, "checkpoint_every": 2, "log_every": 1,
          "progress": False, "keep_checkpoints": 0, "sample_count": 0}
    tr.update(train_opts)
    return RunConfig.from_dict({"model": {"options": dict(TINY)}, "data": {"name": "8gaussians"},
                                "optim": {"lr": lr, "warmup_steps": warmup},
                                "train": tr}).validate()


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def ckpt_steps(run: Path) -> list[int]:
    root = run / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.iterdir()) if root.is_dir() else []


def finite_files(ckpt: Path) -> bool:
    return all(bool(torch.isfinite(t.float()).all())
               for part in ("model", "ema", "optimizer")
               for t in load_file(str(ckpt / f"{part}.safetensors")).values())


class NaNAt:
    """8gaussians whose batches of the given calls (one per step, from 1) are NaN."""

    def __init__(self, calls) -> None:
        self.base, self.nan, self.calls = build_dataset("8gaussians"), set(calls), 0
        self.shape, self.num_classes = self.base.shape, self.base.num_classes

    def batch(self, batch_size, generator):
        self.calls += 1
        x, y = self.base.batch(batch_size, generator)
        return (torch.full_like(x, float("nan")) if self.calls in self.nan else x), y


# ---------------------------------------------------------------------------- one step

def one_step(loss_call):
    """A TrainStep on a tiny MLP with the given loss call; returns (net, step, params before)."""
    torch.manual_seed(0)
    net = build_model("mlp", dim=2, width=16, depth=1, emb_dim=8)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    step = TrainStep(net, object(), loss_call, opt, EMA(net, [0.9]), world=World(),
                     device=torch.device("cpu"), micro=8, accumulation=1, compiled=False,
                     autocast=contextlib.nullcontext(), grad_clip=None, fsdp=False)
    return net, step, copy.deepcopy(net.state_dict())


def call(kind: str):
    def loss_call(net, x, y, aug, *, generator=None, draws=None, jvp_net=None):
        out = net(x, torch.full((len(x),), 0.5), torch.zeros(len(x)))
        if kind == "grad":      # a finite loss whose gradient is NaN: d sqrt(u)/du at u = 0
            loss = torch.sqrt((out - out.detach()).pow(2).sum(1))
        else:
            loss = out.pow(2).sum(1) + 1.0
        mse = torch.tensor(float("inf")) if kind == "mse" else loss.mean().detach()
        return loss, {"loss": loss.mean().detach(), "mse": mse, "u_minus_v": mse}
    return loss_call


@pytest.mark.parametrize("kind,said", [("mse", "the raw error (mse, u_minus_v)"),
                                       ("grad", "the gradient norm")])
def test_a_step_with_a_non_finite_raw_error_or_gradient_is_not_applied(kind, said):
    """A finite weighted loss is not enough (it is ~1 by design with p = 1): an infinite raw
    error, or a NaN gradient, skips the step; the weights, Adam and the EMA are untouched."""
    net, step, before = one_step(call(kind))
    x = torch.randn(8, 2)
    assert step(0, x, None, None, torch.Generator().manual_seed(0), 0.1) is None
    assert step.skipped == said
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert step.opt.state_dict()["state"] == {}
    assert all(p.grad is None for p in net.parameters())
    net, step, before = one_step(call("ok"))
    stats = step(0, x, None, None, torch.Generator().manual_seed(0), 0.1)
    assert stats is not None and bool(torch.isfinite(stats["grad_norm"]))
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())


# ---------------------------------------------------------------------------- streaks

def test_checkpoints_wait_out_a_streak_and_the_good_one_is_kept(tmp_path):
    """NaN at steps 5-13: the checkpoints due at 6, 8, 10 and 12 wait for step 14, the first
    finite one, and are written there once; nothing from inside the streak. The issue's case:
    with keep_checkpoints=1 the streak used to push the good checkpoint out."""
    run = tmp_path / "run"
    train(config(16, keep_checkpoints=0), run, dataset=NaNAt(range(5, 14)))
    assert ckpt_steps(run) == [2, 4, 14, 16]
    assert records(run)[-1]["skipped_nonfinite"] == 9


def test_divergence_keeps_the_last_good_checkpoint_and_names_it(tmp_path):
    """Ten NaN steps in a row after step 12 (checkpoints every 5, keep 1): the run stops at
    step 22 with one line that names step_0000010, which is still there and loads; the
    checkpoints due at 15 and 20 were never written, so none was pruned for them."""
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError) as info:
        train(config(40, checkpoint_every=5, keep_checkpoints=1), run,
              dataset=NaNAt(range(13, 40)))
    message = str(info.value)
    assert "\n" not in message
    assert "10 steps in a row (steps 13 to 22)" in message
    assert "data holds NaN or inf" in message
    good = run / "checkpoints" / "step_0000010"
    assert f"the last good checkpoint is {good}; resume from it" in message
    assert ckpt_steps(run) == [10] and finite_files(good)
    assert load_model(run).step == 10


def test_a_real_divergence_in_warm_up_stops_with_its_cause(tmp_path):
    """A warm-up to lr 1e4 (tiny MLP): the raw error explodes (one warning line), then turns
    non-finite. The run stops with one line naming the rate, that warm-up was still ramping
    and the raw error before; every checkpoint left is from before the streak, finite and
    loadable. Its weights had exploded already, so the line says to start a new run, with a
    command that works."""
    run = tmp_path / "run"
    cfg = config(30, lr=1e4, warmup=20, keep_checkpoints=1)
    with pytest.raises(FloatingPointError) as info:
        train(cfg, run)
    message = str(info.value)
    assert "warm-up still ramping to 10000" in message and "after a raw error (mse) of" in message
    assert "learning rate is likely too high" in message and "--lr 1000" in message
    first_bad = int(message.split("(steps ")[1].split(" ")[0])
    steps = ckpt_steps(run)
    assert steps and steps[-1] < first_bad
    good = run / "checkpoints" / f"step_{steps[-1]:07d}"
    assert f"the last checkpoint before it, {good}, holds weights whose raw error had " \
           "already exploded" in message
    assert finite_files(good) and load_model(good).step == steps[-1]
    assert f"--out {tmp_path / 'NEW_FOLDER'} --lr 1000" in message
    lower = config(30, lr=1e-3, warmup=20, keep_checkpoints=1)
    assert train(lower, tmp_path / "NEW_FOLDER") == tmp_path / "NEW_FOLDER" / "checkpoints" / \
        "step_0000030"


def test_the_last_step_in_a_streak_is_written_and_the_one_before_kept(tmp_path):
    """The final checkpoint is written even from a skipped step (it holds the weights of the
    last applied one), and keep_checkpoints=1 then keeps the checkpoint before the streak."""
    run = tmp_path / "run"
    train(config(6, checkpoint_every=4, keep_checkpoints=1), run, dataset=NaNAt({5, 6}))
    assert ckpt_steps(run) == [4, 6]


def test_the_divergence_line_without_a_checkpoint(tmp_path):
    """The guard's own line when no checkpoint was written: what to run instead."""
    guard = DivergenceGuard(config(40), tmp_path / "r")
    x = torch.ones(4, 2) * 500.0
    with pytest.raises(FloatingPointError) as info:
        for step in range(10):
            guard.step(step, None, x, "the loss")
    message = str(info.value)
    assert "data is large (|x| up to 500)" in message
    assert "no checkpoint was written before it diverged" in message
    assert f"--config {tmp_path / 'r' / 'config.yaml'}" in message


# ---------------------------------------------------------------------------- explosion

def test_explosion_warning_rule():
    """Above EXPLOSION_FACTOR times the lowest raw error: a warning that names the rate."""
    cfg = config(10, lr=1000.0, warmup=20)
    low = (2.0, 1)
    assert explosion_warning(cfg, {"step": 5, "mse": 2.0 * EXPLOSION_FACTOR}, low) is None
    line = explosion_warning(cfg, {"step": 5, "mse": 2.0 * EXPLOSION_FACTOR * 1.01}, low)
    assert line.startswith("warning: training is diverging") and "\n" not in line
    assert "warm-up still ramping to 1000" in line
    assert explosion_warning(cfg, {"step": 5, "mse": 1e9}, None) is None


def test_a_finite_explosion_gets_one_warning_line(tmp_path, capsys):
    """lr 200 without warm-up: the raw error explodes but stays finite, the run ends; stderr
    holds exactly one warning line. A sane run gets none."""
    train(config(10, lr=200.0, log_every=2, checkpoint_every=10), tmp_path / "a")
    err = capsys.readouterr().err.splitlines()
    assert len([line for line in err if "training is diverging" in line]) == 1
    assert max(r["mse"] for r in records(tmp_path / "a")) > 1e6
    train(config(10, log_every=2, checkpoint_every=10), tmp_path / "b")
    assert "diverging" not in capsys.readouterr().err


# ---------------------------------------------------------------------------- the window

def test_metrics_after_a_resume_equal_the_uninterrupted_run(tmp_path):
    """Killed at step 11 (checkpoint at 8, lines at 5 and 10), resumed: metrics.jsonl equals
    the uninterrupted run's line for line (all but the wall-clock samples_per_s and the
    "jvp" note of each train() call's first line), skipped_nonfinite included; the window
    of steps 9-10 and the skipped count came back from the checkpoint."""
    cfg = config(13, log_every=5, checkpoint_every=4)
    a, b = tmp_path / "a", tmp_path / "b"
    nan = {3, 7, 9}
    train(cfg, a, dataset=NaNAt(nan))

    class Killed(NaNAt):
        def batch(self, batch_size, generator):
            if self.calls == 10:
                raise KeyboardInterrupt
            return super().batch(batch_size, generator)

    with pytest.raises(KeyboardInterrupt):
        train(cfg, b, dataset=Killed(nan))
    state = json.loads((b / "checkpoints" / "step_0000008" / "state.json").read_text())
    assert state["log_window"]["count"] == 2 and state["log_window"]["skipped"] == 2
    resumed = NaNAt(nan)
    resumed.calls = 8
    train(cfg, b, resume=True, dataset=resumed)

    def strip(r: dict) -> dict:
        return {k: v for k, v in r.items() if k not in ("samples_per_s", "jvp")}
    ra, rb = records(a), records(b)
    assert [r["step"] for r in rb] == [5, 10, 13]
    assert [strip(r) for r in ra] == [strip(r) for r in rb]
    assert rb[-1]["skipped_nonfinite"] == 3


def test_a_checkpoint_without_the_window_still_resumes(tmp_path):
    """Checkpoints of a meanflow that did not save the window resume with an empty one."""
    run = tmp_path / "run"
    train(config(4, log_every=3), run)
    path = run / "checkpoints" / "step_0000004" / "state.json"
    state = json.loads(path.read_text())
    del state["log_window"]
    path.write_text(json.dumps(state))
    train(config(6, log_every=3), run, resume=True)
    assert [r["step"] for r in records(run)] == [3, 4, 6]
