"""DiT backbone: the paper's sizes, the contract, attention paths, and an exact du/dt."""

from __future__ import annotations

import pytest
import torch

from meanflow import JVP_STRATEGIES, ConfigError
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
    """Within 1 % of the paper's Tab. 2 at 32×32×4 latents, 1000 classes (built on meta)."""
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


def test_fused_and_math_attention_agree(assert_attention_paths_agree):
    """The fused SDPA path (grad on) equals the explicit softmax path in float64."""
    assert_attention_paths_agree(tiny_dit(), tiny_dit(attention="math"))


@pytest.mark.parametrize("strategy", JVP_STRATEGIES)
def test_dudt_equals_finite_differences(strategy, assert_dudt_matches_fd):
    """Every strategy's du/dt equals a float64 central difference along (v, 0, 1)."""
    assert_dudt_matches_fd(tiny_dit(), strategy)


def test_meanflow_loss_agrees_across_strategies(assert_strategies_agree):
    """The same seeded batch gives the same loss and gradients under every strategy."""
    assert_strategies_agree(tiny_dit())


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
