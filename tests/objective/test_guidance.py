"""Classifier-free guidance trained into the target (SPEC §1, paper Eq. 13-19):

    ṽ = ω·v + κ·u(z_t, t, t | y) + (1 - ω - κ)·u(z_t, t, t | ∅),

used both in the target and as the z-part of the JVP tangent, only for kept labels and for t in
t_interval. Checked by hand on nets whose output is a known function of the label.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from meanflow import JVP_STRATEGIES, ConfigError, MeanFlowLoss, guided_velocity

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
    """ω' = ω / (1 - κ) for the paper's settings (SPEC §2)."""
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
