"""Classifier-free guidance trained into the target (paper Eq. 13-19, docs/method.md §8):

    ṽ = ω·v + κ·u(z_t, t, t | y) + (1 - ω - κ)·u(z_t, t, t | ∅),

used both in the target and as the z-part of the JVP tangent, only for kept labels and for t in
t_interval. Checked by hand on nets whose output is a known function of the label.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from meanflow import (JVP_STRATEGIES, ConfigError, FlowMatchingLoss, MeanFlowLoss,
                      guided_velocity)
from meanflow.objective.meanflow_loss import drop_labels

F64 = torch.float64
K = 3        # classes; the null class is index K
NULL = K
B = 8


def col(s: Tensor, x: Tensor) -> Tensor:
    return s.reshape(-1, *([1] * (x.ndim - 1)))


class LabelNet(nn.Module):
    """u(z, t, h | y) = A[y]·z + C[y]·(1 + β·h) + D[y]·t², per element; y = None is the null
    class. Along (ṽ, 0, 1): du/dt = A[y]·ṽ + β·C[y] + 2·D[y]·t. ``calls`` records
    (batch size, labels, h, grad enabled) of every call."""

    def __init__(self, dim: int = 2, seed: int = 0, affine: bool = True, beta: float = 0.8):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        scale = 1.0 if affine else 0.0
        self.register_buffer("A", scale * torch.randn(K + 1, dim, generator=g, dtype=F64))
        self.register_buffer("C", torch.randn(K + 1, dim, generator=g, dtype=F64))
        self.register_buffer("D", scale * torch.randn(K + 1, dim, generator=g, dtype=F64))
        self.beta = beta if affine else 0.0
        self.dummy = nn.Parameter(torch.zeros((), dtype=F64))  # so that backward works
        self.calls: list[tuple[int, Tensor, Tensor, bool]] = []

    def forward(self, z: Tensor, t: Tensor, h: Tensor, y: Tensor | None = None) -> Tensor:
        if y is None:
            y = torch.full((z.shape[0],), NULL, dtype=torch.long)
        self.calls.append((z.shape[0], y.clone(), h.detach().clone(), torch.is_grad_enabled()))
        return (self.A[y] * z + self.C[y] * (1 + self.beta * col(h, z))
                + self.D[y] * col(t, z) ** 2 + self.dummy)

    def instant(self, z: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """u(z, t, t | y), h = 0."""
        return self.A[y] * z + self.C[y] + self.D[y] * col(t, z) ** 2


def draw(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 2, generator=g, dtype=F64)
    e = torch.randn(B, 2, generator=g, dtype=F64)
    t = 0.05 + 0.9 * torch.rand(B, generator=g, dtype=F64)
    r = t * torch.rand(B, generator=g, dtype=F64)
    r[:2] = t[:2]  # some r = t
    y = torch.arange(B) % K
    return x, e, r, t, y


def hand_guided_loss(net: LabelNet, x, e, r, t, y, omega, kappa, guide: Tensor) -> Tensor:
    """Per-sample ||u - u_tgt||² with ṽ from the formula where ``guide`` (B,) is True and plain
    v elsewhere; ``y`` are the labels the net sees (after dropout)."""
    z = (1 - col(t, x)) * x + col(t, x) * e
    v = e - x
    null = torch.full_like(y, NULL)
    v_mix = omega * v + kappa * net.instant(z, t, y) + (1 - omega - kappa) * net.instant(z, t, null)
    v_tilde = torch.where(col(guide, x), v_mix, v)
    dudt = net.A[y] * v_tilde + net.beta * net.C[y] + 2 * net.D[y] * col(t, x)
    u_tgt = v_tilde - col(t - r, x) * dudt
    u = net.A[y] * z + net.C[y] * (1 + net.beta * col(t - r, x)) + net.D[y] * col(t, x) ** 2
    return (u - u_tgt).pow(2).sum(1)


GUIDANCE = [(1.0, 0.0), (1.5, 0.0), (3.0, 0.0), (1.0, 0.5), (0.2, 0.92)]


@pytest.mark.parametrize("omega,kappa", GUIDANCE)
@pytest.mark.parametrize("strategy", JVP_STRATEGIES)
def test_guided_loss_matches_hand_computation(strategy, omega, kappa):
    """Per-sample loss (p = 0, no label dropout) equals the hand-built target with ṽ in both
    the target and the JVP tangent; ω = 1, κ = 0 is the unguided target with plain v."""
    net = LabelNet()
    x, e, r, t, y = draw()
    loss_fn = MeanFlowLoss(p=0.0, omega=omega, kappa=kappa, num_classes=K, label_drop=0.0,
                           jvp=strategy)
    loss, stats = loss_fn(net, x, y, r=r, t=t, e=e)
    everywhere = torch.ones(B, dtype=torch.bool)
    expected = hand_guided_loss(net, x, e, r, t, y, omega, kappa, everywhere)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-12, rtol=1e-12)
    # The logged ||u - v||² uses the plain conditional velocity, comparable with flow matching.
    z = (1 - col(t, x)) * x + col(t, x) * e
    with torch.no_grad():
        u = net(z, t, t - r, y)
    torch.testing.assert_close(stats["u_minus_v"], (u - (e - x)).pow(2).sum(1).mean(),
                               atol=1e-12, rtol=1e-12)
    if (omega, kappa) != (1.0, 0.0):  # non-tautology: guidance changes the loss
        plain = hand_guided_loss(net, x, e, r, t, y, 1.0, 0.0, everywhere)
        assert float((loss.detach() - plain).abs().amax()) > 1e-3


@pytest.mark.parametrize("omega,kappa", GUIDANCE)
def test_constant_label_net_gives_known_loss(omega, kappa):
    """u = c_y, independent of z and t (du/dt = 0): u_tgt = ṽ = ω v + κ c_y + (1-ω-κ) c_∅ and
    the per-sample loss is ||c_y - ṽ||²."""
    net = LabelNet(affine=False)
    x, e, r, t, y = draw(1)
    loss, _ = MeanFlowLoss(p=0.0, omega=omega, kappa=kappa, num_classes=K,
                           label_drop=0.0)(net, x, y, r=r, t=t, e=e)
    c_y, c_null = net.C[y], net.C[NULL]
    v_tilde = omega * (e - x) + kappa * c_y + (1 - omega - kappa) * c_null
    torch.testing.assert_close(loss.detach(), (c_y - v_tilde).pow(2).sum(1), atol=1e-12,
                               rtol=1e-12)


@pytest.mark.parametrize("omega,kappa", [(1.0, 0.0), (1.5, 0.0), (1.0, 0.5)])
def test_guidance_calls_are_instantaneous_and_without_grad(omega, kappa):
    """The extra calls use h = 0 and no grad; κ = 0 needs only the unconditional call (one
    batch of B null labels), κ != 0 one batch of 2B (labels then nulls); ω = 1, κ = 0 none."""
    net = LabelNet()
    x, e, r, t, y = draw(2)
    MeanFlowLoss(p=0.0, omega=omega, kappa=kappa, num_classes=K, label_drop=0.0,
                 jvp="split")(net, x, y, r=r, t=t, e=e)
    extra = net.calls[:-2]  # split strategy: the last two calls are the JVP and the forward
    if (omega, kappa) == (1.0, 0.0):
        assert extra == []
        return
    assert len(extra) == 1
    size, labels, h, grad = extra[0]
    assert not grad and bool((h == 0).all())
    if kappa == 0.0:
        assert size == B and bool((labels == NULL).all())
    else:
        assert size == 2 * B and torch.equal(labels, torch.cat([y, torch.full_like(y, NULL)]))


@pytest.mark.parametrize("omega,kappa", [(2.0, 0.0), (1.0, 0.5), (0.2, 0.9), (1.8, 0.1)])
def test_fixed_point_of_guidance_has_the_effective_scale(omega, kappa):
    """u* = ω' v + (1 - ω') u_∅ with ω' = ω/(1 - κ) = 2 solves u = ω v + κ u + (1-ω-κ) u_∅: a
    net whose conditional output is u* gets u* back from guided_velocity; another conditional
    output does not."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(B, 2, generator=g, dtype=F64)
    v = torch.randn(B, 2, generator=g, dtype=F64)
    u_null = torch.randn(B, 2, generator=g, dtype=F64)
    t = torch.rand(B, generator=g, dtype=F64)
    y = torch.arange(B) % K
    scale = omega / (1 - kappa)
    assert scale == pytest.approx(2.0)
    u_star = scale * v + (1 - scale) * u_null

    def net_with(u_cond: Tensor):
        """Ignores (z, t, h): row i of u_cond for a real label, of u_null for the null class
        (the guidance batch may be [z, z], hence rows modulo B)."""
        def net(z_, t_, h_, y_):
            rows = torch.arange(z_.shape[0]) % B
            return torch.where(col(y_ == NULL, z_), u_null[rows], u_cond[rows])
        return net

    out = guided_velocity(net_with(u_star), z, t, v, y, NULL, omega, kappa)
    torch.testing.assert_close(out, u_star, atol=1e-13, rtol=1e-13)
    assert MeanFlowLoss(omega=omega, kappa=kappa, num_classes=K).effective_guidance_scale \
        == pytest.approx(scale)
    if kappa > 0:
        other = guided_velocity(net_with(u_star + 1.0), z, t, v, y, NULL, omega, kappa)
        assert float((other - u_star).abs().amin()) > 1e-3


def test_effective_guidance_scale_property():
    """ω' = ω / (1 - κ) for the paper's settings (Tab. 2; docs/method.md §10)."""
    for omega, kappa, expected in [(1.0, 0.0, 1.0), (3.0, 0.0, 3.0), (1.0, 0.5, 2.0),
                                   (0.2, 0.92, 2.5)]:
        loss_fn = MeanFlowLoss(omega=omega, kappa=kappa, num_classes=K)
        assert loss_fn.effective_guidance_scale == pytest.approx(expected)


def test_guided_velocity_apply_mask():
    """Where ``apply`` is False guided_velocity returns v unchanged (bitwise)."""
    net = LabelNet()
    g = torch.Generator().manual_seed(4)
    z, v = torch.randn(B, 2, generator=g, dtype=F64), torch.randn(B, 2, generator=g, dtype=F64)
    t = torch.rand(B, generator=g, dtype=F64)
    y = torch.arange(B) % K
    apply = torch.arange(B) % 2 == 0
    out = guided_velocity(net, z, t, v, y, NULL, 2.0, 0.3, apply)
    full = guided_velocity(net, z, t, v, y, NULL, 2.0, 0.3)
    assert torch.equal(out[~apply], v[~apply])
    assert torch.equal(out[apply], full[apply])
    assert float((full[~apply] - v[~apply]).abs().amin()) > 1e-6


def test_dropped_labels_use_plain_v():
    """label_drop = 1: every label becomes the null class and the target is built from plain v
    even though ω, κ ask for guidance."""
    net = LabelNet()
    x, e, r, t, y = draw(5)
    loss, _ = MeanFlowLoss(p=0.0, omega=2.0, kappa=0.5, num_classes=K, label_drop=1.0)(
        net, x, y, r=r, t=t, e=e, generator=torch.Generator().manual_seed(0))
    null = torch.full_like(y, NULL)
    nowhere = torch.zeros(B, dtype=torch.bool)
    expected = hand_guided_loss(net, x, e, r, t, null, 2.0, 0.5, nowhere)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-12, rtol=1e-12)
    guided = hand_guided_loss(net, x, e, r, t, null, 2.0, 0.5, ~nowhere)
    assert float((expected - guided).abs().amax()) > 1e-3


def test_partially_dropped_labels_per_sample():
    """label_drop = 0.5: samples whose label the net saw as null use plain v, the others ṽ."""
    net = LabelNet()
    x, e, r, t, y = draw(6)
    loss, _ = MeanFlowLoss(p=0.0, omega=1.5, kappa=0.3, num_classes=K, label_drop=0.5)(
        net, x, y, r=r, t=t, e=e, generator=torch.Generator().manual_seed(1))
    seen = net.calls[-1][1]  # labels of the final forward, after dropout
    dropped = seen == NULL
    assert 0 < int(dropped.sum()) < B
    assert torch.equal(seen[~dropped], y[~dropped])
    expected = hand_guided_loss(net, x, e, r, t, seen, 1.5, 0.3, ~dropped)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-12, rtol=1e-12)


def test_guidance_only_inside_t_interval():
    """t_interval = (0.3, 0.7): ṽ for t in [0.3, 0.7] (bounds included), plain v outside."""
    net = LabelNet()
    x, e, _, _, y = draw(7)
    t = torch.tensor([0.1, 0.29, 0.3, 0.5, 0.7, 0.71, 0.9, 1.0], dtype=F64)
    r = 0.5 * t
    loss, _ = MeanFlowLoss(p=0.0, omega=2.0, kappa=0.0, num_classes=K, label_drop=0.0,
                           t_interval=(0.3, 0.7))(net, x, y, r=r, t=t, e=e)
    inside = (t >= 0.3) & (t <= 0.7)
    expected = hand_guided_loss(net, x, e, r, t, y, 2.0, 0.0, inside)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-12, rtol=1e-12)
    everywhere = hand_guided_loss(net, x, e, r, t, y, 2.0, 0.0, torch.ones_like(inside))
    assert float((expected - everywhere)[~inside].abs().amin()) > 1e-6


@pytest.mark.parametrize("kwargs", [
    dict(kappa=1.0, num_classes=K), dict(kappa=-0.1, num_classes=K),
    dict(omega=float("inf"), num_classes=K), dict(omega=2.0), dict(kappa=0.5),
    dict(p=-1.0), dict(c=0.0), dict(c=-0.1), dict(label_drop=-0.01, num_classes=K),
    dict(label_drop=1.01, num_classes=K), dict(t_interval=(-0.1, 1.0), num_classes=K)])
def test_invalid_guidance_settings(kwargs):
    """κ must be in [0, 1), guidance needs num_classes, p >= 0, c > 0, label_drop in [0, 1]."""
    with pytest.raises(ConfigError):
        MeanFlowLoss(**kwargs)


def test_invalid_labels():
    """A class-conditional loss needs integer labels shaped (B,)."""
    net = LabelNet()
    x, e, r, t, y = draw(8)
    loss_fn = MeanFlowLoss(num_classes=K)
    for bad in [None, y[:-1], y.reshape(B, 1), y.double(), y > 0]:
        with pytest.raises(ConfigError):
            loss_fn(net, x, bad, r=r, t=t, e=e)
    with pytest.raises(ConfigError):  # r > t given by hand (r and t swapped)
        loss_fn(net, x, y, r=t, t=r, e=e)


# ------------------------------------------ label-dropout layouts ("random" / "first", JAX)

def test_drop_labels_random_layout_is_unchanged():
    """rows="random" (the default) drops label i where u_i < prob for B uniforms u drawn from
    the generator, exactly as before the layouts existed; the generator advances by B."""
    y = torch.arange(40) % K
    for prob in (0.0, 0.1, 0.5, 1.0):
        for layout in ({}, {"rows": "random"}):
            g, ref = torch.Generator().manual_seed(20), torch.Generator().manual_seed(20)
            labels, dropped = drop_labels(y, prob, NULL, g, **layout)
            expected = torch.rand(40, generator=ref) < prob
            assert torch.equal(dropped, expected)
            assert torch.equal(labels, torch.where(expected, torch.full_like(y, NULL), y))
            assert torch.equal(g.get_state(), ref.get_state())


@pytest.mark.parametrize("B,prob", [(1, 0.5), (7, 0.3), (32, 0.1), (32, 0.5), (33, 0.9)])
def test_drop_labels_first_layout_drops_a_prefix_of_the_same_count(B, prob):
    """rows="first": from the same B uniforms, the count n = #(u < prob) equals the count of the
    "random" layout, and the dropped rows are exactly rows [0, n); other labels are kept."""
    y = torch.arange(B) % K
    for seed in range(30):
        labels, dropped = drop_labels(y, prob, NULL, torch.Generator().manual_seed(seed),
                                      rows="first")
        _, per_sample = drop_labels(y, prob, NULL, torch.Generator().manual_seed(seed))
        n = int(per_sample.sum())
        assert torch.equal(dropped, torch.arange(B) < n)
        assert bool((labels[:n] == NULL).all()) and torch.equal(labels[n:], y[n:])
    for prob, n in [(0.0, 0), (1.0, B)]:
        _, dropped = drop_labels(y, prob, NULL, torch.Generator().manual_seed(0), rows="first")
        assert int(dropped.sum()) == n


@pytest.mark.parametrize("B,prob", [(7, 0.3), (32, 0.1)])
def test_drop_labels_first_layout_count_is_binomial(B, prob):
    """The number of dropped labels per batch follows Binomial(B, prob): chi-square test over
    8000 batches (bins with expected count < 5 merged into the tails), and mean B·p and variance
    B·p·(1 - p) within 5 standard errors."""
    from scipy.stats import binom, chisquare
    batches = 8000
    g = torch.Generator().manual_seed(21)
    y = torch.zeros(B, dtype=torch.long)
    counts = np.array([int(drop_labels(y, prob, NULL, g, rows="first")[1].sum())
                       for _ in range(batches)])
    expected = binom.pmf(np.arange(B + 1), B, prob) * batches
    observed = np.bincount(counts, minlength=B + 1).astype(float)
    small = expected < 5
    keep = ~small
    obs = np.append(observed[keep], observed[small].sum())
    exp = np.append(expected[keep], expected[small].sum())
    assert chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3
    mean, var = B * prob, B * prob * (1 - prob)
    assert abs(counts.mean() - mean) <= 5 * math.sqrt(var / batches)
    # the variance of a sample variance: (mu4 - var²·(n-3)/(n-1)) / n, mu4 of the binomial
    mu4 = var * (1 + 3 * (B - 2) * prob * (1 - prob))
    assert abs(counts.var(ddof=1) - var) <= 5 * math.sqrt((mu4 - var ** 2) / batches)
    # power: a layout that dropped a fixed round(B·p) rows would fail the variance check
    assert abs(0.0 - var) > 5 * math.sqrt((mu4 - var ** 2) / batches)


@pytest.mark.parametrize("value", ["last", "First", None])
def test_invalid_label_drop_rows(value):
    """Unknown layouts raise a one-line ConfigError in drop_labels and both losses."""
    calls = [lambda: drop_labels(torch.zeros(4, dtype=torch.long), 0.1, NULL, rows=value),
             lambda: MeanFlowLoss(num_classes=K, label_drop_rows=value),
             lambda: MeanFlowLoss(num_classes=K, r_eq_t_rows=value),
             lambda: FlowMatchingLoss(num_classes=K, label_drop_rows=value)]
    for call in calls:
        with pytest.raises(ConfigError) as info:
            call()
        assert "\n" not in str(info.value) and "'first'" in str(info.value)


def labelled_mlp(tiny_mlp):
    """A small float64 MLP whose label embedding is large enough for labels to matter."""
    net = tiny_mlp(num_classes=K, seed=3)
    with torch.no_grad():
        net.y_embed.table.weight.copy_(
            torch.randn(net.y_embed.table.weight.shape, generator=torch.Generator()
                        .manual_seed(4), dtype=F64))
    return net


def jax_layout_loss(net, x, y, seed: int, *, B: int, data_proportion: float, mu: float,
                    sigma: float, prob: float, omega: float, kappa: float,
                    t_start: float, t_end: float, p: float, c: float):
    """The JAX ImageNet formulation re-derived step by step, drawing from a generator seeded
    with ``seed`` in the library's order (two LN draws, noise e, B label uniforms):

        t, r = max, min of two LN(mu, sigma) draws;  r := t on rows i < int(B·data_proportion)
        z = (1 - t)x + te,  v = e - x
        v_g = ω_t v + κ_t u(z, t, t | y) + (1 - ω_t - κ_t) u(z, t, t | ∅),
              (ω_t, κ_t) = (ω, κ) for t in [t_start, t_end], else (1, 0)
        n = #(u_i < prob);  rows i < n: label := ∅ and v_g := v
        u, du/dt = JVP of net(z, t, t - r | y_inp) along (v_g, dt = 1, dr = 0)
        u_tgt = sg(v_g - clip(t - r, 0, 1)·du/dt),  err = Σ (u - u_tgt)²,  loss = err/sg(err + c)^p

    Returns (loss, r, t, drop mask)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.sigmoid(mu + sigma * torch.randn(B, generator=g))
    b = torch.sigmoid(mu + sigma * torch.randn(B, generator=g))
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    zero_mask = torch.arange(B) < int(B * data_proportion)
    r = torch.where(zero_mask, t, r)
    t, r = t.to(F64), r.to(F64)
    e = torch.randn(x.shape, generator=g, dtype=F64)
    z = (1 - col(t, x)) * x + col(t, x) * e
    v = e - x
    with torch.no_grad():
        h0 = torch.zeros_like(t)
        v_uncond = net(z, t, h0, torch.full_like(y, NULL))
        v_cond = net(z, t, h0, y)
    inside = (t >= t_start) & (t <= t_end)
    om = torch.where(inside, torch.tensor(omega, dtype=F64), torch.tensor(1.0, dtype=F64))
    ka = torch.where(inside, torch.tensor(kappa, dtype=F64), torch.tensor(0.0, dtype=F64))
    v_g = col(om, x) * v + (1 - col(om, x) - col(ka, x)) * v_uncond + col(ka, x) * v_cond
    num_drop = (torch.rand(B, generator=g) < prob).sum()
    drop = torch.arange(B) < num_drop
    y_inp = torch.where(drop, torch.full_like(y, NULL), y)
    v_g = torch.where(col(drop, x), v, v_g)
    u, du_dt = torch.func.jvp(lambda z_, t_, r_: net(z_, t_, t_ - r_, y_inp), (z, t, r),
                              (v_g, torch.ones_like(t), torch.zeros_like(r)))
    u_tgt = (v_g - col((t - r).clamp(0.0, 1.0), x) * du_dt).detach()
    err = (u - u_tgt).pow(2).flatten(1).sum(1)
    return err / (err.detach() + c) ** p, r, t, drop


@pytest.mark.parametrize("strategy", JVP_STRATEGIES)
@pytest.mark.parametrize("prob,omega,kappa", [(0.1, 1.0, 0.0), (0.5, 1.5, 0.3), (0.3, 2.0, 0.0)])
def test_both_first_layouts_match_the_jax_formulation(prob, omega, kappa, strategy, tiny_mlp):
    """MeanFlowLoss(r_eq_t_rows="first", label_drop_rows="first") with its own draws equals the
    JAX formulation re-derived by hand (float64, B = 32, f = 0.25: 24 leading r = t rows),
    over several seeds; dropped rows are a prefix inside the r = t rows, the net's final
    forward sees the null class exactly there, and h = 0 on the first 24 rows. Non-tautology:
    the per-sample layouts give another loss for the same seed."""
    B, f = 32, 0.25
    net = labelled_mlp(tiny_mlp)
    gx = torch.Generator().manual_seed(30)
    x = torch.randn(B, 2, generator=gx, dtype=F64)
    y = torch.randint(0, K, (B,), generator=gx)
    settings = dict(mu=-0.4, sigma=1.0, omega=omega, kappa=kappa, p=1.0, c=1e-3)
    loss_fn = MeanFlowLoss(**settings, fraction_r_neq_t=f, label_drop=prob, num_classes=K,
                           t_interval=(0.2, 0.8), jvp=strategy, r_eq_t_rows="first",
                           label_drop_rows="first")
    calls = []

    def spy(z_, t_, h_, y_=None):
        if torch.is_grad_enabled():
            calls.append((h_.detach().clone(), y_.clone()))
        return net(z_, t_, h_, y_)

    for seed in range(4):
        calls.clear()
        loss, stats = loss_fn(spy, x, y, generator=torch.Generator().manual_seed(seed))
        expected, r, t, drop = jax_layout_loss(
            net, x, y, seed, B=B, data_proportion=1 - f, prob=prob, t_start=0.2, t_end=0.8,
            **settings)
        torch.testing.assert_close(loss.detach(), expected.detach(), atol=1e-13, rtol=1e-11)
        n = int(drop.sum())
        assert n <= 24 and bool((r[:24] == t[:24]).all()) and bool((r[24:] < t[24:]).all())
        h_final, y_final = calls[-1]
        assert torch.equal(y_final == NULL, drop) and bool((h_final[:24] == 0).all())
        assert bool((h_final[24:] > 0).all())
        assert float(stats["frac_r_neq_t"]) == 0.25
        other, _ = MeanFlowLoss(**settings, fraction_r_neq_t=f, label_drop=prob, num_classes=K,
                                t_interval=(0.2, 0.8), jvp=strategy)(
            net, x, y, generator=torch.Generator().manual_seed(seed))
        assert float((other - loss).detach().abs().amax()) > 1e-6
