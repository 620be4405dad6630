"""The training loop: run folder layout, metrics, retention, bit-exact resumption, guarded
output folders, non-finite losses, class-conditional and user-file training."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from meanflow.data import build_dataset
from meanflow.errors import CheckpointError, ConfigError
from meanflow.sampling import sample_seeded
from meanflow.runs.build import resolve_model
from meanflow.runs.config import RunConfig, load_config
from meanflow.runs.folder import saved_config
from meanflow.runs.load import load_model
from meanflow.train import Interrupted
from meanflow.train.loop import train

TINY = {"width": 16, "depth": 1, "emb_dim": 8}
PARTS = ("model", "ema", "optimizer")


def make_config(steps: int = 6, kind: str = "meanflow", model: dict | None = None,
                data: dict | None = None, objective: dict | None = None,
                **train_opts) -> RunConfig:
    tr = {"steps": steps, "batch_size": 16, "checkpoint_every": 4, "log_every": 1,
          "progress": False, "keep_checkpoints": 0, "sample_count": 0}
    tr.update(train_opts)
    return RunConfig.from_dict({
        # the MLP named: these runs compare their folders with this config, and "auto" is
        # resolved there (tests/runs/test_build.py)
        "model": {"name": "mlp", "options": {**TINY, **(model or {})}},
        "data": data or {"name": "8gaussians"},
        "objective": {"kind": kind, **(objective or {})},
        "train": tr,
    }).validate()


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def ckpt_names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_checkpoint(a: Path, b: Path, same_step: bool = True) -> None:
    """Model, EMA and optimizer tensors bit-identical, and the optimizer scalars equal."""
    for part in PARTS:
        ta = load_file(str(a / f"{part}.safetensors"))
        tb = load_file(str(b / f"{part}.safetensors"))
        assert ta.keys() == tb.keys() and ta, part
        for key in ta:
            assert torch.equal(ta[key], tb[key]), (part, key)
    sa, sb = (json.loads((p / "state.json").read_text()) for p in (a, b))
    assert sa["step"] == sb["step"] or not same_step
    assert sa["optimizer"] == sb["optimizer"]


class Wrapped:
    """8gaussians, but call number ``raise_at`` raises ``exc`` and calls in ``nan_at`` return NaN
    points (calls count from 1, one per training step)."""

    def __init__(self, raise_at: int | None = None, exc: BaseException | None = None,
                 nan_at=()) -> None:
        self.base = build_dataset("8gaussians")
        self.shape, self.num_classes = self.base.shape, self.base.num_classes
        self.raise_at, self.exc, self.nan_at, self.calls = raise_at, exc, set(nan_at), 0

    def batch(self, batch_size, generator):
        self.calls += 1
        if self.calls == self.raise_at:
            raise self.exc
        x, y = self.base.batch(batch_size, generator)
        if self.calls in self.nan_at:
            x = torch.full_like(x, float("nan"))
        return x, y


class AllNaN:
    """A dataset whose every batch is NaN."""
    shape, num_classes = (2,), None

    def batch(self, batch_size, generator):
        return torch.full((batch_size, 2), float("nan")), None


# ---------------------------------------------------------------------------- run folder

@pytest.mark.parametrize("kind,keys", [
    ("meanflow", {"loss", "mse", "u_minus_v", "weight", "frac_r_neq_t"}),
    ("flow_matching", {"loss", "mse", "u_minus_v"}),
])
def test_run_folder_layout(tmp_path, kind, keys):
    """A short run writes config.json/.yaml equal to the config, one metrics line per
    log_every steps plus the last step, with finite stats, and checkpoints every
    checkpoint_every steps plus the last."""
    cfg = make_config(10, kind, log_every=4, checkpoint_every=4)
    run = tmp_path / "run"
    last = train(cfg, run)
    assert last == run / "checkpoints" / "step_0000010"
    assert json.loads((run / "config.json").read_text()) == cfg.to_dict()
    assert yaml.safe_load((run / "config.yaml").read_text()) == cfg.to_dict()
    assert load_config(run / "config.yaml") == cfg
    recs = records(run)
    assert [r["step"] for r in recs] == [4, 8, 10]
    for r in recs:
        assert keys | {"step", "grad_norm", "lr", "samples_per_s", "skipped_nonfinite"} <= set(r)
        assert all(np.isfinite(r[k]) for k in keys)
        assert r["skipped_nonfinite"] == 0 and r["lr"] == cfg.optim.lr
    assert ckpt_names(run) == ["step_0000004", "step_0000008", "step_0000010"]
    state = json.loads((last / "state.json").read_text())
    assert state["step"] == 10 and state["config"] == cfg.to_dict()
    assert state["data"] == {"shape": [2], "num_classes": None}


def test_training_changes_the_weights(tmp_path):
    """The loop really optimises: weights after 4 steps differ from those after 2."""
    run = tmp_path / "run"
    train(make_config(4, checkpoint_every=2), run)
    a = load_file(str(run / "checkpoints" / "step_0000002" / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_warmup_lr_is_logged(tmp_path):
    """With warmup_steps=4 the logged lr (the one step k applied) rises linearly from
    1e-8 at step 1 to optim.lr at step 5, then stays (the official LinearLR warm-up)."""
    cfg = make_config(6)
    cfg.optim.warmup_steps = 4
    run = tmp_path / "run"
    train(cfg, run)
    lrs = [r["lr"] for r in records(run)]
    lr, s = cfg.optim.lr, 1e-8 / cfg.optim.lr
    assert lrs == pytest.approx([lr * (s + (1 - s) * i / 4) for i in range(4)] + [lr] * 2,
                                rel=1e-12)
    assert lrs[0] == pytest.approx(1e-8) and lrs[4:] == [lr, lr]


def test_config_is_written_before_training(tmp_path):
    """config.json and config.yaml exist even when the first batch fails."""
    cfg = make_config(4)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="broken loader"):
        train(cfg, run, dataset=Wrapped(raise_at=1, exc=RuntimeError("broken loader")))
    assert json.loads((run / "config.json").read_text()) == cfg.to_dict()
    assert yaml.safe_load((run / "config.yaml").read_text()) == cfg.to_dict()
    assert not (run / "checkpoints").exists()


@pytest.mark.parametrize("keep,expected", [
    (2, ["step_0000010", "step_0000012"]),
    (1, ["step_0000012"]),
    (0, [f"step_{s:07d}" for s in (2, 4, 6, 8, 10, 12)]),
])
def test_keep_checkpoints(tmp_path, keep, expected):
    """keep_checkpoints keeps only the newest N checkpoints (0 keeps all)."""
    run = tmp_path / "run"
    train(make_config(12, checkpoint_every=2, keep_checkpoints=keep, log_every=6), run)
    assert ckpt_names(run) == expected


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_follows_its_update_rule(tmp_path, warmup):
    """Between consecutive checkpoints, shadow_d = β·shadow_d + (1 - β)·θ for each decay d,
    with β = d, or under the warm-up min(d, (k - 1)/(k + 9)) at the k-th update: the first
    update copies the weights, the second has β = min(d, 1/11)."""
    run = tmp_path / "run"
    train(make_config(2, checkpoint_every=1, ema_decays=[0.05, 0.9], ema_warmup=warmup), run)
    root = run / "checkpoints"
    ema1 = load_file(str(root / "step_0000001" / "ema.safetensors"))
    ema2 = load_file(str(root / "step_0000002" / "ema.safetensors"))
    model1 = load_file(str(root / "step_0000001" / "model.safetensors"))
    model2 = load_file(str(root / "step_0000002" / "model.safetensors"))
    for d in (0.05, 0.9):
        prefix = f"ema_{d:g}."
        names = [k[len(prefix):] for k in ema2 if k.startswith(prefix)]
        assert sorted(names) == sorted(model2)
        beta = min(d, 1 / 11) if warmup else d
        for name in names:
            if warmup:
                assert torch.equal(ema1[prefix + name], model1[name])
            expected = beta * ema1[prefix + name] + (1 - beta) * model2[name]
            torch.testing.assert_close(ema2[prefix + name], expected, rtol=1e-6, atol=1e-7)


def test_duplicate_ema_decays_do_not_corrupt_the_average(tmp_path):
    """ema_decays=[0.5, 0.5] is either refused, or its EMA still follows the update rule."""
    try:
        cfg = make_config(2, checkpoint_every=1, ema_decays=[0.5, 0.5])
    except ConfigError:
        return
    run = tmp_path / "run"
    train(cfg, run)
    root = run / "checkpoints"
    ema1 = load_file(str(root / "step_0000001" / "ema.safetensors"))
    ema2 = load_file(str(root / "step_0000002" / "ema.safetensors"))
    model2 = load_file(str(root / "step_0000002" / "model.safetensors"))
    for key, value in ema2.items():
        expected = 0.5 * ema1[key] + 0.5 * model2[key[len("ema_0.5."):]]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)


def test_empty_ema_decays_is_refused_or_sampleable(tmp_path):
    """ema_decays=[] is either a ConfigError, or load_model of the run works."""
    try:
        cfg = make_config(2, ema_decays=[])
    except ConfigError:
        return
    run = tmp_path / "run"
    train(cfg, run)
    load_model(run)


# ---------------------------------------------------------------------------- resumption

RESUME_CASES = [
    ("meanflow", {"dropout": 0.2}),
    ("flow_matching", {"dropout": 0.1}),
]


@pytest.mark.parametrize("kind,model", RESUME_CASES, ids=[k for k, _ in RESUME_CASES])
def test_resume_is_bit_exact(tmp_path, kind, model):
    """12 uninterrupted steps == 8 steps, then resume to 12: model, EMA and optimizer
    tensors identical, per-step losses identical, and no step logged twice."""
    cfg12 = make_config(12, kind, model=model, checkpoint_every=4)
    cfg8 = make_config(8, kind, model=model, checkpoint_every=4)
    a, b = tmp_path / "a", tmp_path / "b"
    train(cfg12, a)
    train(cfg8, b)
    assert ckpt_names(b)[-1] == "step_0000008"
    assert train(cfg12, b, resume=True) == b / "checkpoints" / "step_0000012"
    assert_same_checkpoint(a / "checkpoints" / "step_0000012",
                           b / "checkpoints" / "step_0000012")
    assert steps_logged(b) == list(range(1, 13))
    assert [r["loss"] for r in records(a)] == [r["loss"] for r in records(b)]
    assert json.loads((b / "config.json").read_text())["train"]["steps"] == 12


def test_dropout_is_active_and_seeded(tmp_path):
    """Guards the test above: dropout changes the trajectory (so it is exercised), and the same
    config run twice is identical."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train(make_config(4, model={"dropout": 0.3}), a)
    train(make_config(4, model={"dropout": 0.3}), b)
    train(make_config(4, model={"dropout": 0.0}), c)
    assert_same_checkpoint(a / "checkpoints" / "step_0000004", b / "checkpoints" / "step_0000004")
    ma = load_file(str(a / "checkpoints" / "step_0000004" / "model.safetensors"))
    mc = load_file(str(c / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert any(not torch.equal(ma[k], mc[k]) for k in ma)


def test_resume_after_a_kill(tmp_path):
    """A run killed at step 10 (after the step-8 checkpoint) resumes from step 8 and ends
    identical to an uninterrupted run; log lines past the checkpoint are redone, not doubled."""
    cfg = make_config(12, model={"dropout": 0.2}, checkpoint_every=4)
    a, b = tmp_path / "a", tmp_path / "b"
    train(cfg, a)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, b, dataset=Wrapped(raise_at=11, exc=KeyboardInterrupt()))
    assert steps_logged(b) == list(range(1, 11))
    train(cfg, b, resume=True)
    assert_same_checkpoint(a / "checkpoints" / "step_0000012", b / "checkpoints" / "step_0000012")
    assert steps_logged(b) == list(range(1, 13))


class Signalling:
    """8gaussians, but the batch of call ``at`` (one call per step, from 1) sends ``sig`` to
    this process, as Ctrl-C or a scheduler's SIGTERM would, ``times`` times."""

    def __init__(self, at: int, sig: int, times: int = 1) -> None:
        self.base = build_dataset("8gaussians")
        self.shape, self.num_classes = self.base.shape, self.base.num_classes
        self.at, self.sig, self.times, self.calls = at, sig, times, 0

    def batch(self, batch_size, generator):
        self.calls += 1
        if self.calls == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), self.sig)
        return self.base.batch(batch_size, generator)


def without_timing(run: Path) -> list[dict]:
    """The metrics lines without the speed, and without the du/dt strategy that the first
    line of each train() call records (a resumed run's first line has it too)."""
    return [{k: v for k, v in r.items() if k not in ("samples_per_s", "jvp")}
            for r in records(run)]


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_checkpoints_the_last_step_and_resume_is_exact(tmp_path, sig, code):
    """SIGINT/SIGTERM during step 7 of 12 (no checkpoint due before the end): the step ends,
    its checkpoint is written, Interrupted says so; resuming from the folder alone (its saved
    config) ends bit for bit where an uninterrupted run does: weights, EMA, Adam state and
    every metrics.jsonl line (the log window of steps 5-7 travels in the checkpoint; the
    speed and the first line's du/dt strategy aside)."""
    cfg = make_config(12, model={"dropout": 0.2}, checkpoint_every=100, log_every=4)
    a, b = tmp_path / "a", tmp_path / "b"
    train(cfg, a)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as stop:
        train(cfg, b, dataset=Signalling(at=7, sig=sig))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert stop.value.step == 7 and stop.value.exit_code == code
    assert stop.value.checkpoint == b / "checkpoints" / "step_0000007"
    assert ckpt_names(b) == ["step_0000007"]
    line = stop.value.message()
    assert "step 7" in line and f"meanflow train --resume --out {b}" in line
    assert "\n" not in line
    assert steps_logged(b) == [4]
    train(saved_config(b), b, resume=True)
    assert_same_checkpoint(a / "checkpoints" / "step_0000012", b / "checkpoints" / "step_0000012")
    assert without_timing(a) == without_timing(b)


def test_a_second_signal_stops_at_once(tmp_path):
    """Two Ctrl-C: the second is a plain KeyboardInterrupt, no checkpoint is written."""
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt) as stop:
        train(make_config(12, checkpoint_every=100), run,
              dataset=Signalling(at=3, sig=signal.SIGINT, times=2))
    assert not isinstance(stop.value, Interrupted)
    assert not (run / "checkpoints").exists() or not ckpt_names(run)


def test_resume_without_a_checkpoint_says_it_starts_again(tmp_path, capsys):
    """A folder with a config but no checkpoint (a run stopped or diverged before its first
    one) resumes from step 0, and one line says so; train(resume=True) into a new folder
    (meanflow demo does) starts quietly."""
    cfg = make_config(6, checkpoint_every=100)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, dataset=Wrapped(raise_at=4, exc=KeyboardInterrupt()))
    capsys.readouterr()
    train(cfg, run, resume=True)
    err = capsys.readouterr().err.splitlines()
    assert err == [f"meanflow: {run} holds no checkpoint yet: the run starts again from step 0"]
    train(cfg, tmp_path / "new", resume=True)      # a folder with no run yet: nothing to say
    assert capsys.readouterr().err == ""


def test_an_old_run_resumes_with_the_ema_it_had(tmp_path):
    """A config.json saved before train.ema_warmup existed reads as the rule it ran with (no
    warm-up): resumed from its folder alone, it continues bit for bit."""
    old = make_config(8, ema_warmup=False)
    a, b = tmp_path / "a", tmp_path / "b"
    train(old, a)
    train(make_config(4, ema_warmup=False), b)
    saved = json.loads((b / "config.json").read_text())
    del saved["train"]["ema_warmup"]
    (b / "config.json").write_text(json.dumps(saved))
    cfg = saved_config(b, ["train.steps=8"])
    assert cfg.train.ema_warmup is False and cfg == old
    train(cfg, b, resume=True)
    assert_same_checkpoint(a / "checkpoints" / "step_0000008", b / "checkpoints" / "step_0000008")
    with pytest.raises(ConfigError, match="train.ema_warmup"):
        train(make_config(12), b, resume=True)     # a new run's default is another rule


def test_a_run_starts_with_a_summary_and_its_measured_speed(tmp_path, capsys):
    """With train.progress, one summary when the run starts (data, model, objective, steps)
    and, a few steps later, the measured time per step; nothing with progress off."""
    run = tmp_path / "run"
    train(make_config(12, progress=True), run)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"meanflow train: {run}"
    assert err[1] == "  data       8gaussians: drawn without end of shape (2,), unconditional"
    assert err[2].startswith("  model      mlp: ") and err[2].endswith(" parameters, on cpu")
    assert err[3].startswith("  objective  meanflow (p=1, c=0.001")
    assert err[4].startswith("  steps      12, batch 16, lr 0.001, EMA 0.999 with warm-up")
    assert err[5].startswith("  speed      ") and "s/step (steps 2 to 6)" in err[5]
    assert "for the 6 steps left" in err[5] and len(err) == 6
    train(make_config(4), tmp_path / "quiet")
    assert capsys.readouterr().err == ""


def test_resume_before_first_checkpoint_does_not_duplicate_metrics(tmp_path):
    """A run killed before any checkpoint restarts from scratch with a clean metrics log."""
    cfg = make_config(6, checkpoint_every=100)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, dataset=Wrapped(raise_at=4, exc=KeyboardInterrupt()))
    train(cfg, run, resume=True)
    assert steps_logged(run) == list(range(1, 7))


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    """Resuming a run that already reached train.steps returns its last checkpoint, leaves the
    checkpoints untouched and the log's content unchanged."""
    cfg = make_config(4)
    run = tmp_path / "run"
    train(cfg, run)
    before = snapshot(run)
    assert train(cfg, run, resume=True) == run / "checkpoints" / "step_0000004"
    after = snapshot(run)
    assert after.keys() == before.keys()
    assert {k: v for k, v in after.items() if k.startswith("checkpoints")} == \
        {k: v for k, v in before.items() if k.startswith("checkpoints")}
    assert after["metrics.jsonl"][0] == before["metrics.jsonl"][0]


def test_resume_with_a_changed_objective_is_refused(tmp_path):
    """Resuming with a different non-resumable setting is a ConfigError naming it, and the
    run folder is left as it was."""
    run = tmp_path / "run"
    train(make_config(4), run)
    before = snapshot(run)
    with pytest.raises(ConfigError, match="objective.kind"):
        train(make_config(8, "flow_matching"), run, resume=True)
    with pytest.raises(ConfigError, match="objective.p"):
        train(make_config(8, objective={"p": 0.5}), run, resume=True)
    assert snapshot(run) == before


def test_resume_of_a_run_made_before_a_setting_existed(tmp_path):
    """A config.json written before a setting was added (so it lacks the key) resumes when
    the setting keeps its default, and is refused when it does not."""
    run = tmp_path / "run"
    train(make_config(4), run)
    saved = json.loads((run / "config.json").read_text())
    del saved["objective"]["label_drop_rows"]
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="objective.label_drop_rows"):
        train(make_config(8, objective={"label_drop_rows": "first"}), run, resume=True)
    train(make_config(8), run, resume=True)
    assert (run / "checkpoints" / "step_0000008").is_dir()


def _add_tangent(path: Path, value: str, key: str | None = None) -> None:
    """Writes objective.tangent (a setting since removed) into a saved config, as runs made
    before the removal hold it."""
    d = json.loads(path.read_text())
    (d[key] if key else d)["objective"]["tangent"] = value
    path.write_text(json.dumps(d))


def test_resume_of_a_run_saved_with_the_removed_tangent_setting(tmp_path):
    """objective.tangent left the config; a run whose config.json (and checkpoint) hold its
    old default "v01" still resumes (continuing bit-exactly) and loads; any other value is
    refused naming the setting, and the run folder is left as it was."""
    a, b = tmp_path / "a", tmp_path / "b"
    train(make_config(8), a)
    train(make_config(4), b)
    _add_tangent(b / "config.json", "v01")
    _add_tangent(b / "checkpoints" / "step_0000004" / "state.json", "v01", key="config")
    assert load_model(b).step == 4
    train(make_config(8), b, resume=True)
    assert_same_checkpoint(a / "checkpoints" / "step_0000008", b / "checkpoints" / "step_0000008")
    c = tmp_path / "c"
    train(make_config(4), c)
    _add_tangent(c / "config.json", "v11")
    before = snapshot(c)
    with pytest.raises(ConfigError, match="objective.tangent"):
        train(make_config(8), c, resume=True)
    assert snapshot(c) == before


def test_resume_with_corrupt_config_json(tmp_path):
    """A run whose config.json is corrupt cannot be resumed: CheckpointError naming it."""
    run = tmp_path / "run"
    train(make_config(2), run)
    (run / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="config.json"):
        train(make_config(4), run, resume=True)


# ---------------------------------------------------------------------------- the loss

def test_the_resolved_jvp_strategy_is_recorded(tmp_path):
    """objective.jvp "auto" is resolved once ("split" for the MLP on the CPU): the first line
    that each call of train writes to metrics.jsonl names it, and so does every checkpoint."""
    run = tmp_path / "run"
    train(make_config(4, checkpoint_every=2), run)
    assert [r.get("jvp") for r in records(run)] == ["split", None, None, None]
    state = json.loads((run / "checkpoints" / "step_0000004" / "state.json").read_text())
    assert state["loss"] == {"class": "MeanFlowLoss", "given": False, "jvp": "split",
                             "tangent": "v01"}
    train(make_config(6, checkpoint_every=2), run, resume=True)
    assert [r.get("jvp") for r in records(run)] == ["split", None, None, None, "split", None]
    fm = tmp_path / "fm"
    train(make_config(2, "flow_matching"), fm)
    state = json.loads((fm / "checkpoints" / "step_0000002" / "state.json").read_text())
    assert state["loss"] == {"class": "FlowMatchingLoss", "given": False}
    assert "jvp" not in records(fm)[0]


def test_a_given_loss_trains_instead_of_the_objective(tmp_path):
    """train(loss_fn=...) trains with that loss, here a wrong tangent of paper Tab. 1b (which
    the config does not offer): the config's own loss given so equals the plain run, the
    wrong tangent does not; the checkpoints record the loss, and resuming needs the same."""
    cfg = make_config(4)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train(cfg, a)
    train(cfg, b, loss_fn=cfg.objective.build(None))
    assert_same_checkpoint(a / "checkpoints" / "step_0000004", b / "checkpoints" / "step_0000004")
    train(cfg, c, loss_fn=cfg.objective.build(None, tangent="v10"))
    wa = load_file(str(a / "checkpoints" / "step_0000004" / "model.safetensors"))
    wc = load_file(str(c / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    state = json.loads((c / "checkpoints" / "step_0000004" / "state.json").read_text())
    # a given loss with jvp "auto" is resolved like the config's (split for the MLP on the CPU)
    assert state["loss"] == {"class": "MeanFlowLoss", "given": True, "jvp": "split",
                             "tangent": "v10"}
    before = snapshot(c)
    with pytest.raises(ConfigError, match="tangent 'v10'"):
        train(make_config(6), c, resume=True)
    assert {k: v for k, v in snapshot(c).items() if k.startswith("checkpoints")} == \
        {k: v for k, v in before.items() if k.startswith("checkpoints")}
    train(make_config(6), c, resume=True, loss_fn=cfg.objective.build(None, tangent="v10"))
    assert (c / "checkpoints" / "step_0000006").is_dir()


def test_the_jvp_strategy_may_change_on_resume(tmp_path):
    """The strategies are exact, so objective.jvp may change between a run and its resumption
    (a run made when split was the default resumes under auto); the new one is recorded."""
    run = tmp_path / "run"
    cfg = make_config(2)
    cfg.objective.jvp = "split"
    train(cfg, run)
    cfg = make_config(4)
    cfg.objective.jvp = "forward_ad"
    train(cfg, run, resume=True)
    assert [r.get("jvp") for r in records(run)][-2:] == ["forward_ad", None]
    state = json.loads((run / "checkpoints" / "step_0000004" / "state.json").read_text())
    assert state["loss"]["jvp"] == "forward_ad"


def test_a_given_loss_that_does_not_fit_the_run_is_refused(tmp_path):
    """A loss of the other kind, or for another number of classes, is a ConfigError before
    the run folder is made."""
    from meanflow.objective import FlowMatchingLoss, MeanFlowLoss
    cases = [(FlowMatchingLoss(), "objective.kind"), (MeanFlowLoss(num_classes=8), "num_classes=8")]
    for loss, needle in cases:
        with pytest.raises(ConfigError, match=needle):
            train(make_config(2), tmp_path / "run", loss_fn=loss)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- output folders

def test_folder_holding_a_run_is_not_overwritten(tmp_path):
    """Training into a folder that holds a run without resume is a ConfigError; every file
    keeps its bytes and mtime."""
    run = tmp_path / "run"
    train(make_config(4), run)
    before = snapshot(run)
    for cfg in (make_config(4), make_config(6, "flow_matching")):
        with pytest.raises(ConfigError, match="already holds a run"):
            train(cfg, run)
    assert snapshot(run) == before


@pytest.mark.parametrize("resume", [False, True])
def test_non_empty_foreign_folder_is_refused(tmp_path, resume):
    """A non-empty folder that holds no run is refused (also with resume); its files are
    untouched and nothing is added."""
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("precious")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = snapshot(out)
    with pytest.raises(ConfigError, match="not empty"):
        train(make_config(2), out, resume=resume)
    assert snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "sub"]


def test_empty_existing_folder_is_accepted(tmp_path):
    """An existing empty folder may be used as a run folder."""
    out = tmp_path / "empty"
    out.mkdir()
    train(make_config(2), out)
    assert (out / "config.json").is_file()


def test_bad_dataset_creates_no_folder(tmp_path):
    """An unknown dataset fails before the run folder is created."""
    cfg = make_config(2, data={"name": "no_such_set"})
    with pytest.raises(ConfigError, match="no_such_set"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_invalid_config_object_is_refused(tmp_path):
    """train() validates the config it is given before touching the disk."""
    cfg = make_config(2)
    cfg.objective.c = 0.0
    with pytest.raises(ConfigError, match="objective.c"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_bad_model_option_creates_no_folder(tmp_path):
    """A model option that cannot build a model fails before the run folder is created."""
    cfg = make_config(2, model={"width": 0})
    with pytest.raises(ConfigError, match="width"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- non-finite loss

def test_nan_batches_raise_after_ten_in_a_row(tmp_path):
    """NaN losses are skipped; the 10th in a row raises FloatingPointError with advice, and no
    NaN weights are ever checkpointed."""
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError) as info:
        train(make_config(50, checkpoint_every=5), run, dataset=AllNaN())
    message = str(info.value)
    assert "10 steps in a row (steps 1 to 10)" in message and "NaN or inf" in message
    assert "optim.lr" in message and "no checkpoint was written before it diverged" in message
    assert "\n" not in message
    saved = sorted((run / "checkpoints").glob("step_*")) if (run / "checkpoints").exists() else []
    assert all(int(p.name[5:]) <= 10 for p in saved)
    for ckpt in saved:
        for part in PARTS:
            tensors = load_file(str(ckpt / f"{part}.safetensors"))
            assert all(bool(torch.isfinite(t.float()).all()) for t in tensors.values())


def test_scattered_nan_batches_are_skipped(tmp_path):
    """Isolated NaN batches do not stop the run, are counted in the log, and leave finite
    weights."""
    run = tmp_path / "run"
    nan_at = {2, 3, 6, 9}               # none on a log or checkpoint step
    train(make_config(10, log_every=5, checkpoint_every=5), run, dataset=Wrapped(nan_at=nan_at))
    recs = records(run)
    assert [r["step"] for r in recs] == [5, 10]
    assert recs[-1]["skipped_nonfinite"] == len(nan_at)
    assert all(np.isfinite(r["loss"]) for r in recs)
    for part in PARTS:
        tensors = load_file(str(run / "checkpoints" / "step_0000010" / f"{part}.safetensors"))
        assert all(bool(torch.isfinite(t.float()).all()) for t in tensors.values())


def test_nine_nan_then_finite_does_not_raise(tmp_path):
    """Nine NaN steps in a row are tolerated; the counter resets on a finite step."""
    run = tmp_path / "run"
    nan_at = set(range(1, 10)) | set(range(11, 20))
    train(make_config(20, log_every=20, checkpoint_every=20), run, dataset=Wrapped(nan_at=nan_at))
    assert records(run)[-1]["skipped_nonfinite"] == 18


def test_nan_at_the_last_step_still_checkpoints(tmp_path):
    """The final checkpoint is written even when the last step's loss was skipped, and a
    skipped step changes nothing: it equals the state after the step before."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    last = train(make_config(6, checkpoint_every=4), run, dataset=Wrapped(nan_at={6}))
    assert last == run / "checkpoints" / "step_0000006"
    train(make_config(5, checkpoint_every=5), ref)
    assert_same_checkpoint(last, ref / "checkpoints" / "step_0000005", same_step=False)


# ---------------------------------------------------------------------------- data variants

def test_class_conditional_guided_training(tmp_path):
    """Class-conditional MeanFlow with guidance (omega=1.5, kappa=0.2) on 8gaussians trains,
    logs finite losses, and restores a model with 8 classes that accepts labels."""
    cfg = make_config(4, data={"name": "8gaussians", "class_conditional": True},
                      objective={"omega": 1.5, "kappa": 0.2, "t_interval": [0.0, 0.8]})
    run = tmp_path / "run"
    train(cfg, run)
    assert all(np.isfinite(r["loss"]) for r in records(run))
    loaded = load_model(run)
    assert loaded.num_classes == 8 and loaded.config == cfg
    y = torch.tensor([0, 3, 7, 8])                         # 8 is the null class
    x = sample_seeded(loaded.net, [0, 1, 2, 3], loaded.shape, y=y)
    assert x.shape == (4, 2) and bool(torch.isfinite(x).all())
    # The label matters: the same seed under two labels gives different points.
    x2 = sample_seeded(loaded.net, [0, 1, 2, 3], loaded.shape, y=torch.tensor([1, 4, 6, 2]))
    assert not torch.equal(x, x2)


def test_class_conditional_without_labels_is_refused(tmp_path):
    """class_conditional on unlabelled data is a ConfigError, before any folder exists."""
    path = tmp_path / "pts.npy"
    np.save(path, np.random.default_rng(0).normal(size=(20, 2)).astype(np.float32))
    cfg = make_config(2, data={"name": str(path), "class_conditional": True})
    with pytest.raises(ConfigError, match="no labels"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _points(n: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 3)).astype(np.float32) + np.array([5.0, -2.0, 0.5], np.float32)


@pytest.mark.parametrize("fmt", ["npz", "csv"])
def test_training_on_a_users_3d_point_file(tmp_path, fmt):
    """A user's .npz / .csv file of 3-D points trains a 3-D model that samples 3-D points."""
    pts = _points()
    path = tmp_path / f"points.{fmt}"
    if fmt == "npz":
        np.savez(path, x=pts)
    else:
        lines = ["a,b,c"] + [",".join(f"{v:.6f}" for v in row) for row in pts]
        path.write_text("\n".join(lines) + "\n")
    cfg = make_config(4, data={"name": str(path)})
    run = tmp_path / "run"
    train(cfg, run)
    state = json.loads((run / "checkpoints" / "step_0000004" / "state.json").read_text())
    assert state["data"] == {"shape": [3], "num_classes": None}
    loaded = load_model(run)
    assert loaded.shape == (3,)
    x = sample_seeded(loaded.net, range(5), loaded.shape, steps=2)
    assert x.shape == (5, 3) and bool(torch.isfinite(x).all())


def test_labelled_point_file_class_conditional(tmp_path):
    """A .npz with labels under 'y' trains class-conditionally with num_classes = max(y)+1."""
    path = tmp_path / "pts.npz"
    np.savez(path, x=_points(30), y=np.arange(30) % 3)
    run = tmp_path / "run"
    train(make_config(2, data={"name": str(path), "class_conditional": True}), run)
    assert load_model(run).num_classes == 3


def test_dataset_argument_overrides_config_data(tmp_path):
    """A dataset passed to train() is used instead of cfg.data (here 3-D in-memory points)."""
    from meanflow.data import PointCloud
    run = tmp_path / "run"
    train(make_config(2), run, dataset=PointCloud(torch.from_numpy(_points(20))))
    assert load_model(run).shape == (3,)


def test_copying_a_run_folder_keeps_it_loadable(tmp_path):
    """A run folder is self-contained: a copy elsewhere loads and resumes."""
    run = tmp_path / "run"
    train(make_config(4), run)
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(run, moved)
    assert load_model(moved).step == 4
    assert train(make_config(6), moved, resume=True).name == "step_0000006"


def test_new_run_dir_is_named_by_content_and_numbered(tmp_path):
    """Without --out, runs get fresh folders runs/NNNNN-<data>[-cond]-<objective>-<model>,
    <model> the backbone model.name auto resolved to (as meanflow train gives the config)."""
    from meanflow.runs.folder import new_run_dir
    cfg = RunConfig.from_dict({"data": {"name": str(tmp_path / "my points.npz"),
                                        "class_conditional": True},
                               "objective": {"kind": "flow_matching"}})
    first = new_run_dir(resolve_model(cfg, (3,)), tmp_path / "runs")
    assert first.name == "00001-my_points-cond-flow_matching-mlp"
    first.mkdir(parents=True)
    (tmp_path / "runs" / "notes.txt").write_text("not a run")
    second = new_run_dir(resolve_model(RunConfig(), (2,)), tmp_path / "runs")
    assert second.name == "00002-8gaussians-meanflow-mlp"
    third = new_run_dir(resolve_model(RunConfig(), (1, 8, 8)), tmp_path / "runs")
    assert third.name == "00002-8gaussians-meanflow-unet-tiny"
