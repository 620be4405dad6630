"""The exact fields of a Gaussian mixture (meanflow.exact) against independent mathematics:
the closed-form affine flow of one Gaussian, the continuity equation, a Monte-Carlo estimate of
E[v | z_t], the pushforward of N(0, I), and the MeanFlow identity by finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from meanflow.data import EightGaussians
from meanflow.errors import ConfigError
from meanflow.exact import GaussianMixtureFlow
from meanflow.metrics import energy_distance

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def ring() -> GaussianMixtureFlow:
    return GaussianMixtureFlow.from_eight_gaussians()


def _col(a: float, n: int) -> torch.Tensor:
    return torch.full((n,), a, dtype=F64)


def test_eight_gaussians_constructor_matches_the_dataset():
    ds = EightGaussians()
    g = GaussianMixtureFlow.from_eight_gaussians(ds)
    assert g.std == ds.std == 0.5
    assert g.means.dtype == F64 and g.means.shape == (8, 2)
    assert torch.allclose(g.means.float(), ds.centers, atol=1e-6)
    assert torch.allclose(g.weights, torch.full((8,), 1 / 8, dtype=F64))
    other = GaussianMixtureFlow.from_eight_gaussians(EightGaussians(radius=2.0, std=0.1))
    assert other.std == 0.1 and torch.allclose(other.means.norm(dim=1), _col(2.0, 8))


@pytest.mark.parametrize("t", [0.0, 0.05, 0.3, 0.7, 1.0])
def test_single_gaussian_velocity_is_the_closed_form(gaussian_oracle, t):
    m, s = torch.tensor([1.5, -0.7], dtype=F64), 0.6
    oracle, exact = gaussian_oracle(m, s), GaussianMixtureFlow(m[None], s)
    z = 2 * torch.randn(64, 2, generator=_gen(0), dtype=F64)
    tt = _col(t, 64)
    torch.testing.assert_close(exact.marginal_velocity(z, tt), oracle.marginal_velocity(z, tt),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t,r", [(1.0, 0.0), (0.8, 0.3), (0.5, 0.49), (0.2, 0.0), (0.6, 0.6)])
def test_single_gaussian_flow_and_average_velocity_match_the_affine_map(gaussian_oracle, t, r):
    m, s = torch.tensor([1.5, -0.7], dtype=F64), 0.6
    oracle, exact = gaussian_oracle(m, s), GaussianMixtureFlow(m[None], s)
    z = 2 * torch.randn(64, 2, generator=_gen(1), dtype=F64)
    tt, rr = _col(t, 64), _col(r, 64)
    torch.testing.assert_close(exact.flow(z, tt, rr, steps=100), oracle.flow(z, rr, tt),
                               rtol=0, atol=1e-9)
    with torch.no_grad():
        u_true = oracle(z, tt, tt - rr)
    torch.testing.assert_close(exact.average_velocity(z, rr, tt, steps=100), u_true,
                               rtol=0, atol=1e-9)
    # scalar times give the same as per-sample tensors
    torch.testing.assert_close(exact.average_velocity(z, r, t, steps=100), u_true,
                               rtol=0, atol=1e-9)


def test_velocity_at_the_ends_and_far_away(ring):
    z = 3 * torch.randn(32, 2, generator=_gen(2), dtype=F64)
    # t = 0: z is the data point x and E[e | x] = 0, so v = -z
    torch.testing.assert_close(ring.marginal_velocity(z, 0.0), -z, rtol=0, atol=1e-12)
    # t = 1: z is pure noise, every posterior weight is 1/8, v = z - mean(m) = z
    torch.testing.assert_close(ring.marginal_velocity(z, 1.0), z, rtol=0, atol=1e-12)
    far = torch.tensor([[1e3, -1e3], [0.0, 0.0], [1e6, 0.0]], dtype=F64)
    for t in (0.0, 1e-12, 0.5, 1.0 - 1e-12, 1.0):
        assert torch.isfinite(ring.marginal_velocity(far, t)).all()
        assert torch.isfinite(ring.posterior(far, t)).all()


def test_continuity_equation_by_finite_differences(ring):
    """d/dt log p + v·∇log p + ∇·v = 0 for the marginal density p_t and velocity v."""
    z = 3 * torch.randn(200, 2, generator=_gen(3), dtype=F64)
    t = torch.rand(200, generator=_gen(4), dtype=F64) * 0.9 + 0.05
    d = 1e-5
    eye = torch.eye(2, dtype=F64)
    dlogp_dt = (ring.log_density(z, t + d) - ring.log_density(z, t - d)) / (2 * d)
    grad_logp = torch.stack([(ring.log_density(z + d * eye[i], t)
                              - ring.log_density(z - d * eye[i], t)) / (2 * d)
                             for i in range(2)], 1)
    div_v = sum((ring.marginal_velocity(z + d * eye[i], t)[:, i]
                 - ring.marginal_velocity(z - d * eye[i], t)[:, i]) / (2 * d) for i in range(2))
    v = ring.marginal_velocity(z, t)
    residual = dlogp_dt + (v * grad_logp).sum(1) + div_v
    scale = dlogp_dt.abs() + div_v.abs() + 1
    assert float((residual.abs() / scale).max()) < 1e-6


def test_marginal_velocity_is_the_conditional_mean_monte_carlo(ring):
    """Tower property E[(v - v̂(z_t, t))·g(z_t)] = 0 for test functions g; a moment-matched
    single-Gaussian velocity (right mean and covariance, wrong shape) must fail it."""
    n = 200_000
    g = _gen(5)
    x = ring.sample(n, g)
    e = torch.randn(n, 2, generator=g, dtype=F64)
    mean, var = x.mean(0), float(x.var(0).mean())
    fit = GaussianMixtureFlow(mean[None], math.sqrt(var))
    for t in (0.2, 0.5, 0.8):
        z = (1 - t) * x + t * e
        v = e - x
        feats = torch.stack([torch.ones(n, dtype=F64), z[:, 0], z[:, 1], torch.tanh(z[:, 0]),
                             torch.sin(z[:, 1]), torch.sigmoid(z[:, 0] + z[:, 1]),
                             torch.exp(-(z ** 2).sum(1) / 4)], 1)

        def worst_z_score(v_hat: torch.Tensor) -> float:
            prod = (v - v_hat)[:, :, None] * feats[:, None, :]      # (n, 2, features)
            mean_ = prod.mean(0)
            se = prod.std(0) / math.sqrt(n)
            return float((mean_.abs() / se).max())

        assert worst_z_score(ring.marginal_velocity(z, t)) < 5.0
        assert worst_z_score(fit.marginal_velocity(z, t)) > 10.0


def test_one_step_map_pushes_noise_to_the_mixture(ring):
    n = 1500
    e = torch.randn(n, 2, generator=_gen(6), dtype=F64)
    data = ring.sample(n, _gen(7))
    other = ring.sample(n, _gen(8))
    mapped = ring.one_step_map(e, steps=60)
    floor = energy_distance(other, data)
    pushed = energy_distance(mapped, data)
    assert abs(floor) < 0.01 and abs(pushed) < 0.01
    assert energy_distance(e, data) > 1.0          # the noise itself is far from the data
    # e - u(e, 0, 1) is the same map
    torch.testing.assert_close(e - ring.average_velocity(e, 0.0, 1.0, steps=60), mapped,
                               rtol=0, atol=1e-12)
    # the flow is invertible: integrating back from the data side returns the noise
    torch.testing.assert_close(ring.flow(mapped[:200], 0.0, 1.0, steps=60), e[:200],
                               rtol=0, atol=1e-5)


def test_rk4_converges(ring):
    e = torch.randn(300, 2, generator=_gen(9), dtype=F64)
    coarse, fine = ring.one_step_map(e, steps=100), ring.one_step_map(e, steps=200)
    assert float((coarse - fine).norm(dim=1).max()) < 1e-5


def test_meanflow_identity_and_additivity(ring):
    """u(z_t, r, t) = v(z_t, t) - (t - r)·du/dt along the trajectory, du/dt by central
    differences; the (v, 0, 0)-tangent version (v·∂_z u only) must not hold."""
    B, steps, d = 48, 120, 1e-4   # FD error ~ 4e-7 (O(d²)), RK4 ~ 5e-7
    z_data = ring.sample(B, _gen(10))
    e = torch.randn(B, 2, generator=_gen(11), dtype=F64)
    eye = torch.eye(2, dtype=F64)
    for r, t in ((0.0, 0.95), (0.2, 0.7), (0.5, 0.6), (0.0, 0.3)):
        z = (1 - t) * z_data + t * e
        u = ring.average_velocity(z, r, t, steps)
        v = ring.marginal_velocity(z, t)
        z_plus, z_minus = ring.flow(z, t, t + d, steps), ring.flow(z, t, t - d, steps)
        dudt = (ring.average_velocity(z_plus, r, t + d, steps)
                - ring.average_velocity(z_minus, r, t - d, steps)) / (2 * d)
        torch.testing.assert_close(u, v - (t - r) * dudt, rtol=0, atol=2e-6)
        # wrong tangent (v, 0, 0): drop ∂_t u
        v_dz_u = sum(v[:, i:i + 1] * (ring.average_velocity(z + d * eye[i], r, t, 20)
                                      - ring.average_velocity(z - d * eye[i], r, t, 20))
                     / (2 * d) for i in range(2))
        assert float((u - (v - (t - r) * v_dz_u)).norm(dim=1).max()) > 1e-2
        # additivity over [r, s] and [s, t]
        s = (r + t) / 2
        z_s = ring.flow(z, t, s, steps)
        torch.testing.assert_close(
            (t - r) * u,
            (s - r) * ring.average_velocity(z_s, r, s, steps)
            + (t - s) * ring.average_velocity(z, s, t, steps), rtol=0, atol=5e-7)


def test_average_velocity_tends_to_v_as_r_tends_to_t(ring):
    z = 2 * torch.randn(32, 2, generator=_gen(12), dtype=F64)
    for t in (0.0, 0.4, 1.0):
        v = ring.marginal_velocity(z, t)
        # r = t: the mean RK4 slope is v itself, up to rounding of (k1 + 2k2 + 2k3 + k4) / 6
        torch.testing.assert_close(ring.average_velocity(z, t, t, steps=5), v, rtol=0,
                                   atol=1e-14)
        r = max(t - 1e-9, 0.0)
        torch.testing.assert_close(ring.average_velocity(z, r, t, steps=5), v, rtol=0,
                                   atol=1e-7)


def test_rejects_bad_arguments(ring):
    z = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(ConfigError):
        GaussianMixtureFlow([[0.0, 0.0]], std=0.0)
    with pytest.raises(ConfigError):
        GaussianMixtureFlow([[0.0, 0.0], [1.0, 1.0]], std=1.0, weights=[1.0, -1.0])
    with pytest.raises(ConfigError):
        ring.average_velocity(z, 0.8, 0.2)               # r > t
    with pytest.raises(ConfigError):
        ring.marginal_velocity(z, 1.5)                   # time outside [0, 1]
    with pytest.raises(ConfigError):
        ring.marginal_velocity(torch.zeros(4, 3), 0.5)   # wrong dimension
    with pytest.raises(ConfigError):
        ring.flow(z, 1.0, 0.0, steps=0)
