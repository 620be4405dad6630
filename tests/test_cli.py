"""The command line: help, dry runs, train -> sample, and one-line errors with exit code 2.

Runs ``meanflow.cli.main`` in-process (it returns the exit code), plus one subprocess call
to prove the installed entry point works.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from meanflow.fileio import exclusive
from meanflow.sampling import sample_seeded
from meanflow.runs.load import load_model

from cli_helpers import cli  # noqa: E402

TINY_SET = ["--set", "model.options={width: 16, depth: 1, emb_dim: 8}",
            "--set", "train.progress=false", "--set", "train.checkpoint_every=2",
            "--batch-size", "16"]


def assert_one_line_error(capsys, code: int, *needles: str) -> str:
    """Exit code 2 and exactly one stderr line, 'meanflow: error: ...', holding the needles."""
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("meanflow: error:")
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 4-step unconditional MeanFlow run trained through the CLI."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert cli("train", "--out", out, "--steps", 4, *TINY_SET) == 0
    return out


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory) -> Path:
    """A 2-step class-conditional, guided run on 8gaussians."""
    out = tmp_path_factory.mktemp("cli") / "cond"
    assert cli("train", "--out", out, "--steps", 2, "--class-conditional",
               "--set", "objective.omega=1.5", "--set", "objective.kappa=0.2", *TINY_SET) == 0
    return out


# ---------------------------------------------------------------------------- help, version

def test_entry_point_help_in_a_subprocess():
    """The module runs as a program and --help exits 0 listing the subcommands."""
    proc = subprocess.run([sys.executable, "-m", "meanflow.cli", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "sample", "demo"):
        assert command in proc.stdout


@pytest.mark.parametrize("command", [[], ["train"], ["sample"], ["demo"]])
def test_help_of_each_command(capsys, command):
    """--help of the program and of each subcommand exits 0 and prints a usage text."""
    assert cli(*command, "--help") == 0
    assert "usage: meanflow" in capsys.readouterr().out


def test_version(capsys):
    """--version prints the package version."""
    from meanflow import __version__
    assert cli("--version") == 0
    assert capsys.readouterr().out.strip() == __version__


def test_no_command_is_one_error_line(capsys):
    """Without a subcommand: one `meanflow: error:` line on stderr naming the commands, exit 2."""
    assert cli() == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("meanflow: error: no command")
    assert "prepare-latents" in captured.err


# ---------------------------------------------------------------------------- train

def test_dry_run_prints_resolved_yaml_and_creates_nothing(tmp_path, capsys):
    """--dry-run prints the resolved config as YAML, with flags and --set values applied, and
    creates no folder."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("objective:\n  p: 0.7\n  c: 0.01\n")
    out = tmp_path / "never"
    code = cli("train", "--dry-run", "--config", cfg, "--out", out, "--steps", 33,
               "--objective", "flow_matching", "--lr", "2e-4", "--jvp", "func",
               "--set", "objective.p=0.5", "--set", "optim.lr=1e-4", "--set",
               "train.ema_decays=[0.9]")
    printed = capsys.readouterr().out
    assert code == 0
    d = yaml.safe_load(printed)
    assert d["objective"]["p"] == 0.5 and d["objective"]["c"] == 0.01
    assert d["objective"]["kind"] == "flow_matching" and d["objective"]["jvp"] == "func"
    assert d["optim"]["lr"] == 1e-4                      # --set wins over --lr
    assert d["train"]["steps"] == 33 and d["train"]["ema_decays"] == [0.9]
    assert d["model"]["name"] == "mlp"                   # auto, resolved for 2-D points
    assert not out.exists()


# ---------------------------------------------------------------------------- model.name auto

def test_auto_model_on_points_is_the_mlp_bit_for_bit(tmp_path):
    """Without --model, points train the MLP: the same config.json and the same weights, bit
    for bit, as --model mlp."""
    auto, mlp = tmp_path / "auto", tmp_path / "mlp"
    assert cli("train", "--out", auto, "--steps", 2, *TINY_SET) == 0
    assert cli("train", "--out", mlp, "--steps", 2, "--model", "mlp", *TINY_SET) == 0
    assert (auto / "config.json").read_text() == (mlp / "config.json").read_text()
    assert json.loads((auto / "config.json").read_text())["model"]["name"] == "mlp"
    for part in ("model", "ema", "optimizer"):
        ta, tb = (load_file(str(r / "checkpoints" / "step_0000002" / f"{part}.safetensors"))
                  for r in (auto, mlp))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _gray_images(path: Path) -> Path:
    np.savez(path, x=np.random.default_rng(0).integers(0, 256, (12, 8, 8), dtype=np.uint8))
    return path


def test_auto_model_on_images_is_unet_tiny_and_recorded_so(tmp_path, monkeypatch, capsys):
    """Without --model, uint8 images train unet-tiny: --dry-run prints it, the default folder
    is named by it, config.json/.yaml and the checkpoint hold it, never "auto"; the run
    resumes from its folder alone, or with a config file that names no model."""
    monkeypatch.chdir(tmp_path)
    data = _gray_images(tmp_path / "imgs.npz")
    flags = ["--data", data, "--batch-size", 4, "--set", "train.progress=false",
             "--set", "train.sample_count=0"]
    assert cli("train", "--dry-run", "--steps", 1, *flags) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["name"] == "unet-tiny"
    assert cli("train", "--steps", 1, *flags) == 0
    run = tmp_path / "runs" / "00001-imgs-meanflow-unet-tiny"
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run.name]
    assert json.loads((run / "config.json").read_text())["model"]["name"] == "unet-tiny"
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["name"] == "unet-tiny"
    loaded = load_model(run)
    assert loaded.config.model.name == "unet-tiny" and type(loaded.net).__name__ == "UNet"
    assert cli("train", "--resume", "--out", run, "--steps", 2) == 0
    cfg = tmp_path / "cfg.yaml"        # model.name left to auto, as at the start
    cfg.write_text(f"data: {{name: {data}}}\ntrain: {{batch_size: 4, progress: false, "
                   "sample_count: 0}\n")
    assert cli("train", "--config", cfg, "--resume", "--out", run, "--steps", 3) == 0
    assert (run / "checkpoints" / "step_0000003").is_dir()
    assert json.loads((run / "config.json").read_text())["model"]["name"] == "unet-tiny"


def test_auto_model_on_an_image_folder_and_explicit_names_kept(tmp_path, capsys):
    """An image folder resolves to unet-tiny too; a name given by --model, --set or a preset
    is never changed, also on images (an MLP on images if asked for)."""
    rng = np.random.default_rng(0)
    (tmp_path / "folder").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            tmp_path / "folder" / f"{i}.png")
    data = _gray_images(tmp_path / "imgs.npz")

    def printed(*args) -> str:
        assert cli("train", "--dry-run", "--batch-size", 4, *args) == 0
        return yaml.safe_load(capsys.readouterr().out)["model"]["name"]
    assert printed("--data", tmp_path / "folder") == "unet-tiny"
    assert printed("--data", data, "--model", "mlp") == "mlp"
    assert printed("--data", data, "--set", "model.name=unet-small") == "unet-small"
    assert printed("--preset", "fmnist-unet", "--data", data) == "unet-small"
    assert printed("--data", data, "--set", "model.name=auto") == "unet-tiny"
    assert printed("--data", "moons", "--model", "auto") == "mlp"


def test_train_writes_a_run(run_dir, capsys):
    """A few-step train writes config files, metrics and the final checkpoint."""
    assert (run_dir / "config.json").is_file() and (run_dir / "config.yaml").is_file()
    assert (run_dir / "metrics.jsonl").is_file()
    assert (run_dir / "checkpoints" / "step_0000004" / "state.json").is_file()
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["train"]["steps"] == 4 and cfg["model"]["options"]["width"] == 16


def test_train_prints_the_checkpoint(tmp_path, capsys):
    """train reports the path of the checkpoint it wrote on stdout."""
    out = tmp_path / "r"
    assert cli("train", "--out", out, "--steps", 2, "--objective", "flow_matching",
               *TINY_SET) == 0
    assert str(out / "checkpoints" / "step_0000002") in capsys.readouterr().out


def test_train_resume_flag(tmp_path, capsys):
    """--resume continues a run to more steps instead of refusing its folder."""
    out = tmp_path / "r"
    assert cli("train", "--out", out, "--steps", 2, *TINY_SET) == 0
    assert cli("train", "--out", out, "--steps", 4, "--resume", *TINY_SET) == 0
    assert (out / "checkpoints" / "step_0000004").is_dir()


def test_resume_from_the_folder_alone(tmp_path, capsys):
    """--resume --out DIR --steps N continues with the folder's saved config (no other flag
    repeated) and ends where an uninterrupted run of N steps does; a non-resumable flag that
    differs from the saved config is a one-line refusal naming it."""
    a, b = tmp_path / "a", tmp_path / "b"
    flags = ["--data", "moons", "--lr", "3e-3", *TINY_SET, "--set", "objective.p=0.5"]
    assert cli("train", "--out", a, "--steps", 4, *flags) == 0
    assert cli("train", "--out", b, "--steps", 2, *flags) == 0
    assert cli("train", "--resume", "--out", b, "--steps", 4) == 0
    for part in ("model", "ema", "optimizer"):
        ta, tb = (load_file(str(r / "checkpoints" / "step_0000004" / f"{part}.safetensors"))
                  for r in (a, b))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert json.loads((b / "config.json").read_text())["data"]["name"] == "moons"
    capsys.readouterr()
    assert_one_line_error(capsys, cli("train", "--resume", "--out", b, "--data", "spirals"),
                          "data.name")


def test_ctrl_c_in_a_subprocess_checkpoints_and_says_how_to_continue(tmp_path):
    """SIGINT to a training `meanflow train`: exit 130, one stderr line naming the
    checkpoint of the last step and the command that continues; that command ends bit for
    bit where an uninterrupted run does."""
    out = tmp_path / "run"
    flags = [*TINY_SET, "--set", "train.checkpoint_every=100000", "--set", "train.log_every=1"]
    proc = subprocess.Popen([sys.executable, "-m", "meanflow.cli", "train", "--out", str(out),
                             "--steps", "100000", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = err.splitlines()
    assert len(lines) == 1 and f"meanflow train --resume --out {out}" in lines[0], err
    (ckpt,) = (out / "checkpoints").iterdir()
    step = int(ckpt.name.removeprefix("step_"))
    assert step >= 3 and f"step {step}:" in lines[0]
    ref = tmp_path / "ref"
    assert cli("train", "--out", ref, "--steps", step + 2, *flags) == 0
    assert cli("train", "--resume", "--out", out, "--steps", step + 2) == 0
    last = f"step_{step + 2:07d}"
    for part in ("model", "ema", "optimizer"):
        ta, tb = (load_file(str(r / "checkpoints" / last / f"{part}.safetensors"))
                  for r in (ref, out))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# ---------------------------------------------------------------------------- sample

def test_sample_writes_npz_png_and_meta(run_dir, tmp_path, capsys):
    """sample writes samples (n, 2), their seeds and meta to .npz (+ .json) and a PNG; the
    samples equal those drawn in Python from the run's EMA weights."""
    out, png = tmp_path / "s.npz", tmp_path / "s.png"
    assert cli("sample", run_dir, "--n", 37, "--seed", 5, "--out", out, "--png", png) == 0
    with np.load(out, allow_pickle=False) as f:
        samples, seeds, labels = f["samples"], f["seeds"], f["labels"]
        meta = json.loads(str(f["meta"]))
    assert samples.shape == (37, 2) and np.isfinite(samples).all()
    assert seeds.tolist() == list(range(5, 42)) and labels.size == 0
    assert meta["step"] == 4 and meta["weights"] == "ema_0.999" and meta["method"] == "meanflow"
    assert meta["n"] == 37 and meta["seed"] == 5 and meta["steps"] == 1
    assert json.loads(out.with_suffix(".json").read_text()) == meta
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    expected = sample_seeded(load_model(run_dir).net, range(5, 42), (2,), steps=1)
    assert np.array_equal(samples, expected.numpy())


def test_sample_depends_only_on_the_seed(run_dir, tmp_path):
    """Sample i depends on seed+i only: a shifted seed range gives the same rows exactly, and
    another --batch-size the same rows up to float32 rounding of the matrix products."""
    a, b, c = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "c.npz"
    assert cli("sample", run_dir, "--n", 10, "--out", a) == 0
    assert cli("sample", run_dir, "--n", 6, "--seed", 4, "--out", b) == 0
    assert cli("sample", run_dir, "--n", 10, "--batch-size", 3, "--out", c) == 0
    with np.load(a) as fa, np.load(b) as fb, np.load(c) as fc:
        assert np.array_equal(fa["samples"][4:], fb["samples"])
        np.testing.assert_allclose(fc["samples"], fa["samples"], rtol=0, atol=1e-5)
        assert not np.array_equal(fa["samples"][:6], fb["samples"])     # seeds matter


def test_sample_two_steps_and_schedule(run_dir, tmp_path):
    """--steps 2 uses two network calls (different from one step); an explicit uniform
    schedule gives the same result as the default."""
    one, two, sched = tmp_path / "1.npz", tmp_path / "2.npz", tmp_path / "sch.npz"
    assert cli("sample", run_dir, "--n", 8, "--out", one) == 0
    assert cli("sample", run_dir, "--n", 8, "--steps", 2, "--out", two) == 0
    assert cli("sample", run_dir, "--n", 8, "--steps", 2, "--schedule", "1,0.5,0",
               "--out", sched) == 0
    with np.load(one) as f1, np.load(two) as f2, np.load(sched) as f3:
        assert f2["samples"].shape == (8, 2)
        assert json.loads(str(f2["meta"]))["steps"] == 2
        assert not np.array_equal(f1["samples"], f2["samples"])
        assert np.array_equal(f2["samples"], f3["samples"])


def test_sample_raw_weights(run_dir, tmp_path):
    """--ema none samples the raw training weights."""
    out = tmp_path / "raw.npz"
    assert cli("sample", run_dir, "--n", 4, "--ema", "none", "--out", out) == 0
    with np.load(out) as f:
        assert json.loads(str(f["meta"]))["weights"] == "model"


def test_sample_refuses_to_overwrite(run_dir, tmp_path, capsys):
    """An existing output is kept (exit 2, bytes unchanged) unless --overwrite is given."""
    out = tmp_path / "s.npz"
    out.write_bytes(b"my precious results")
    assert_one_line_error(capsys, cli("sample", run_dir, "--n", 4, "--out", out),
                          str(out), "--overwrite")
    assert out.read_bytes() == b"my precious results"
    png = tmp_path / "p.png"
    png.write_bytes(b"old plot")
    assert_one_line_error(capsys, cli("sample", run_dir, "--n", 4, "--out", tmp_path / "new.npz",
                                      "--png", png), str(png))
    assert png.read_bytes() == b"old plot" and not (tmp_path / "new.npz").exists()
    assert cli("sample", run_dir, "--n", 4, "--out", out, "--overwrite") == 0
    with np.load(out) as f:
        assert f["samples"].shape == (4, 2)


def test_sample_does_not_overwrite_the_json_sidecar(run_dir, tmp_path, capsys):
    """Without --overwrite, no existing file is replaced, including OUT.json."""
    side = tmp_path / "s.json"
    side.write_text("my notes")
    cli("sample", run_dir, "--n", 4, "--out", tmp_path / "s.npz")
    assert side.read_text() == "my notes"


def test_class_conditional_sample_with_label(cond_run, tmp_path):
    """--label gives every sample that class; without it labels cycle over the 8 classes."""
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert cli("sample", cond_run, "--n", 10, "--label", 3, "--out", a) == 0
    assert cli("sample", cond_run, "--n", 10, "--out", b) == 0
    with np.load(a) as fa, np.load(b) as fb:
        assert fa["labels"].tolist() == [3] * 10
        assert fb["labels"].tolist() == [i % 8 for i in range(10)]
        assert fa["samples"].shape == (10, 2)
        assert not np.array_equal(fa["samples"], fb["samples"])
    loaded = load_model(cond_run)
    expected = sample_seeded(loaded.net, range(10), (2,), y=torch.full((10,), 3))
    with np.load(a) as fa:
        assert np.array_equal(fa["samples"], expected.numpy())


@pytest.mark.parametrize("label", [8, -1])
def test_label_out_of_range(cond_run, tmp_path, capsys, label):
    """A label outside [0, num_classes) is a one-line error."""
    out = tmp_path / "s.npz"
    assert_one_line_error(capsys, cli("sample", cond_run, "--n", 4, "--label", label,
                                      "--out", out), "--label")
    assert not out.exists()


def test_label_on_unconditional_model(run_dir, tmp_path, capsys):
    """--label on an unconditional model is a one-line error."""
    assert_one_line_error(capsys, cli("sample", run_dir, "--n", 4, "--label", 1,
                                      "--out", tmp_path / "s.npz"), "unconditional")


def test_flow_matching_sample_uses_euler(tmp_path):
    """A flow-matching run is sampled with Euler steps."""
    run, out = tmp_path / "fm", tmp_path / "s.npz"
    assert cli("train", "--out", run, "--steps", 2, "--objective", "flow_matching",
               *TINY_SET) == 0
    assert cli("sample", run, "--n", 4, "--steps", 3, "--out", out) == 0
    with np.load(out) as f:
        assert json.loads(str(f["meta"]))["method"] == "euler"


def test_png_of_3d_samples_fails_without_writing(tmp_path, capsys):
    """--png on 3-D data is a one-line error that writes no output."""
    pts = tmp_path / "pts.npz"
    np.savez(pts, x=np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32))
    run, out = tmp_path / "r3", tmp_path / "s.npz"
    assert cli("train", "--out", run, "--steps", 2, "--data", pts, *TINY_SET) == 0
    capsys.readouterr()
    code = cli("sample", run, "--n", 4, "--out", out, "--png", tmp_path / "p.png")
    assert code == 2
    assert not out.exists()


# ---------------------------------------------------------------------------- one-line errors

@pytest.mark.parametrize("args,needle", [
    (["--set", "objective.fraction_r_neq_t=1.5"], "fraction_r_neq_t"),
    (["--set", "objective.p=-1"], "objective.p"),
    (["--set", "objective.c=0"], "objective.c"),
    (["--data", "no_such_set"], "no_such_set"),
    (["--jvp", "magic"], "magic"),
    (["--objective", "diffusion"], "diffusion"),
    (["--set", "objective.bogus=1"], "objective.bogus"),
    (["--set", "objective.p"], "objective.p"),
    (["--set", "train.steps=0"], "train.steps"),
    (["--steps", "ten"], "--steps"),
    (["--no-such-flag"], "--no-such-flag"),
], ids=["fraction", "p", "c", "dataset", "jvp", "objective", "unknown-key", "no-equals",
        "steps0", "steps-type", "unknown-flag"])
@pytest.mark.parametrize("dry", [False, True], ids=["train", "dry-run"])
def test_bad_train_inputs(tmp_path, capsys, args, needle, dry):
    """Each bad train input exits 2 with one 'meanflow: error:' line, creating no folder."""
    out = tmp_path / "run"
    code = cli("train", "--out", out, "--steps", 2, *(["--dry-run"] if dry else []), *args)
    assert_one_line_error(capsys, code, needle)
    assert not out.exists()


def test_dry_run_rejects_bad_model_options(tmp_path, capsys):
    """--dry-run catches a model option that cannot build the model (exit 2, one line)."""
    code = cli("train", "--dry-run", "--out", tmp_path / "r", "--set", "model.options.width=0")
    assert_one_line_error(capsys, code, "width")


def test_missing_config_file(tmp_path, capsys):
    """A missing --config file is a one-line error naming it."""
    missing = tmp_path / "nope.yaml"
    assert_one_line_error(capsys, cli("train", "--config", missing, "--out", tmp_path / "r"),
                          str(missing))


def test_output_folder_holding_another_run(run_dir, capsys):
    """Training into a folder holding a run (without --resume) is a one-line error, and the
    run's files are unchanged."""
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*")
              if p.is_file()}
    assert_one_line_error(capsys, cli("train", "--out", run_dir, "--steps", 2, *TINY_SET),
                          "already holds a run", "--resume")
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()}
    assert after == before


def test_resume_with_changed_setting(tmp_path, capsys):
    """--resume with a changed objective is a one-line error naming the setting."""
    out = tmp_path / "r"
    assert cli("train", "--out", out, "--steps", 2, *TINY_SET) == 0
    assert_one_line_error(capsys, cli("train", "--out", out, "--steps", 4, "--resume",
                                      "--objective", "flow_matching", *TINY_SET),
                          "objective.kind")


def test_output_path_is_a_file(tmp_path, capsys):
    """--out naming an existing file is a one-line error and the file is kept."""
    target = tmp_path / "file.txt"
    target.write_text("keep")
    assert_one_line_error(capsys, cli("train", "--out", target, "--steps", 2, *TINY_SET))
    assert target.read_text() == "keep"


def _tamper(run: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(run, dst)
    path = dst / "checkpoints" / "step_0000004" / "ema.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("case", [
    "n0", "schedule-text", "schedule-up",
    "schedule-length", "missing", "tampered", "not-npz", "ema",
    "ema-absent", "steps0"])
def test_bad_sample_inputs(run_dir, tmp_path, capsys, case):
    """Each bad sample input exits 2 with one 'meanflow: error:' line and writes nothing."""
    out = tmp_path / "s.npz"
    ckpt, extra, needle = run_dir, [], ""
    if case == "n0":
        extra, needle = ["--n", 0], "--n"
    elif case == "schedule-text":
        extra, needle = ["--steps", 2, "--schedule", "1,half,0"], "--schedule"
    elif case == "schedule-up":
        extra, needle = ["--steps", 2, "--schedule", "0,0.5,1"], "schedule"
    elif case == "schedule-length":
        extra, needle = ["--steps", 1, "--schedule", "1,0.5,0"], "schedule"
    elif case == "missing":
        ckpt = tmp_path / "no-run"
        needle = str(ckpt)
    elif case == "tampered":
        ckpt = tmp_path / "bad"
        needle = str(_tamper(run_dir, ckpt))
    elif case == "not-npz":
        out, needle = tmp_path / "s.txt", ".npz"
    elif case == "ema":
        extra, needle = ["--ema", "newest"], "--ema"
    elif case == "ema-absent":
        extra, needle = ["--ema", "0.5"], "0.5"
    else:
        extra, needle = ["--steps", 0], "steps"
    code = cli("sample", ckpt, "--n", 4, "--out", out, *extra) if case != "n0" else \
        cli("sample", ckpt, "--out", out, *extra)
    assert_one_line_error(capsys, code, needle)
    assert not out.exists() and not out.with_suffix(".json").exists()


# ------------------------------------------------- inputs found by review to leak tracebacks

@pytest.mark.parametrize("args,needle", [
    (["--set", "model.options.dropout=abc"], "dropout"),
    (["--set", "model.options.time_max_freq=-1"], "time_max_freq"),
    (["--set", "model.options.time_max_freq=abc"], "time_max_freq"),
    (["--set", "train.device=tpu"], "train.device"),
    (["--set", "train.device=cuda:x"], "train.device"),
], ids=["dropout-text", "freq-negative", "freq-text", "device-unknown", "device-index"])
def test_more_bad_train_inputs(tmp_path, capsys, args, needle):
    """Each is a one-line error with exit 2, and no run folder is written."""
    out = tmp_path / "run"
    code = cli("train", "--out", out, "--steps", 2, *TINY_SET, *args)
    assert_one_line_error(capsys, code, needle)
    assert not out.exists()


def test_float_in_options_written_with_exponent(tmp_path):
    """YAML 1.1 reads 1e-1 as a string; inside model.options it still means 0.1."""
    from meanflow.runs.config import load_config
    cfg = load_config(None, ["model.options.dropout=1e-1", "data.options.std=5e-1"])
    assert cfg.model.options["dropout"] == 0.1 and cfg.data.options["std"] == 0.5


def test_binary_config_file(tmp_path, capsys):
    """A config file that is not text is refused in one line."""
    bad = tmp_path / "weights.yaml"
    bad.write_bytes(bytes(range(256)))
    assert_one_line_error(capsys, cli("train", "--config", bad, "--dry-run"), "not text")


def test_out_below_a_file(tmp_path, capsys):
    """--out inside a regular file: one line, exit 2."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = cli("train", "--out", blocker / "run", "--steps", 2, *TINY_SET)
    assert_one_line_error(capsys, code)


def test_resume_of_a_missing_run(tmp_path, capsys):
    """--resume on a folder that holds no run is refused, so a typo does not start afresh."""
    code = cli("train", "--out", tmp_path / "typo", "--resume", "--steps", 2, *TINY_SET)
    assert_one_line_error(capsys, code, "no run to continue")
    assert not (tmp_path / "typo").exists()


def test_divergence_is_one_line(tmp_path, capsys):
    """A run whose loss is non-finite 10 steps in a row ends with one line, exit 1."""
    code = cli("train", "--out", tmp_path / "run", "--steps", 30, *TINY_SET,
               "--set", "optim.lr=1e30", "--set", "objective.p=0")
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and len(err) == 1 and "non-finite" in err[0], err


def test_sample_png_into_a_new_folder(run_dir, tmp_path):
    """--png into a folder that does not exist yet creates it; npz, json and png all land."""
    out = tmp_path / "a" / "s.npz"
    png = tmp_path / "b" / "c" / "s.png"
    assert cli("sample", run_dir, "--n", 8, "--out", out, "--png", png) == 0
    assert out.is_file() and out.with_suffix(".json").is_file() and png.is_file()


def test_tampered_state_json_step(run_dir, tmp_path, capsys):
    """An edited state.json (step is not a number) gives a one-line error on --resume."""
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    for ckpt in (copy / "checkpoints").iterdir():
        state = json.loads((ckpt / "state.json").read_text())
        state["step"] = "x"
        (ckpt / "state.json").write_text(json.dumps(state))
    code = cli("train", "--out", copy, "--resume", "--steps", 6, *TINY_SET)
    assert_one_line_error(capsys, code, "state.json")


def test_demo_refuses_a_folder_with_other_files(tmp_path, capsys):
    """The demo never overwrites files it did not write, and --steps 0 is an error, not 2000."""
    (tmp_path / "figure.png").write_text("mine")
    (tmp_path / "notes.txt").write_text("mine")
    assert_one_line_error(capsys, cli("demo", "--out", tmp_path, "--steps", 5), "notes.txt")
    assert (tmp_path / "figure.png").read_text() == "mine"
    assert_one_line_error(capsys, cli("demo", "--out", tmp_path / "new", "--steps", 0),
                          "train.steps")


# ---------------------------------------------------------------------------- images, presets

@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    """A 2-step class-conditional U-Net run on a small uint8 image .npz (3 classes)."""
    root = tmp_path_factory.mktemp("cli_img")
    rng = np.random.default_rng(0)
    data = root / "imgs.npz"
    np.savez(data, x=rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8), y=np.arange(30) % 3)
    out = root / "run"
    assert cli("train", "--out", out, "--steps", 2, "--data", data, "--model", "unet-small",
               "--class-conditional", "--batch-size", 6,
               "--set", "model.options={channels: 8, channel_mult: [1, 2], blocks_per_res: 1, "
               "attn_resolutions: [], emb_mult: 2}",
               "--set", "train.progress=false", "--set", "train.sample_count=0") == 0
    return out


def test_sample_images_to_png_grid_and_uint8_npz(image_run, tmp_path, capsys):
    png, out = tmp_path / "grid.png", tmp_path / "s.npz"
    assert cli("sample", image_run, "--n", 7, "--png", png, "--out", out) == 0
    import matplotlib.image as mpimg
    grid = mpimg.imread(png)
    # 3 classes per row (one per column), 3 rows of 8x8 images, 2-pixel borders, all drawn 2x
    assert grid.shape[:2] == (2 * (3 * (8 + 2) + 2), 2 * (3 * (8 + 2) + 2))
    with np.load(out) as f:
        images, samples = f["images"], f["samples"]
    assert images.dtype == np.uint8 and images.shape == (7, 8, 8, 3)
    expect = np.clip(np.round((samples + 1) * 127.5), 0, 255).astype(np.uint8)
    assert np.array_equal(images, expect.transpose(0, 2, 3, 1))


def test_sample_png_only_writes_no_npz(image_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("sample", image_run, "--n", 4, "--png", "only.png", "--nrow", 2) == 0
    assert (tmp_path / "only.png").is_file() and (tmp_path / "only.png.json").is_file()
    assert not (tmp_path / "samples.npz").exists()


def test_a_preset_trains_on_your_own_image_folder(tmp_path, capsys):
    """--preset fmnist-unet --data FOLDER: the preset's fashion-mnist options (split) stay
    behind, its U-Net takes the folder's 16x16 colour images of 2 classes, the start-up
    summary names data, classes and parameters, and the training grid of 16 samples is 4 x 4
    (one class per column), not 2 x 8."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "shapes"
    for name in ("circles", "squares"):
        (folder / name).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")
    out = tmp_path / "run"
    assert cli("train", "--preset", "fmnist-unet", "--data", folder, "--class-conditional",
               "--steps", 2, "--batch-size", 4, "--out", out,
               "--set", "train.sample_count=16", "--set", "train.sample_steps=[1]") == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["data"]["options"] == {} and saved["model"]["name"] == "unet-small"
    err = capsys.readouterr().err
    assert f"data       {folder}: 12 samples of shape (3, 16, 16), 2 classes: circles, " \
        "squares" in err
    assert "parameters" in err and "objective  meanflow (p=0.75" in err
    import matplotlib.image as mpimg
    grid = mpimg.imread(out / "samples" / "step_0000002-nfe1.png")
    side = 2 * (4 * (16 + 2) + 2)           # 4 rows and 4 columns of 16 px, drawn 2x
    assert grid.shape[:2] == (side, side)


def test_presets_command_and_preset_flag(tmp_path, capsys):
    assert cli("presets") == 0
    listed = capsys.readouterr().out
    for name in ("fmnist-unet", "cifar10-unet", "imagenet-dit-xl2"):
        assert name in listed
    code = cli("train", "--preset", "fmnist-unet", "--dry-run", "--steps", 5)
    if Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        assert code == 0
        text = capsys.readouterr().out
        assert "name: fashion-mnist" in text and "steps: 5" in text
    else:  # the data is missing: one line saying how to get it
        assert_one_line_error(capsys, code, "dataset-fashion-mnist")
    code = cli("train", "--preset", "no-such", "--dry-run")
    assert_one_line_error(capsys, code, "unknown preset", "fmnist-unet")
    code = cli("train", "--preset", "fmnist-unet", "--config", tmp_path / "x.yaml")
    assert_one_line_error(capsys, code, "not both")


def test_sample_label_takes_a_class_name_of_a_folder_run(tmp_path):
    """`--label NAME` picks a class by the name of its image sub-folder; an unknown name is
    one line naming the classes."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for name in ("circles", "squares"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                tmp_path / "data" / name / f"{i}.png")
    run = tmp_path / "run"
    assert cli("train", "--out", run, "--steps", 1, "--data", tmp_path / "data", "--model",
               "unet-small", "--class-conditional", "--batch-size", 4,
               "--set", "model.options={channels: 8, channel_mult: [1, 2], blocks_per_res: 1, "
               "attn_resolutions: [], emb_mult: 2}",
               "--set", "train.progress=false", "--set", "train.sample_count=0") == 0
    assert cli("sample", run, "--n", 3, "--label", "squares", "--out", tmp_path / "s.npz") == 0
    with np.load(tmp_path / "s.npz") as f:
        assert f["labels"].tolist() == [1, 1, 1]
    assert cli("sample", run, "--n", 3, "--label", "triangles", "--out", tmp_path / "t.npz") == 2
    assert not (tmp_path / "t.npz").exists()


# ---------------------------------------------------------------------------- one writer

def test_sample_has_one_writer_and_removes_only_its_own_stale_temporaries(run_dir, tmp_path,
                                                                          capsys):
    """While another process holds the output, sample refuses in one line naming it; at its
    next start it removes the temporaries a killed sample left for this output, and nothing
    else."""
    out = tmp_path / "s.npz"
    with exclusive(out, "meanflow sample"):
        assert_one_line_error(capsys, cli("sample", run_dir, "--n", 4, "--out", out),
                              "is in use by process", "meanflow sample")
    assert not out.exists()
    stale = tmp_path / ".s.npz.a1b2c3d4.tmp.npz"          # a killed run's, for this output
    other = tmp_path / ".t.npz.a1b2c3d4.tmp.npz"           # another output's
    mine = tmp_path / ".s.npz.notes"                       # not of our naming
    for path in (stale, other, mine):
        path.write_bytes(b"x")
    assert cli("sample", run_dir, "--n", 4, "--out", out) == 0
    assert not stale.exists() and other.exists() and mine.exists() and out.exists()


def test_fid_calc_out_is_not_replaced_without_overwrite(run_dir, tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    np.savez(tmp_path / "imgs.npz", x=np.random.default_rng(0).integers(0, 256, (8, 28, 28),
                                                                         dtype=np.uint8))
    assert cli("fid", "ref", tmp_path / "imgs.npz", "-o", ref) == 0
    np.savez(tmp_path / "s.npz", samples=np.zeros((8, 1, 28, 28), np.float32))
    out = tmp_path / "fid.json"
    out.write_text("mine")
    capsys.readouterr()
    assert_one_line_error(capsys, cli("fid", "calc", tmp_path / "s.npz", "--ref", ref, "--out",
                                      out), "fid.json exists", "--overwrite")
    assert out.read_text() == "mine"
    with exclusive(out, "meanflow fid calc"):
        assert_one_line_error(capsys, cli("fid", "calc", tmp_path / "s.npz", "--ref", ref,
                                          "--out", out, "--overwrite"), "is in use")
    assert cli("fid", "calc", tmp_path / "s.npz", "--ref", ref, "--out", out,
               "--overwrite") == 0
    assert json.loads(out.read_text())["n"] == 8


def test_sizes_are_checked_against_memory_before_any_work(run_dir, tmp_path, capsys):
    """--n 1e12 would build a 10^12-element list; --batch-size 1e12 a 10^12-row batch."""
    assert_one_line_error(capsys, cli("sample", run_dir, "--n", "1e12", "--out",
                                      tmp_path / "s.npz"), "lower --n", "needs at least")
    assert_one_line_error(capsys, cli("train", "--batch-size", "1e12", "--dry-run"),
                          "lower train.batch_size")
    assert not (tmp_path / "s.npz").exists()
