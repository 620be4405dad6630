"""The (r, t) sampler against its distribution (SPEC §1, paper §4.3).

Statistical tolerances are a few standard errors with a fixed seed, so the tests are both
deterministic and able to fail for a wrong distribution.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logit, ndtr

from meanflow import TIME_SAMPLERS, ConfigError, TimeSampler

N = 200_000


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ln_cdf(x: np.ndarray | float, mu: float, sigma: float) -> np.ndarray:
    """CDF of LN(mu, sigma) = sigmoid(mu + sigma·n): Φ((logit x - mu) / sigma)."""
    return ndtr((logit(x) - mu) / sigma)


def binomial_tol(p: float, n: int, k: float = 5.0) -> float:
    return k * math.sqrt(p * (1 - p) / n) + 1e-12


@pytest.mark.parametrize("fraction", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("kind", TIME_SAMPLERS)
def test_times_are_ordered_and_in_range(kind, fraction):
    """0 <= r <= t <= 1 for every sample, shapes (B,), float32."""
    r, t = TimeSampler(kind=kind, mu=-2.0, sigma=2.0, fraction_r_neq_t=fraction)(
        20_000, generator=gen(0))
    assert r.shape == t.shape == (20_000,) and r.dtype == t.dtype == torch.float32
    assert bool((r >= 0).all()) and bool((t <= 1).all()) and bool((r <= t).all())


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("kind", ["logit_normal", "uniform"])
def test_fraction_of_r_neq_t(kind, fraction):
    """The share of samples with r != t is fraction_r_neq_t (binomial tolerance, n = 200k)."""
    r, t = TimeSampler(kind=kind, fraction_r_neq_t=fraction)(N, generator=gen(1))
    observed = float((r != t).double().mean())
    if fraction == 0.0:
        assert observed == 0.0
    else:  # two float32 draws can tie with tiny probability
        assert abs(observed - fraction) <= binomial_tol(fraction, N) + 1e-4


@pytest.mark.parametrize("fraction", [0.25, 0.75, 1.0])
def test_fraction_of_r_neq_t_v1(fraction):
    """"v1": r := t with probability 1 - f, then r := min(r, t), so r != t exactly when the draw
    is kept AND r < t: share f·P(r < t) = f·Φ((mu - mu_r) / sqrt(sigma² + sigma_r²)) for
    independent logit-normals."""
    sampler = TimeSampler(kind="v1", mu=-0.6, sigma=1.6, mu_r=-4.0, sigma_r=1.6,
                          fraction_r_neq_t=fraction)
    r, t = sampler(N, generator=gen(2))
    expected = fraction * float(ndtr((-0.6 + 4.0) / math.hypot(1.6, 1.6)))
    observed = float((r != t).double().mean())
    assert abs(observed - expected) <= binomial_tol(expected, N)
    assert bool((r <= t).all())


@pytest.mark.parametrize("mu,sigma", [(-0.4, 1.0), (-2.0, 2.0), (0.5, 0.3)])
def test_sample_t_is_logit_normal(mu, sigma):
    """logit(sample_t) ~ N(mu, sigma): mean and std within 4 standard errors."""
    t = TimeSampler(kind="logit_normal", mu=mu, sigma=sigma).sample_t(N, generator=gen(3))
    assert t.shape == (N,) and bool(((t > 0) & (t < 1)).all())
    logits = logit(t.double().numpy())
    assert abs(logits.mean() - mu) <= 4 * sigma / math.sqrt(N)
    assert abs(logits.std() - sigma) <= 4 * sigma / math.sqrt(2 * N)


def test_sample_t_uniform():
    """kind "uniform": sample_t is U(0, 1) (mean 1/2, variance 1/12, CDF at quartiles)."""
    t = TimeSampler(kind="uniform").sample_t(N, generator=gen(4)).double()
    assert abs(float(t.mean()) - 0.5) <= 4 * math.sqrt(1 / 12 / N)
    assert abs(float(t.var()) - 1 / 12) <= 4 * math.sqrt(1 / 180 / N)
    for q in (0.25, 0.5, 0.75):
        assert abs(float((t <= q).double().mean()) - q) <= binomial_tol(q, N)


XS = [0.05, 0.2, 0.4, 0.6, 0.8, 0.95]


@pytest.mark.parametrize("kind,mu,sigma", [("logit_normal", -0.4, 1.0),
                                            ("logit_normal", -2.0, 2.0), ("uniform", 0, 1)])
def test_t_is_max_and_r_is_min_of_two_draws(kind, mu, sigma):
    """t = max of two i.i.d. draws: P(t <= x) = F(x)²; with fraction 1, r = min:
    P(r <= x) = 1 - (1 - F(x))². F is the LN(mu, sigma) CDF (or x for uniform)."""
    r, t = TimeSampler(kind=kind, mu=mu, sigma=sigma, fraction_r_neq_t=1.0)(N, generator=gen(5))
    r, t = r.double().numpy(), t.double().numpy()
    for x in XS:
        f = x if kind == "uniform" else float(ln_cdf(x, mu, sigma))
        p_t, p_r = f ** 2, 1 - (1 - f) ** 2
        assert abs((t <= x).mean() - p_t) <= binomial_tol(p_t, N), x
        assert abs((r <= x).mean() - p_r) <= binomial_tol(p_r, N), x


def test_r_given_r_neq_t_is_the_min_draw():
    """With fraction 0.25 the samples with r != t keep the min-of-two law of r."""
    mu, sigma = -0.4, 1.0
    r, t = TimeSampler(mu=mu, sigma=sigma, fraction_r_neq_t=0.25)(N, generator=gen(6))
    kept = (r != t).numpy()
    r_kept = r.double().numpy()[kept]
    for x in XS:
        p = 1 - (1 - float(ln_cdf(x, mu, sigma))) ** 2
        assert abs((r_kept <= x).mean() - p) <= binomial_tol(p, kept.sum()), x


def test_v1_marginals():
    """"v1": t ~ LN(mu, sigma) alone (one draw, not a max); with fraction 1,
    r = min(r_draw, t) with r_draw ~ LN(mu_r, sigma_r) independent of t:
    P(r <= x) = 1 - (1 - F_r(x))(1 - F_t(x))."""
    mu, sigma, mu_r, sigma_r = -0.6, 1.6, -4.0, 1.6
    r, t = TimeSampler(kind="v1", mu=mu, sigma=sigma, mu_r=mu_r, sigma_r=sigma_r,
                       fraction_r_neq_t=1.0)(N, generator=gen(7))
    r, t = r.double().numpy(), t.double().numpy()
    for x in XS:
        f_t, f_r = float(ln_cdf(x, mu, sigma)), float(ln_cdf(x, mu_r, sigma_r))
        p_r = 1 - (1 - f_r) * (1 - f_t)
        assert abs((t <= x).mean() - f_t) <= binomial_tol(f_t, N), x
        assert abs((r <= x).mean() - p_r) <= binomial_tol(p_r, N), x


@pytest.mark.parametrize("kind", TIME_SAMPLERS)
def test_same_seed_same_draws(kind):
    """A seeded generator makes the draws reproducible; another seed changes them."""
    sampler = TimeSampler(kind=kind, fraction_r_neq_t=0.5)
    r1, t1 = sampler(1000, generator=gen(8))
    r2, t2 = sampler(1000, generator=gen(8))
    r3, t3 = sampler(1000, generator=gen(9))
    assert torch.equal(r1, r2) and torch.equal(t1, t2)
    assert not torch.equal(t1, t3)
    assert torch.equal(sampler.sample_t(50, "cpu", gen(10)), sampler.sample_t(50, "cpu", gen(10)))


@pytest.mark.parametrize("kwargs", [
    dict(fraction_r_neq_t=-0.1), dict(fraction_r_neq_t=1.5), dict(sigma=0.0), dict(sigma=-1.0),
    dict(sigma_r=0.0), dict(sigma=float("inf")), dict(mu=float("nan")), dict(mu_r=float("inf")),
    dict(kind="foo"), dict(kind="LN")])
def test_invalid_settings(kwargs):
    """Out-of-range or unknown settings raise ConfigError at construction."""
    with pytest.raises(ConfigError):
        TimeSampler(**kwargs)
