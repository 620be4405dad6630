"""iMF in-context DiT: the paper's sizes, the network contract (ω, interval, v-head), its
layers (RoPE, RMSNorm, zero gates), and an exact du/dt under every JVP strategy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from meanflow import JVP_STRATEGIES, ConfigError
from meanflow.models import MODELS, IMFDiT, backbone_family, build_model, build_model_for_data
from meanflow.models.attention import Attention, set_jvp_attention
from meanflow.models.imf_dit import apply_rope, rope_tables
from meanflow.models.layers import rms_norm
from meanflow.objective.jvp import u_and_dudt

TINY = dict(in_channels=3, input_size=8, num_classes=5, patch=2, depth=3, head_depth=1,
            width=32, heads=2)
F64 = dict(dtype=torch.float64)


def tiny_imf(**kw) -> IMFDiT:
    """A small iMF DiT with every weight random (zero gates and output layers would make the
    output identically 0)."""
    torch.manual_seed(0)
    net = build_model("imf-dit-tiny/2", **{**TINY, **kw}).double()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    return net


def point() -> tuple:
    """(z, v, r, t, y, cond) in float64: labels include the null class 5."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 8, 8, generator=g, **F64)
    v = torch.randn(2, 3, 8, 8, generator=g, **F64)
    t, r = torch.tensor([0.7, 0.4], **F64), torch.tensor([0.2, 0.35], **F64)
    cond = {"omega": torch.tensor([2.5, 6.0], **F64), "t_min": torch.tensor([0.1, 0.3], **F64),
            "t_max": torch.tensor([0.6, 0.9], **F64)}
    return z, v, r, t, torch.tensor([1, 5]), cond


# inference parameters (u-path, no v-head) at 32×32×4 latents, 1000 classes; the paper's
# counts in millions
PAPER = {"b": (88_935_184, 89), "m": (173_908_240, 174), "l": (409_054_224, 409),
         "xl": (610_415_632, 610)}


@pytest.mark.parametrize("size", sorted(PAPER))
def test_parameter_counts_match_the_paper(size):
    """Without the v-head, within 1 % of the paper's B/M/L/XL (built on meta); the v-head adds
    head_depth blocks and an output layer."""
    with torch.device("meta"):
        net = build_model(f"imf-dit-{size}/2", in_channels=4, input_size=32, num_classes=1000)
    exact, paper = PAPER[size]
    assert net.inference_parameters() == exact
    assert abs(exact / (paper * 1e6) - 1) < 0.01
    v_head = sum(p.numel() for m in (net.v_blocks, net.v_final) for p in m.parameters())
    assert sum(p.numel() for p in net.parameters()) == exact + v_head
    assert len(net.v_blocks) == len(net.u_blocks) == 8
    assert len(net.shared_blocks) == net.cfg.depth - 8
    with torch.device("meta"):
        lean = build_model(f"imf-dit-{size}/2", in_channels=4, input_size=32, num_classes=1000,
                           v_head=False)
    assert sum(p.numel() for p in lean.parameters()) == lean.inference_parameters() == exact
    assert not lean.has_v_head


def test_registry_names_and_family():
    for name in ("tiny/2", "tiny/4", "s/2", "s/4", "b/2", "m/2", "l/2", "xl/2"):
        assert f"imf-dit-{name}" in MODELS
    net = build_model_for_data("imf-dit-tiny/4", (1, 28, 28), 10, {})
    assert isinstance(net, IMFDiT) and net.takes_guidance and net.has_v_head
    assert backbone_family(net) == "imf-dit"
    assert net.grid == 7 and net.cfg.prefix == 20


def test_swiglu_width_and_block_layout():
    """SwiGLU hidden int(D·8/3): 2048 at 768, 2730 at 1024; bias-free projections."""
    for size, hidden in (("b", 2048), ("l", 2730)):
        with torch.device("meta"):
            net = build_model(f"imf-dit-{size}/2", in_channels=4, input_size=32)
        block = net.u_blocks[0]
        assert block.mlp.fc_out.in_features == hidden
        assert block.mlp.fc_in.bias is None and block.mlp.fc_out.bias is None
        assert block.attn.proj.bias is None and block.attn.qkv.proj.bias is None


def test_fresh_blocks_are_identities_and_the_output_is_zero():
    """Zero gates: every block of a fresh model returns its input exactly; zero output
    layers: u = v = 0."""
    torch.manual_seed(0)
    net = build_model("imf-dit-tiny/2", **TINY)
    x = torch.randn(2, net.cfg.prefix + 16, 32)
    for block in (*net.shared_blocks, *net.u_blocks, *net.v_blocks):
        assert torch.equal(block(x), x)
    z, _, r, t, y, cond = point()
    u, v = net(z.float(), t.float(), (t - r).float(), y, v_head=True)
    assert torch.count_nonzero(u) == 0 and torch.count_nonzero(v) == 0
    assert u.shape == v.shape == z.shape


def test_rope_turns_pairs_and_depends_on_relative_position():
    """RoPE is multiplication of channel pairs (x₀ + i x₁) by e^{i n θ_k}, and a rotated q·k
    depends only on the positions' difference."""
    d, L = 8, 12
    cos, sin = rope_tables(d, L)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(L, d, generator=g, **F64)
    ref = torch.view_as_complex(x.reshape(L, d // 2, 2))
    angles = torch.arange(L, **F64)[:, None] * 10000.0 ** (-torch.arange(0, d, 2, **F64) / d)
    want = torch.view_as_real(ref * torch.polar(torch.ones_like(angles), angles)).reshape(L, d)
    torch.testing.assert_close(apply_rope(x, cos, sin), want)
    q, k = torch.randn(d, generator=g, **F64), torch.randn(d, generator=g, **F64)
    rq = apply_rope(q.expand(L, d), cos, sin)
    rk = apply_rope(k.expand(L, d), cos, sin)
    for shift in (0, 1, 5):
        dots = [rq[m + shift] @ rk[m] for m in range(L - shift)]
        torch.testing.assert_close(torch.stack(dots), dots[0].expand(len(dots)))
    assert not torch.allclose(rq[3] @ rk[1], rq[3] @ rk[2])


def test_rms_norm_paths_agree_with_their_derivatives():
    """The lean rms_norm (no grad, or a tangent) equals F.rms_norm in value, JVP and
    gradient."""
    g = torch.Generator().manual_seed(0)
    x, dx = torch.randn(3, 5, 16, generator=g, **F64), torch.randn(3, 5, 16, generator=g, **F64)
    want = F.rms_norm(x, (16,), eps=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(rms_norm(x, 1e-6), want)
    _, want_t = torch.func.jvp(lambda a: F.rms_norm(a, (16,), eps=1e-6), (x,), (dx,))
    _, got_t = torch.func.jvp(lambda a: rms_norm(a, 1e-6), (x,), (dx,))
    torch.testing.assert_close(got_t, want_t)
    with forward_ad.dual_level():
        out = rms_norm(forward_ad.make_dual(x.requires_grad_(), dx), 1e-6)
        torch.testing.assert_close(forward_ad.unpack_dual(out).tangent, want_t)
    grad = torch.autograd.grad((out * dx).sum(), x)[0]
    ref = torch.autograd.grad((F.rms_norm(x, (16,), eps=1e-6) * dx).sum(), x)[0]
    torch.testing.assert_close(grad, ref)


def test_prefix_tokens_embed_the_conditions_in_order():
    """Class, ω (as 1 − 1/ω), t_min, t_max, h: each group its matrix plus its embedding."""
    net = tiny_imf()
    z, _, r, t, y, cond = point()
    seq = net.tokens(z, t - r, y, cond["omega"], cond["t_min"], cond["t_max"])
    parts = [net.class_tokens + net.y_embed(y)[:, None],
             net.omega_tokens + net.omega_embed(1 - 1 / cond["omega"])[:, None],
             net.t_min_tokens + net.t_min_embed(cond["t_min"])[:, None],
             net.t_max_tokens + net.t_max_embed(cond["t_max"])[:, None],
             net.time_tokens + net.h_embed(t - r)[:, None]]
    torch.testing.assert_close(seq[:, :20], torch.cat(parts, 1), rtol=0, atol=0)
    assert [p.shape[1] for p in parts] == [8, 4, 2, 2, 4]


def test_scalar_features_are_cosines_then_sines_from_frequency_one():
    """Each scalar condition gets 256 features: cos(s·f_i), then sin(s·f_i), with
    f_i = 10000^(-i/128), i = 0 .. 127."""
    net = build_model("imf-dit-tiny/2", **TINY).double()
    s = torch.tensor([0.0, 0.3, 1.0], **F64)
    f = 10000.0 ** (-torch.arange(128, **F64) / 128)
    want = torch.cat([torch.cos(s[:, None] * f), torch.sin(s[:, None] * f)], 1)
    for embedder in (net.h_embed, net.omega_embed, net.t_min_embed, net.t_max_embed):
        torch.testing.assert_close(embedder.freq(s), want, rtol=1e-6, atol=1e-6)


def test_patches_round_trip():
    """With an identity patch embedding, unpatchify(patch tokens) is the input image."""
    net = build_model("imf-dit-tiny/2", **{**TINY, "width": 12, "heads": 2}).double()
    with torch.no_grad():
        net.patch_embed.weight.copy_(torch.eye(12))
        net.patch_embed.bias.zero_()
    z = point()[0]
    seq = net.tokens(z, torch.zeros(2, **F64), None, None, None, None)
    torch.testing.assert_close(net.unpatchify(seq), z, rtol=0, atol=0)


def test_defaults_labels_and_time():
    """omega=None is ω = 1 and the interval [0, 1], bit for bit; y=None is the null class; t
    is not an input; ω and the labels do reach the output."""
    net = tiny_imf()
    z, _, r, t, y, cond = point()
    h = t - r
    ones = torch.ones(2, **F64)
    base = net(z, t, h, y, v_head=True)
    explicit = net(z, t, h, y, omega=ones, t_min=torch.zeros(2), t_max=ones.float(),
                   v_head=True)
    assert all(torch.equal(a, b) for a, b in zip(base, explicit))
    assert torch.equal(net(z, t, h), net(z, t, h, torch.tensor([5, 5])))
    assert torch.equal(net(z, t, h, y), net(z, t.flip(0), h, y))
    assert (net(z, t, h, y, omega=2 * ones) - base[0]).abs().max() > 1e-5
    assert (net(z, t, h, torch.tensor([1, 1])) - base[0]).abs().max() > 1e-5


def test_v_head_runs_only_when_asked():
    net = tiny_imf()
    calls = []
    for module in (*net.v_blocks, net.v_final):
        module.register_forward_hook(lambda *_: calls.append(1))
    z, _, r, t, y, cond = point()
    u = net(z, t, t - r, y, **cond)
    assert calls == [] and isinstance(u, torch.Tensor)
    u2, v = net(z, t, t - r, y, **cond, v_head=True)
    assert len(calls) == 2 and torch.equal(u, u2) and not torch.allclose(u, v)


def test_fused_and_math_attention_agree(assert_attention_paths_agree):
    assert_attention_paths_agree(tiny_imf(), tiny_imf(attention="math"))
    assert all(isinstance(m.attn, Attention) for m in tiny_imf().u_blocks)


@pytest.mark.parametrize("strategy", JVP_STRATEGIES)
def test_dudt_equals_finite_differences(strategy):
    """du/dt of (z, r, t) -> u(z, t, t − r, y, ω, t_min, t_max) along (v, 0, 1) equals a float64
    central difference; u is the plain forward; dropping v·∂u/∂z is wrong."""
    net = tiny_imf()
    z, v, r, t, y, cond = point()
    eps = 1e-6
    fd = (net(z + eps * v, t + eps, t + eps - r, y, **cond)
          - net(z - eps * v, t - eps, t - eps - r, y, **cond)) / (2 * eps)
    u, dudt = u_and_dudt(net, z, r, t, v, y, strategy=strategy, cond=cond)
    torch.testing.assert_close(dudt, fd, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(u, net(z, t, t - r, y, **cond), rtol=1e-12, atol=1e-12)
    _, wrong = u_and_dudt(net, z, r, t, torch.zeros_like(v), y, strategy=strategy, cond=cond)
    assert (wrong - fd).abs().max() > 1e-3


def test_chunked_jvp_attention_gives_the_same_dudt():
    """The JVP pass goes through Attention's JVP implementations: chunked equals math."""
    net = tiny_imf()
    z, v, r, t, y, cond = point()
    _, ref = u_and_dudt(net, z, r, t, v, y, strategy="forward_ad", cond=cond)
    set_jvp_attention(net, "chunked")
    _, got = u_and_dudt(net, z, r, t, v, y, strategy="forward_ad", cond=cond)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_meanflow_loss_agrees_across_strategies(assert_strategies_agree):
    """The MeanFlow loss (no ω, interval: the defaults) gives the same loss and gradients
    under every strategy (built without the v-head, which it never calls)."""
    assert_strategies_agree(tiny_imf(v_head=False))


def test_bad_inputs():
    net = build_model("imf-dit-tiny/2", **TINY)
    with pytest.raises(ConfigError, match="inputs got"):
        net(torch.randn(1, 3, 16, 16), torch.rand(1), torch.rand(1))
    with pytest.raises(ConfigError, match="without a v-head"):
        build_model("imf-dit-tiny/2", **TINY, v_head=False)(
            torch.randn(1, 3, 8, 8), torch.rand(1), torch.rand(1), v_head=True)
    with pytest.raises(ConfigError, match="head_depth"):
        build_model("imf-dit-tiny/2", **{**TINY, "head_depth": 4})
    with pytest.raises(ConfigError, match="even"):
        build_model("imf-dit-tiny/2", **{**TINY, "width": 30, "heads": 2})
    with pytest.raises(ConfigError, match="divisible by patch"):
        build_model("imf-dit-tiny/2", **{**TINY, "input_size": 9})
    with pytest.raises(ConfigError, match="square images"):
        build_model_for_data("imf-dit-tiny/2", (2,), None, {})
