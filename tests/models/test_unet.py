"""U-Net backbone: the paper's size, the contract, and an exact du/dt under every strategy."""

from __future__ import annotations

import pytest
import torch

from meanflow import JVP_STRATEGIES, ConfigError, time_derivative
from meanflow.models.unet import UNET_PRESETS, UNet, UNetConfig

TINY = dict(in_channels=3, input_size=8, num_classes=5, channels=8, channel_mult=[1, 2],
            blocks_per_res=1, attn_resolutions=[4], emb_mult=2, dropout=0.0, heads=2)


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


# Parameter counts of the official CIFAR-10 network (py-meanflow's SongUNet with its scripts'
# settings), counted with the official code, per part (mapping network, input convolution,
# encoder and decoder blocks by the resolution they output, output layers).
OFFICIAL_CIFAR10_PARTS = {"mapping": 528_384, "conv_in": 3_584, "encoder 32x32": 4_987_904,
                          "encoder 16x16": 7_683_072, "encoder 8x8": 6_628_352,
                          "decoder 8x8": 13_059_584, "decoder 16x16": 11_812_864,
                          "decoder 32x32": 11_221_248, "output": 7_427}


def test_parameter_count_is_the_official_networks():
    """unet-cifar10 with the official 6-wide augmentation label has the official network's
    55,932,419 parameters, part for part; without the label 55,929,347. Each block's recorded
    side is the side a forward pass (on the meta device) gives it."""
    with torch.device("meta"):
        net = build("unet-cifar10", in_channels=3, input_size=32, augment_dim=6)
        plain = build("unet-cifar10", in_channels=3, input_size=32)
    assert net.parameter_counts() == OFFICIAL_CIFAR10_PARTS
    assert sum(p.numel() for p in net.parameters()) == 55_932_419
    assert sum(p.numel() for p in plain.parameters()) == 55_929_347
    sides = {}
    hooks = [b.register_forward_hook(lambda m, i, o: sides.__setitem__(m, o.shape[-1]))
             for b in [*net.encoder, *net.decoder]]
    z = torch.empty(1, 3, 32, 32, device="meta")
    net(z, torch.empty(1, device="meta"), torch.empty(1, device="meta"))
    for hook in hooks:
        hook.remove()
    assert all(sides[b] == b.res for b in [*net.encoder, *net.decoder])


def test_attention_sits_where_the_official_network_has_it():
    """Every 16x16 encoder block, the first bottleneck block, and only the last 16x16 decoder
    block (not all five of them)."""
    with torch.device("meta"):
        net = build("unet-cifar10", in_channels=3, input_size=32)
    enc = [block.attn is not None for block in net.encoder]
    dec = [block.attn is not None for block in net.decoder]
    assert enc == [False] * 4 + [False] + [True] * 4 + [False] * 5
    assert dec == [True, False] + [False] * 5 + [False] + [False] * 4 + [True] + [False] * 6
    assert [block.resample for block in net.encoder].count("down") == 2
    assert [block.resample for block in net.decoder].count("up") == 2


def test_time_features_are_the_sinusoids_of_the_raw_times():
    """sin/cos at frequencies 10000^(-j/(n/2-1)) of t in [0, 1] (no x1000 scaling)."""
    net = build(**TINY).double()
    s = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    n = net.cfg.channels * net.cfg.time_mult
    j = torch.arange(n // 2, dtype=torch.float64)
    freqs = 10000.0 ** (-j / (n // 2 - 1))
    expected = torch.cat([torch.sin(s[:, None] * freqs), torch.cos(s[:, None] * freqs)], 1)
    torch.testing.assert_close(net.time_features(s), expected, rtol=0, atol=1e-7)
    assert net.time_features(s)[0, : n // 2].abs().max() == 0      # sin(0) = 0, cos(0) = 1


@pytest.mark.parametrize("taps", [[1, 3, 3, 1], [1, 1]])
def test_fir_resampling_keeps_a_constant_and_a_ramp(taps):
    """The normalised FIR filter keeps a constant image constant (away from the zero-padded
    border) going down, and up (its transpose times 4 is an interpolator); a linear ramp stays
    linear with half / double the slope."""
    from meanflow.models.unet import _downsample, _upsample, fir_filter
    fir = fir_filter(taps).double()
    assert float(fir.sum()) == pytest.approx(1.0, abs=1e-15)
    ones = torch.ones(1, 2, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(_downsample(ones, fir)[..., 1:-1, 1:-1],
                               torch.ones(1, 2, 6, 6, dtype=torch.float64))
    up = _upsample(ones[..., :8, :8], fir)
    assert up.shape == (1, 2, 16, 16)
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.ones(1, 2, 12, 12, dtype=torch.float64))
    ramp = torch.arange(16, dtype=torch.float64).expand(1, 1, 16, 16)   # x coordinate
    down = _downsample(ramp, fir)[0, 0, 2:-2, 2:-2]
    torch.testing.assert_close(down[:, 1:] - down[:, :-1], torch.full_like(down[:, 1:], 2.0))
    small = torch.arange(8, dtype=torch.float64).expand(1, 1, 8, 8)
    upr = _upsample(small, fir)[0, 0, 3:-3, 3:-3]
    if taps == [1, 3, 3, 1]:   # linear interpolation: half the slope
        torch.testing.assert_close(upr[:, 1:] - upr[:, :-1], torch.full_like(upr[:, 1:], 0.5))
    else:                      # the box filter's transpose repeats each pixel twice
        full = _upsample(small, fir)[0, 0]
        torch.testing.assert_close(full[:, 0::2], full[:, 1::2])
        torch.testing.assert_close(full[:, 0::2], small[0, 0].repeat_interleave(2, 0))


@pytest.mark.parametrize("shape,kw", [
    ((1, 28, 28), dict(channels=8, channel_mult=[1, 2, 2], blocks_per_res=1,
                       attn_resolutions=[7], emb_mult=2)),
    ((3, 32, 32), dict(channels=8, channel_mult=[1, 2, 2], blocks_per_res=1,
                       attn_resolutions=[16], emb_mult=2)),
])
def test_fresh_model_outputs_near_zero_and_keeps_the_shape(shape, kw):
    """EDM's initialisation scales the layers that end each residual branch, and the output
    convolution, by 1e-5: a fresh net's output is tiny but not exactly zero."""
    torch.manual_seed(0)
    net = build(in_channels=shape[0], input_size=shape[1], num_classes=10, **kw)
    z = torch.randn(2, *shape)
    out = net(z, torch.rand(2), torch.rand(2), torch.tensor([0, 10]))
    assert out.shape == z.shape and 0 < out.abs().max() < 1e-3
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
    assert [_groups(c) for c in (3, 8, 16, 24, 32, 64, 128, 256, 384, 512)] == \
        [1, 2, 4, 6, 8, 16, 32, 32, 32, 32]
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
    """augment_dim = 0 (the default) adds nothing; augment_dim = A adds one bias-free A -> 512
    map (A = 6 for the official augmentation, 9 with y-flips and rotations on)."""
    counts = {}
    for dim in (None, 0, 6, 9):
        kw = {} if dim is None else {"augment_dim": dim}
        with torch.device("meta"):
            net = build("unet-cifar10", in_channels=3, input_size=32, num_classes=None, **kw)
        counts[dim] = sum(p.numel() for p in net.parameters())
    assert counts[0] == counts[None]
    assert counts[6] == counts[0] + 6 * 512 and counts[9] == counts[0] + 9 * 512
    assert net.map_augment.bias is None


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
    """Fresh: output near 0 whatever the label (near-zero output layers); after perturbing
    them, the label changes the output."""
    torch.manual_seed(0)
    net = build(**TINY, augment_dim=9)
    z, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    aug = torch.randn(2, 9)
    assert net(z, t, t * 0, aug=aug).abs().max() < 1e-3
    assert net.map_augment.weight.abs().sum() > 0            # xavier, not zero
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d) and module.weight.abs().max() < 1e-3:
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


# ---- the iMF options (guidance_cond, v_head) ----------------------------------------------

def _guidance(dtype=torch.float64) -> dict:
    return {"omega": torch.tensor([3.0, 1.5], dtype=dtype),
            "t_min": torch.tensor([0.2, 0.0], dtype=dtype),
            "t_max": torch.tensor([0.8, 0.6], dtype=dtype)}


def test_imf_options_default_off_and_add_only_their_layers():
    """Off by default (the same network, seed for seed); on, they add map_guidance (3n -> 2n,
    no bias) and a copy of the output layers, nothing else."""
    torch.manual_seed(0)
    plain = build("unet-small", in_channels=1, input_size=28)
    torch.manual_seed(0)
    off = build("unet-small", in_channels=1, input_size=28, guidance_cond=False, v_head=False)
    a, b = plain.state_dict(), off.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not plain.takes_guidance and not plain.has_v_head
    on = build("unet-small", in_channels=1, input_size=28, guidance_cond=True, v_head=True)
    n = 32 * 2                                           # channels * time_mult features
    out = 2 * 32 + 32 * 1 * 9 + 1                        # GroupNorm(32) + conv 3x3 to 1
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(on) == count(plain) + 3 * n * 2 * n + out
    assert on.parameter_counts()["v output"] == out and on.takes_guidance and on.has_v_head


def test_imf_defaults_are_omega_one_and_the_unit_interval():
    """omega/t_min/t_max None equal ω = 1 and [0, 1] bit for bit; ω reaches the output; the
    v-head is not run unless asked, and u is the same either way."""
    net = tiny_unet(guidance_cond=True, v_head=True)
    calls = []
    for module in (net.norm_out_v, net.conv_out_v):
        module.register_forward_hook(lambda *_: calls.append(1))
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g)
    t, h = torch.tensor([0.6, 0.9], dtype=torch.float64), torch.tensor([0.1, 0.5],
                                                                          dtype=torch.float64)
    y = torch.tensor([0, 5])
    base = net(z, t, h, y)
    ones = torch.ones(2)
    assert torch.equal(base, net(z, t, h, y, omega=ones, t_min=0 * ones, t_max=ones))
    assert calls == []
    u, v = net(z, t, h, y, **_guidance(), v_head=True)
    assert len(calls) == 2 and torch.equal(u, net(z, t, h, y, **_guidance()))
    assert (u - base).abs().max() > 1e-4 and (u - v).abs().max() > 1e-4


@pytest.mark.parametrize("strategy", JVP_STRATEGIES)
def test_imf_dudt_equals_finite_differences(strategy, dudt_point):
    """With ω, t_min, t_max as constants of the JVP, du/dt equals a float64 central
    difference along (v, 0, 1) under every strategy."""
    net = tiny_unet(guidance_cond=True, v_head=True)
    z, v, r, t, y = dudt_point
    cond, eps = _guidance(), 1e-6
    fd = (net(z + eps * v, t + eps, t + eps - r, y, **cond)
          - net(z - eps * v, t - eps, t - eps - r, y, **cond)) / (2 * eps)
    dudt = time_derivative(net, z, r, t, v, y, strategy=strategy, cond=cond)
    torch.testing.assert_close(dudt, fd, rtol=1e-6, atol=1e-7)
    plain = time_derivative(net, z, r, t, v, y, strategy=strategy)
    assert (dudt - plain).abs().max() > 1e-4


def test_imf_option_errors():
    net = build(**{**TINY, "dropout": 0.0})
    z, t = torch.randn(1, 3, 8, 8), torch.rand(1)
    with pytest.raises(ConfigError, match="guidance_cond"):
        net(z, t, t, omega=torch.ones(1))
    with pytest.raises(ConfigError, match="v_head=true"):
        net(z, t, t, v_head=True)
    with pytest.raises(ConfigError, match="true or false"):
        build(**{**TINY, "v_head": 1})
