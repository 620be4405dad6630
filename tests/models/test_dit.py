"""DiT backbone: the paper's sizes, the contract, attention paths, and an exact du/dt."""

from __future__ import annotations

import pytest
import torch

from meanflow import JVP_STRATEGIES, ConfigError, MeanFlowLoss, average_velocity, time_derivative
from meanflow.models import MODELS, build_model, build_model_for_data

TINY = dict(in_channels=3, input_size=8, num_classes=5, patch=2, depth=2, width=32, heads=2)


def tiny_dit(**kw) -> torch.nn.Module:
    """A small DiT with every weight random (adaLN-Zero would make the output identically 0)."""
    torch.manual_seed(0)
    net = build_model("dit-s/2", **{**TINY, **kw}).double()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    return net


@pytest.mark.parametrize("name,paper_millions", [
    ("dit-b/4", 131), ("dit-b/2", 131), ("dit-m/2", 308), ("dit-l/2", 459), ("dit-xl/2", 676)])
def test_parameter_counts_match_the_paper(name, paper_millions):
    """Within 1 % of SPEC §2's table at 32×32×4 latents, 1000 classes (built on meta)."""
    with torch.device("meta"):
        net = build_model(name, in_channels=4, input_size=32, num_classes=1000)
    count = sum(p.numel() for p in net.parameters()) / 1e6
    assert abs(count / paper_millions - 1) < 0.01, count


def test_registry_has_every_size_and_patch():
    for size in ("s", "b", "m", "l", "xl"):
        for patch in (2, 4, 8):
            assert f"dit-{size}/{patch}" in MODELS


def test_fresh_model_outputs_zero():
    """adaLN-Zero: the output layer starts at zero, so u = 0 before training."""
    torch.manual_seed(0)
    net = build_model("dit-s/2", **TINY)
    z = torch.randn(2, 3, 8, 8)
    out = net(z, torch.rand(2), torch.rand(2), torch.tensor([0, 5]))
    assert out.shape == z.shape and torch.count_nonzero(out) == 0


def test_fused_and_math_attention_agree():
    """The fused SDPA path (grad on) equals the explicit softmax path in float64."""
    net = tiny_dit()
    math_net = tiny_dit(attention="math")
    z = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    t, h, y = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) * 0.3, \
        torch.tensor([0, 4, 5])
    fused = net(z, t, h, y)                     # grad mode: SDPA
    with torch.no_grad():
        explicit = math_net(z, t, h, y)
    torch.testing.assert_close(fused, explicit, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy", JVP_STRATEGIES)
def test_dudt_equals_finite_differences(strategy):
    """Every strategy's du/dt equals a float64 central difference along (v, 0, 1)."""
    net = tiny_dit()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g)
    v = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g)
    t = torch.tensor([0.7, 0.4], dtype=torch.float64)
    r = torch.tensor([0.2, 0.35], dtype=torch.float64)
    y = torch.tensor([1, 5])
    eps = 1e-6
    fd = (average_velocity(net, z + eps * v, r, t + eps, y)
          - average_velocity(net, z - eps * v, r, t - eps, y)) / (2 * eps)
    dudt = time_derivative(net, z, r, t, v, y, strategy=strategy)
    torch.testing.assert_close(dudt, fd, rtol=1e-6, atol=1e-7)
    wrong = time_derivative(net, z, r, t, torch.zeros_like(v), y, strategy=strategy)
    assert (wrong - fd).abs().max() > 1e-3  # dropping the v·∂u/∂z term is far off


def test_meanflow_loss_agrees_across_strategies():
    """The same seeded batch gives the same loss and gradients under every strategy."""
    net = tiny_dit()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    results = []
    for strategy in JVP_STRATEGIES:
        loss_fn = MeanFlowLoss(jvp=strategy, num_classes=5, fraction_r_neq_t=1.0, p=0.0,
                               omega=1.5, kappa=0.3)
        loss, _ = loss_fn(net, x, y, generator=torch.Generator().manual_seed(3))
        grads = torch.autograd.grad(loss.mean(), list(net.parameters()))
        results.append((loss.detach(), grads))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-9, atol=1e-12)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_bad_inputs():
    net = build_model("dit-s/2", **TINY)
    with pytest.raises(ConfigError, match="inputs got"):
        net(torch.randn(1, 3, 16, 16), torch.rand(1), torch.rand(1))
    with pytest.raises(ConfigError, match="divisible by patch"):
        build_model("dit-s/2", **{**TINY, "input_size": 9})
    with pytest.raises(ConfigError, match="square images"):
        build_model_for_data("dit-s/2", (2,), None, {})
    with pytest.raises(ConfigError, match="attention"):
        build_model("dit-s/2", **{**TINY, "attention": "flash"})
