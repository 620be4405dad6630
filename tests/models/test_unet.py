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


def test_conditioning_reaches_the_output_at_every_width():
    """t, h and the label change the output, also in narrow nets: GroupNorm keeps at least 4
    channels per group (with one channel per group it would cancel the per-channel embedding
    added just before it, and a 32-channel level would ignore t, h and y)."""
    from meanflow.models.unet import _groups
    assert [_groups(c) for c in (3, 8, 16, 32, 64, 128, 256, 384, 512)] == \
        [1, 2, 4, 8, 16, 32, 32, 32, 32]
    net = tiny_unet()
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    h = torch.tensor([0.1, 0.2], dtype=torch.float64)
    y = torch.tensor([1, 2])
    base = net(z, t, h, y)
    # (before the fix these differences were ~1e-16; t and h enter through low frequencies)
    for other in (net(z, t + 0.2, h, y), net(z, t, h + 0.2, y), net(z, t, h, y + 1)):
        assert (other - base).abs().max() > 1e-5


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


# ---- the augmentation label (EDM's map_augment) ----------------------------------------------

def test_augment_dim_zero_keeps_the_parameter_count():
    """augment_dim = 0 (the default) adds nothing; augment_dim = 9 adds one bias-free 9 -> 512
    map."""
    counts = {}
    for dim in (None, 0, 9):
        kw = {} if dim is None else {"augment_dim": dim}
        with torch.device("meta"):
            net = build("unet-cifar10", in_channels=3, input_size=32, num_classes=None, **kw)
        counts[dim] = sum(p.numel() for p in net.parameters())
    assert counts[0] == counts[None]
    assert counts[9] == counts[0] + 9 * 512
    assert net.aug_embed.bias is None


def test_aug_none_equals_zero_labels_and_a_label_changes_the_output():
    net = tiny_unet(augment_dim=9)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=g)
    t = torch.rand(3, dtype=torch.float64, generator=g)
    h = t * 0.5
    y = torch.tensor([0, 2, 5])
    plain = net(z, t, h, y)
    assert plain.abs().max() > 0
    torch.testing.assert_close(net(z, t, h, y, aug=torch.zeros(3, 9, dtype=torch.float64)),
                               plain, rtol=0, atol=0)
    aug = torch.zeros(3, 9, dtype=torch.float64)
    aug[1, 3], aug[1, 4] = -0.5, 0.8
    out = net(z, t, h, y, aug=aug)
    assert torch.equal(out[[0, 2]], plain[[0, 2]])          # rows with a zero label unchanged
    assert (out[1] - plain[1]).abs().max() > 1e-3
    # float32 labels (EDMAugment on float32 images) work with a float64 net
    torch.testing.assert_close(net(z, t, h, y, aug=aug.float()), out, rtol=1e-6, atol=1e-7)


def test_fresh_augmented_model_starts_at_zero_and_feeds_the_label_to_every_block():
    """Fresh: output 0 whatever the label (zero-init output); after perturbing the zero-init
    output layers, the label changes the output."""
    torch.manual_seed(0)
    net = build(**TINY, augment_dim=9)
    z, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    aug = torch.randn(2, 9)
    assert torch.count_nonzero(net(z, t, t * 0, aug=aug)) == 0
    assert net.aug_embed.weight.abs().sum() > 0              # xavier, not zero
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d) and not module.weight.any():
                module.weight.normal_(0.0, 0.1)
    assert (net(z, t, t * 0, aug=aug) - net(z, t, t * 0)).abs().max() > 1e-4


def test_augmentation_label_errors():
    net = build(**TINY)
    z, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    with pytest.raises(ConfigError, match="augment_dim=0.*aug=None"):
        net(z, t, t, aug=torch.zeros(2, 9))
    net = build(**TINY, augment_dim=9)
    with pytest.raises(ConfigError, match=r"shape \(2, 4\).*\(2, 9\)"):
        net(z, t, t, aug=torch.zeros(2, 4))
    for value in (-1, 2.0, True, None):
        with pytest.raises(ConfigError, match="augment_dim"):
            build(**TINY, augment_dim=value)


@pytest.mark.parametrize("strategy", JVP_STRATEGIES)
def test_dudt_with_augment_labels_equals_finite_differences(strategy, assert_dudt_matches_fd,
                                                           dudt_point):
    """With a fixed augmentation label (a constant, not differentiated) every strategy's du/dt
    still equals a float64 central difference; a different label gives another du/dt."""
    net = tiny_unet(augment_dim=9)
    aug = torch.randn(2, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def with_label(z, t, h, y=None):
        return net(z, t, h, y, aug=aug)

    assert_dudt_matches_fd(with_label, strategy)
    z, v, r, t, y = dudt_point
    labelled = time_derivative(with_label, z, r, t, v, y, strategy=strategy)
    plain = time_derivative(net, z, r, t, v, y, strategy=strategy)
    assert (labelled - plain).abs().max() > 1e-4


def test_func_jvp_treats_the_label_as_a_constant():
    """torch.func.jvp through (z, t) with aug closed over equals the same JVP with aug passed
    as a primal with a zero tangent."""
    net = tiny_unet(augment_dim=9)
    g = torch.Generator().manual_seed(6)
    z = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g)
    v = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g)
    t = torch.tensor([0.6, 0.9], dtype=torch.float64)
    h = torch.tensor([0.1, 0.5], dtype=torch.float64)
    aug = torch.randn(2, 9, dtype=torch.float64, generator=g)
    _, closed = torch.func.jvp(lambda z_, t_: net(z_, t_, h, aug=aug), (z, t),
                               (v, torch.ones_like(t)))
    _, explicit = torch.func.jvp(lambda z_, t_, a_: net(z_, t_, h, aug=a_), (z, t, aug),
                                 (v, torch.ones_like(t), torch.zeros_like(aug)))
    torch.testing.assert_close(closed, explicit, rtol=1e-12, atol=1e-12)
