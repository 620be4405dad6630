"""The improved MeanFlow (iMF) objective (docs/imf.md), checked on the mathematics:

- with the target ṽ as tangent (and no v-head) it is the MeanFlow loss, value and gradient;
- the guidance-scale sampler inverts its CDF exactly and matches it empirically (KS bound);
- the guided target on hand-computed cases: ω′ = ω inside the interval, 1 outside;
  label-dropped rows get v_c; ω ≡ 1 gives the unguided target;
- du/dt with the v-head under every JVP strategy equals a float64 central difference, and the
  three strategies agree on u, du/dt, v and the gradients;
- the boundary variant takes v̂ = u(z, h = 0);
- the row layout (first half r = t, interval [0, 1] there) and the whole loss against our own
  float64 re-derivation of the official code's formula on the same draws (three guidance calls,
  the JVP on (z, t, r) along (v̂, 1, 0), the row mask by index).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from meanflow import ConfigError, MeanFlowLoss
from meanflow.models.forward_mode import in_jvp_pass
from meanflow.objective import (JVP_STRATEGIES, IMFLoss, guidance_scale_cdf,
                                imf_guided_velocity, sample_guidance_interval,
                                sample_guidance_scale, u_and_dudt)

F64 = torch.float64
K = 3          # classes; the null class is K
EPS, TOL = 1e-6, 1e-7


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def col(s: Tensor, x: Tensor) -> Tensor:
    return s.reshape(-1, *([1] * (x.ndim - 1)))


class IMFNet(nn.Module):
    """A float64 test backbone honouring the iMF contract: a tanh MLP on (flattened z, sin 3t,
    h, 1 - 1/ω, t_min, t_max) plus a label embedding, a shared trunk, a u-head and (``heads``)
    a v-head. ``calls`` records every call made outside a JVP pass."""

    def __init__(self, shape: tuple[int, ...] = (3,), width: int = 16, seed: int = 0,
                 heads: bool = True) -> None:
        super().__init__()
        g = gen(seed)
        dim = math.prod(shape)

        def lin(i: int, o: int) -> nn.Linear:
            layer = nn.Linear(i, o).double()
            with torch.no_grad():
                layer.weight.copy_(torch.randn(o, i, generator=g, dtype=F64) / math.sqrt(i))
                layer.bias.copy_(0.3 * torch.randn(o, generator=g, dtype=F64))
            return layer
        self.shape = shape
        self.emb = nn.Parameter(0.5 * torch.randn(K + 1, width, generator=g, dtype=F64))
        self.inp, self.mid, self.u_out = lin(dim + 5, width), lin(width, width), lin(width, dim)
        self.v_out = lin(width, dim) if heads else None
        self.calls: list[dict] = []

    def forward(self, z, t, h, y=None, *, omega=None, t_min=None, t_max=None, **flag):
        v_head = flag.pop("v_head", False)
        if flag or (v_head and self.v_out is None):
            raise TypeError(f"unexpected keywords {sorted(flag) or ['v_head']}")
        B = z.shape[0]
        omega = torch.ones_like(t) if omega is None else omega
        t_min = torch.zeros_like(t) if t_min is None else t_min
        t_max = torch.ones_like(t) if t_max is None else t_max
        scalars = torch.stack([torch.sin(3 * t), h, 1 - 1 / omega, t_min, t_max], 1)
        a = self.inp(torch.cat([z.reshape(B, -1), scalars], 1))
        if y is not None:
            a = a + self.emb[y]
        a = torch.tanh(self.mid(torch.tanh(a)))
        u = self.u_out(a).reshape(z.shape)
        if not in_jvp_pass():
            self.calls.append({k: None if val is None else val.detach().clone() for k, val in
                               dict(y=y, h=h, omega=omega, t_min=t_min, t_max=t_max).items()}
                              | {"B": B, "v_head": v_head, "grad": torch.is_grad_enabled()})
        if v_head:
            return u, self.v_out(a).reshape(z.shape)
        return u


def batch(B: int = 8, shape: tuple[int, ...] = (3,), seed: int = 1):
    g = gen(seed)
    return torch.randn(B, *shape, generator=g, dtype=F64), torch.arange(B) % K


def grads(net: nn.Module) -> list[Tensor]:
    out = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    net.zero_grad(set_to_none=True)
    return out


def official_reference(net, x, y, d, *, variant="v_head", p=1.0, c=0.01, drop=0.1,
                       frac_eq=0.5):
    """Our float64 re-derivation of the official iMF training step on the draws ``d``: row
    masks by index, three no-grad guidance calls (v^c at ω, v^u at ω = 1 with the null label,
    v̂ at ω′), the r = t rows' target from the first, the JVP on (z, t, r) along (v̂, 1, 0)
    with the v output as auxiliary. Returns (per-sample loss, ṽ, v̂)."""
    B = x.shape[0]
    r, t, e = d["r"].to(F64), d["t"].to(F64), d["e"]
    fm = torch.arange(B) < int(B * frac_eq)
    z, v_t = (1 - col(t, x)) * x + col(t, x) * e, e - x
    zero, one = torch.zeros_like(t), torch.ones_like(t)
    t_min = torch.where(fm, zero, d["t_min"].to(F64))
    t_max = torch.where(fm, one, d["t_max"].to(F64))
    omega = d["omega"].to(F64)

    def V(w, labels):
        with torch.no_grad():
            if variant == "v_head":
                return net(z, t, zero, labels, omega=w, t_min=zero, t_max=one, v_head=True)[1]
            return net(z, t, zero, labels, omega=w, t_min=zero, t_max=one)

    v_cw, v_u = V(omega, y), V(one, torch.full_like(y, K))
    v_g_fm = v_t + col(1 - 1 / omega, x) * (v_cw - v_u)
    w = torch.where((t >= t_min) & (t <= t_max), omega, one)
    v_hat = V(w, y)
    v_g = torch.where(col(fm, x), v_g_fm, v_t + col(1 - 1 / w, x) * (v_hat - v_u))
    n_drop = int((d["label_drop_u"] < drop).sum())
    dropped = torch.arange(B) < n_drop
    labels = torch.where(dropped, torch.full_like(y, K), y)
    v_g = torch.where(col(dropped, x), v_t, v_g)

    def f(z_, t_, r_):
        kw = dict(omega=omega, t_min=t_min, t_max=t_max)
        if variant == "v_head":
            return net(z_, t_, t_ - r_, labels, v_head=True, **kw)
        return net(z_, t_, t_ - r_, labels, **kw), None

    if variant == "v_head":
        u, du, v = torch.func.jvp(f, (z, t, r), (v_hat, one, zero), has_aux=True)
    else:
        u, du = torch.func.jvp(lambda *a: f(*a)[0], (z, t, r), (v_hat, one, zero))
    big_v = u + col(t - r, x) * du.detach()

    def weighted(err):
        err = err.flatten(1).sum(1)
        return err / (err + c).detach() ** p

    loss = weighted((big_v - v_g.detach()) ** 2)
    if variant == "v_head":
        loss = loss + weighted((v - v_g.detach()) ** 2)
    return loss, v_g, v_hat


# ----------------------------------------------------------------------------- the ω sampler
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 2.0, -1.0])
@pytest.mark.parametrize("omega_range", [(1.0, 8.0), (2.0, 5.0)])
def test_guidance_scale_is_the_exact_inverse_cdf(beta, omega_range):
    u = torch.linspace(0, 1, 101, dtype=F64)
    omega = sample_guidance_scale(u, omega_range, beta)
    lo, hi = omega_range
    assert abs(omega[0] - lo) < 1e-12 and abs(omega[-1] - hi) < 1e-12
    assert bool((omega[1:] > omega[:-1]).all())
    torch.testing.assert_close(guidance_scale_cdf(omega, omega_range, beta), u,
                               atol=1e-12, rtol=0)
    # the CDF's derivative is the normalised density ω^(-β)
    norm = math.log(hi / lo) if beta == 1 else (hi ** (1 - beta) - lo ** (1 - beta)) / (1 - beta)
    w = torch.linspace(lo + 0.1, hi - 0.1, 7, dtype=F64)
    slope = (guidance_scale_cdf(w + 1e-6, omega_range, beta)
             - guidance_scale_cdf(w - 1e-6, omega_range, beta)) / 2e-6
    torch.testing.assert_close(slope, w ** (-beta) / norm, atol=1e-7, rtol=1e-7)


def test_guidance_scale_special_cases_and_the_official_forms():
    """β = 0 is uniform, β = 1 log-uniform (ω = 8^U on [1, 8]); on [1, 1 + s] the official
    code's two expressions, exp(U·log(1 + s)) and exp(log1p(U·expm1((1-β)·log(1 + s)))/(1-β))."""
    u = torch.rand(1000, generator=gen(0), dtype=F64)
    torch.testing.assert_close(sample_guidance_scale(u, (2.0, 6.0), 0.0), 2 + 4 * u)
    torch.testing.assert_close(sample_guidance_scale(u, (1.0, 8.0), 1.0), 8.0 ** u)
    torch.testing.assert_close(sample_guidance_scale(u, (2.0, 6.0), 1.0), 2 * 3.0 ** u)
    s = 7.0
    for beta in (0.3, 1.7):
        official = torch.exp(torch.log1p(u * math.expm1((1 - beta) * math.log1p(s)))
                             / (1 - beta))
        torch.testing.assert_close(sample_guidance_scale(u, (1.0, 1 + s), beta), official)
    assert torch.equal(sample_guidance_scale(u, (3.0, 3.0), 0.5), torch.full_like(u, 3.0))


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0])
def test_drawn_guidance_scales_follow_the_cdf(beta):
    """Kolmogorov–Smirnov: the loss's own draws of ω, n = 20000, sup |F_n - F| < 1.63/√n
    (the 1 % critical value)."""
    loss_fn = IMFLoss(num_classes=K, beta=beta)
    n = 20000
    omega = loss_fn.draw(torch.zeros(n, 1), gen(5))["omega"].to(F64).sort().values
    cdf = guidance_scale_cdf(omega, (1.0, 8.0), beta)
    i = torch.arange(1, n + 1, dtype=F64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max()
    assert float(ks) < 1.63 / math.sqrt(n)
    assert float(omega.min()) >= 1.0 and float(omega.max()) <= 8.0


# ----------------------------------------------------------------------------- draws and rows
def test_draw_order_rows_and_intervals():
    """draw() is, in order: (r, t) from the time sampler, e, the interval (t_min ~ U[0, .5],
    t_max ~ U[.5, 1]), ω, the label-drop uniforms. The first floor(B/2) rows have r = t, and
    the network sees the interval [0, 1] exactly on them."""
    for B in (10, 7):
        x, y = batch(B)
        loss_fn = IMFLoss(num_classes=K, jvp="split")
        d = loss_fn.draw(x, gen(3))
        g = gen(3)
        r, t = loss_fn.sampler(B, "cpu", g)
        e = torch.randn(x.shape, generator=g, dtype=F64)
        u_min, u_max, u_w, u_drop = (torch.rand(B, generator=g) for _ in range(4))
        hand = dict(r=r, t=t, e=e, t_min=0.5 * u_min, t_max=0.5 + 0.5 * u_max,
                    omega=8.0 ** u_w, label_drop_u=u_drop)
        assert list(d) == list(hand) == list(loss_fn.draw_keys)
        for key in hand:
            torch.testing.assert_close(d[key], hand[key], atol=1e-6, rtol=1e-6)
        assert torch.equal(d["r"] == d["t"], torch.arange(B) < B // 2)
        net = IMFNet()
        loss_fn(net, x, y, draws=d)
        grad_call = [c for c in net.calls if c["grad"]]
        assert len(grad_call) == 1 and grad_call[0]["v_head"] and grad_call[0]["B"] == B
        first = torch.arange(B) < B // 2
        assert torch.equal(grad_call[0]["t_min"][first], torch.zeros(B // 2, dtype=F64))
        assert torch.equal(grad_call[0]["t_max"][first], torch.ones(B // 2, dtype=F64))
        assert torch.equal(grad_call[0]["t_min"][~first], d["t_min"][~first].to(F64))
        assert torch.equal(grad_call[0]["omega"], d["omega"].to(F64))  # ω, not ω′
        n_drop = int((d["label_drop_u"] < 0.1).sum())
        assert torch.equal(grad_call[0]["y"] == K, torch.arange(B) < n_drop)


def test_given_draws_are_bit_identical_and_validated():
    x, y = batch()
    loss_fn, net = IMFLoss(num_classes=K), IMFNet()
    own, own_stats = loss_fn(net, x, y, generator=gen(4))
    given, given_stats = loss_fn(net, x, y, draws=loss_fn.draw(x, gen(4)))
    assert torch.equal(own, given)
    assert all(torch.equal(own_stats[k], given_stats[k]) for k in own_stats)
    d = loss_fn.draw(x, gen(4))
    with pytest.raises(ConfigError, match="t_min and t_max"):
        loss_fn(net, x, y, draws={"t_min": d["t_min"]})
    with pytest.raises(ConfigError, match="positive"):
        loss_fn(net, x, y, draws=d | {"omega": torch.zeros(8)})
    with pytest.raises(ConfigError, match="cond may not set omega"):
        loss_fn(net, x, y, cond={"omega": torch.ones(8)})
    with pytest.raises(ConfigError, match="v-head"):
        loss_fn(lambda z, t, h, y=None, **kw: z, x, y)


@pytest.mark.parametrize("bad", [dict(variant="u_head"), dict(omega_range=(0.5, 8.0)),
                                 dict(omega_range=(8.0, 1.0)), dict(beta=float("nan")),
                                 dict(t_min_range=(0.6, 0.5)), dict(c=0.0),
                                 dict(jvp_velocity="v"), dict(jvp="fast"),
                                 dict(label_drop_rows="last"), dict(time_sampler="v1")])
def test_settings_are_validated(bad):
    with pytest.raises(ConfigError):
        IMFLoss(**bad)


# ----------------------------------------------------------------------------- guided target
def test_guided_target_by_hand():
    """ṽ = v + (1 - 1/ω′)(v̂ - v^u): ω′ = ω for t in [t_min, t_max], 1 outside; v̂ and v^u are
    one no-grad v-head call of 2B rows at h = 0, interval [0, 1], labels (y, null), scales
    (ω′, 1)."""
    net, B = IMFNet(), 6
    g = gen(2)
    z, v = torch.randn(B, 3, generator=g, dtype=F64), torch.randn(B, 3, generator=g, dtype=F64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 0.45], dtype=F64)
    t_min = torch.tensor([0.2, 0.2, 0.0, 0.2, 0.0, 0.45], dtype=F64)
    t_max = torch.tensor([0.8, 0.8, 1.0, 0.6, 1.0, 0.45], dtype=F64)
    omega = torch.tensor([3.0, 3.0, 2.0, 5.0, 1.0, 4.0], dtype=F64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    w_inside = torch.tensor([1.0, 3.0, 2.0, 1.0, 1.0, 4.0], dtype=F64)   # ω′ by hand
    v_tilde, v_hat = imf_guided_velocity(net, z, t, v, y, omega, t_min, t_max, K)
    (call,) = net.calls
    assert call["B"] == 2 * B and call["v_head"] and not call["grad"]
    assert torch.equal(call["omega"], torch.cat([w_inside, torch.ones(B, dtype=F64)]))
    assert torch.equal(call["y"], torch.cat([y, torch.full((B,), K)]))
    assert not call["h"].any() and not call["t_min"].any() and bool((call["t_max"] == 1).all())
    zero, one = torch.zeros(B, dtype=F64), torch.ones(B, dtype=F64)
    expect_hat = net(z, t, zero, y, omega=w_inside, t_min=zero, t_max=one, v_head=True)[1]
    v_null = net(z, t, zero, torch.full_like(y, K), omega=one, t_min=zero, t_max=one,
                 v_head=True)[1]
    torch.testing.assert_close(v_hat, expect_hat.detach(), atol=1e-14, rtol=0)
    expect = v + col(1 - 1 / w_inside, v) * (expect_hat - v_null).detach()
    torch.testing.assert_close(v_tilde, expect, atol=1e-14, rtol=0)
    # rows with ω′ = 1 keep v exactly
    assert torch.equal(v_tilde[w_inside == 1], v[w_inside == 1])


def test_guidance_off_gives_the_unguided_target():
    """ω ≡ 1: ṽ = v_c on every row, and the loss is the official formula's (tangent v̂ at
    ω = 1, target v_c), also when ω ≡ 1 comes from the setting omega_range = (1, 1)."""
    x, y = batch()
    net = IMFNet()
    loss_fn = IMFLoss(num_classes=K, jvp="func")
    d = loss_fn.draw(x, gen(6)) | {"omega": torch.ones(8)}
    loss, _ = loss_fn(net, x, y, draws=d)
    ref, v_g, _ = official_reference(net, x, y, d)
    assert torch.equal(v_g, d["e"] - x)
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    off = IMFLoss(num_classes=K, jvp="func", omega_range=(1.0, 1.0))
    assert torch.equal(off.draw(x, gen(6))["omega"], torch.ones(8))
    torch.testing.assert_close(off(net, x, y, generator=gen(6))[0], loss, atol=0, rtol=0)


# ----------------------------------------------------------------------------- MeanFlow limit
@pytest.mark.parametrize("case", ["unconditional", "omega_one", "all_labels_dropped"])
def test_with_the_target_as_tangent_it_is_the_meanflow_loss(case):
    """Boundary variant, tangent ṽ: L_u = ||u + (t - r) du/dt - ṽ||² is MeanFlow's
    ||u - (ṽ - (t - r) du/dt)||² with the same weight, so value and gradient equal
    MeanFlowLoss's on the same draws, when ṽ = v_c: no classes, ω ≡ 1, or every label dropped
    (dropped rows' target is v_c whatever ω; the network still sees ω and the interval, which
    MeanFlowLoss passes on as cond)."""
    x, y = batch(10)
    net = IMFNet(heads=False)
    kw = dict(fraction_r_neq_t=0.5, r_eq_t_rows="first", c=0.01, p=1.0, jvp="split")
    drop = 1.0 if case == "all_labels_dropped" else 0.3
    if case == "unconditional":
        imf = IMFLoss(variant="boundary", jvp_velocity="target", **kw)
        mf = MeanFlowLoss(**kw)
        y = None
    else:
        omega_range = (1.0, 1.0) if case == "omega_one" else (1.0, 8.0)
        imf = IMFLoss(num_classes=K, omega_range=omega_range, variant="boundary",
                      jvp_velocity="target", label_drop=drop, **kw)
        mf = MeanFlowLoss(num_classes=K, label_drop_rows="first", label_drop=drop, **kw)
    d = imf.draw(x, gen(9))
    cond = None
    if y is not None:
        full = d["r"] == d["t"]
        cond = {"omega": d["omega"].to(F64),
                "t_min": torch.where(full, 0.0, d["t_min"].to(F64)),
                "t_max": torch.where(full, 1.0, d["t_max"].to(F64))}
        assert (case == "omega_one") == bool((d["omega"] == 1).all())
    a, _ = imf(net, x, y, draws=d)
    a.sum().backward()
    ga = grads(net)
    b, _ = mf(net, x, y, draws={k: d[k] for k in mf.draw_keys}, cond=cond)
    b.sum().backward()
    gb = grads(net)
    torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-12)
    for p, q in zip(ga, gb, strict=True):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-11)


# ----------------------------------------------------------------------------- du/dt and JVP
@pytest.mark.parametrize("shape", [(3,), (2, 2, 2)])
def test_v_head_jvp_strategies_agree_with_finite_differences(shape):
    """u_and_dudt(..., v_head=True): du/dt along (v̂, 0, 1) equals a float64 central difference
    under every strategy; u, du/dt, v and the gradients of u and v agree across strategies."""
    net, B = IMFNet(shape), 5
    g = gen(11)
    z = torch.randn(B, *shape, generator=g, dtype=F64)
    v = torch.randn(B, *shape, generator=g, dtype=F64)
    t = 0.1 + 0.8 * torch.rand(B, generator=g, dtype=F64)
    r = torch.where(torch.arange(B) < 2, t, t * torch.rand(B, generator=g, dtype=F64))
    y = torch.tensor([0, 1, 2, 3, 1])
    cond = {"omega": 1 + 7 * torch.rand(B, generator=g, dtype=F64),
            "t_min": 0.5 * torch.rand(B, generator=g, dtype=F64),
            "t_max": 0.5 + 0.5 * torch.rand(B, generator=g, dtype=F64)}

    def u_of(z_, r_, t_):
        return net(z_, t_, t_ - r_, y, **cond)
    with torch.no_grad():
        fd = (u_of(z + EPS * v, r, t + EPS) - u_of(z - EPS * v, r, t - EPS)) / (2 * EPS)
        u_ref, v_ref = net(z, t, t - r, y, v_head=True, **cond)
    results = {}
    for strategy in JVP_STRATEGIES:
        u, dudt, v_out = u_and_dudt(net, z, r, t, v, y, strategy=strategy, cond=cond,
                                    v_head=True)
        assert not dudt.requires_grad and u.requires_grad and v_out.requires_grad
        (u.sum() + (v_out ** 2).sum()).backward()
        results[strategy] = (u.detach(), dudt, v_out.detach(), grads(net))
        torch.testing.assert_close(dudt, fd, atol=TOL, rtol=TOL)
        torch.testing.assert_close(u.detach(), u_ref, atol=1e-14, rtol=0)
        torch.testing.assert_close(v_out.detach(), v_ref, atol=1e-14, rtol=0)
    base = results["split"]
    for strategy in JVP_STRATEGIES:
        for a, b in zip(results[strategy][:3], base[:3]):
            torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-13)
        for a, b in zip(results[strategy][3], base[3], strict=True):
            torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-12)


@pytest.mark.parametrize("variant", ["v_head", "boundary"])
def test_loss_is_the_same_under_every_strategy(variant):
    x, y = batch(8, (2, 2))
    net = IMFNet((2, 2), heads=variant == "v_head")
    out = {}
    for strategy in JVP_STRATEGIES:
        loss_fn = IMFLoss(num_classes=K, jvp=strategy, variant=variant, label_drop=0.3)
        loss, _ = loss_fn(net, x, y, generator=gen(12))
        loss.mean().backward()
        out[strategy] = (loss.detach(), grads(net))
    for strategy in JVP_STRATEGIES:
        torch.testing.assert_close(out[strategy][0], out["split"][0], atol=1e-13, rtol=1e-12)
        for a, b in zip(out[strategy][1], out["split"][1], strict=True):
            torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-11)


# ----------------------------------------------------------------------------- the whole loss
@pytest.mark.parametrize("variant", ["v_head", "boundary"])
@pytest.mark.parametrize("strategy", ["split", "func"])
def test_loss_equals_the_official_formula_on_the_same_draws(variant, strategy):
    """Value and gradient against :func:`official_reference`, with enough label dropout that
    some rows are dropped; the boundary variant takes v̂ from u at h = 0 (no v-head call)."""
    x, y = batch(10, (2, 2))
    net = IMFNet((2, 2), heads=variant == "v_head")
    loss_fn = IMFLoss(num_classes=K, variant=variant, jvp=strategy, label_drop=0.35)
    d = loss_fn.draw(x, gen(16))
    # 7 dropped rows (two more than the r = t rows); 3 rows with t outside their interval
    assert int((d["label_drop_u"] < 0.35).sum()) == 7
    assert int(((d["t"] < d["t_min"]) | (d["t"] > d["t_max"]))[5:].sum()) == 3
    loss, stats = loss_fn(net, x, y, draws=d)
    loss.mean().backward()
    got = grads(net)
    assert all(not c["v_head"] for c in net.calls) == (variant == "boundary")
    ref, v_g, _ = official_reference(net, x, y, d, variant=variant, drop=0.35)
    ref.mean().backward()
    want = grads(net)
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    assert set(stats) >= {"loss", "mse", "u_minus_v", "weight", "frac_r_neq_t", "loss_u"}
    assert float(stats["frac_r_neq_t"]) == 0.5


def test_boundary_tangent_is_u_at_h_zero():
    """Boundary variant: v̂ = u(z, t, h = 0 | y, ω′, [0, 1]) from the u-head itself."""
    net, B = IMFNet(heads=False), 4
    g = gen(14)
    z, v = torch.randn(B, 3, generator=g, dtype=F64), torch.randn(B, 3, generator=g, dtype=F64)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=F64)
    omega = torch.tensor([2.0, 3.0, 4.0, 5.0], dtype=F64)
    t_min, t_max = torch.full_like(t, 0.3), torch.full_like(t, 0.7)
    y = torch.tensor([0, 1, 2, 0])
    _, v_hat = imf_guided_velocity(net, z, t, v, y, omega, t_min, t_max, K, variant="boundary")
    zero, one = torch.zeros_like(t), torch.ones_like(t)
    w = torch.tensor([1.0, 3.0, 4.0, 1.0], dtype=F64)
    with torch.no_grad():
        expect = net(z, t, zero, y, omega=w, t_min=zero, t_max=one)
    torch.testing.assert_close(v_hat, expect, atol=1e-14, rtol=0)


def test_sample_guidance_interval_is_affine_in_the_uniforms():
    u = torch.tensor([0.0, 0.25, 1.0], dtype=F64)
    lo, hi = sample_guidance_interval(u, u)
    assert torch.equal(lo, torch.tensor([0.0, 0.125, 0.5], dtype=F64))
    assert torch.equal(hi, torch.tensor([0.5, 0.625, 1.0], dtype=F64))
