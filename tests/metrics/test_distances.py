"""Energy distance and sliced Wasserstein: exact identities and closed forms for Gaussians."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm

from meanflow.errors import ConfigError
from meanflow.metrics import energy_distance, sliced_wasserstein


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=gen(seed), dtype=torch.float64)


def brute_energy(a: torch.Tensor, b: torch.Tensor) -> float:
    """The definition, with explicit all-pairs distances and U-statistic within-set means."""
    def dist(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (u[:, None, :] - v[None, :, :]).norm(dim=-1)
    n, m = len(a), len(b)
    within_a = dist(a, a).sum() / (n * (n - 1))
    within_b = dist(b, b).sum() / (m * (m - 1))
    return float(2 * dist(a, b).mean() - within_a - within_b)


# ----------------------------------------------------------------------------- energy distance


def test_energy_hand_computed() -> None:
    a = torch.tensor([[0.0], [1.0]])
    b = torch.tensor([[0.0], [3.0]])
    # cross mean (0 + 3 + 1 + 2) / 4 = 1.5; within a: 1; within b: 3
    assert energy_distance(a, b) == pytest.approx(2 * 1.5 - 1 - 3, abs=1e-12)


@pytest.mark.parametrize("block_size", [5, 64, 2048])
def test_energy_blocks_match_brute_force(block_size: int) -> None:
    a, b = randn(130, 3, 0), randn(97, 3, 1) + 0.4
    assert energy_distance(a, b, block_size=block_size) == pytest.approx(
        brute_energy(a, b), rel=1e-10, abs=1e-12)


def test_energy_matrix_product_path_for_high_dimension() -> None:
    a, b = randn(90, 12, 21), randn(70, 12, 22) * 1.2
    assert energy_distance(a, b, block_size=16) == pytest.approx(brute_energy(a, b), rel=1e-9)


def test_energy_symmetric_and_translation_invariant_in_float32() -> None:
    a, b = randn(200, 2, 2), randn(150, 2, 3) * 1.5
    value = energy_distance(a, b)
    assert energy_distance(b, a) == pytest.approx(value, rel=1e-12)
    shift = torch.tensor([1e4, -3e3], dtype=torch.float64)
    assert energy_distance(a + shift, b + shift) == pytest.approx(value, rel=1e-8)
    assert energy_distance(a.float(), b.float()) == pytest.approx(value, rel=1e-5)


def test_energy_of_a_set_with_itself_is_the_u_statistic_bias() -> None:
    # a vs a: 2 S / N^2 - 2 S / (N (N - 1)) = -(2 / N) * mean_{i != j} |a_i - a_j|
    a = randn(300, 2, 4)
    n = len(a)
    mean_within = float((a[:, None] - a[None]).norm(dim=-1).sum()) / (n * (n - 1))
    assert energy_distance(a, a) == pytest.approx(-2 / n * mean_within, rel=1e-9)


def test_energy_same_distribution_is_near_zero() -> None:
    # two independent samples of N(0, I_2): the estimate is unbiased for 0 (sd ~ 4e-4 here)
    value = energy_distance(randn(4000, 2, 5), randn(4000, 2, 6))
    assert abs(value) < 3e-3
    assert energy_distance(randn(4000, 2, 7), randn(4000, 2, 8) + 0.5) > 0.05


@pytest.mark.parametrize("delta", [0.5, 1.0, 2.0])
def test_energy_matches_closed_form_for_shifted_1d_gaussians(delta: float) -> None:
    # X ~ N(0, 1), Y ~ N(delta, 1): X - Y ~ N(-delta, 2), X - X' ~ N(0, 2)
    s = math.sqrt(2.0)
    mean_xy = 2 * s * norm.pdf(delta / s) + delta * (2 * norm.cdf(delta / s) - 1)
    mean_xx = 2 / math.sqrt(math.pi)
    exact = 2 * mean_xy - 2 * mean_xx
    estimate = energy_distance(randn(4000, 1, 10), randn(4000, 1, 11) + delta)
    # Monte Carlo sd at N = M = 4000 is about 0.023 for delta = 1 (checked by simulation)
    assert estimate == pytest.approx(exact, abs=0.09)


# ----------------------------------------------------------------------------- sliced W2


def test_sliced_1d_is_exact_w2() -> None:
    a = randn(500, 1, 12)
    # a shift by m moves every quantile by m: W2 = |m| (θ = ±1 in 1-D)
    assert sliced_wasserstein(a, a + 2.5, num_projections=3) == pytest.approx(2.5, rel=1e-12)
    # unequal sizes: quantile functions {0 on (0, 1/2], 1 on (1/2, 1]} vs thirds of 0, 1, 2:
    # they differ by 1 on (1/3, 1/2] and (2/3, 1], so W2^2 = 1/6 + 1/3
    a2, b3 = torch.tensor([[0.0], [1.0]]), torch.tensor([[2.0], [0.0], [1.0]])
    assert sliced_wasserstein(a2, b3, num_projections=4) == pytest.approx(math.sqrt(0.5))
    assert sliced_wasserstein(b3, a2, num_projections=4) == pytest.approx(math.sqrt(0.5))


def test_sliced_repeated_sample_is_zero() -> None:
    # the same empirical distribution with different N: distance exactly 0
    a = randn(333, 3, 13)
    twice = torch.cat([a, a.flip(0)])
    assert sliced_wasserstein(a, twice, num_projections=64) == pytest.approx(0.0, abs=1e-12)


def test_sliced_shift_in_2d_is_half_the_squared_shift() -> None:
    # projections of a + m differ by m·θ, so SW2^2 = E_θ[(m·θ)^2] = |m|^2 / 2 in 2-D.
    # With P = 4096 directions the sd of the estimate of SW2^2 is 25 * sqrt(1/8) / 64 ~ 0.14.
    a = randn(200, 2, 14)
    m = torch.tensor([3.0, 4.0], dtype=torch.float64)
    sw = sliced_wasserstein(a, a + m, num_projections=4096, generator=gen(0))
    assert sw**2 == pytest.approx(12.5, abs=0.7)


def test_sliced_independent_shifted_gaussians() -> None:
    m = torch.tensor([3.0, 4.0], dtype=torch.float64)
    a, b = randn(3000, 2, 15), randn(3000, 2, 16) + m
    sw = sliced_wasserstein(a, b, num_projections=1024, generator=gen(1))
    assert sw**2 == pytest.approx(12.5, abs=1.4)  # sd ~ 0.35 (directions and sampling)
    same = sliced_wasserstein(randn(3000, 2, 17), randn(3000, 2, 18))
    assert same < 0.1


def test_sliced_symmetric_and_deterministic() -> None:
    a, b = randn(400, 3, 19), randn(300, 3, 20) * 2
    value = sliced_wasserstein(a, b)
    assert sliced_wasserstein(a, b) == value  # default generator is seeded
    assert sliced_wasserstein(b, a) == pytest.approx(value, rel=1e-12)
    assert sliced_wasserstein(a, b, generator=gen(5)) == sliced_wasserstein(
        a, b, generator=gen(5))


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("a", "b", "problem"),
    [
        (torch.zeros(5), torch.zeros(5, 1), "2-D"),
        (torch.zeros(5, 2), torch.zeros(5, 3), "different dimensions"),
        (torch.zeros(5, 2), torch.full((5, 2), float("nan")), "NaN or infinite"),
        (torch.zeros(5, 2), torch.full((5, 2), float("inf")), "NaN or infinite"),
        (torch.zeros(0, 2), torch.zeros(5, 2), "at least"),
        (torch.zeros(5, 2, dtype=torch.complex64), torch.zeros(5, 2), "real-valued"),
        ([[0.0, 1.0]], torch.zeros(5, 2), "torch.Tensor"),
    ],
)
def test_bad_inputs_raise_config_error(a: object, b: object, problem: str) -> None:
    for metric in (energy_distance, sliced_wasserstein):
        with pytest.raises(ConfigError, match=problem):
            metric(a, b)  # type: ignore[arg-type]


def test_bad_options_raise_config_error() -> None:
    a = torch.zeros(4, 2)
    with pytest.raises(ConfigError, match="at least 2"):
        energy_distance(a[:1], a)
    with pytest.raises(ConfigError, match="block_size"):
        energy_distance(a, a, block_size=0)
    with pytest.raises(ConfigError, match="num_projections"):
        sliced_wasserstein(a, a, num_projections=0)
    with pytest.raises(ConfigError, match="generator"):
        sliced_wasserstein(a, a, generator=0)  # type: ignore[arg-type]
