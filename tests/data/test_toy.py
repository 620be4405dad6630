"""Toy datasets: reproducibility, the BatchSource protocol, and the geometry of each label."""

from __future__ import annotations

import math

import pytest
import torch

from meanflow.data import (
    TOY_DATASETS,
    BatchSource,
    Checkerboard,
    EightGaussians,
    Spirals,
    TwoMoons,
    build_dataset,
)
from meanflow.errors import ConfigError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_protocol_dtypes_and_label_range(name: str) -> None:
    data = build_dataset(name)
    assert isinstance(data, BatchSource)
    assert data.shape == (2,)
    x, y = data.batch(500, gen(0))
    assert x.shape == (500, 2) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert y is not None and y.shape == (500,) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < data.num_classes
    assert set(y.tolist()) == set(range(data.num_classes))
    assert bool(torch.isfinite(x).all())
    assert float(x.abs().max()) < 6.0  # roughly within [-4, 4]^2 (plus noise tails)


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_same_generator_state_gives_identical_batch(name: str) -> None:
    data = build_dataset(name)
    x1, y1 = data.batch(256, gen(7))
    x2, y2 = data.batch(256, gen(7))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = data.batch(256, gen(8))
    assert not torch.equal(x1, x3)
    # the global RNG plays no part
    g = gen(7)
    torch.manual_seed(123)
    x4, _ = data.batch(256, g)
    assert torch.equal(x1, x4)


def test_eight_gaussians_moments_and_modes() -> None:
    data = EightGaussians(radius=4.0, std=0.5)
    expected = torch.tensor([[4 * math.cos(2 * math.pi * k / 8), 4 * math.sin(2 * math.pi * k / 8)]
                             for k in range(8)])
    torch.testing.assert_close(data.centers, expected)
    x, y = data.batch(40_000, gen(1))
    # overall mean 0: per-coordinate variance is radius^2/2 + std^2 = 8.25, sd of mean ~0.014
    assert x.mean(0).abs().max() < 0.07
    # per-component spread equals std
    residual = x - data.centers[y]
    assert residual.std(0).sub(0.5).abs().max() < 0.01
    assert residual.mean(0).abs().max() < 0.01
    # each point's nearest centre is its label (modes 3.06 apart, 3 sd each side)
    nearest = torch.cdist(x, data.centers).argmin(1)
    assert (nearest == y).float().mean() > 0.95
    counts = torch.bincount(y, minlength=8).float() / len(y)
    assert counts.sub(1 / 8).abs().max() < 0.01


def test_checkerboard_points_lie_on_their_dark_square() -> None:
    data = Checkerboard()
    x, y = data.batch(20_000, gen(2))
    assert float(x.min()) >= -4.0 and float(x.max()) <= 4.0
    col = torch.floor((x[:, 0] + 4) / 2).long().clamp(0, 3)
    row = torch.floor((x[:, 1] + 4) / 2).long().clamp(0, 3)
    assert bool(((row + col) % 2 == 0).all())  # dark squares only
    square = row * 4 + col
    for k in range(8):
        on_k = square[y == k]
        assert on_k.numel() > 0 and bool((on_k == on_k[0]).all())  # one square per label
    assert len({int(square[y == k][0]) for k in range(8)}) == 8  # labels -> distinct squares
    # uniform on each square: its mean is the square's centre, its variance 2^2 / 12
    centres = data.corners[y] + 1.0
    torch.testing.assert_close((x - centres).mean(0), torch.zeros(2), atol=0.03, rtol=0)
    torch.testing.assert_close((x - centres).var(0), torch.full((2,), 1 / 3), atol=0.02, rtol=0)


def test_two_moons_geometry_without_noise() -> None:
    x, y = TwoMoons(noise=0.0).batch(4000, gen(3))
    unscaled = x.double() / 2 + torch.tensor([0.5, 0.25], dtype=torch.float64)
    moon0, moon1 = unscaled[y == 0], unscaled[y == 1]
    # moon 0: upper unit half circle about (0, 0); moon 1: lower one about (1, 1/2)
    torch.testing.assert_close(moon0.norm(dim=1), torch.ones(len(moon0), dtype=torch.float64),
                               atol=1e-5, rtol=0)
    assert bool((moon0[:, 1] >= -1e-6).all())
    centre1 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close((moon1 - centre1).norm(dim=1),
                               torch.ones(len(moon1), dtype=torch.float64), atol=1e-5, rtol=0)
    assert bool((moon1[:, 1] <= 0.5 + 1e-6).all())


def test_two_moons_balanced_centred_and_noisy() -> None:
    x, y = TwoMoons(noise=0.1).batch(20_000, gen(4))
    assert abs(float(y.float().mean()) - 0.5) < 0.02
    assert x.mean(0).abs().max() < 0.05
    clean, _ = TwoMoons(noise=0.0).batch(20_000, gen(4))
    assert abs(float((x - clean).std()) - 0.1) < 0.005  # same draws, noise added on top


def test_spirals_geometry_without_noise() -> None:
    data = Spirals(noise=0.0)
    x, y = data.batch(4000, gen(5))
    x = x.double()
    radius = x.norm(dim=1)
    assert float(radius.max()) <= data.max_radius + 1e-5
    s = radius / data.max_radius
    angle = 2 * math.pi * data.turns * s + math.pi * y.double()
    predicted = torch.stack([torch.cos(angle), torch.sin(angle)], 1) * radius[:, None]
    torch.testing.assert_close(x, predicted, atol=1e-4, rtol=0)  # label = arm, exactly


def test_spirals_balanced_and_symmetric() -> None:
    x, y = Spirals(noise=0.1).batch(20_000, gen(6))
    assert abs(float(y.float().mean()) - 0.5) < 0.02
    assert float(x.abs().max()) < 4.5
    # arm 1 is arm 0 rotated by π, so the two arms' means are opposite
    torch.testing.assert_close(x[y == 0].mean(0), -x[y == 1].mean(0), atol=0.06, rtol=0)


def test_build_dataset_passes_options_and_rejects_bad_ones() -> None:
    data = build_dataset("8Gaussians", std=0.25, radius=2.0)
    assert isinstance(data, EightGaussians) and data.std == 0.25 and data.radius == 2.0
    assert isinstance(build_dataset("moons", noise=0.0), TwoMoons)
    with pytest.raises(ConfigError, match="unknown dataset 'foo'.*8gaussians.*npz"):
        build_dataset("foo")
    with pytest.raises(ConfigError, match="sigma"):
        build_dataset("8gaussians", sigma=1.0)
    with pytest.raises(ConfigError, match="std"):
        EightGaussians(std=-1.0)
    with pytest.raises(ConfigError, match="noise"):
        Spirals(noise=float("nan"))


def test_batch_arguments_are_validated() -> None:
    data = Checkerboard()
    with pytest.raises(ConfigError, match="batch_size"):
        data.batch(0, gen(0))
    with pytest.raises(ConfigError, match="generator"):
        data.batch(4, 0)  # type: ignore[arg-type]
