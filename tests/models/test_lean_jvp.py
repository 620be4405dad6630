"""Lean forward-AD rules: GroupNorm, the chunked attention JVP, and the lean
Linear/Conv2d in the joint strategies' grad-carrying pass. Every rule is exact: tangents equal
PyTorch's own rules and float64 central differences, under torch.func.jvp and forward_ad."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from meanflow import JVP_STRATEGIES
from meanflow.models.attention import (Attention, attention_jvp, check_attention_jvp,
                                       math_attention, set_jvp_attention)
from meanflow.models.layers import Conv2d, Linear, group_norm, layer_norm

from test_dit import tiny_dit  # noqa: E402
from test_unet import tiny_unet  # noqa: E402


def _jvp(engine, fn, primals, tangents):
    if engine == "func":
        return torch.func.jvp(fn, primals, tangents)
    with forward_ad.dual_level():
        out = fn(*[forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)])
        return forward_ad.unpack_dual(out)


def _rand(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- GroupNorm
@pytest.mark.parametrize("engine", ["func", "forward_ad"])
@pytest.mark.parametrize("groups", [1, 4, 8])
def test_group_norm_tangent_matches_native_and_fd(engine, groups):
    x = _rand(3, 8, 5, 5, seed=0) * 2 + 1
    w, b = _rand(8, seed=1), _rand(8, seed=2)
    xt, wt, bt = _rand(3, 8, 5, 5, seed=3), _rand(8, seed=4), _rand(8, seed=5)

    def ours(a, m, c):
        return torch.tanh(group_norm(a, groups, m, c, 1e-6))

    def ref(a, m, c):
        return torch.tanh(F.group_norm(a, groups, m, c, 1e-6))

    out, tan = _jvp(engine, ours, (x, w, b), (xt, wt, bt))
    ref_out, ref_tan = _jvp(engine, ref, (x, w, b), (xt, wt, bt))
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tan, ref_tan, rtol=1e-10, atol=1e-12)
    eps = 1e-6
    fd = (ours(x + eps * xt, w, b) - ours(x - eps * xt, w, b)) / (2 * eps)
    only_x = _jvp(engine, lambda a: ours(a, w, b), (x,), (xt,))[1]
    torch.testing.assert_close(only_x, fd, rtol=1e-6, atol=1e-8)


def test_group_norm_gradients_and_vmap():
    x = _rand(2, 8, 3, 3) * 3 - 1
    w, b = _rand(8, seed=1), _rand(8, seed=2)
    args = tuple(a.clone().requires_grad_() for a in (x, w, b))
    assert torch.autograd.gradcheck(lambda a, m, c: group_norm(a, 2, m, c, 1e-6), args)
    batched = torch.vmap(lambda a: group_norm(a[None], 2, w, b, 1e-6)[0])(x)
    torch.testing.assert_close(batched, group_norm(x, 2, w, b, 1e-6))


def test_group_norm_gradients_of_a_channels_last_input_in_a_joint_pass():
    """A channels-last input (as the sum of a transposed attention output and a feature map
    can be) gets F.group_norm's gradients in a joint pass with a tangent; without the
    contiguous copy, native_group_norm_backward read it in the wrong order."""
    x = (_rand(2, 8, 4, 4) * 3 - 1).to(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    w, b = _rand(8, seed=1), _rand(8, seed=2)
    g = _rand(2, 8, 4, 4, seed=3)
    params = [w.clone().requires_grad_(), b.clone().requires_grad_()]
    xs = x.clone().requires_grad_()
    ref = torch.autograd.grad((F.group_norm(xs, 2, *params, 1e-6) * g).sum(), [xs, *params])
    out, _ = torch.func.jvp(lambda a: group_norm(a, 2, *params, 1e-6), (xs,),
                            (torch.ones_like(x),))
    got = torch.autograd.grad((out * g).sum(), [xs, *params])
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- attention
@pytest.mark.parametrize("engine", ["func", "forward_ad"])
@pytest.mark.parametrize("tokens,chunk", [(1, None), (16, 5), (64, None), (64, 7), (257, 32)])
def test_attention_jvp_matches_math_path_and_fd(engine, tokens, chunk):
    P = tuple(_rand(2, 3, tokens, 8, seed=s) for s in range(3))
    T = tuple(_rand(2, 3, tokens, 8, seed=10 + s) for s in range(3))
    fn = lambda q, k, v: attention_jvp(q, k, v, chunk)  # noqa: E731
    out, tan = _jvp(engine, fn, P, T)
    ref_out, ref_tan = _jvp(engine, math_attention, P, T)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tan, ref_tan, rtol=1e-10, atol=1e-12)
    eps = 1e-6
    fd = (fn(*[p + eps * t for p, t in zip(P, T)])
          - fn(*[p - eps * t for p, t in zip(P, T)])) / (2 * eps)
    torch.testing.assert_close(tan, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_attention_jvp_with_one_tangent(which):
    P = [_rand(1, 2, 9, 4, seed=s) for s in range(3)]
    t = _rand(1, 2, 9, 4, seed=7)

    def along(fn):
        def f(a):
            args = list(P)
            args[which] = a
            return fn(*args)
        return torch.func.jvp(f, (P[which],), (t,))[1]

    torch.testing.assert_close(along(lambda q, k, v: attention_jvp(q, k, v, 4)),
                               along(math_attention), rtol=1e-10, atol=1e-12)


def test_attention_jvp_gradients_and_startup_check():
    P = tuple(_rand(1, 2, 6, 4, seed=s).requires_grad_() for s in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: attention_jvp(q, k, v, 4), P)
    assert check_attention_jvp(dtype=torch.float64) < 1e-12
    assert check_attention_jvp() < 1e-5
    with pytest.raises(RuntimeError, match="disagrees"):      # a dropped jvp rule is caught
        check_attention_jvp(lambda q, k, v: attention_jvp(q, k.detach(), v.detach()))


def test_set_jvp_attention_selects_and_validates():
    net = tiny_dit()
    set_jvp_attention(net, "chunked")
    assert all(m.jvp_impl == "chunked" for m in net.modules() if isinstance(m, Attention))
    with pytest.raises(ValueError):
        set_jvp_attention(net, "flash")
    assert "jvp_impl" not in str(list(net.state_dict()))


# ----------------------------------------------------------------------------- backbones
@pytest.mark.parametrize("strategy", JVP_STRATEGIES)
@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_dudt_with_chunked_attention_equals_finite_differences(strategy, backbone,
                                                               assert_dudt_matches_fd):
    net = tiny_unet() if backbone == "unet" else tiny_dit()
    set_jvp_attention(net, "chunked")
    assert_dudt_matches_fd(net, strategy)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_strategies_agree_with_chunked_attention(backbone, assert_strategies_agree):
    net = tiny_unet(dropout=0.3).train() if backbone == "unet" else tiny_dit()
    set_jvp_attention(net, "chunked")
    assert_strategies_agree(net)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_chunked_and_math_attention_give_the_same_dudt(backbone, dudt_point):
    from meanflow import time_derivative
    z, v, r, t, y = dudt_point
    net = tiny_unet() if backbone == "unet" else tiny_dit()
    ref = time_derivative(net, z, r, t, v, y, strategy="split")
    set_jvp_attention(net, "chunked")
    for strategy in JVP_STRATEGIES:
        got = time_derivative(net, z, r, t, v, y, strategy=strategy)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- joint pass
def _products(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = ("aten::mm", "aten::addmm", "aten::convolution")
    return sum(e.count for e in prof.key_averages() if e.key in names)


def test_joint_pass_with_grad_skips_the_zero_weight_tangent():
    """With grad on and a tangent on the input (the func / forward_ad strategies' one pass),
    Linear and Conv2d make 2 products (primal + tangent), not 3, and gradients still flow."""
    torch.manual_seed(0)
    lin, conv = Linear(8, 4), Conv2d(3, 4, 3, padding=1)
    x, xt = torch.randn(5, 8), torch.randn(5, 8)
    assert _products(lambda: torch.func.jvp(lin, (x,), (xt,))) == 2
    assert _products(lambda: torch.func.jvp(conv, (torch.randn(2, 3, 6, 6),),
                                            (torch.randn(2, 3, 6, 6),))) == 2
    with forward_ad.dual_level():
        out = lin(forward_ad.make_dual(x, xt))
        primal = forward_ad.unpack_dual(out).primal
    primal.square().sum().backward()
    ref = torch.nn.Linear(8, 4)
    ref.load_state_dict(lin.state_dict())
    ref(x).square().sum().backward()
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad)


# ----------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("engine", ["func", "forward_ad"])
@pytest.mark.parametrize("grad", [False, True])
def test_lean_dropout_draws_f_dropouts_mask_and_tangent(engine, grad):
    """Same RNG draws as CPU F.dropout (so the split passes' masks still match), same output,
    tangent and gradient."""
    from meanflow.models.layers import dropout
    x, xt = _rand(4, 5, 6), _rand(4, 5, 6, seed=1)
    results = []
    for fn in (lambda a: F.dropout(a, 0.3, True), lambda a: dropout(a, 0.3, True)):
        torch.manual_seed(3)
        with torch.set_grad_enabled(grad):
            primal = x.clone().requires_grad_(grad)
            out, tan = _jvp(engine, fn, (primal,), (xt,))
            g = torch.autograd.grad(out.sum(), primal)[0] if grad and engine == "forward_ad" \
                else None
        results.append((out.detach(), tan, g))
    (o1, t1, g1), (o2, t2, g2) = results
    assert torch.equal(o1, o2) and torch.equal(t1, t2)
    if g1 is not None:
        assert torch.equal(g1, g2)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.3, True), results[0][0])       # grad mode, no tangent


# ----------------------------------------------------------------------------- LayerNorm
@pytest.mark.parametrize("engine", ["func", "forward_ad"])
def test_layer_norm_tangent_matches_native_and_fd(engine):
    x = _rand(3, 7, 12, seed=0) * 2 + 1
    xt = _rand(3, 7, 12, seed=3)

    def ours(a):
        return torch.tanh(layer_norm(a, 1e-6))

    def ref(a):
        return torch.tanh(F.layer_norm(a, a.shape[-1:], eps=1e-6))

    out, tan = _jvp(engine, ours, (x,), (xt,))
    ref_out, ref_tan = _jvp(engine, ref, (x,), (xt,))
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tan, ref_tan, rtol=1e-10, atol=1e-12)
    eps = 1e-6
    fd = (ours(x + eps * xt) - ours(x - eps * xt)) / (2 * eps)
    torch.testing.assert_close(tan, fd, rtol=1e-6, atol=1e-8)


def test_layer_norm_gradients_vmap_and_the_dit_uses_it():
    x = (_rand(2, 5, 8) * 3 - 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: layer_norm(a, 1e-6), (x,))
    batched = torch.vmap(lambda a: layer_norm(a[None], 1e-6)[0])(x.detach())
    torch.testing.assert_close(batched, layer_norm(x.detach(), 1e-6))
    # the DiT's JVP through the lean rule equals PyTorch's own rules (native F.layer_norm)
    import meanflow.models.dit as dit_module
    net = tiny_dit().double()
    z, tz = _rand(2, 3, 8, 8, seed=1), _rand(2, 3, 8, 8, seed=2)
    t, h = torch.tensor([0.3, 0.8], dtype=torch.float64), torch.tensor([0.1, 0.5],
                                                                       dtype=torch.float64)
    with torch.no_grad():
        got = torch.func.jvp(lambda a: net(a, t, h), (z,), (tz,))[1]
    native = dit_module.layer_norm
    calls = []
    try:
        dit_module.layer_norm = lambda a, eps: calls.append(1) or F.layer_norm(
            a, a.shape[-1:], eps=eps)
        with torch.no_grad():
            want = torch.func.jvp(lambda a: net(a, t, h), (z,), (tz,))[1]
    finally:
        dit_module.layer_norm = native
    assert calls                                  # the lean path was the one taken
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
