"""Checks every image backbone must pass, shared by test_dit.py and test_unet.py.

Each fixture returns an assertion function taking a float64 network whose weights are all
random (zero-initialised outputs would make the checks trivially true). Inputs are
(B, 3, 8, 8) with labels in [0, 5], index 5 being the null class.
"""

from __future__ import annotations

import pytest
import torch

from meanflow import JVP_STRATEGIES, MeanFlowLoss, average_velocity, time_derivative


def _dudt_point() -> tuple[torch.Tensor, ...]:
    """(z, v, r, t, y): the fixed float64 point at which du/dt is checked."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g)
    v = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g)
    t = torch.tensor([0.7, 0.4], dtype=torch.float64)
    r = torch.tensor([0.2, 0.35], dtype=torch.float64)
    return z, v, r, t, torch.tensor([1, 5])


def _dudt_matches_fd(net: torch.nn.Module, strategy: str) -> None:
    """du/dt equals a float64 central difference along (v, 0, 1); dropping v·∂u/∂z does not."""
    z, v, r, t, y = _dudt_point()
    eps = 1e-6
    fd = (average_velocity(net, z + eps * v, r, t + eps, y)
          - average_velocity(net, z - eps * v, r, t - eps, y)) / (2 * eps)
    dudt = time_derivative(net, z, r, t, v, y, strategy=strategy)
    torch.testing.assert_close(dudt, fd, rtol=1e-6, atol=1e-7)
    wrong = time_derivative(net, z, r, t, torch.zeros_like(v), y, strategy=strategy)
    assert (wrong - fd).abs().max() > 1e-3


def _strategies_agree(net: torch.nn.Module) -> None:
    """The same seeded batch (and dropout seed) gives the same guided MeanFlow loss and
    gradients under every du/dt strategy."""
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    results = []
    for strategy in JVP_STRATEGIES:
        loss_fn = MeanFlowLoss(jvp=strategy, num_classes=5, fraction_r_neq_t=1.0, p=0.0,
                               omega=1.5, kappa=0.3)
        torch.manual_seed(7)
        loss, _ = loss_fn(net, x, y, generator=torch.Generator().manual_seed(3))
        grads = torch.autograd.grad(loss.mean(), list(net.parameters()))
        results.append((loss.detach(), grads))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-9, atol=1e-12)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def _attention_paths_agree(net: torch.nn.Module, math_net: torch.nn.Module) -> None:
    """The fused SDPA path (grad on) equals the explicit-softmax path in float64."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=g)
    t = torch.rand(3, dtype=torch.float64, generator=g)
    h = torch.rand(3, dtype=torch.float64, generator=g) * 0.3
    y = torch.tensor([0, 4, 5])
    fused = net(z, t, h, y)
    with torch.no_grad():
        explicit = math_net(z, t, h, y)
    torch.testing.assert_close(fused, explicit, rtol=1e-10, atol=1e-12)


@pytest.fixture
def dudt_point():
    return _dudt_point()


@pytest.fixture
def assert_dudt_matches_fd():
    return _dudt_matches_fd


@pytest.fixture
def assert_strategies_agree():
    return _strategies_agree


@pytest.fixture
def assert_attention_paths_agree():
    return _attention_paths_agree
