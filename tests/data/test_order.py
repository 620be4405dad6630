"""Finite sources give chosen samples (``take``), and ``batch`` is ``take`` of uniform draws;
:class:`EpochOrder` visits a dataset epoch by epoch without replacement, in an order that does
not depend on the number of processes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from meanflow.data import (ArraySamples, BatchSource, EpochOrder, FiniteSource, ImageArray,
                           LatentShards, PointCloud, build_dataset, epoch_seed)
from meanflow.data.latents import INDEX_NAME, LATENT_FORMAT, LATENT_VERSION, shard_name
from meanflow.errors import ConfigError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- EpochOrder

def test_each_epoch_visits_s_times_b_distinct_indices_once():
    """N = 50, B = 16: 3 steps an epoch take 48 distinct indices (none twice); 2 are dropped."""
    order = EpochOrder(50, 16, seed=7)
    assert order.steps_per_epoch == 3
    for epoch in range(4):
        taken = torch.cat([order.indices(epoch * 3 + i) for i in range(3)])
        assert taken.shape == (48,) and taken.dtype == torch.int64
        assert len(set(taken.tolist())) == 48
        assert bool(((taken >= 0) & (taken < 50)).all())


def test_the_dropped_tail_differs_between_epochs():
    order = EpochOrder(50, 16, seed=0)
    dropped = []
    for epoch in range(6):
        seen = set(torch.cat([order.indices(epoch * 3 + i) for i in range(3)]).tolist())
        dropped.append(frozenset(set(range(50)) - seen))
    assert all(len(d) == 2 for d in dropped)
    assert len(set(dropped)) > 1
    # and the epochs are differently ordered, not one permutation repeated
    assert not torch.equal(order.permutation(0), order.permutation(1))


def test_the_order_depends_only_on_seed_epoch_and_step():
    """Step k's global batch is the slice (k % S) * B of the permutation drawn from a generator
    seeded by (seed, k // S); a fresh object, another seed, the cache: as expected."""
    order = EpochOrder(50, 16, seed=3)
    for step in (0, 2, 3, 7, 11, 2):          # back to an earlier epoch: the cache is redone
        epoch, i = divmod(step, 3)
        perm = torch.randperm(50, generator=gen(epoch_seed(3, epoch)))
        assert torch.equal(order.indices(step), perm[i * 16:(i + 1) * 16])
        assert torch.equal(EpochOrder(50, 16, seed=3).indices(step), order.indices(step))
    assert not torch.equal(EpochOrder(50, 16, seed=4).indices(0), order.indices(0))
    assert order.position(7) == (2, 1)


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_shares_make_up_the_one_process_batch(world):
    """W ranks, each taking its contiguous share [r B / W, (r + 1) B / W), give exactly the
    global batch of one process, step after step."""
    order = EpochOrder(70, 16, seed=1)
    share = 16 // world
    for step in range(10):
        parts = [order.indices(step, r * share, (r + 1) * share) for r in range(world)]
        assert torch.equal(torch.cat(parts), order.indices(step))


def test_too_few_samples_for_one_batch_is_refused():
    with pytest.raises(ConfigError, match="no whole batch.*data.order=random"):
        EpochOrder(10, 16, seed=0)
    assert EpochOrder(16, 16, seed=0).steps_per_epoch == 1
    with pytest.raises(ValueError):
        EpochOrder(20, 16, seed=0).indices(0, 8, 17)


def test_epoch_seeds_are_not_step_seeds():
    from meanflow.train.schedule import step_seed
    steps = {step_seed(s, r, k) for s in range(3) for r in range(4) for k in range(50)}
    epochs = {epoch_seed(s, e) for s in range(3) for e in range(50)}
    assert not steps & epochs and len(epochs) == 150


# ---------------------------------------------------------------------------- take / batch

def _images(n: int = 20) -> ImageArray:
    rng = np.random.default_rng(0)
    return ImageArray(torch.from_numpy(rng.integers(0, 256, (n, 1, 4, 4), dtype=np.uint8)),
                      torch.arange(n) % 3, hflip=True)


def test_image_take_returns_the_chosen_images_and_flips_from_the_generator():
    data = _images()
    index = torch.tensor([5, 0, 5, 19])
    x, y = data.take(index, gen(1))
    flips = torch.randint(0, 2, (4,), generator=gen(1)).bool()
    plain = data.images[index].to(torch.float32) / 127.5 - 1
    expected = torch.where(flips[:, None, None, None], plain.flip(-1), plain)
    assert torch.equal(x, expected) and torch.equal(y, index % 3)
    assert flips.any() and not flips.all()        # both cases exercised
    x2, _ = ImageArray(data.images, hflip=False).take(index, gen(1))
    assert torch.equal(x2, plain)


@pytest.mark.parametrize("make", ["images", "points", "arrays"])
def test_batch_is_take_of_uniform_draws_with_the_same_generator(make):
    """The with-replacement draw of ``batch`` (data.order random) is bit-identical to what it
    was: indices ``randint(0, N, (B,))`` from the generator, then ``take`` with it."""
    rng = np.random.default_rng(1)
    data = {"images": _images(),
            "points": PointCloud(torch.from_numpy(rng.normal(size=(20, 3))),
                                 torch.arange(20) % 4),
            "arrays": ArraySamples(torch.from_numpy(rng.normal(size=(20, 2, 3, 3))),
                                   scale=0.5)}[make]
    x, y = data.batch(12, gen(9))
    g = gen(9)
    index = torch.randint(0, 20, (12,), generator=g)
    x2, y2 = data.take(index, g)
    assert torch.equal(x, x2) and (y is None and y2 is None or torch.equal(y, y2))
    if make != "images":
        rows = data.data[index] * (0.5 if make == "arrays" else 1.0)
        assert torch.equal(x, rows)


def test_take_checks_its_arguments():
    data = PointCloud(torch.randn(10, 2))
    for bad in (torch.tensor([0, 10]), torch.tensor([-1]), torch.tensor([[0, 1]]),
                torch.tensor([0.0, 1.0]), torch.tensor([], dtype=torch.int64), [0, 1]):
        with pytest.raises(ConfigError, match="indices"):
            data.take(bad, gen(0))
    with pytest.raises(ConfigError, match="generator"):
        data.take(torch.tensor([0]), None)


def test_finite_sources_follow_the_protocol_and_toys_do_not():
    assert isinstance(_images(), FiniteSource)
    assert isinstance(PointCloud(torch.randn(4, 2)), FiniteSource)
    toy = build_dataset("moons")
    assert isinstance(toy, BatchSource) and not isinstance(toy, FiniteSource)
    assert not hasattr(toy, "__len__")


def _latent_folder(root, n: int = 11, shard_size: int = 4, labelled: bool = True):
    """A latent folder written by hand (the format of meanflow prepare-latents): returns the
    folder and the full (mean, std) tensors."""
    rng = torch.Generator().manual_seed(0)
    mean = torch.randn(n, 2, 3, 3, generator=rng)
    std = torch.rand(n, 2, 3, 3, generator=rng) + 0.1
    labels = torch.arange(n) % 3 if labelled else torch.full((n,), -1)
    shards = (n + shard_size - 1) // shard_size
    (root / "shards").mkdir(parents=True)
    for s in range(shards):
        rows = slice(s * shard_size, min((s + 1) * shard_size, n))
        save_file({"mean": mean[rows].contiguous(), "std": std[rows].contiguous(),
                   "index": torch.arange(n)[rows].contiguous(),
                   "label": labels[rows].contiguous()},
                  str(root / shard_name(s)), metadata={"plan_id": "p1", "shard": str(s)})
    index = {"format": LATENT_FORMAT, "version": LATENT_VERSION, "complete": True,
             "plan_id": "p1", "num_images": n, "shard_size": shard_size, "num_shards": shards,
             "latent_shape": [2, 3, 3], "dtype": "float32", "scale": 0.5, "vae": {},
             "num_classes": 3 if labelled else None, "class_names": None}
    (root / INDEX_NAME).write_text(json.dumps(index))
    return root, mean, std


@pytest.mark.parametrize("in_memory", [True, False])
def test_latent_take_resamples_the_posterior_of_the_chosen_images(tmp_path, in_memory):
    """take: (mean + std * e) * scale of the given images (across shards, unsorted, repeated),
    e from the generator; batch is take of uniform draws with the same generator."""
    root, mean, std = _latent_folder(tmp_path / "lat")
    data = LatentShards(root, in_memory=in_memory)
    assert isinstance(data, FiniteSource) and len(data) == 11
    index = torch.tensor([10, 0, 5, 5, 3])
    x, y = data.take(index, gen(2))
    e = torch.randn((5, 2, 3, 3), generator=gen(2))
    torch.testing.assert_close(x, (mean[index] + std[index] * e) * 0.5, rtol=0, atol=0)
    assert torch.equal(y, index % 3)
    xb, yb = data.batch(6, gen(4))
    g = gen(4)
    x2, y2 = data.take(torch.randint(0, 11, (6,), generator=g), g)
    assert torch.equal(xb, x2) and torch.equal(yb, y2)
    det, _ = LatentShards(root, sample_posterior=False, in_memory=in_memory).take(index, gen(2))
    assert torch.equal(det, mean[index] * 0.5)
