"""The EMA warm-up (docs/method.md, EMA warm-up): no average keeps the initialisation, the
paper's decay is exact once the warm-up ends, and a short toy run samples at least as well
from its default (EMA) weights as from its raw ones."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import meanflow
from meanflow.data import build_dataset
from meanflow.metrics.distances import energy_distance
from meanflow.runs.config import RunConfig
from meanflow.train import EMA
from meanflow.train.ema import warmup_decay
from meanflow.train.loop import train


def test_the_warmup_starts_with_a_copy_and_ends_at_the_decay():
    """β_1 = 0, β_k = (k - 1)/(k + 9) below d, rising, and exactly d from about
    k = ceil((1 + 9d)/(1 - d)) on."""
    assert warmup_decay(0.999, 1) == 0.0
    assert warmup_decay(0.999, 2) == 1 / 11
    assert warmup_decay(0.999, 300) == 299 / 309
    for d in (0.995, 0.999, 0.9999, 0.9999 ** 16):
        end = math.ceil((1 + 9 * d) / (1 - d))       # up to the rounding of d itself
        assert warmup_decay(d, end - 2) < d
        assert all(warmup_decay(d, k) == d for k in (end + 1, end + 2, 10 * end))
        assert all(warmup_decay(d, k) <= warmup_decay(d, k + 1) for k in range(1, end + 2))


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5))


@pytest.mark.parametrize("every", [1, 16])
def test_after_the_warmup_an_update_is_the_papers_bit_for_bit(every):
    """Past the warm-up the update of a warm-up EMA equals that of an EMA without it, bit for
    bit (the same lerp weight, the same float64 path for every > 1); its first update copies
    the weights, where an EMA without warm-up keeps the initialisation."""
    init, trained = _net(0), _net(1)
    warm = EMA(init, [0.999, 0.9999], every=every, warmup=True)
    plain = EMA(init, [0.999, 0.9999], every=every, warmup=False)
    warm.update(trained, 1)
    plain.update(trained, 1)
    for key, shadow in warm.shadows.items():
        for name, value in trained.state_dict().items():
            assert torch.equal(shadow[name], value), (key, name)
        assert not torch.equal(plain.shadows[key]["0.weight"], trained.state_dict()["0.weight"])
    plain.load_state_dict(warm.state_dict())
    late = 100_000            # beyond the end of the warm-up of 0.9999 (99 991 updates)
    warm.update(_net(2), late)
    plain.update(_net(2), late)
    for key in warm.shadows:
        for name in warm.shadows[key]:
            assert torch.equal(warm.shadows[key][name], plain.shadows[key][name]), (key, name)
    assert warm.step(_net(3), late * every) and plain.step(_net(3), late * every)
    assert all(torch.equal(warm.shadows[k][n], plain.shadows[k][n])
               for k in warm.shadows for n in warm.shadows[k])


def _toy(warmup: bool) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"options": {"width": 64, "depth": 2, "emb_dim": 16}},
        "data": {"name": "8gaussians"},
        "train": {"steps": 300, "batch_size": 128, "ema_decays": [0.999], "seed": 0,
                  "ema_warmup": warmup, "progress": False, "sample_count": 0,
                  "log_every": 300, "checkpoint_every": 300},
    }).validate()


def _distances(run) -> dict[str, float]:
    ref, _ = build_dataset("8gaussians").batch(2000, torch.Generator().manual_seed(7))
    out = {}
    for ema in ("auto", None):
        model = meanflow.load(run, ema=ema)
        out[model.weights] = energy_distance(model.sample(2000, seed=1_000_000).samples, ref)
    return out


@pytest.mark.slow
def test_a_300_step_run_samples_from_its_default_weights_as_well_as_from_its_raw_ones(
        tmp_path):
    """300 steps on 8gaussians, EMA 0.999 (the default decay): with the warm-up the default
    (EMA) weights are at least as close to the data as the raw ones (energy distance, fixed
    seeds); without it they hold 0.999^300 = 0.74 of the initialisation and are far off."""
    warm = _distances(train(_toy(True), tmp_path / "warm").parent.parent)
    cold = _distances(train(_toy(False), tmp_path / "cold").parent.parent)
    assert warm["ema_0.999"] <= warm["model"], warm
    assert cold["ema_0.999"] > 5 * warm["ema_0.999"], (warm, cold)
    assert cold["model"] == warm["model"]      # the EMA does not touch training
