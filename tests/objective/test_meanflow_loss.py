"""The MeanFlow loss against closed forms.

- An exact oracle (Gaussian data, linear path) satisfies the MeanFlow identity, has zero loss on
  point-mass data, and is the fixed point of the stop-gradient loss on Gaussian data.
- r = t reduces the loss to flow matching.
- The adaptive weight w = sg(1/(||Δ||² + c)^p) and its gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from meanflow import (JVP_STRATEGIES, ConfigError, FlowMatchingLoss, MeanFlowLoss,
                      average_velocity, time_derivative)
from meanflow.objective import adaptive_weight

F64 = torch.float64
M2 = torch.tensor([1.5, -0.5], dtype=F64)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def col(s: Tensor, x: Tensor) -> Tensor:
    return s.reshape(-1, *([1] * (x.ndim - 1)))


def rk4(field, z: Tensor, t_from: Tensor, t_to: Tensor, steps: int = 200) -> Tensor:
    """Integrates dz/dτ = field(z, τ) from τ = t_from to τ = t_to (per sample) with RK4."""
    dt = (t_to - t_from) / steps
    tau = t_from.clone()
    for _ in range(steps):
        k1 = field(z, tau)
        k2 = field(z + col(dt / 2, z) * k1, tau + dt / 2)
        k3 = field(z + col(dt / 2, z) * k2, tau + dt / 2)
        k4 = field(z + col(dt, z) * k3, tau + dt)
        z = z + col(dt / 6, z) * (k1 + 2 * k2 + 2 * k3 + k4)
        tau = tau + dt
    return z


def hand_loss(net, x: Tensor, r: Tensor, t: Tensor, e: Tensor, p: float = 0.0,
              c: float = 1e-3) -> tuple[Tensor, Tensor, Tensor]:
    """MeanFlow loss from its definition, independent of the library:
    z = (1-t)x + te, v = e - x, du/dt = JVP of net(z, t, t - r) along (v, 0, 1),
    u_tgt = sg(v - (t - r) du/dt), err = ||u - u_tgt||² summed, loss = err / (err + c)^p.
    Returns (loss, err, u)."""
    z = (1 - col(t, x)) * x + col(t, x) * e
    v = e - x
    f = lambda z_, r_, t_: net(z_, t_, t_ - r_)  # noqa: E731
    _, dudt = torch.func.jvp(f, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    u = net(z, t, t - r)
    u_tgt = (v - col(t - r, x) * dudt).detach()
    err = (u - u_tgt).pow(2).flatten(1).sum(1)
    return err / (err.detach() + c) ** p, err, u


# --------------------------------------------------------------------------- the oracle itself

@pytest.mark.parametrize("s", [0.0, 0.5, 2.0])
def test_oracle_is_the_exact_flow_of_the_marginal_velocity(s, gaussian_oracle):
    """Validates the oracle used below: u(z, t, t) is E[e - x | z_t = z] (Gaussian regression),
    and the jump z_r = z_t - (t - r)·u(z_t, r, t) equals an RK4 integration of the marginal
    ODE from t down to r; also the closed-form flow map."""
    oracle = gaussian_oracle(M2, s)
    g = gen(0)
    B = 16
    z = 2 * torch.randn(B, 2, generator=g, dtype=F64)
    t = 0.2 + 0.8 * torch.rand(B, generator=g, dtype=F64)
    r = 0.05 + (t - 0.05) * torch.rand(B, generator=g, dtype=F64)
    with torch.no_grad():
        if s > 0:
            torch.testing.assert_close(oracle(z, t, torch.zeros_like(t)),
                                       oracle.marginal_velocity(z, t), atol=1e-13, rtol=0)
        field = lambda z_, tau: oracle(z_, tau, torch.zeros_like(tau))  # noqa: E731
        jump = z - col(t - r, z) * average_velocity(oracle, z, r, t)
        torch.testing.assert_close(jump, rk4(field, z, t, r), atol=1e-9, rtol=0)
        torch.testing.assert_close(jump, oracle.flow(z, r, t), atol=1e-12, rtol=0)


@pytest.mark.parametrize("s", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("strategy", JVP_STRATEGIES)
def test_oracle_satisfies_the_meanflow_identity(strategy, s, gaussian_oracle):
    """u = v_marg - (t - r)·du/dt with du/dt along (v_marg, 0, 1) (paper §4.1), for the exact u of
    Gaussian data: residual at round-off. The wrong tangent (v_marg, 0, 0) breaks it."""
    oracle = gaussian_oracle(M2, s)
    g = gen(1)
    B = 32
    z = 2 * torch.randn(B, 2, generator=g, dtype=F64)
    t = torch.rand(B, generator=g, dtype=F64)
    r = t * torch.rand(B, generator=g, dtype=F64)
    t[0], r[0] = 1.0, 0.0
    with torch.no_grad():
        u = average_velocity(oracle, z, r, t)
        v_marg = oracle(z, t, torch.zeros_like(t))
    dudt = time_derivative(oracle, z, r, t, v_marg, strategy=strategy)
    residual = u - (v_marg - col(t - r, z) * dudt)
    assert float(residual.abs().amax()) < 1e-10
    # Non-tautology: dropping ∂_t u leaves a residual of order one.
    f = lambda z_, r_, t_: oracle(z_, t_, t_ - r_)  # noqa: E731
    zero = torch.zeros_like(t)
    wrong = torch.func.jvp(f, (z, r, t), (v_marg, zero, zero))[1]
    assert float((u - (v_marg - col(t - r, z) * wrong)).abs().amax()) > 1e-2


@pytest.mark.parametrize("t_val", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("r_frac", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("strategy", JVP_STRATEGIES)
def test_point_mass_oracle_has_zero_loss(strategy, r_frac, t_val, gaussian_oracle):
    """For deterministic data x = m the conditional velocity v = e - x IS the marginal one, so
    the exact u gives a per-sample loss of zero for every r <= t; a perturbed u does not."""
    B = 8
    x = M2.expand(B, 2).clone()
    e = torch.randn(B, 2, generator=gen(2), dtype=F64)
    t = torch.full((B,), t_val, dtype=F64)
    r = r_frac * t
    loss_fn = MeanFlowLoss(p=0.0, jvp=strategy)
    loss, stats = loss_fn(gaussian_oracle(M2, 0.0), x, r=r, t=t, e=e)
    assert loss.shape == (B,)
    assert float(loss.detach().amax()) <= 1e-20
    perturbed, _ = loss_fn(gaussian_oracle(M2, 0.0, wobble=0.01), x, r=r, t=t, e=e)
    assert float(perturbed.detach().amin()) > 1e-5


def test_oracle_is_the_fixed_point_of_the_stop_gradient_loss(gaussian_oracle):
    """Gaussian data, p = 0: E[u_tgt | z_t, r, t] = u for the exact u, so the gradient of the
    loss with respect to an additive shift of u, 2·mean(Δ), is zero within its standard error;
    for a perturbed u it is far from zero, and the loss itself is larger with the same noise.
    (The perturbation is z-independent: a z-dependent one also changes the noise part of the
    target, so the raw loss VALUE is not minimised at the oracle for every perturbation.)"""
    B, s = 100_000, 0.7
    x = M2 + s * torch.randn(B, 2, generator=gen(3), dtype=F64)
    loss_fn = MeanFlowLoss(p=0.0, fraction_r_neq_t=0.5, jvp="func")
    results = {}
    for wobble in (0.0, 0.1):
        oracle = gaussian_oracle(M2, s, wobble=wobble)
        loss, _ = loss_fn(oracle, x, generator=gen(4))
        grad, = torch.autograd.grad(loss.mean(), oracle.shift)
        results[wobble] = (loss.mean().item(), grad)
    loss_exact, grad_exact = results[0.0]
    loss_pert, grad_pert = results[0.1]
    # d loss_i / d shift = 2Δ_i; the batch mean has standard error 2·std(Δ_d)/sqrt(B) per
    # dimension, and std(Δ_d)² <= E[Δ_d²] <= E||Δ||² = the mean loss.
    se = 2 * (loss_exact / B) ** 0.5
    assert float(grad_exact.abs().amax()) < 5 * se
    assert float(grad_pert.abs().amin()) > 20 * se
    assert loss_pert > loss_exact + 0.005


# ------------------------------------------------------------------ r = t is flow matching

@pytest.mark.parametrize("shape", [(16, 2), (4, 3, 4, 4)])
@pytest.mark.parametrize("strategy", JVP_STRATEGIES)
def test_r_equal_t_is_flow_matching(strategy, shape, tiny_mlp):
    """With r = t the correction (t - r)·du/dt vanishes, u_tgt = v, and the MeanFlow per-sample
    loss (p = 0) equals FlowMatchingLoss's for the same t and e."""
    dim = int(torch.tensor(shape[1:]).prod())
    net = tiny_mlp(dim=dim)
    g = gen(5)
    x = torch.randn(shape, generator=g, dtype=F64)
    e = torch.randn(shape, generator=g, dtype=F64)
    t = torch.rand(shape[0], generator=g, dtype=F64)
    t[0] = 1.0
    mf, stats = MeanFlowLoss(p=0.0, jvp=strategy)(net, x, r=t, t=t, e=e)
    fm, _ = FlowMatchingLoss()(net, x, t=t, e=e)
    torch.testing.assert_close(mf, fm, atol=0, rtol=1e-14)
    assert float(stats["frac_r_neq_t"]) == 0.0
    torch.testing.assert_close(stats["u_minus_v"], stats["mse"], atol=0, rtol=1e-14)
    # Non-tautology: with r < t the two losses differ.
    mf_r0, _ = MeanFlowLoss(p=0.0, jvp=strategy)(net, x, r=torch.zeros_like(t), t=t, e=e)
    assert float((mf_r0 - fm).detach().abs().amax()) > 1e-6


def test_fraction_zero_samples_only_r_equal_t(tiny_mlp):
    """fraction_r_neq_t = 0: every net call sees h = 0, and the loss is ||u(z_t, t, t) - v||²
    with v recovered from the recorded z_t (v = (z_t - x)/t)."""
    net = tiny_mlp()
    calls = []

    def spy(z, t, h, y=None):
        calls.append((z.detach().clone(), t.detach().clone(), h.detach().clone()))
        return net(z, t, h, y)

    x = torch.randn(64, 2, generator=gen(6), dtype=F64)
    loss, stats = MeanFlowLoss(p=0.0, fraction_r_neq_t=0.0)(spy, x, generator=gen(7))
    assert calls and all(bool((h == 0).all()) for _, _, h in calls)
    z, t, _ = calls[-1]
    v = (z - x) / col(t, x)
    with torch.no_grad():
        expected = (net(z, t, torch.zeros_like(t)) - v).pow(2).sum(1)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-10, rtol=1e-9)
    assert float(stats["frac_r_neq_t"]) == 0.0


# ---------------------------------------------------------------------- the adaptive weight

def test_adaptive_weight_function():
    """w = 1 for p = 0; otherwise (err + c)^(-p), detached from err's graph."""
    err = torch.tensor([0.0, 1e-4, 0.3, 7.0], dtype=F64, requires_grad=True)
    torch.testing.assert_close(adaptive_weight(err, 0.0, 1e-3), torch.ones_like(err))
    for p, c in [(0.5, 1e-3), (1.0, 1e-2), (1.5, 0.1)]:
        w = adaptive_weight(err, p, c)
        assert not w.requires_grad
        torch.testing.assert_close(w, 1.0 / (err.detach() + c) ** p, atol=0, rtol=1e-14)


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0, 1.5])
@pytest.mark.parametrize("strategy", ["split", "forward_ad"])
def test_weighted_loss_and_stats_match_direct_computation(strategy, p, tiny_mlp):
    """Per-sample loss = err/(err + c)^p with err = ||u - sg(u_tgt)||²; the stats are the
    means of loss, err, weight, ||u - v||² and of [r != t]."""
    c = 1e-3
    net = tiny_mlp()
    g = gen(8)
    x = torch.randn(12, 2, generator=g, dtype=F64)
    e = torch.randn(12, 2, generator=g, dtype=F64)
    t = torch.rand(12, generator=g, dtype=F64)
    r = t * (torch.rand(12, generator=g, dtype=F64) < 0.5)
    loss, stats = MeanFlowLoss(p=p, c=c, jvp=strategy)(net, x, r=r, t=t, e=e)
    expected, err, u = hand_loss(net, x, r, t, e, p, c)
    torch.testing.assert_close(loss, expected, atol=1e-14, rtol=1e-11)
    torch.testing.assert_close(stats["loss"], expected.mean().detach(), atol=1e-14, rtol=1e-11)
    torch.testing.assert_close(stats["mse"], err.mean().detach(), atol=1e-14, rtol=1e-11)
    torch.testing.assert_close(stats["weight"], ((err.detach() + c) ** -p).mean(),
                               atol=1e-14, rtol=1e-11)
    torch.testing.assert_close(stats["u_minus_v"], (u - (e - x)).pow(2).sum(1).mean().detach(),
                               atol=1e-14, rtol=1e-11)
    torch.testing.assert_close(stats["frac_r_neq_t"], (r != t).float().mean())
    assert all(not s.requires_grad and s.ndim == 0 for s in stats.values())
    if p == 1.0:  # the weighted loss of p = 1 is ≈ 1 when err >> c
        big = err.detach() > 100 * c
        assert bool(big.any()) and bool((loss.detach()[big] > 0.9).all())


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0, 1.5])
def test_weighted_loss_gradient(p, tiny_mlp):
    """The gradient of w·err with w stop-gradient is that of F(err) with F' = 1/(err + c)^p:
    F = err (p = 0), log(err + c) (p = 1), (err + c)^(1-p)/(1-p) otherwise. This also checks that
    no gradient flows through u_tgt (err is built with a detached target)."""
    c = 1e-2
    net = tiny_mlp()
    g = gen(9)
    x = torch.randn(10, 2, generator=g, dtype=F64)
    e = torch.randn(10, 2, generator=g, dtype=F64)
    t = torch.rand(10, generator=g, dtype=F64)
    r = 0.5 * t
    params = list(net.parameters())
    loss, _ = MeanFlowLoss(p=p, c=c)(net, x, r=r, t=t, e=e)
    grads = torch.autograd.grad(loss.mean(), params)
    _, err, _ = hand_loss(net, x, r, t, e)
    if p == 0.0:
        potential = err
    elif p == 1.0:
        potential = torch.log(err + c)
    else:
        potential = (err + c) ** (1 - p) / (1 - p)
    expected = torch.autograd.grad(potential.mean(), params, retain_graph=True)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-10)
    # Non-tautology: back-propagating through the target as well changes the gradient.
    z = (1 - col(t, x)) * x + col(t, x) * e
    f = lambda z_, r_, t_: net(z_, t_, t_ - r_)  # noqa: E731
    u, dudt = torch.func.jvp(f, (z, r, t), (e - x, torch.zeros_like(r), torch.ones_like(t)))
    err_through = (u - (e - x - col(t - r, x) * dudt)).pow(2).sum(1)
    g_through = torch.autograd.grad(err_through.mean(), params)
    g_stopped = torch.autograd.grad(err.mean(), params)
    assert max(float((a - b).abs().max()) for a, b in zip(g_through, g_stopped)) > 1e-6


# ------------------------------------------------------------------------- invalid arguments

@pytest.mark.parametrize("kwargs", [dict(p=-0.5), dict(p=float("nan")), dict(c=0.0),
                                    dict(c=-1e-3), dict(label_drop=-0.1), dict(label_drop=1.1),
                                    dict(fraction_r_neq_t=1.5), dict(time_sampler="foo"),
                                    dict(t_interval=(0.8, 0.2)), dict(num_classes=0),
                                    dict(r_eq_t_rows="last"), dict(r_eq_t_rows=None),
                                    dict(label_drop_rows="prefix"),
                                    dict(label_drop_rows="First")])
def test_invalid_loss_configuration(kwargs):
    """Out-of-range settings raise ConfigError at construction."""
    with pytest.raises(ConfigError):
        MeanFlowLoss(**kwargs)


def test_invalid_times_and_noise(tiny_mlp):
    """Hand-given times must satisfy 0 <= r <= t <= 1, shapes must match, and both r and t must
    be given; average_velocity refuses r > t."""
    net = tiny_mlp()
    x = torch.randn(4, 2, dtype=F64)
    t = torch.full((4,), 0.5, dtype=F64)
    loss_fn = MeanFlowLoss()
    bad = [dict(r=t + 0.1, t=t), dict(r=t, t=t + 0.6), dict(r=t - 0.6, t=t), dict(r=t),
           dict(t=t), dict(r=t[:3], t=t[:3]), dict(e=torch.randn(4, 3, dtype=F64))]
    for kwargs in bad:
        with pytest.raises(ConfigError):
            loss_fn(net, x, **kwargs)
    with pytest.raises(ConfigError):
        loss_fn(net, x[0])  # no batch dimension
    with pytest.raises(ConfigError):
        loss_fn(net, x, torch.zeros(4, dtype=torch.long))  # labels to an unconditional loss
    with pytest.raises(ConfigError):
        average_velocity(net, x, t + 0.1, t)
    with pytest.raises(ConfigError):
        average_velocity(net, x, t[:2], t[:2])


# ------------------------------------------------- batch layouts ("random" / "first", JAX)

LAYOUTS = [("random", "random"), ("first", "random"), ("random", "first"), ("first", "first")]


@pytest.mark.parametrize("B,fraction,n_eq", [(32, 0.25, 24), (7, 0.75, 1), (7, 0.25, 5),
                                             (8, 0.0, 8), (8, 1.0, 0), (10, 0.9, 1)])
def test_first_layout_frac_r_neq_t_stat_is_exact(B, fraction, n_eq, tiny_mlp):
    """Under r_eq_t_rows="first" the logged frac_r_neq_t is exactly (B - n_eq)/B in every
    step, and the net's final forward sees h = 0 on rows [0, n_eq) and h > 0 after."""
    net = tiny_mlp()
    calls = []

    def spy(z, t, h, y=None):
        if torch.is_grad_enabled():
            calls.append(h.detach().clone())
        return net(z, t, h, y)

    loss_fn = MeanFlowLoss(fraction_r_neq_t=fraction, r_eq_t_rows="first")
    assert loss_fn.r_eq_t_rows == "first"
    x = torch.randn(B, 2, generator=gen(40), dtype=F64)
    for seed in range(5):
        _, stats = loss_fn(spy, x, generator=gen(seed))
        assert float(stats["frac_r_neq_t"]) == float(torch.tensor((B - n_eq) / B))
        assert round(float(stats["frac_r_neq_t"]) * B) == B - n_eq
        assert bool((calls[-1][:n_eq] == 0).all()) and bool((calls[-1][n_eq:] > 0).all())


@pytest.mark.parametrize("r_rows,drop_rows", LAYOUTS)
def test_layouts_keep_the_order_of_the_random_draws(r_rows, drop_rows, tiny_mlp):
    """Every layout draws, in order: the two time draws, the per-sample keep uniforms (only
    for r_eq_t_rows="random"), the noise e, then B label uniforms. So the generator ends where
    a hand replay of that sequence ends, and the loss equals the one given (r, t, e) drawn by
    the sampler then e, as the compiled training step does, with the same generator."""
    B = 12
    net = tiny_mlp(num_classes=3)
    x = torch.randn(B, 2, generator=gen(41), dtype=F64)
    y = torch.arange(B) % 3
    loss_fn = MeanFlowLoss(fraction_r_neq_t=0.5, label_drop=0.4, num_classes=3,
                           r_eq_t_rows=r_rows, label_drop_rows=drop_rows)
    g = gen(42)
    loss, _ = loss_fn(net, x, y, generator=g)
    ref = gen(42)
    torch.randn(B, generator=ref), torch.randn(B, generator=ref)
    if r_rows == "random":
        torch.rand(B, generator=ref)
    torch.randn(B, 2, generator=ref, dtype=F64)
    torch.rand(B, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())
    g2 = gen(42)
    r, t = loss_fn.sampler(B, x.device, g2)
    e = torch.randn(x.shape, generator=g2, dtype=F64)
    loss2, _ = loss_fn(net, x, y, generator=g2, r=r.to(F64), t=t.to(F64), e=e)
    assert torch.equal(loss, loss2)


def test_default_layouts_are_the_per_sample_ones(tiny_mlp):
    """The defaults are "random" for both layouts, bit for bit."""
    net = tiny_mlp(num_classes=3)
    x = torch.randn(16, 2, generator=gen(43), dtype=F64)
    y = torch.arange(16) % 3
    default = MeanFlowLoss(num_classes=3, label_drop=0.3)
    explicit = MeanFlowLoss(num_classes=3, label_drop=0.3, r_eq_t_rows="random",
                            label_drop_rows="random")
    assert default.r_eq_t_rows == "random" and default.label_drop_rows == "random"
    a, _ = default(net, x, y, generator=gen(44))
    b, _ = explicit(net, x, y, generator=gen(44))
    assert torch.equal(a, b)
