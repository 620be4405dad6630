"""Checkpoints: safetensors + JSON, bit-exact round trips, verified on load (a missing, truncated
or tampered file is a CheckpointError naming it), written atomically, never unpickled."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import meanflow.runs.checkpoint as ckpt_mod
from meanflow.errors import CheckpointError, ConfigError
from meanflow.fileio import atomic_write_text
from meanflow.models import build_model_for_data
from meanflow.runs.checkpoint import (find_checkpoint, list_checkpoints, load_checkpoint,
                                      load_optimizer_tensors, optimizer_tensors,
                                      save_checkpoint)
from meanflow.runs.config import RunConfig
from meanflow.runs.load import load_model
from meanflow.train.loop import train

TINY = {"width": 16, "depth": 1, "emb_dim": 8}


def tiny_config(steps: int = 4, **train_opts) -> RunConfig:
    train_cfg = {"steps": steps, "batch_size": 16, "checkpoint_every": 2, "log_every": 2,
                 "progress": False, "ema_decays": [0.999, 0.9], "keep_checkpoints": 0}
    train_cfg.update(train_opts)
    return RunConfig.from_dict({"model": {"options": dict(TINY)},
                                "train": train_cfg}).validate()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A 4-step MeanFlow run with two EMA decays and checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    train(tiny_config(), run)
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the trained run that a test may damage."""
    import shutil
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(3, 5, generator=g, dtype=torch.float64)
    return {
        "f32": torch.randn(4, 3, generator=g),
        "f64": base,
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        "i64": torch.randint(-50, 50, (6,), generator=g),
        "scalar": torch.tensor(3.25),
        "noncontig": base.t(),                       # saved contiguous, same values
        "special": torch.tensor([float("inf"), -0.0, float("nan"), 1e-40]),
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: equal dtype, shape and bytes (NaN-safe)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        a, b = (x.contiguous().reshape(-1).view(torch.uint8) for x in (a, b))
    return bool(torch.equal(a, b))


def _save_sample(path: Path, seed: int = 0) -> dict:
    parts = {"model": _tensors(seed), "ema": _tensors(seed + 1), "optimizer": _tensors(seed + 2)}
    state = {"step": 17, "note": "hello", "nested": {"a": [1, 2.5]}}
    save_checkpoint(path, **parts, state=state)
    return parts


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_save_load_round_trip_is_bit_exact(tmp_path):
    """Every tensor of every part comes back with the same dtype, shape and bits, and the
    state's fields come back as saved."""
    path = tmp_path / "checkpoints" / "step_0000017"
    parts = _save_sample(path)
    tensors, state = load_checkpoint(path)
    assert set(tensors) == {"model", "ema", "optimizer"}
    for part, expected in parts.items():
        assert set(tensors[part]) == set(expected)
        for key, value in expected.items():
            assert _same(tensors[part][key], value), (part, key)
    assert state["step"] == 17 and state["note"] == "hello"
    assert state["nested"] == {"a": [1, 2.5]}
    assert set(state["sha256"]) == {"model.safetensors", "ema.safetensors",
                                    "optimizer.safetensors"}


def test_load_selected_parts(tmp_path):
    """parts= loads only the named files."""
    path = tmp_path / "step_0000001"
    _save_sample(path)
    tensors, _ = load_checkpoint(path, parts=("model",))
    assert set(tensors) == {"model"}


def test_optimizer_state_round_trip(tmp_path):
    """Adam's state split into tensors + JSON and restored equals the original, and both
    optimisers then take bit-identical steps."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.8, 0.95), foreach=True)
    for _ in range(3):
        net(torch.randn(5, 3)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    tensors, meta = optimizer_tensors(opt)
    path = tmp_path / "step_0000003"
    save_checkpoint(path, model=net.state_dict(), ema={}, optimizer=tensors,
                    state={"optimizer": meta})
    loaded, state = load_checkpoint(path)

    net2 = torch.nn.Linear(3, 2)
    net2.load_state_dict(loaded["model"])
    opt2 = torch.optim.Adam(net2.parameters(), lr=0.5, foreach=True)
    load_optimizer_tensors(opt2, loaded["optimizer"], state["optimizer"])
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd1["state"].keys() == sd2["state"].keys()
    for idx in sd1["state"]:
        for name, value in sd1["state"][idx].items():
            assert _same(sd2["state"][idx][name], value), (idx, name)
    assert sd2["param_groups"][0]["lr"] == 1e-2
    assert list(sd2["param_groups"][0]["betas"]) == [0.8, 0.95]

    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    for n, o in ((net, opt), (net2, opt2)):
        n(x).pow(2).sum().backward()
        o.step()
    for p1, p2 in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p1, p2)


def test_trained_checkpoint_matches_its_files(trained_run):
    """load_checkpoint of a run's newest checkpoint equals the raw safetensors files."""
    newest = find_checkpoint(trained_run)
    assert newest.name == "step_0000004"
    tensors, state = load_checkpoint(newest)
    for part in ("model", "ema", "optimizer"):
        raw = load_file(str(newest / f"{part}.safetensors"))
        assert raw.keys() == tensors[part].keys() and raw
        assert all(torch.equal(raw[k], tensors[part][k]) for k in raw)
    assert state["step"] == 4 and state["ema_decays"] == [0.999, 0.9]


def _net_from_files(ckpt: Path, part: str, prefix: str = "") -> torch.nn.Module:
    raw = load_file(str(ckpt / f"{part}.safetensors"))
    sd = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    net = build_model_for_data("mlp", (2,), None, dict(TINY))
    net.load_state_dict(sd)
    return net.eval()


@pytest.mark.parametrize("ema,part,prefix,weights", [
    ("auto", "ema", "ema_0.999.", "ema_0.999"),
    (0.999, "ema", "ema_0.999.", "ema_0.999"),
    (0.9, "ema", "ema_0.9.", "ema_0.9"),
    (None, "model", "", "model"),
])
def test_load_model_gives_the_chosen_weights(trained_run, ema, part, prefix, weights):
    """load_model's net holds exactly the chosen weights (the first EMA for 'auto', the raw
    ones for None) and its outputs are bit-identical to a net built from the files."""
    loaded = load_model(trained_run, ema=ema)
    ckpt = trained_run / "checkpoints" / "step_0000004"
    assert loaded.checkpoint == ckpt and loaded.step == 4 and loaded.weights == weights
    assert loaded.shape == (2,) and loaded.num_classes is None
    assert not loaded.net.training
    reference = _net_from_files(ckpt, part, prefix)
    ref_sd = reference.state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in loaded.net.state_dict().items())
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(32, 2, generator=g), torch.rand(32, generator=g)
    h = t * torch.rand(32, generator=g)
    with torch.no_grad():
        assert torch.equal(loaded.net(z, t, h), reference(z, t, h))


def test_ema_and_raw_weights_differ(trained_run):
    """Guards the test above: after 4 steps, the EMA and raw weights really differ, so picking
    the wrong file would be caught."""
    a = load_model(trained_run, ema=None).net.state_dict()
    b = load_model(trained_run, ema=0.999).net.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_load_model_of_a_step_folder(trained_run):
    """A checkpoints/step_* folder may be given instead of the run folder."""
    loaded = load_model(trained_run / "checkpoints" / "step_0000002")
    assert loaded.step == 2


def test_load_model_unknown_decay(trained_run):
    """Asking for an EMA decay the run does not have is a ConfigError listing the choices."""
    with pytest.raises(ConfigError, match="0.999"):
        load_model(trained_run, ema=0.5)


def test_missing_state_json(run_copy):
    """A checkpoint folder without state.json is refused with its path in the message."""
    ckpt = run_copy / "checkpoints" / "step_0000004"
    (ckpt / "state.json").unlink()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(ckpt)
    assert str(ckpt) in str(info.value)


def test_no_checkpoint_in_folder(tmp_path):
    """find_checkpoint / load_model of a folder without checkpoints name the folder."""
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "does-not-exist")


@pytest.mark.parametrize("fname", ["model.safetensors", "ema.safetensors",
                                   "optimizer.safetensors"])
@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_tensor_file(run_copy, fname, damage):
    """A truncated, byte-flipped or missing tensor file is a CheckpointError naming the file."""
    ckpt = run_copy / "checkpoints" / "step_0000004"
    path = ckpt / fname
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:-7])
    elif damage == "flip":
        i = len(data) - 5                                      # inside the tensor data
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:])
    else:
        path.unlink()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(ckpt)
    assert str(path) in str(info.value)


def test_flipped_header_byte(run_copy):
    """A flip in the safetensors header (not only the data) is also refused (by the load that
    reads the raw weights: sampling reads only the file of the weights it uses)."""
    path = run_copy / "checkpoints" / "step_0000004" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[12] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(run_copy, ema=None)


def test_tampered_file_is_refused_by_load_model(run_copy):
    """load_model, used by sampling, also checks the files it reads."""
    path = run_copy / "checkpoints" / "step_0000004" / "ema.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(CheckpointError) as info:
        load_model(run_copy)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe\x00garbage", b"[1, 2]",
                                     b'{"step": 4}'])
def test_corrupt_state_json(run_copy, content):
    """A state.json that is not checkpoint JSON is a CheckpointError naming it."""
    state = run_copy / "checkpoints" / "step_0000004" / "state.json"
    state.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(state.parent)
    assert str(state) in str(info.value)


@pytest.mark.parametrize("edit", ["drop_config", "null_sha"])
def test_state_json_with_missing_fields(run_copy, edit):
    """A state.json that parses but lacks required fields is a CheckpointError too."""
    path = run_copy / "checkpoints" / "step_0000004" / "state.json"
    state = json.loads(path.read_text())
    if edit == "drop_config":
        del state["config"]
    else:
        state["sha256"] = None
    path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError):
        load_model(run_copy)


def test_save_leaves_no_temporary_files(tmp_path):
    """After saving (also over an existing step) only the step folders are left, and
    re-saving a step replaces its content."""
    root = tmp_path / "checkpoints"
    _save_sample(root / "step_0000001", seed=0)
    _save_sample(root / "step_0000002", seed=5)
    parts = _save_sample(root / "step_0000002", seed=9)
    assert sorted(p.name for p in root.iterdir()) == ["step_0000001", "step_0000002"]
    assert sorted(p.name for p in (root / "step_0000002").iterdir()) == [
        "ema.safetensors", "model.safetensors", "optimizer.safetensors", "state.json"]
    tensors, _ = load_checkpoint(root / "step_0000002")
    assert _same(tensors["model"]["f32"], parts["model"]["f32"])


def test_trained_run_has_no_temporary_files(trained_run):
    """A training run leaves no hidden temporary files or folders anywhere (only the run
    folder's lock file, which stays by design)."""
    hidden = [p for p in trained_run.rglob("*") if p.name.startswith(".") or "tmp" in p.name]
    assert hidden == [trained_run / ".meanflow.lock"]


class _FailOnCall:
    """Replaces save_file: calls through, except that call number ``fail_at`` raises."""

    def __init__(self, real, fail_at: int) -> None:
        self.real, self.fail_at, self.calls = real, fail_at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError("disk full (simulated)")
        return self.real(*args, **kwargs)


@pytest.mark.parametrize("target", ["step_0000002", "step_0000001"],
                         ids=["new-step", "same-step"])
def test_failed_save_leaves_old_checkpoint_untouched(tmp_path, monkeypatch, target):
    """If writing fails mid-way (2nd tensor file), one CheckpointError names the cause and the
    intact checkpoint, the existing checkpoint is byte-for-byte unchanged and no partial or
    temporary folder is left."""
    root = tmp_path / "checkpoints"
    _save_sample(root / "step_0000001")
    before = _snapshot(root)
    fake = _FailOnCall(ckpt_mod.save_file, fail_at=2)
    monkeypatch.setattr(ckpt_mod, "save_file", fake)
    with pytest.raises(CheckpointError, match=r"\(disk full \(simulated\)\); the newest "
                       r"checkpoint, .*step_0000001, is intact"):
        _save_sample(root / target, seed=3)
    assert fake.calls == 2
    assert [p.name for p in root.iterdir()] == ["step_0000001"]
    assert _snapshot(root) == before
    load_checkpoint(root / "step_0000001")
    assert list_checkpoints(tmp_path) == [root / "step_0000001"]


def test_failed_save_during_training(tmp_path, monkeypatch):
    """A save that fails during training leaves the earlier checkpoints intact and complete."""
    run = tmp_path / "run"
    train(tiny_config(steps=2), run)
    before = _snapshot(run / "checkpoints")
    monkeypatch.setattr(ckpt_mod, "save_file", _FailOnCall(ckpt_mod.save_file, fail_at=2))
    with pytest.raises(CheckpointError, match="step_0000002, is intact"):
        train(tiny_config(steps=4), run, resume=True)
    assert _snapshot(run / "checkpoints") == before
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]


def test_atomic_write_text(tmp_path):
    """atomic_write_text replaces the file's content and leaves no temporary file."""
    path = tmp_path / "a.json"
    path.write_text("old")
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_list_checkpoints_ignores_incomplete_folders(run_copy):
    """Folders without state.json (an interrupted write) are not checkpoints; order is by
    step number."""
    root = run_copy / "checkpoints"
    (root / "step_0000010").mkdir()
    (root / ".step_0000012.tmp-abc").mkdir()
    assert [p.name for p in list_checkpoints(run_copy)] == ["step_0000002", "step_0000004"]
    assert find_checkpoint(run_copy) == root / "step_0000004"


def test_loading_never_unpickles(trained_run, tmp_path, monkeypatch):
    """load_checkpoint, load_model and resuming work with pickle and torch.load disabled."""
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling was attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    tensors, state = load_checkpoint(find_checkpoint(trained_run))
    assert state["step"] == 4 and tensors["model"]
    assert load_model(trained_run).step == 4
    import shutil
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert train(tiny_config(steps=6), run, resume=True).name == "step_0000006"


def test_atomic_text_files_get_ordinary_permissions(tmp_path):
    """mkstemp creates 0600 files; written text files get what open() would give."""
    import os
    from meanflow.fileio import atomic_write_text
    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}\n")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
