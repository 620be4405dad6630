"""Distributed training (torch.distributed, gloo, 2 CPU processes).

One ``torch.multiprocessing.spawn`` of two ranks runs every multi-process scenario (module
fixture ``ranks``); the tests below then check its results against single-process references
computed here:

- DDP + split JVP, DDP + guidance, and the joint "forward_ad" and "func" strategies with a hand
  all-reduce: after 4 Adam steps both ranks hold bit-identical weights, equal (float64, to
  ~1e-12) to one process training on the concatenated global batch (what the ranks drew,
  gathered here);
- the known bug (grad pass on ``.module``, no DDP) makes the ranks diverge, fails that equality
  and is caught by the loop's replica check;
- resuming with another number of ranks (1 -> 2 and 2 -> 1) continues the same reference;
- sharded seeded sampling, the sharded periodic FID and the sample PNGs equal one process;
- a global batch that does not split over the ranks is one clear ConfigError;
- the train.compile start-up check refuses, on every rank, a grad pass that skips DDP;
- ``train.compile`` (slow; fixture ``compiled_ranks``, its own spawn, the "aot_eager" backend,
  which traces the same graphs as inductor without its C++ build): with the split JVP (the
  compiled loss calls the DDP wrapper) and with "func" (hand all-reduce after the compiled
  backward) the ranks stay bit-identical and equal the eager global-batch reference.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from meanflow.data import build_dataset
from meanflow.errors import ConfigError
from meanflow.fileio import exclusive
from meanflow.models import build_model, build_model_for_data
from meanflow.objective import MeanFlowLoss
from meanflow.objective.jvp import u_and_dudt
from meanflow.runs.config import RunConfig
from meanflow.sampling import generate, sample_seeded
from meanflow.train import distributed as dist_
from meanflow.train import loop
from meanflow.train import step as step_mod
from meanflow.train.ema import EMA
from meanflow.train.interrupt import Interrupted
from meanflow.train.loop import check_config, train
from meanflow.train.schedule import step_seed
from meanflow.world import World, env_world, gather_sharded, on_every, shard

WORLD = 2
BATCH, ACCUM, SEED = 16, 2, 3
TINY = {"width": 16, "depth": 1, "emb_dim": 8}
TINY_UNET = {"channels": 8, "channel_mult": [1, 2], "blocks_per_res": 1,
             "attn_resolutions": [], "dropout": 0.0}
SAMPLE_SEEDS = list(range(100, 107))            # 7: an uneven split over 2 ranks
VARIANTS = {                                     # name -> (objective, class-conditional)
    "split": ({"jvp": "split"}, False),
    "guided": ({"jvp": "split", "omega": 2.0, "kappa": 0.5, "label_drop": 0.0}, True),
    "forward_ad": ({"jvp": "forward_ad"}, False),
    "func": ({"jvp": "func"}, False),
}


class F64:
    """8gaussians in float64, so that equalities hold to ~1e-12 (no float32 noise in Adam)."""

    def __init__(self) -> None:
        self.base = build_dataset("8gaussians")
        self.shape, self.num_classes = self.base.shape, self.base.num_classes

    def batch(self, batch_size, generator):
        x, y = self.base.batch(batch_size, generator)
        return x.double(), y


class SignalledOnRank1(F64):
    """F64, but rank 1 sends itself SIGTERM while it draws the batch of step 3 (rank 0 gets
    no signal), as a scheduler stopping one node first would."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def batch(self, batch_size, generator):
        self.calls += 1
        if self.calls == 3 and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().batch(batch_size, generator)


class F64Points:
    """40 fixed 2-D points in float64: a finite source (data.order "epochs" applies), which
    records the indices the loop takes."""
    taken: list = []

    def __init__(self) -> None:
        from meanflow.data import PointCloud
        rng = np.random.default_rng(1)
        self.base = PointCloud(torch.from_numpy(rng.normal(size=(40, 2)) * 2))
        self.shape, self.num_classes = (2,), None

    def __len__(self) -> int:
        return 40

    def batch(self, batch_size, generator):
        x, y = self.base.batch(batch_size, generator)
        return x.double(), y

    def take(self, indices, generator):
        F64Points.taken.append(indices.clone())
        x, y = self.base.take(indices, generator)
        return x.double(), y


def make_config(steps: int, variant: str = "split", **train_opts) -> RunConfig:
    objective, cond = VARIANTS[variant]
    return tiny_config(steps, objective, cond, **train_opts)


def tiny_config(steps: int, objective: dict, cond: bool, **train_opts) -> RunConfig:
    """The tiny float64 run of these tests (also used by test_fsdp.py)."""
    tr = {"steps": steps, "batch_size": BATCH, "grad_accumulation": ACCUM, "seed": SEED,
          "checkpoint_every": 2, "log_every": 1, "progress": False, "keep_checkpoints": 0,
          "sample_count": 0, "device": "cpu", "ema_decays": [0.9]}
    tr.update(train_opts)
    return RunConfig.from_dict({
        "model": {"options": dict(TINY)},
        "data": {"name": "8gaussians", "class_conditional": cond},
        "objective": {"fraction_r_neq_t": 0.5, "p": 1.0, **objective},
        "optim": {"lr": 1e-2},
        "train": tr}).validate()


def images_npz(root: Path) -> Path:
    rng = np.random.default_rng(0)
    path = root / "imgs.npz"
    np.savez(path, x=rng.integers(0, 256, (40, 1, 8, 8), dtype=np.uint8), y=rng.integers(0, 3, 40))
    return path


def image_config(data: Path, ref: Path) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"name": "unet-small", "options": dict(TINY_UNET)},
        "data": {"name": str(data)},
        "objective": {"fraction_r_neq_t": 0.5, "p": 0.5},
        "train": {"steps": 2, "batch_size": 8, "log_every": 1, "checkpoint_every": 100,
                  "progress": False, "device": "cpu", "ema_decays": [0.5], "fid_every": 2,
                  "fid_ref": str(ref), "fid_n": 7, "fid_steps": [1], "sample_count": 5,
                  "sample_steps": [1]}}).validate()


def sampling_net() -> torch.nn.Module:
    """A class-conditional MLP with every weight random (zero-init outputs would make any two
    samplers agree trivially)."""
    torch.manual_seed(0)
    net = build_model("mlp", dim=2, num_classes=3, **TINY).double()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    return net.eval()


class RecordingEMA(EMA):
    """Keeps the weights each rank held after its last optimiser step."""
    last: dict = {}

    def update(self, model, count=None):
        super().update(model, count)
        RecordingEMA.last = {k: v.detach().clone() for k, v in model.state_dict().items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo(rank: int, port: int, root: str, timeout_s: int) -> Path:
    """A spawned rank's set-up (one thread, float64, LOCAL_RANK, the gloo group of WORLD
    ranks); returns ``root`` as a Path. Used by the workers here and in test_fsdp.py."""
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=timeout_s))
    return Path(root)


def _worker(rank: int, port: int, root: str) -> None:
    """Every multi-process scenario, in one process group; results to root/rank<r>.pt."""
    root = join_gloo(rank, port, root, 120)
    loop.EMA = RecordingEMA
    out: dict = {}
    try:
        for variant in VARIANTS:                 # synchronised designs, from scratch
            train(make_config(4, variant), root / variant, dataset=F64())
            out[variant] = RecordingEMA.last
        train(make_config(4), root / "grow", resume=True, dataset=F64())   # 1 -> 2 ranks
        out["grow"] = RecordingEMA.last
        F64Points.taken = []                     # data.order "epochs" on a finite source
        train(make_config(4), root / "epochs", dataset=F64Points())
        out["epochs_taken"] = F64Points.taken

        real_wrap = dist_.wrap_ddp               # the known bug: grad pass on .module
        dist_.wrap_ddp = lambda module, world, device: module
        try:
            train(make_config(4), root / "unsynced", dataset=F64())
        except dist_.ReplicaMismatchError as exc:
            out["unsynced_error"] = str(exc)
        finally:
            dist_.wrap_ddp = real_wrap
        out["unsynced"] = RecordingEMA.last

        try:
            train(make_config(4, batch_size=6), root / "odd", dataset=F64())
        except ConfigError as exc:
            out["odd_error"] = str(exc)

        # a "compiled" loss whose grad pass bypasses DDP (each rank keeps its own gradient):
        # the start-up check, on a different batch on each rank, refuses it everywhere
        world = env_world()
        cfg = make_config(1)
        loss_fn = cfg.objective.build(None)
        torch.manual_seed(SEED)
        model = build_model_for_data("mlp", (2,), None, cfg.model.options)
        x = F64().batch(8, torch.Generator().manual_seed(rank))[0]

        def bypass(net, x, y, aug=None, *, draws=None, generator=None, jvp_net=None):
            return loss_fn(net.module, x, y, generator=generator, draws=draws, jvp_net=jvp_net)
        try:
            on_every(world, step_mod.check_compiled, model, loss_fn, bypass, x, None,
                           wrap=lambda m: dist_.wrap_ddp(m, world, torch.device("cpu")))
        except ConfigError as exc:
            out["bypass_error"] = str(exc)

        def fails_on_rank1():
            if dist.get_rank() == 1:
                raise ConfigError("rank 1 says no")
            return "fine"
        try:
            on_every(world, fails_on_rank1)
        except ConfigError as exc:
            out["on_every_error"] = str(exc)

        # SIGTERM on rank 1 only: every rank stops after the same step, checkpointed
        try:
            train(make_config(6, checkpoint_every=100), root / "stopped",
                  dataset=SignalledOnRank1())
        except Interrupted as stop:
            out["interrupted"] = (int(stop.signum), stop.step, stop.checkpoint.name)
        train(make_config(6, checkpoint_every=100), root / "stopped", resume=True, dataset=F64())
        train(make_config(6, checkpoint_every=100), root / "whole", dataset=F64())

        try:            # the test process holds this folder's lock: rank 0 is refused,
            train(make_config(4), root / "locked", dataset=F64())   # and so is every rank
        except ConfigError as exc:
            out["locked_error"] = str(exc)
        out["pid"] = os.getpid()

        y = torch.arange(len(SAMPLE_SEEDS)) % 3
        out["samples"] = generate(sampling_net(), SAMPLE_SEEDS, (2,), labels=y, steps=2,
                                  batch_size=2, device="cpu", world=env_world())[0]
        torch.set_default_dtype(torch.float32)   # the image run: float32 U-Net
        train(image_config(root / "imgs.npz", root / "ref.npz"), root / "image")
    finally:
        torch.save(out, root / f"rank{rank}.pt")
        dist.destroy_process_group()


COMPILED = ("split", "func")       # the strategies trained compiled under torchrun
COMPILED_STEPS = 2


def _compile_worker(rank: int, port: int, root: str) -> None:
    """train.compile under 2 ranks; results to root/compiled<r>.pt."""
    root = join_gloo(rank, port, root, 300)
    loop.EMA = RecordingEMA
    step_mod.COMPILE_BACKEND = "aot_eager"
    out: dict = {}
    try:
        for variant in COMPILED:
            train(make_config(COMPILED_STEPS, variant, compile=True), root / variant,
                  dataset=F64())
            out[variant] = RecordingEMA.last
    finally:
        torch.save(out, root / f"compiled{rank}.pt")
        dist.destroy_process_group()


def reference(variant: str, world_sizes: list[int],
              stats: list | None = None) -> dict[str, torch.Tensor]:
    """One process, no DDP: at each step the global batch is what every rank would draw
    (batch, then per micro-batch the times and noise, from its (seed, rank, step) generator),
    concatenated, and one Adam step is taken on the mean loss over it. ``stats`` collects the
    loss's stats of each step (means over the global batch)."""
    cfg = make_config(max(1, len(world_sizes)), variant)
    num_classes = 8 if cfg.data.class_conditional else None
    torch.manual_seed(SEED)
    model = build_model_for_data("mlp", (2,), num_classes, cfg.model.options)
    loss_fn = cfg.objective.build(num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    ds = F64()
    for step, world in enumerate(world_sizes):
        parts: dict[str, list] = {}
        for rank in range(world):
            gen = torch.Generator().manual_seed(step_seed(SEED, rank, step))
            x, y = ds.batch(BATCH // world, gen)
            for xi, yi in zip(x.chunk(ACCUM), y.chunk(ACCUM)):
                draws = loss_fn.draw(xi, gen)        # r, t, e (and label dropout's uniforms)
                for k, v in [("x", xi), ("y", yi), *draws.items()]:
                    parts.setdefault(k, []).append(v)
        cat = {k: torch.cat(v) for k, v in parts.items()}
        x, y = cat.pop("x"), cat.pop("y")
        loss, step_stats = loss_fn(model, x, y if num_classes else None, draws=cat)
        if stats is not None:
            stats.append({k: float(v) for k, v in step_stats.items()})
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    num = max(float((a[k] - b[k]).abs().max()) for k in a)
    den = max(float(b[k].abs().max()) for k in b)
    return num / den


@pytest.fixture(scope="module")
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, float64, pool_extractor):
    """Runs the two ranks once: (root, rank 0's results, rank 1's results)."""
    import torch.multiprocessing as mp
    root = tmp_path_factory.mktemp("dist")
    train(make_config(2), root / "grow", dataset=F64())       # 1 process to step 2
    data = images_npz(root)
    torch.set_default_dtype(torch.float32)
    from meanflow.metrics.fid import reference_stats
    reference_stats(str(data), root / "ref.npz", extractor=str(pool_extractor),
                    device="cpu", progress=False)
    torch.set_default_dtype(torch.float64)
    (root / "locked").mkdir()
    with exclusive(root / "locked", "meanflow train"):
        mp.spawn(_worker, args=(_free_port(), str(root)), nprocs=WORLD, join=True)
    return root, torch.load(root / "rank0.pt"), torch.load(root / "rank1.pt")


@pytest.fixture(scope="module")
def compiled_ranks(tmp_path_factory, float64):
    """Runs the two ranks of the train.compile scenarios once (about a minute, most of it
    Dynamo tracing): rank 0's and rank 1's results."""
    import torch.multiprocessing as mp
    root = tmp_path_factory.mktemp("compiled")
    mp.spawn(_compile_worker, args=(_free_port(), str(root)), nprocs=WORLD, join=True)
    return torch.load(root / "compiled0.pt"), torch.load(root / "compiled1.pt")


# ------------------------------------------------------------------- the synchronised designs

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ranks_stay_identical_and_equal_one_process_on_the_global_batch(ranks, variant):
    """DDP (split JVP on .module, grad pass through DDP; with guidance too) and the hand
    all-reduce (forward_ad): 4 steps of 2 ranks x 2 micro-batches = 4 steps of one process on
    the concatenated batch of 16."""
    _, r0, r1 = ranks
    assert all(torch.equal(r0[variant][k], r1[variant][k]) for k in r0[variant])
    ref = reference(variant, [WORLD] * 4)
    assert max_rel_diff(r0[variant], ref) < 1e-10
    init = reference(variant, [])
    assert max_rel_diff(init, ref) > 1e-3       # the weights did move


def test_unsynchronised_ranks_diverge_and_are_caught(ranks):
    """The known bug, grad pass on ``.module`` (no DDP): each rank trains alone. Its weights
    differ between ranks and from the global-batch reference, and the loop's replica check
    stops the run at its first checkpoint."""
    _, r0, r1 = ranks
    assert "not synchronised" in r0["unsynced_error"] and r1["unsynced_error"]
    assert max_rel_diff(r0["unsynced"], r1["unsynced"]) > 1e-3
    assert max_rel_diff(r0["unsynced"], reference("split", [WORLD] * 2)) > 1e-3


def test_logs_are_the_mean_over_ranks_and_rank0_writes_alone(ranks):
    """metrics.jsonl has one line per step (rank 0 alone writes) with the global batch count,
    and the stats of the whole global batch (all-reduced, not rank 0's half); checkpoints hold
    rank 0's weights, which are everyone's."""
    root, r0, _ = ranks
    lines = [json.loads(s) for s in (root / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [d["step"] for d in lines] == [1, 2, 3, 4]
    assert [d["images"] for d in lines] == [16, 32, 48, 64]
    expected: list = []
    reference("split", [WORLD] * 4, expected)
    for line, want in zip(lines, expected):
        for key in ("loss", "mse", "u_minus_v", "weight", "frac_r_neq_t"):
            assert line[key] == pytest.approx(want[key], rel=1e-6), key
    saved = load_file(str(root / "split" / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert all(torch.equal(saved[k], r0["split"][k]) for k in saved)
    state = json.loads((root / "split" / "checkpoints" / "step_0000004" / "state.json")
                       .read_text())
    assert state["world_size"] == WORLD


# ------------------------------------------------------------------- train.compile

@pytest.mark.slow
@pytest.mark.parametrize("variant", COMPILED)
def test_compiled_ranks_stay_identical_and_equal_the_eager_run(compiled_ranks, variant):
    """2 compiled steps of 2 ranks x 2 micro-batches: split (the compiled loss calls the DDP
    wrapper for the grad pass, DDP's hooks all-reduce in the compiled backward, no_sync on the
    first micro-batch) and func (compiled loss on the module, gradients all-reduced by hand
    afterwards). Both ranks hold bit-identical weights, equal to the eager global-batch run."""
    r0, r1 = compiled_ranks
    assert all(torch.equal(r0[variant][k], r1[variant][k]) for k in r0[variant])
    ref = reference(variant, [WORLD] * COMPILED_STEPS)
    assert max_rel_diff(r0[variant], ref) < 1e-10
    assert max_rel_diff(reference("split", []), ref) > 1e-3     # the weights did move


def test_a_compiled_grad_pass_that_skips_ddp_is_refused_on_every_rank(ranks):
    """The train.compile start-up check runs the grad pass through a DDP copy of the probe,
    on a batch of each rank's own, so gradients that were not averaged differ from eager's;
    every rank raises, and an error on one rank only reaches all of them (none waits)."""
    _, r0, r1 = ranks
    for r in (r0, r1):
        assert "changed the gradient" in r["bypass_error"]
        assert "\n" not in r["bypass_error"]
        assert r["on_every_error"] == "rank 1 says no"


# ------------------------------------------------------------------- resume, sampling, errors

def test_rank0_alone_holds_the_run_folder_and_a_refusal_reaches_every_rank(ranks):
    """Rank 0 takes the run folder's lock (the lock file names its PID); a folder locked by
    another process is refused on every rank with rank 0's one line, none left waiting."""
    root, r0, r1 = ranks
    assert (root / "image" / ".meanflow.lock").read_text().split()[0] == str(r0["pid"])
    holder = f"in use by process {os.getpid()} (meanflow train)"
    assert holder in r0["locked_error"] and r0["locked_error"] == r1["locked_error"]
    assert sorted(p.name for p in (root / "locked").iterdir()) == [".meanflow.lock"]


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(ranks):
    """SIGTERM reaches rank 1 alone during step 3: both ranks agree after that step, write
    its checkpoint together and stop with Interrupted; resumed, the run ends bit for bit
    where an uninterrupted one does."""
    root, r0, r1 = ranks
    assert r0["interrupted"] == r1["interrupted"] == (signal.SIGTERM, 3, "step_0000003")
    for part in ("model", "ema", "optimizer"):
        a, b = (load_file(str(root / run / "checkpoints" / "step_0000006" /
                              f"{part}.safetensors")) for run in ("stopped", "whole"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_resume_with_another_number_of_ranks(ranks):
    """1 process to step 2, then 2 ranks to step 4; and 2 ranks to step 4, then 1 process to
    step 6: both continue the global-batch reference exactly."""
    root, r0, r1 = ranks
    assert all(torch.equal(r0["grow"][k], r1["grow"][k]) for k in r0["grow"])
    assert max_rel_diff(r0["grow"], reference("split", [1, 1, WORLD, WORLD])) < 1e-10
    shrink = root / "shrink"
    shutil.copytree(root / "split", shrink)
    loop.EMA, old = RecordingEMA, loop.EMA
    try:
        train(make_config(6), shrink, resume=True, dataset=F64())
    finally:
        loop.EMA = old
    assert max_rel_diff(RecordingEMA.last, reference("split", [WORLD] * 4 + [1, 1])) < 1e-10


def test_epoch_order_gives_the_ranks_shares_of_the_one_process_batches(ranks, tmp_path):
    """data.order "epochs" (40 points, global batch 16: 2 steps an epoch): at every step rank
    r takes the contiguous half r of the global batch that one process takes, so the order of
    the data does not depend on the number of ranks."""
    from meanflow.data import EpochOrder
    _, r0, r1 = ranks
    F64Points.taken = []
    train(make_config(4), tmp_path / "one", dataset=F64Points())
    one = F64Points.taken
    assert len(one) == len(r0["epochs_taken"]) == len(r1["epochs_taken"]) == 4
    for k in range(4):
        assert torch.equal(torch.cat([r0["epochs_taken"][k], r1["epochs_taken"][k]]), one[k])
        assert torch.equal(one[k], EpochOrder(40, BATCH, SEED).indices(k))
    assert len(set(torch.cat(one[:2]).tolist())) == 32          # one epoch: no repeats


def test_sharded_sampling_equals_one_process(ranks):
    _, r0, r1 = ranks
    y = torch.arange(len(SAMPLE_SEEDS)) % 3
    one = sample_seeded(sampling_net(), SAMPLE_SEEDS, (2,), steps=2, y=y, batch_size=64)
    assert one.abs().max() > 0.1
    torch.testing.assert_close(r0["samples"], one, rtol=1e-12, atol=1e-12)
    assert torch.equal(r0["samples"], r1["samples"])


def test_sharded_periodic_fid_and_pngs_equal_one_process(ranks):
    """A 2-rank U-Net run's periodic FID (7 seeds: 4 + 3 per rank) equals `fid calc` of its
    final checkpoint in one process; the sample PNG is written once."""
    from meanflow.metrics.fid import fid_of
    root, _, _ = ranks
    lines = [json.loads(s) for s in (root / "image" / "metrics.jsonl").read_text().splitlines()]
    evals = [d for d in lines if d.get("eval") == "fid"]
    assert [d["step"] for d in evals] == [2] and evals[0]["fid_n"] == 7
    torch.set_default_dtype(torch.float32)
    try:
        record = fid_of(root / "image", root / "ref.npz", n=7, steps=1, seed=0, device="cpu",
                        progress=False)
    finally:
        torch.set_default_dtype(torch.float64)
    assert record["fid"] == pytest.approx(evals[0]["fid_nfe1"], rel=1e-5)
    assert [p.name for p in (root / "image" / "samples").iterdir()] == ["step_0000002-nfe1.png"]


def test_a_batch_that_does_not_split_over_the_ranks_is_one_error(ranks, monkeypatch):
    _, r0, r1 = ranks
    for msg in (r0["odd_error"], r1["odd_error"]):
        assert "\n" not in msg and "multiple of 4" in msg
    with pytest.raises(ConfigError, match="multiple of 6"):
        dist_.check_batch_split(16, 2, World(0, 3))
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="3 rank"):      # `meanflow train --dry-run` too
        check_config(make_config(2))


# ------------------------------------------------------------------- single-process pieces

def test_env_world(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert env_world() == World() and not World().enabled
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env_world() == World(3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="torchrun"):
        env_world()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConfigError, match="not an integer"):
        env_world()


def test_jvp_net_takes_the_jvp_and_joint_strategies_refuse_it(float64):
    """u comes from ``net`` (the grad pass), du/dt from ``jvp_net``: with a copy of the net the
    result is unchanged; with another net du/dt changes and u does not."""
    net = sampling_net()
    other = build_model("mlp", dim=2, num_classes=3, **TINY).double()
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()                                 # a constant net: du/dt = 0
    g = torch.Generator().manual_seed(1)
    z, v = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    t = torch.rand(5, generator=g)
    r, y = t * 0.5, torch.arange(5) % 3
    u, d = u_and_dudt(net, z, r, t, v, y)
    u2, d2 = u_and_dudt(net, z, r, t, v, y, jvp_net=sampling_net())
    assert torch.equal(u, u2) and torch.equal(d, d2)
    u3, d3 = u_and_dudt(net, z, r, t, v, y, jvp_net=other)
    assert torch.equal(u, u3) and d.abs().max() > 0 and torch.equal(d3, torch.zeros_like(d3))
    for strategy in ("func", "forward_ad"):
        with pytest.raises(ConfigError, match="one pass"):
            u_and_dudt(net, z, r, t, v, y, strategy=strategy, jvp_net=other)
    loss = MeanFlowLoss(num_classes=3, omega=2.0, kappa=0.5)
    draws = {"r": r, "t": t, "e": v}
    a, _ = loss(net, z, y, generator=torch.Generator().manual_seed(0), **draws)
    b, _ = loss(net, z, y, generator=torch.Generator().manual_seed(0), jvp_net=sampling_net(),
                **draws)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name,shape,options", [
    ("mlp", (2,), TINY),
    ("unet-small", (1, 8, 8), TINY_UNET),
    ("dit-s/2", (3, 8, 8), {"depth": 1, "width": 32, "heads": 2}),
])
def test_every_parameter_gets_a_gradient(name, shape, options, float64):
    """DDP runs with find_unused_parameters=False: every weight (h-embedder and labels
    included) must take part in the grad pass of the MeanFlow loss with guidance."""
    torch.manual_seed(0)
    net = build_model_for_data(name, shape, 4, dict(options)).double()
    loss_fn = MeanFlowLoss(num_classes=4, omega=2.0, kappa=0.5, fraction_r_neq_t=0.5)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, *shape, generator=g), torch.arange(4)
    loss, _ = loss_fn(net, x, y, generator=g, jvp_net=net)
    loss.mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing


def test_gather_sharded_single_process_is_the_identity():
    x = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(gather_sharded(x, 3, World(), torch.device("cpu")), x)
    assert shard(range(7), World(1, 3)) == [1, 4]


def test_torchrun_cli_smoke(tmp_path):
    """`torchrun --standalone --nproc_per_node 2 -m meanflow.cli train` on the CPU (gloo)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "meanflow.cli",
           "train", "--out", str(run), "--steps", "3", "--batch-size", "8", "--device", "cpu",
           "--set", "train.progress=false", "--set", "train.sample_count=0",
           "--set", "model.options.width=16", "--set", "model.options.depth=1"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["step"] for s in lines][-1] == 3
    assert (run / "checkpoints" / "step_0000003" / "state.json").is_file()
