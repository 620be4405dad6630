"""U-Net backbone: the paper's size, the contract, and an exact du/dt under every strategy."""

from __future__ import annotations

import pytest
import torch

from meanflow import JVP_STRATEGIES, ConfigError, MeanFlowLoss, average_velocity, time_derivative
from meanflow.models.unet import UNET_PRESETS, UNet, UNetConfig

TINY = dict(in_channels=3, input_size=8, num_classes=5, channels=8, channel_mult=[1, 2],
            blocks_per_res=1, attn_resolutions=[4], emb_dim=16, dropout=0.0, heads=2)


def build(name: str | None = None, **kw) -> UNet:
    preset = UNET_PRESETS[name] if name else {}
    return UNet(UNetConfig(**{**preset, **kw}))


def tiny_unet(**kw) -> UNet:
    """A small U-Net with every weight random (zero-initialised branches would give u = 0)."""
    torch.manual_seed(0)
    net = build(**{**TINY, **kw}).double()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    return net


def test_parameter_count_matches_the_paper():
    """The paper's CIFAR-10 U-Net has about 55M parameters; ours (DDPM++ layout, separate t and
    h embedders concatenated) has 57.77M: within 10 %."""
    with torch.device("meta"):
        net = build("unet-cifar10", in_channels=3, input_size=32, num_classes=None)
    count = sum(p.numel() for p in net.parameters())
    print(f"unet-cifar10 at 32x32x3: {count} parameters")
    assert abs(count / 55e6 - 1) < 0.10, count


@pytest.mark.parametrize("shape,kw", [
    ((1, 28, 28), dict(channels=8, channel_mult=[1, 2, 2], blocks_per_res=1,
                       attn_resolutions=[7], emb_dim=16)),
    ((3, 32, 32), dict(channels=8, channel_mult=[1, 2, 2], blocks_per_res=1,
                       attn_resolutions=[16], emb_dim=16)),
])
def test_fresh_model_outputs_zero_and_keeps_the_shape(shape, kw):
    torch.manual_seed(0)
    net = build(in_channels=shape[0], input_size=shape[1], num_classes=10, **kw)
    z = torch.randn(2, *shape)
    out = net(z, torch.rand(2), torch.rand(2), torch.tensor([0, 10]))
    assert out.shape == z.shape and torch.count_nonzero(out) == 0
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    out = net(z, torch.rand(2), torch.rand(2))
    assert out.shape == z.shape and torch.count_nonzero(out) > 0


def test_small_preset_runs_on_fashion_mnist_size():
    net = build("unet-small", in_channels=1, input_size=28, num_classes=10)
    z = torch.randn(2, 1, 28, 28)
    assert net(z, torch.rand(2), torch.rand(2)).shape == z.shape


def test_fused_and_math_attention_agree(assert_attention_paths_agree):
    """The fused SDPA path (grad on) equals the explicit softmax path in float64."""
    assert_attention_paths_agree(tiny_unet(), tiny_unet(attention="math"))


@pytest.mark.parametrize("strategy", JVP_STRATEGIES)
def test_dudt_equals_finite_differences(strategy, assert_dudt_matches_fd):
    """Every strategy's du/dt equals a float64 central difference along (v, 0, 1)."""
    assert_dudt_matches_fd(tiny_unet(), strategy)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_meanflow_loss_agrees_across_strategies(dropout, assert_strategies_agree):
    """The same seeded batch gives the same loss and gradients under every strategy, also with
    dropout in train mode (the split strategies rewind the RNG so the masks match)."""
    assert_strategies_agree(tiny_unet(dropout=dropout).train())


def test_bad_inputs():
    net = build(**TINY)
    with pytest.raises(ConfigError, match="inputs got"):
        net(torch.randn(1, 3, 16, 16), torch.rand(1), torch.rand(1))
    with pytest.raises(ConfigError, match="inputs got"):
        net(torch.randn(1, 1, 8, 8), torch.rand(1), torch.rand(1))
    with pytest.raises(ConfigError, match="not divisible"):
        build(**{**TINY, "input_size": 9})
    with pytest.raises(ConfigError, match="not divisible"):
        build(**{**TINY, "input_size": 28, "channel_mult": [1, 2, 2, 2]})
    with pytest.raises(ConfigError, match="attention"):
        build(**{**TINY, "attention": "flash"})
    with pytest.raises(ConfigError, match="dropout"):
        build(**{**TINY, "dropout": 1.5})
    with pytest.raises(ConfigError, match="heads"):
        build(**{**TINY, "heads": 3})


def test_registry_builds_presets_for_the_data():
    """unet-small and unet-cifar10 are registered and sized from the data's (C, H, H)."""
    from meanflow.models import MODELS, build_model_for_data
    assert "unet-small" in MODELS and "unet-cifar10" in MODELS
    net = build_model_for_data("unet-small", (1, 28, 28), 10, {})
    z = torch.randn(2, 1, 28, 28)
    assert net(z, torch.rand(2), torch.rand(2), torch.tensor([3, 10])).shape == z.shape
