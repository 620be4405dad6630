"""The flow-matching baseline: loss = ||net(z_t, t, h = 0) - (e - x)||² summed per sample."""

from __future__ import annotations

import pytest
import torch

from meanflow import ConfigError, FlowMatchingLoss

F64 = torch.float64
M2 = torch.tensor([1.5, -0.5], dtype=F64)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(16, 2), (4, 3, 4, 4)])
def test_loss_matches_definition(shape, tiny_mlp):
    """Per-sample sum over all elements of (v_θ(z_t, t) - v)², z_t = (1-t)x + te, v = e - x,
    the network called with h = 0; stats hold the batch mean."""
    net = tiny_mlp(dim=int(torch.tensor(shape[1:]).prod()))
    g = gen(0)
    x, e = torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64)
    t = torch.rand(shape[0], generator=g, dtype=F64)
    loss, stats = FlowMatchingLoss()(net, x, t=t, e=e)
    tt = t.reshape(-1, *([1] * (len(shape) - 1)))
    z = (1 - tt) * x + tt * e
    expected = (net(z, t, torch.zeros_like(t)) - (e - x)).pow(2).flatten(1).sum(1)
    assert loss.shape == (shape[0],) and loss.requires_grad
    torch.testing.assert_close(loss, expected, atol=0, rtol=1e-14)
    torch.testing.assert_close(stats["loss"], expected.mean().detach())


def test_marginal_velocity_is_the_fixed_point(gaussian_oracle):
    """Gaussian data: the marginal velocity E[e - x | z_t] has zero expected loss gradient with
    respect to an additive shift (within 5 standard errors) and a lower loss than a shifted
    field with the same noise."""
    B, s = 100_000, 0.7
    x = M2 + s * torch.randn(B, 2, generator=gen(1), dtype=F64)
    results = {}
    for wobble in (0.0, 0.1):
        oracle = gaussian_oracle(M2, s, wobble=wobble)
        loss, _ = FlowMatchingLoss(time_sampler="uniform")(oracle, x, generator=gen(2))
        grad, = torch.autograd.grad(loss.mean(), oracle.shift)
        results[wobble] = (loss.mean().item(), grad)
    se = 2 * (results[0.0][0] / B) ** 0.5
    assert float(results[0.0][1].abs().amax()) < 5 * se
    assert float(results[0.1][1].abs().amin()) > 20 * se
    assert results[0.1][0] > results[0.0][0] + 0.005


def test_seeded_generator_reproduces_the_loss(tiny_mlp):
    """All randomness (t, e, label dropout) comes from the generator."""
    net = tiny_mlp(num_classes=3)
    x = torch.randn(32, 2, generator=gen(3), dtype=F64)
    y = torch.arange(32) % 3
    loss_fn = FlowMatchingLoss(num_classes=3)
    a, _ = loss_fn(net, x, y, generator=gen(4))
    b, _ = loss_fn(net, x, y, generator=gen(4))
    c, _ = loss_fn(net, x, y, generator=gen(5))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_invalid_arguments(tiny_mlp):
    """Unknown samplers, bad label_drop / num_classes, out-of-range t and bad noise raise."""
    for kwargs in [dict(time_sampler="v1"), dict(time_sampler="foo"), dict(label_drop=1.5),
                   dict(num_classes=0), dict(label_drop_rows="last"),
                   dict(label_drop_rows=None)]:
        with pytest.raises(ConfigError):
            FlowMatchingLoss(**kwargs)
    net = tiny_mlp()
    x = torch.randn(4, 2, dtype=F64)
    for kwargs in [dict(t=torch.full((4,), 1.5, dtype=F64)), dict(t=torch.rand(3, dtype=F64)),
                   dict(e=torch.randn(4, 3, dtype=F64))]:
        with pytest.raises(ConfigError):
            FlowMatchingLoss()(net, x, **kwargs)


def test_first_label_drop_layout_drops_a_prefix(tiny_mlp):
    """label_drop_rows="first": the net sees the null class on a prefix of the batch whose
    length is the count the per-sample layout drops with the same generator; the loss is
    ||v_θ(z_t, t | y_inp) - v||² with those labels, and the default layout is "random"."""
    B, K = 32, 3
    net = tiny_mlp(num_classes=K)
    seen = []

    def spy(z, t, h, y=None):
        seen.append(y.clone())
        return net(z, t, h, y)

    x = torch.randn(B, 2, generator=gen(6), dtype=F64)
    y = torch.arange(B) % K
    first = FlowMatchingLoss(num_classes=K, label_drop=0.3, label_drop_rows="first")
    per_sample = FlowMatchingLoss(num_classes=K, label_drop=0.3)
    assert per_sample.label_drop_rows == "random"
    for seed in range(5):
        loss, _ = first(spy, x, y, generator=gen(seed))
        y_first = seen[-1]
        per_sample(spy, x, y, generator=gen(seed))
        n = int((seen[-1] == K).sum())
        assert 0 < n < B and torch.equal(y_first == K, torch.arange(B) < n)
        assert torch.equal(y_first[n:], y[n:])
        g = gen(seed)
        t = first.sampler.sample_t(B, generator=g).to(F64)
        e = torch.randn(x.shape, generator=g, dtype=F64)
        z = (1 - t[:, None]) * x + t[:, None] * e
        expected = (net(z, t, torch.zeros_like(t), y_first) - (e - x)).pow(2).sum(1)
        torch.testing.assert_close(loss, expected, atol=0, rtol=1e-14)
