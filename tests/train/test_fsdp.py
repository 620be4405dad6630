"""FSDP2 (``train.fsdp``, torch.distributed.fsdp.fully_shard) on 2 gloo CPU processes.

Spawns of two ranks (module fixtures ``fsdp_ranks``, and ``fsdp_more`` for the slow tests)
train with the weights, gradients and Adam state sharded over the ranks, and the tests compare
their checkpoints (full tensors, the format DDP and one-process runs write) with
single-process references from tests/train/test_distributed.py:

- MLP, float64, 4 Adam steps of 2 ranks x 2 micro-batches with the split JVP (slow: func, and
  split with guidance): the saved weights equal one process trained on the
  concatenated global batch (~1e-16), and the EMA and Adam state equal a DDP run's;
- resuming an FSDP checkpoint in one process (no FSDP) continues that reference exactly, and an
  FSDP run resumes a one-process checkpoint exactly;
- the periodic EMA update (``train.ema_every``) on the shards equals the DDP run's;
- (slow) a tiny DiT (float32, sample PNGs from the gathered EMA) equals its DDP run to float
  precision;
- forward_ad, compile and a single process are refused with one-line ConfigErrors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from meanflow.errors import ConfigError
from meanflow.runs.config import RunConfig, load_config
from meanflow.train.loop import check_config, train

from test_distributed import (F64, WORLD, _free_port, join_gloo,  # noqa: E402
                              max_rel_diff, reference, tiny_config)

# name -> (objective, class-conditional, the test_distributed reference variant)
STRATEGIES = {
    "split": ({"jvp": "split"}, False, "split"),
    "func": ({"jvp": "func"}, False, "func"),
    "guided": ({"jvp": "split", "omega": 2.0, "kappa": 0.5, "label_drop": 0.0}, True, "guided"),
}
DIT = {"depth": 2, "width": 32, "heads": 2}


def fsdp_config(steps: int, name: str = "split", **train_opts) -> RunConfig:
    objective, cond, _ = STRATEGIES[name]
    return tiny_config(steps, objective, cond, **{"fsdp": True, **train_opts})


def dit_config(data: Path, fsdp: bool) -> RunConfig:
    # jvp "split" for both: "auto" would take forward_ad for the DiT on the CPU without FSDP
    return RunConfig.from_dict({
        "model": {"name": "dit-s/2", "options": dict(DIT)},
        "data": {"name": str(data)},
        "objective": {"fraction_r_neq_t": 0.5, "p": 0.5, "jvp": "split"},
        "optim": {"lr": 1e-2},
        "train": {"steps": 3, "batch_size": 8, "log_every": 1, "checkpoint_every": 100,
                  "progress": False, "device": "cpu", "ema_decays": [0.5], "fsdp": fsdp,
                  "sample_count": 4, "sample_steps": [1]}}).validate()


CORE = ("split",)                   # trained in the default run; the rest are slow tests
MORE = tuple(name for name in STRATEGIES if name not in CORE)


def _worker(rank: int, port: int, root: str, more: bool) -> None:
    root = join_gloo(rank, port, root, 120)
    try:
        if not more:
            train(fsdp_config(4), root / "split", dataset=F64())
            train(fsdp_config(4, fsdp=False), root / "ddp", dataset=F64())    # the DDP twin
            train(fsdp_config(4), root / "grow", resume=True, dataset=F64())  # 1 -> 2 ranks
            # the periodic EMA update (float64 arithmetic on the shards) and its DDP twin
            train(fsdp_config(4, ema_every=2), root / "ema2", dataset=F64())
            train(fsdp_config(4, fsdp=False, ema_every=2), root / "ema2-ddp", dataset=F64())
            return
        for name in MORE:
            train(fsdp_config(4, name), root / name, dataset=F64())
        torch.set_default_dtype(torch.float32)
        train(dit_config(root / "imgs.npz", True), root / "dit-fsdp")
        train(dit_config(root / "imgs.npz", False), root / "dit-ddp")
    finally:
        dist.destroy_process_group()


def _spawn(root: Path, more: bool) -> Path:
    import torch.multiprocessing as mp
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        if not more:
            train(fsdp_config(2, fsdp=False), root / "grow", dataset=F64())  # 1 process, 2 steps
        else:
            rng = np.random.default_rng(0)
            np.savez(root / "imgs.npz", x=rng.integers(0, 256, (32, 1, 8, 8), dtype=np.uint8))
        mp.spawn(_worker, args=(_free_port(), str(root), more), nprocs=WORLD, join=True)
    finally:
        torch.set_default_dtype(old)
    return root


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory):
    """The two ranks' split-JVP runs (FSDP, its DDP twin, a resumed one): their root folder.
    About 45 s on 2 busy cores, most of it FSDP's first start."""
    return _spawn(tmp_path_factory.mktemp("fsdp"), more=False)


@pytest.fixture(scope="module")
def fsdp_more(tmp_path_factory):
    """The two ranks' other strategies and the DiT runs (slow)."""
    return _spawn(tmp_path_factory.mktemp("fsdp_more"), more=True)


def saved(run: Path, step: int, part: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:07d}" / f"{part}.safetensors"))


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("name", [*CORE, *(pytest.param(n, marks=pytest.mark.slow)
                                           for n in MORE)])
def test_fsdp_equals_one_process_on_the_global_batch(request, name, float64):
    """du/dt and the gradients are right under fully_shard: after 4 sharded Adam steps the
    gathered weights equal one process trained on the concatenated batch of 16."""
    root = request.getfixturevalue("fsdp_ranks" if name in CORE else "fsdp_more")
    model = saved(root / name, 4)
    ref = reference(STRATEGIES[name][2], [WORLD] * 4)
    assert model.keys() == ref.keys()
    assert max_rel_diff(model, ref) < 1e-10
    assert max_rel_diff(reference(STRATEGIES[name][2], []), ref) > 1e-3   # the weights moved


def test_fsdp_checkpoints_are_those_of_a_ddp_run(fsdp_ranks):
    """Full (gathered) tensors under the same names: model, EMA and Adam state (keyed by
    parameter index) equal the DDP run's, so either run resumes the other's checkpoints."""
    for part in ("model", "ema", "optimizer"):
        got, want = saved(fsdp_ranks / "split", 4, part), saved(fsdp_ranks / "ddp", 4, part)
        assert got.keys() == want.keys()
        assert all(got[k].shape == want[k].shape for k in got)
        assert max_rel_diff(got, want) < 1e-10, part


def test_periodic_ema_on_shards_equals_the_ddp_run(fsdp_ranks):
    """train.ema_every = 2 on sharded weights: the gathered EMA equals the DDP run's, and
    differs from the every-step EMA of the same training (the period was applied)."""
    got, want = saved(fsdp_ranks / "ema2", 4, "ema"), saved(fsdp_ranks / "ema2-ddp", 4, "ema")
    assert got.keys() == want.keys()
    assert max_rel_diff(got, want) < 1e-10
    assert max_rel_diff(saved(fsdp_ranks / "ema2", 4), saved(fsdp_ranks / "split", 4)) < 1e-10
    assert max_rel_diff(got, saved(fsdp_ranks / "split", 4, "ema")) > 1e-6


def test_resume_an_fsdp_checkpoint_in_one_process_and_vice_versa(fsdp_ranks, float64):
    """2 FSDP ranks to step 4, then one process (train.fsdp=false, a resumable key) to step 6:
    the global-batch reference; and 1 process to step 2, then 2 FSDP ranks to step 4."""
    assert max_rel_diff(saved(fsdp_ranks / "grow", 4), reference("split", [1, 1, 2, 2])) < 1e-10
    shrink = fsdp_ranks / "shrink"
    shutil.copytree(fsdp_ranks / "split", shrink)
    train(fsdp_config(6, fsdp=False), shrink, resume=True, dataset=F64())
    ref = reference("split", [WORLD] * 4 + [1, 1])
    assert max_rel_diff(saved(shrink, 6), ref) < 1e-10
    ddp = fsdp_ranks / "ddp-shrink"
    shutil.copytree(fsdp_ranks / "ddp", ddp)
    train(fsdp_config(6, fsdp=False), ddp, resume=True, dataset=F64())
    for part in ("model", "ema", "optimizer"):
        assert max_rel_diff(saved(shrink, 6, part), saved(ddp, 6, part)) < 1e-10, part


@pytest.mark.slow
def test_fsdp_dit_equals_its_ddp_run(fsdp_more):
    """A 2-block DiT sharded per transformer block and at the root: weights and EMA after 3
    steps equal the DDP run's to float32 precision, and the sample PNG (from the EMA gathered
    to every rank) is written."""
    for part in ("model", "ema"):
        got = saved(fsdp_more / "dit-fsdp", 3, part)
        want = saved(fsdp_more / "dit-ddp", 3, part)
        assert got.keys() == want.keys()
        assert max_rel_diff(got, want) < 1e-5, part
    assert [p.name for p in (fsdp_more / "dit-fsdp" / "samples").iterdir()] == [
        "step_0000003-nfe1.png"]


@pytest.mark.parametrize("overrides,needle", [
    (["objective.jvp=forward_ad"], "use objective.jvp=split"),
    (["train.compile=true"], "train.fsdp with train.compile"),
])
def test_what_fsdp_does_not_do_is_one_line_errors(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.fsdp=true", *overrides])
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_fsdp_needs_torchrun(monkeypatch, tmp_path):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    cfg = load_config(None, ["train.fsdp=true", "train.steps=1", "train.progress=false"])
    with pytest.raises(ConfigError, match="launch with torchrun, or set train.fsdp=false"):
        check_config(cfg)
    with pytest.raises(ConfigError, match="train.fsdp=false"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
