"""du/dt = v·∂_z u + ∂_t u: the JVP of f(z, r, t) = u(z, r, t) along the tangent (v, 0, 1).

Every strategy is checked against a float64 central finite difference, against an analytic
derivative of a stand-in backbone, against the other strategies, and against the wrong tangents
of paper Tab. 1b, which must land far outside the tolerance.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import meanflow
from meanflow import JVP_STRATEGIES, ConfigError, average_velocity, time_derivative, u_and_dudt

F64 = torch.float64
# Central difference step and tolerance. The MLP's sinusoidal time embedding has angular
# frequencies up to 1000, so the truncation error ε²·f'''/6 dominates: measured max error is
# ≈ 7e-7 at ε = 1e-6 and ≈ 1e-8 at ε = 1e-7 (round-off ≈ 1e-16/ε·|f| ≈ 1e-9). Wrong tangents
# move du/dt by O(1e-2 .. 10) per sample, more than 1e4 × the tolerance.
EPS = 1e-7
TOL = 1e-6


class StandIn(nn.Module):
    """u(z, t, h) = tanh(a·z + b·sin(3t))·exp(0.7h), elementwise, any sample shape.

    Along (dz, dr, dt) = (v, 0, 1), with h = t - r (so dh = 1):
        du/dt = (1 - tanh²)(a·v + 3b·cos(3t))·exp(0.7h) + 0.7·tanh·exp(0.7h).
    """

    def __init__(self, sample_shape: tuple[int, ...], seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(torch.randn(sample_shape, generator=g, dtype=F64))
        self.b = nn.Parameter(torch.randn(sample_shape, generator=g, dtype=F64))

    @staticmethod
    def _col(s: Tensor, z: Tensor) -> Tensor:
        return s.reshape(-1, *([1] * (z.ndim - 1)))

    def forward(self, z: Tensor, t: Tensor, h: Tensor, y: Tensor | None = None) -> Tensor:
        tt, hh = self._col(t, z), self._col(h, z)
        return torch.tanh(self.a * z + self.b * torch.sin(3 * tt)) * torch.exp(0.7 * hh)

    @torch.no_grad()
    def analytic_dudt(self, z: Tensor, r: Tensor, t: Tensor, v: Tensor) -> Tensor:
        tt, hh = self._col(t, z), self._col(t - r, z)
        th = torch.tanh(self.a * z + self.b * torch.sin(3 * tt))
        g = torch.exp(0.7 * hh)
        return (1 - th ** 2) * (self.a * v + 3 * self.b * torch.cos(3 * tt)) * g + 0.7 * th * g


# name -> (batch shape, backbone kind)
CASES = {
    "mlp_2d": ((5, 2), "mlp"),
    "mlp_image": ((3, 3, 4, 4), "mlp"),
    "mlp_labels": ((6, 2), "mlp_cond"),
    "standin_2d": ((6, 2), "standin"),
    "standin_image": ((4, 3, 4, 4), "standin"),
}


def make_case(name: str, tiny_mlp, times: str = "r_lt_t", seed: int = 0):
    """(net, z, r, t, v, y) in float64; times "r_lt_t" has r <= t - 0.01 (and t = 1, r = 0 in
    row 0), "r_eq_t" has r = t."""
    shape, kind = CASES[name]
    B = shape[0]
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=F64)
    v = torch.randn(shape, generator=g, dtype=F64)
    t = 0.05 + 0.9 * torch.rand(B, generator=g, dtype=F64)
    if times == "r_lt_t":
        r = (t - 0.01) * torch.rand(B, generator=g, dtype=F64)
        t[0], r[0] = 1.0, 0.0
    else:
        r = t.clone()
    y = None
    dim = int(torch.tensor(shape[1:]).prod())
    if kind == "mlp":
        net = tiny_mlp(seed=seed, dim=dim)
    elif kind == "mlp_cond":
        net = tiny_mlp(seed=seed, dim=dim, num_classes=3)
        y = torch.arange(B) % 4  # includes the null class 3
    else:
        net = StandIn(shape[1:], seed=seed)
    return net, z, r, t, v, y


def u_of(net, y=None):
    """f(z, r, t) = net(z, t, t - r, y): average_velocity's definition, called on the net
    directly so that t - ε < r is allowed at r = t."""
    return lambda z, r, t: net(z, t, t - r, y)


@torch.no_grad()
def central_difference(f, z: Tensor, r: Tensor, t: Tensor, v: Tensor, eps: float = EPS):
    """(f(z + εv, r, t + ε) - f(z - εv, r, t - ε)) / 2ε: the derivative along (v, 0, 1)."""
    return (f(z + eps * v, r, t + eps) - f(z - eps * v, r, t - eps)) / (2 * eps)


def jvp_with_tangent(f, z, r, t, v, dr: float, dt: float) -> Tensor:
    """The JVP of f(z, r, t) along (v, dr, dt), computed independently of the library."""
    tangents = (v, torch.full_like(r, dr), torch.full_like(t, dt))
    return torch.func.jvp(f, (z, r, t), tangents)[1].detach()


@pytest.mark.parametrize("times", ["r_lt_t", "r_eq_t"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("strategy", JVP_STRATEGIES)
def test_dudt_matches_central_difference(strategy, case, times, tiny_mlp):
    """time_derivative and u_and_dudt's du/dt are the derivative of u(z_τ, r, τ) along the
    trajectory dz/dτ = v, with r held fixed (tangent (v, 0, 1) on (z, r, t))."""
    net, z, r, t, v, y = make_case(case, tiny_mlp, times)
    reference = central_difference(u_of(net, y), z, r, t, v)
    dudt = time_derivative(net, z, r, t, v, y, strategy=strategy)
    _, dudt_pair = u_and_dudt(net, z, r, t, v, y, strategy=strategy)
    assert dudt.shape == z.shape and dudt.dtype == F64
    torch.testing.assert_close(dudt, reference, atol=TOL, rtol=TOL)
    torch.testing.assert_close(dudt_pair, reference, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("times", ["r_lt_t", "r_eq_t"])
@pytest.mark.parametrize("case", ["standin_2d", "standin_image"])
@pytest.mark.parametrize("strategy", JVP_STRATEGIES)
def test_dudt_matches_analytic_derivative(strategy, case, times, tiny_mlp):
    """On the stand-in backbone du/dt equals its closed-form derivative to round-off."""
    net, z, r, t, v, y = make_case(case, tiny_mlp, times)
    exact = net.analytic_dudt(z, r, t, v)
    torch.testing.assert_close(time_derivative(net, z, r, t, v, strategy=strategy), exact,
                               atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(u_and_dudt(net, z, r, t, v, strategy=strategy)[1], exact,
                               atol=1e-13, rtol=1e-12)


@pytest.mark.parametrize("wrong", [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)],
                         ids=["v00", "v10", "v11"])
@pytest.mark.parametrize("case", list(CASES))
def test_wrong_tangents_of_tab1b_are_far_from_the_right_one(case, wrong, tiny_mlp):
    """The tangents (v,0,0), (v,1,0), (v,1,1) on (z, r, t) (paper Tab. 1b) give a du/dt that is
    far outside the finite-difference tolerance of the right one, in every sample: the
    finite-difference test above can tell them apart."""
    net, z, r, t, v, y = make_case(case, tiny_mlp)
    f = u_of(net, y)
    right = time_derivative(net, z, r, t, v, y)
    torch.testing.assert_close(jvp_with_tangent(f, z, r, t, v, 0.0, 1.0), right,
                               atol=1e-12, rtol=1e-12)
    wrong_dudt = jvp_with_tangent(f, z, r, t, v, *wrong)
    per_sample_gap = (wrong_dudt - right).abs().flatten(1).amax(1)
    assert bool((per_sample_gap > 1e3 * TOL).all()), per_sample_gap


@pytest.mark.parametrize("case", list(CASES))
def test_all_strategies_agree(case, tiny_mlp):
    """The four strategies are exact, so u and du/dt agree to float64 round-off."""
    net, z, r, t, v, y = make_case(case, tiny_mlp)
    u_ref, d_ref = u_and_dudt(net, z, r, t, v, y, strategy="func")
    for strategy in JVP_STRATEGIES:
        u, dudt = u_and_dudt(net, z, r, t, v, y, strategy=strategy)
        torch.testing.assert_close(u, u_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(dudt, d_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(time_derivative(net, z, r, t, v, y, strategy=strategy),
                                   d_ref, atol=1e-12, rtol=0)


def test_labels_reach_the_network(tiny_mlp):
    """y is passed through: du/dt of a class-conditional net depends on the label."""
    net, z, r, t, v, y = make_case("mlp_labels", tiny_mlp)
    other = (y + 1) % 4
    gap = (time_derivative(net, z, r, t, v, y) - time_derivative(net, z, r, t, v, other)).abs()
    assert float(gap.amax()) > 1e3 * TOL


@pytest.mark.parametrize("case", ["mlp_2d", "mlp_image", "standin_image"])
@pytest.mark.parametrize("strategy", JVP_STRATEGIES)
def test_u_carries_grad_and_dudt_is_detached(strategy, case, tiny_mlp):
    """u equals average_velocity and back-propagates exactly like a plain forward (same
    parameter gradients); du/dt carries no graph (it only enters the stop-gradient target)."""
    net, z, r, t, v, y = make_case(case, tiny_mlp)
    u, dudt = u_and_dudt(net, z, r, t, v, y, strategy=strategy)
    u_plain = average_velocity(net, z, r, t, y)
    assert u.requires_grad and not dudt.requires_grad and dudt.grad_fn is None
    torch.testing.assert_close(u, u_plain, atol=1e-14, rtol=0)
    weights = torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad((u * weights).sum(), params)
    grads_plain = torch.autograd.grad((u_plain * weights).sum(), params)
    for a, b in zip(grads, grads_plain):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("strategy", JVP_STRATEGIES)
def test_time_derivative_is_detached_even_with_grad_inputs(strategy, tiny_mlp):
    """time_derivative returns a tensor without autograd graph, whatever requires grad."""
    net, z, r, t, v, y = make_case("mlp_2d", tiny_mlp)
    dudt = time_derivative(net, z.requires_grad_(), r, t, v.requires_grad_(), strategy=strategy)
    assert not dudt.requires_grad


def test_average_velocity_is_the_net_at_h_equal_t_minus_r(tiny_mlp):
    """average_velocity(net, z, r, t) = net(z, t, h = t - r): the backbone sees h, not r."""
    net, z, r, t, v, y = make_case("mlp_2d", tiny_mlp)
    assert torch.equal(average_velocity(net, z, r, t), net(z, t, t - r))
    assert not torch.allclose(average_velocity(net, z, r, t), net(z, t, r))


def _seeded(net, seed: int, y=None):
    """f_seed(z, r, t): the net with the dropout masks that the global RNG seeded with ``seed``
    draws; mask draws do not depend on the input values, so f_seed is a fixed function."""
    def f(z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        torch.manual_seed(seed)
        return net(z, t, t - r, y)
    return f


@pytest.mark.parametrize("strategy", JVP_STRATEGIES)
def test_dropout_masks_are_shared_by_u_and_dudt(strategy, tiny_mlp):
    """With dropout in train mode, what the code guarantees is self-consistency: u is the
    forward with the masks drawn from the RNG state at entry, and du/dt is the JVP of that SAME
    masked function (the split strategies rewind the RNG between their two passes). Since every
    strategy draws its masks from the entry state, u is also the same across strategies for the
    same seed, and the RNG ends where one plain forward leaves it."""
    net = tiny_mlp(dropout=0.5).train()
    _, z, r, t, v, _ = make_case("mlp_2d", tiny_mlp)
    seed = 1234
    torch.manual_seed(seed)
    u, dudt = u_and_dudt(net, z, r, t, v, strategy=strategy)
    after_call = torch.rand(4)
    f = _seeded(net, seed)
    with torch.no_grad():
        u_masked = f(z, r, t)
    after_forward = torch.rand(4)
    assert torch.equal(u.detach(), u_masked)
    torch.testing.assert_close(dudt, central_difference(f, z, r, t, v), atol=TOL, rtol=TOL)
    assert torch.equal(after_call, after_forward)
    # Non-tautology: other masks give a different u and a different du/dt.
    g = _seeded(net, seed + 1)
    with torch.no_grad():
        assert float((g(z, r, t) - u_masked).abs().amax()) > 1e-3
    assert float((central_difference(g, z, r, t, v) - dudt).abs().amax()) > 1e3 * TOL


def test_unknown_strategy_is_a_config_error(tiny_mlp):
    """A misspelt strategy is rejected everywhere it can be given."""
    net, z, r, t, v, y = make_case("mlp_2d", tiny_mlp)
    with pytest.raises(ConfigError):
        u_and_dudt(net, z, r, t, v, strategy="jvp")
    with pytest.raises(ConfigError):
        time_derivative(net, z, r, t, v, strategy="Split")
    with pytest.raises(ConfigError):
        meanflow.MeanFlowLoss(jvp="double_backward")


@pytest.mark.parametrize("strategy", JVP_STRATEGIES)
@pytest.mark.parametrize("tangent", ["v00", "v10", "v11"])
def test_wrong_tangents_match_finite_differences(tiny_mlp, strategy, tangent):
    """The ablation tangents (paper Tab. 1b) differentiate along (v, dr, dt) exactly."""
    from meanflow.objective.jvp import TANGENTS
    torch.manual_seed(0)
    net = tiny_mlp()
    z, v = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    t = torch.rand(6, dtype=torch.float64) * 0.5 + 0.4
    r = t * torch.rand(6, dtype=torch.float64) * 0.8
    dr, dt = TANGENTS[tangent]
    eps = 1e-6

    def f(s):
        rr, tt = r + s * dr, t + s * dt
        return net(z + s * v, tt, tt - rr)

    fd = (f(eps) - f(-eps)) / (2 * eps)
    got = time_derivative(net, z, r, t, v, strategy=strategy, tangent=tangent)
    torch.testing.assert_close(got, fd, rtol=1e-6, atol=1e-8)
    _, got2 = u_and_dudt(net, z, r, t, v, strategy=strategy, tangent=tangent)
    torch.testing.assert_close(got2, fd, rtol=1e-6, atol=1e-8)


def test_unknown_tangent_is_refused(tiny_mlp):
    from meanflow.errors import ConfigError
    net = tiny_mlp()
    z = torch.randn(2, 2, dtype=torch.float64)
    t = torch.full((2,), 0.5, dtype=torch.float64)
    with pytest.raises(ConfigError, match="tangent"):
        u_and_dudt(net, z, t, t, z, tangent="v02")
