"""The (r, t) sampler against its distribution (paper §4.3, docs/method.md §7).

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


# ------------------------------------------- the batch layout of the r = t rows ("first")

def old_sampler(s: TimeSampler, batch_size: int, generator: torch.Generator):
    """The per-sample ("random") sampler as it was before r_eq_t_rows existed, written out:
    the two draws, then one uniform per sample, r := t where it is >= f, r := min(r, t)."""
    draw = ((lambda mu, sg: torch.rand(batch_size, generator=generator)) if s.kind == "uniform"
            else (lambda mu, sg: torch.sigmoid(mu + sg * torch.randn(batch_size,
                                                                     generator=generator))))
    if s.kind == "v1":
        t = draw(s.mu, s.sigma)
        r = draw(s.mu_r, s.sigma_r)
    else:
        a, b = draw(s.mu, s.sigma), draw(s.mu, s.sigma)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
    u = torch.rand(batch_size, generator=generator)
    r = torch.where(u < s.fraction_r_neq_t, r, t)
    return torch.minimum(r, t), t


@pytest.mark.parametrize("kind", TIME_SAMPLERS)
def test_random_layout_is_bit_identical_to_the_per_sample_sampler(kind):
    """r_eq_t_rows="random" (also the default) draws exactly what the per-sample sampler drew:
    same values bit for bit and the same generator state afterwards."""
    for fraction in (0.0, 0.25, 0.75, 1.0):
        for B in (1, 7, 32, 1000):
            for layout in ({}, {"r_eq_t_rows": "random"}):
                s = TimeSampler(kind=kind, mu=-0.6, sigma=1.3, fraction_r_neq_t=fraction,
                                **layout)
                g_new, g_old = gen(B), gen(B)
                r, t = s(B, generator=g_new)
                r_ref, t_ref = old_sampler(s, B, g_old)
                assert torch.equal(r, r_ref) and torch.equal(t, t_ref)
                assert torch.equal(g_new.get_state(), g_old.get_state())


# (B, f, n_eq): n_eq = floor(B·(1 - f)), the official JAX code's int(bz * data_proportion)
FIRST_CASES = [(32, 0.25, 24), (7, 0.75, 1), (7, 0.25, 5), (33, 0.5, 16), (10, 0.9, 1),
               (1, 0.5, 0), (1, 0.0, 1), (6, 0.0, 6), (6, 1.0, 0), (256, 0.25, 192)]


@pytest.mark.parametrize("B,fraction,n_eq", FIRST_CASES)
@pytest.mark.parametrize("kind", TIME_SAMPLERS)
def test_first_layout_count_and_positions_are_exact(kind, B, fraction, n_eq):
    """r_eq_t_rows="first": in every batch exactly the first n_eq rows have r = t and every
    later row has r < t (two continuous draws tie with probability 0). For "v1" the later rows
    have r = min(r_draw, t), which is t when r_draw >= t, so there only r <= t holds."""
    s = TimeSampler(kind=kind, fraction_r_neq_t=fraction, r_eq_t_rows="first")
    assert s.num_r_eq_t(B) == n_eq
    g = gen(11)
    for _ in range(25):
        r, t = s(B, generator=g)
        assert r.shape == t.shape == (B,) and r.dtype == torch.float32
        assert torch.equal(r[:n_eq], t[:n_eq])
        if kind == "v1":
            assert bool((r[n_eq:] <= t[n_eq:]).all())
        else:
            assert bool((r[n_eq:] < t[n_eq:]).all())
        assert bool((r >= 0).all()) and bool((t <= 1).all())


@pytest.mark.parametrize("kind", TIME_SAMPLERS)
def test_first_layout_keeps_the_draws_and_makes_no_keep_draws(kind):
    """The (r, t) draws are those of the per-sample sampler (compared with f = 1, where it
    keeps every draw); "first" consumes only the two draws, no per-sample uniforms."""
    B, n_eq = 32, 24
    r, t = TimeSampler(kind=kind, fraction_r_neq_t=0.25, r_eq_t_rows="first")(
        B, generator=(g := gen(12)))
    r_all, t_all = TimeSampler(kind=kind, fraction_r_neq_t=1.0)(B, generator=gen(12))
    assert torch.equal(t, t_all) and torch.equal(r[n_eq:], r_all[n_eq:])
    assert torch.equal(r[:n_eq], t_all[:n_eq])
    ref = gen(12)
    for _ in range(2):
        torch.rand(B, generator=ref) if kind == "uniform" else torch.randn(B, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


@pytest.mark.parametrize("kind,mu,sigma", [("logit_normal", -0.4, 1.0), ("uniform", 0.0, 1.0),
                                            ("v1", -0.6, 1.6)])
def test_first_layout_rows_follow_the_per_sample_law(kind, mu, sigma):
    """The rows >= n_eq of "first" (B = 32, f = 0.25, 8 per batch) have the law of the rows
    that the "random" sampler keeps: two-sample KS tests on r, t and t - r at fixed seeds
    against its r != t samples ("v1": against all its samples at f = 1, since there a kept row
    has r = t when r_draw >= t; the share of such rows is P(r_draw >= t) =
    1 - Φ((mu - mu_r) / sqrt(sigma² + sigma_r²))). For logit_normal also a one-sample KS test
    of r against the min-of-two CDF 1 - (1 - F)². Power check: the test rejects r against t."""
    from scipy.stats import ks_1samp, ks_2samp
    B, n_eq = 32, 24
    first = TimeSampler(kind=kind, mu=mu, sigma=sigma, fraction_r_neq_t=0.25,
                        r_eq_t_rows="first")
    g = gen(13)
    rows = [first(B, generator=g) for _ in range(1500)]
    r_f = torch.cat([r[n_eq:] for r, _ in rows]).double().numpy()
    t_f = torch.cat([t[n_eq:] for _, t in rows]).double().numpy()
    r_eq = torch.cat([r[:n_eq] for r, _ in rows])
    assert bool((r_eq == torch.cat([t[:n_eq] for _, t in rows])).all())
    reference = 1.0 if kind == "v1" else 0.25
    r_p, t_p = TimeSampler(kind=kind, mu=mu, sigma=sigma, fraction_r_neq_t=reference)(
        N, generator=gen(14))
    kept = (r_p != t_p).numpy() if kind != "v1" else np.ones(N, dtype=bool)
    r_p, t_p = r_p.double().numpy()[kept], t_p.double().numpy()[kept]
    for a, b in [(r_f, r_p), (t_f, t_p), (t_f - r_f, t_p - r_p)]:
        assert ks_2samp(a, b).pvalue > 1e-3
    assert ks_2samp(r_f, t_p).pvalue < 1e-12
    if kind == "v1":  # defaults mu_r, sigma_r = -4.0, 1.6
        tie = 1 - float(ndtr((mu + 4.0) / math.hypot(sigma, 1.6)))
        assert abs(float((r_f == t_f).mean()) - tie) <= binomial_tol(tie, r_f.size)
    if kind == "logit_normal":
        assert ks_1samp(r_f, lambda x: 1 - (1 - ln_cdf(x, mu, sigma)) ** 2).pvalue > 1e-3


@pytest.mark.parametrize("value", ["last", "FIRST", "", None, 1, True])
def test_invalid_r_eq_t_rows(value):
    """An unknown layout raises a one-line ConfigError naming the choices."""
    with pytest.raises(ConfigError) as info:
        TimeSampler(r_eq_t_rows=value)
    message = str(info.value)
    assert "\n" not in message and "'random'" in message and "'first'" in message
