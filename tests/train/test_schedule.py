"""The loop's schedules: the data order (epochs without replacement, or random draws), the EMA
period ``train.ema_every``, the learning-rate warm-up, TF32 and ``train.compile: auto``, and the
backbone options of an augmented run (trained and loaded alike)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from meanflow.data import EpochOrder, PointCloud, build_dataset
from meanflow.errors import ConfigError
from meanflow.models import build_model
from meanflow.runs.build import build_augment, model_options
from meanflow.runs.config import RunConfig
from meanflow.runs.load import load_model
from meanflow.sampling import sample_seeded
from meanflow.objective import MeanFlowLoss
from meanflow.train import loop
from meanflow.train.ema import EMA
from meanflow.train.loop import train
from meanflow.train.schedule import lr_at, step_seed, total_steps
from meanflow.train.step import resolve_compile, tf32_mode

TINY = {"width": 16, "depth": 1, "emb_dim": 8}
TINY_UNET = {"channels": 8, "channel_mult": [1, 2], "blocks_per_res": 1,
             "attn_resolutions": [], "dropout": 0.0}
PARTS = ("model", "ema", "optimizer")


def points(n: int = 40, seed: int = 0) -> PointCloud:
    rng = np.random.default_rng(seed)
    return PointCloud(torch.from_numpy(rng.normal(size=(n, 3)).astype(np.float32)))


def config(steps: int = 5, data: dict | None = None, model: str = "mlp",
           options: dict | None = None, **train_opts) -> RunConfig:
    tr = {"steps": steps, "batch_size": 16, "checkpoint_every": 100, "log_every": 1,
          "progress": False, "keep_checkpoints": 0, "sample_count": 0, "seed": 5,
          "ema_decays": [0.9]}
    tr.update(train_opts)
    return RunConfig.from_dict({
        "model": {"name": model, "options": dict(TINY if options is None else options)},
        "data": data or {"name": "8gaussians"},
        "objective": {"fraction_r_neq_t": 0.5},
        "train": tr}).validate()


def images_npz(root: Path, n: int = 20) -> Path:
    rng = np.random.default_rng(0)
    path = root / "imgs.npz"
    np.savez(path, x=rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8), y=rng.integers(0, 3, n))
    return path


def tensors(ckpt: Path, part: str) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / f"{part}.safetensors"))


def assert_same(a: Path, b: Path) -> None:
    for part in PARTS:
        ta, tb = tensors(a, part), tensors(b, part)
        assert ta.keys() == tb.keys() and ta
        assert all(torch.equal(ta[k], tb[k]) for k in ta), part


def state(ckpt: Path) -> dict:
    return json.loads((ckpt / "state.json").read_text())


class Recording:
    """A finite source that records what the loop asks of it."""

    def __init__(self, base) -> None:
        self.base, self.shape, self.num_classes = base, base.shape, base.num_classes
        self.taken: list[torch.Tensor] = []
        self.drawn: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.base)

    def batch(self, batch_size, generator):
        x, y = self.base.batch(batch_size, generator)
        self.drawn.append(x.clone())
        return x, y

    def take(self, indices, generator):
        self.taken.append(indices.clone())
        return self.base.take(indices, generator)


# ---------------------------------------------------------------------------- data order

def test_epochs_order_takes_the_epoch_batches_and_records_the_position(tmp_path):
    """N = 40, B = 16 (two micro-batches of 8): S = 2 steps an epoch; step k trains on the
    global batch k of EpochOrder(40, 16, seed), taken (not drawn), and each epoch's 32 indices
    are distinct. The checkpoint records epoch 2, one step into it, after 5 steps."""
    data = Recording(points(40))
    run = tmp_path / "run"
    train(config(5, grad_accumulation=2, checkpoint_every=5), run, dataset=data)
    order = EpochOrder(40, 16, seed=5)
    assert len(data.taken) == 5 and not data.drawn
    for k, got in enumerate(data.taken):
        assert torch.equal(got, order.indices(k))
    for epoch in range(2):
        seen = torch.cat(data.taken[2 * epoch:2 * epoch + 2]).tolist()
        assert len(set(seen)) == 32
    assert state(run / "checkpoints" / "step_0000005")["data_position"] == {
        "order": "epochs", "size": 40, "batch_size": 16, "steps_per_epoch": 2, "epoch": 2,
        "epoch_step": 1}


def test_random_order_keeps_the_with_replacement_draws(tmp_path):
    """data.order=random: each step's batch is ``randint(0, N, (B,))`` of the step's
    (seed, rank, step) generator, as before data.order existed (the loop never calls take)."""
    base = points(40)
    data = Recording(base)
    run = tmp_path / "run"
    cfg = config(4, data={"name": "8gaussians", "order": "random"}, checkpoint_every=4)
    train(cfg, run, dataset=data)
    assert len(data.drawn) == 4 and not data.taken
    for k, x in enumerate(data.drawn):
        index = torch.randint(0, 40, (16,), generator=torch.Generator().manual_seed(
            step_seed(5, 0, k)))
        assert torch.equal(x, base.data[index])
    assert state(run / "checkpoints" / "step_0000004")["data_position"] == {
        "order": "random", "size": 40}


def test_resume_mid_epoch_is_bit_exact(tmp_path):
    """Images with random flips (drawn from the step's generator), N = 20, B = 8: S = 2. Five
    steps straight equal three steps (stopped one step into epoch 1), then a resumption to
    five: model, EMA and Adam state identical."""
    data = images_npz(tmp_path)
    spec = {"name": str(data), "options": {"hflip": True}}
    opts = dict(model="unet-small", options=TINY_UNET, batch_size=8)
    a, b = tmp_path / "a", tmp_path / "b"
    train(config(5, spec, **opts), a)
    train(config(3, spec, **opts), b)
    assert state(b / "checkpoints" / "step_0000003")["data_position"]["epoch_step"] == 1
    train(config(5, spec, **opts), b, resume=True)
    assert_same(a / "checkpoints" / "step_0000005", b / "checkpoints" / "step_0000005")


def test_data_that_fills_no_batch_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "pts.npy"
    np.save(path, np.random.default_rng(0).normal(size=(10, 2)).astype(np.float32))
    with pytest.raises(ConfigError, match="10 samples.*train.batch_size=16.*data.order=random"):
        train(config(2, {"name": str(path)}), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="data.order=random"):
        loop.check_config(config(2, {"name": str(path)}))
    train(config(2, {"name": str(path), "order": "random"}), tmp_path / "run")


@pytest.mark.parametrize("order", ["epochs", "random"])
def test_resuming_on_data_of_another_size_is_refused(tmp_path, order):
    run = tmp_path / "run"
    spec = {"name": "8gaussians", "order": order}
    train(config(2, spec, checkpoint_every=2), run, dataset=points(40))
    with pytest.raises(ConfigError, match="trained on 40 samples and this data holds 44"):
        train(config(4, spec, checkpoint_every=2), run, resume=True, dataset=points(44))
    train(config(4, spec, checkpoint_every=2), run, resume=True, dataset=points(40))


def test_a_run_made_before_data_order_existed_resumes_with_the_random_order(tmp_path):
    """Its config.json lacks data.order and it drew with replacement: resuming it under the
    new default ("epochs") is refused naming data.order; data.order=random continues it."""
    run = tmp_path / "run"
    spec = {"name": "8gaussians", "order": "random"}
    train(config(2, spec, checkpoint_every=2), run, dataset=points(40))
    saved = json.loads((run / "config.json").read_text())
    del saved["data"]["order"]
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="differs in data.order"):
        train(config(4, checkpoint_every=2), run, resume=True, dataset=points(40))
    train(config(4, spec, checkpoint_every=2), run, resume=True, dataset=points(40))
    assert (run / "checkpoints" / "step_0000004").is_dir()


def test_a_finite_source_without_take_needs_the_random_order(tmp_path):
    class NoTake:
        shape, num_classes = (3,), None

        def __init__(self) -> None:
            self.base = points(40)

        def __len__(self) -> int:
            return 40

        def batch(self, batch_size, generator):
            return self.base.batch(batch_size, generator)

    with pytest.raises(ConfigError, match="take.*NoTake.*data.order=random"):
        train(config(2), tmp_path / "a", dataset=NoTake())
    train(config(2, {"name": "8gaussians", "order": "random"}), tmp_path / "b", dataset=NoTake())


def test_endless_sources_ignore_the_order(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(config(3, {"name": "moons", "order": "epochs"}, checkpoint_every=3), a)
    train(config(3, {"name": "moons", "order": "random"}, checkpoint_every=3), b)
    assert_same(a / "checkpoints" / "step_0000003", b / "checkpoints" / "step_0000003")


def test_length_in_epochs_counts_whole_steps_of_the_order():
    """Under "epochs" train.epochs is epochs * S steps rounded up (CIFAR-10 at B = 1024: 48
    steps an epoch, 16000 epochs = 768,000 steps); under "random" epochs * N / B rounded up."""
    class Sized:
        shape, num_classes = (2,), None

        def __init__(self, n: int) -> None:
            self.n = n

        def __len__(self) -> int:
            return self.n

        def batch(self, batch_size, generator):
            raise AssertionError("not drawn")

        def take(self, indices, generator):
            raise AssertionError("not drawn")

    def steps(n: int, order: str, **tr) -> int:
        cfg = config(1, {"name": "8gaussians", "order": order}, **tr)
        return total_steps(cfg, Sized(n))

    assert steps(50_000, "epochs", batch_size=1024, epochs=16000) == 768_000
    assert steps(50_000, "random", batch_size=1024, epochs=16000) == 781_250
    assert steps(50, "epochs", epochs=2.5) == 8          # S = 3: ceil(7.5)
    assert steps(50, "random", epochs=2.5) == 8          # ceil(7.8125)
    assert steps(480, "epochs", epochs=0.1) == 3         # S = 30: not ceil(3.0000000000000004)
    assert steps(50, "epochs", epochs=1) == 3 and steps(50, "random", epochs=1) == 4
    assert steps(50, "epochs", images=100) == 7
    with pytest.raises(ConfigError, match="data.order=random"):
        steps(10, "epochs", epochs=1)


# ---------------------------------------------------------------------------- EMA period

class RecordingEMA(EMA):
    """Keeps the model's weights at construction and after every optimiser step."""
    trajectory: list = []

    def __init__(self, model, decays, every=1, warmup=False) -> None:
        super().__init__(model, decays, every, warmup)
        RecordingEMA.trajectory = [self._weights(model)]

    @staticmethod
    def _weights(model) -> dict:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def step(self, model, n):
        assert n == len(RecordingEMA.trajectory)
        RecordingEMA.trajectory.append(self._weights(model))
        return super().step(model, n)


def test_ema_every_follows_the_official_rule(tmp_path, monkeypatch):
    """ema_every = 16 for 32 steps: the EMA stays the initial weights until step 16, then
    ema <- ema + (1 - d**16) (theta_16 - ema) computed in float64 and stored in float32; the
    same at step 32, from the recorded parameter trajectory."""
    monkeypatch.setattr(loop, "EMA", RecordingEMA)
    run = tmp_path / "run"
    decays = [0.9, 0.5]
    train(config(32, ema_every=16, ema_decays=decays, checkpoint_every=8, ema_warmup=False),
          run)
    theta = RecordingEMA.trajectory
    assert len(theta) == 33
    saved = {n: tensors(run / "checkpoints" / f"step_{n:07d}", "ema") for n in (8, 16, 24, 32)}
    for d in decays:
        prefix = f"ema_{d:g}."
        ema = {k: v.clone() for k, v in theta[0].items()}
        expected = {}
        for n in range(1, 33):
            if n % 16 == 0:
                for k in ema:
                    old = ema[k].double()
                    ema[k] = (old + (1 - d ** 16) * (theta[n][k].double() - old)).float()
            expected[n] = {k: v.clone() for k, v in ema.items()}
        for n, got in saved.items():
            for k in ema:
                assert torch.equal(got[prefix + k], expected[n][k]), (d, n, k)
        # the updates did move the average, and step 8's checkpoint still held the start
        assert any(not torch.equal(expected[16][k], theta[0][k]) for k in ema)
        assert all(torch.equal(saved[8][prefix + k], theta[0][k]) for k in ema)


def test_ema_every_one_is_the_plain_lerp():
    """N = 1 keeps the fused lerp: three updates equal shadow.lerp_(theta, 1 - d) bit for
    bit, and step() updates at every n."""
    torch.manual_seed(0)
    net = build_model("mlp", dim=2, **TINY)
    ema = EMA(net, [0.9, 0.99])
    shadows = {d: {k: v.clone() for k, v in net.state_dict().items()} for d in (0.9, 0.99)}
    for n in range(1, 4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        assert ema.step(net, n)
        for d, shadow in shadows.items():
            for k, v in net.state_dict().items():
                shadow[k].lerp_(v, 1.0 - d)
                assert torch.equal(ema.shadows[EMA.key(d)][k], shadow[k])


def test_ema_every_resumes_exactly(tmp_path):
    """ema_every = 4: 10 steps straight equal 6 steps (between two updates) and a
    resumption to 10."""
    a, b = tmp_path / "a", tmp_path / "b"
    train(config(10, ema_every=4, checkpoint_every=6), a)
    train(config(6, ema_every=4, checkpoint_every=6), b)
    train(config(10, ema_every=4, checkpoint_every=6), b, resume=True)
    assert_same(a / "checkpoints" / "step_0000010", b / "checkpoints" / "step_0000010")


def test_a_skipped_step_skips_its_ema_update(tmp_path):
    """A non-finite step updates nothing: with ema_every = 2 and step 4 skipped, the weights
    after step 4 are those after step 3, and the EMA those after step 2 (the update of step 4
    is not made up)."""

    class NanAt4:
        def __init__(self) -> None:
            self.base, self.calls = build_dataset("8gaussians"), 0
            self.shape, self.num_classes = self.base.shape, None

        def batch(self, batch_size, generator):
            self.calls += 1
            x, y = self.base.batch(batch_size, generator)
            return (torch.full_like(x, float("nan")) if self.calls == 4 else x), y

    run = tmp_path / "run"
    train(config(4, ema_every=2, checkpoint_every=1), run, dataset=NanAt4())
    saved = {n: {part: tensors(run / "checkpoints" / f"step_{n:07d}", part)
                 for part in ("model", "ema")} for n in (1, 2, 3, 4)}

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert same(saved[4]["model"], saved[3]["model"])
    assert not same(saved[3]["model"], saved[2]["model"])
    assert same(saved[4]["ema"], saved[2]["ema"]) and same(saved[3]["ema"], saved[2]["ema"])
    assert not same(saved[2]["ema"], saved[1]["ema"])


# ---------------------------------------------------------------------------- learning rate

def test_warmup_is_the_official_linear_lr():
    """lr * (s + (1 - s) * min(i, W) / W), s = 1e-8 / lr: about 0 at step 0, exactly lr from
    step W on; the same as torch's LinearLR + ConstantLR in a SequentialLR, stepped after each
    optimiser step."""
    cfg = config(1)
    cfg.optim.lr, cfg.optim.warmup_steps = 6e-4, 5
    s = 1e-8 / 6e-4
    expected = [6e-4 * (s + (1 - s) * min(i, 5) / 5) for i in range(9)]
    got = [lr_at(cfg, i) for i in range(9)]
    assert got == pytest.approx(expected, rel=1e-12, abs=0)
    assert got[0] == pytest.approx(1e-8, rel=1e-12) and got[5:] == [6e-4] * 4
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=6e-4)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=s, end_factor=1.0,
                                             total_iters=5)
    const = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=100)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, const], milestones=[5])
    for i in range(9):
        assert opt.param_groups[0]["lr"] == pytest.approx(got[i], rel=1e-9), i
        opt.step()
        sched.step()
    cfg.optim.warmup_steps = 0
    assert [lr_at(cfg, i) for i in range(3)] == [6e-4] * 3


# ---------------------------------------------------------------------------- TF32, compile

def _tf32_now() -> tuple[str, bool]:
    return torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32


def test_tf32_is_set_for_cuda_runs_only_and_restored():
    before = _tf32_now()
    torch.backends.cudnn.allow_tf32 = False
    try:
        with tf32_mode(True, torch.device("cpu")):
            assert _tf32_now() == ("highest", False)
        with tf32_mode(False, torch.device("cuda")):
            assert _tf32_now() == ("highest", False)
        with tf32_mode(True, torch.device("cuda", 0)):
            assert _tf32_now() == ("high", True)
        assert _tf32_now() == ("highest", False)
        with pytest.raises(KeyError):
            with tf32_mode(True, torch.device("cuda")):
                raise KeyError("an error inside still restores")
        assert _tf32_now() == ("highest", False)
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def test_tf32_under_the_newer_per_backend_flags():
    """A process that set TF32 through torch's per-backend ``fp32_precision`` flags, where the
    legacy getters raise: those flags are set and restored instead (in a subprocess, to keep
    this process's flags as they are)."""
    import subprocess
    import sys
    code = (
        "import torch\n"
        "from meanflow.train.step import tf32_mode\n"
        "m, c = torch.backends.cuda.matmul, torch.backends.cudnn.conv\n"
        "m.fp32_precision, c.fp32_precision = 'tf32', 'ieee'\n"
        "try:\n"
        "    torch.get_float32_matmul_precision()\n"
        "    print('legacy readable')\n"
        "except RuntimeError:\n"
        "    print('legacy raises')\n"
        "with tf32_mode(True, torch.device('cuda')):\n"
        "    print(m.fp32_precision, c.fp32_precision)\n"
        "print(m.fp32_precision, c.fp32_precision)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("\n")[:3] == ["legacy raises", "tf32 tf32", "tf32 ieee"]


def test_compile_auto_is_resolved_once_by_the_device(tmp_path, monkeypatch):
    """"auto" is on for CUDA only; a CPU run with compile=auto neither compiles nor runs the
    compiled-loss check (the string "auto" is truthy: every use takes the resolved value)."""
    assert resolve_compile("auto", torch.device("cuda")) is True
    assert resolve_compile("auto", torch.device("cuda", 1)) is True
    assert resolve_compile("auto", torch.device("cpu")) is False
    assert resolve_compile(True, torch.device("cpu")) is True
    assert resolve_compile(False, torch.device("cuda")) is False
    assert resolve_compile("auto", torch.device("cuda"), fsdp=True) is False
    asked = []
    real = loop.make_loss_call

    def recording(loss_fn, compile_=False, backend=None):
        asked.append(compile_)
        return real(loss_fn, compile_, backend)

    def no_check(*args, **kwargs):
        raise AssertionError("the compiled-loss check ran")

    monkeypatch.setattr(loop, "make_loss_call", recording)
    monkeypatch.setattr(loop, "check_compiled", no_check)
    monkeypatch.setattr(MeanFlowLoss, "draw", no_check)      # the compiled path's draws
    train(config(2, compile="auto", device="cpu"), tmp_path / "run")
    assert asked == [False]


# ---------------------------------------------------------------------------- augmentation

@pytest.mark.parametrize("options", [{}, {"yflip": 1.0}])
def test_an_augmented_unet_run_loads_and_samples(tmp_path, options):
    """A U-Net trained with data.augment takes the augmentation's label width (augment_dim =
    EDMAugment(p, **augment_options).label_dim); load_model builds the same backbone, so the
    run samples."""
    data = images_npz(tmp_path)
    spec = {"name": str(data), "augment": 0.5, "augment_options": options}
    cfg = config(2, spec, model="unet-small", options=TINY_UNET, batch_size=8)
    run = tmp_path / "run"
    train(cfg, run)
    width = build_augment(cfg).label_dim
    assert model_options(cfg, (1, 8, 8))["augment_dim"] == width
    weights = tensors(run / "checkpoints" / "step_0000002", "model")
    aug = [v for k, v in weights.items() if "aug" in k]
    assert len(aug) == 1 and aug[0].shape[1] == width
    loaded = load_model(run)
    x = sample_seeded(loaded.net, range(3), loaded.shape, steps=1)
    assert x.shape == (3, 1, 8, 8) and bool(torch.isfinite(x).all())
    assert math.isfinite(float(x.abs().sum()))
