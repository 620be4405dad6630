"""The JVP-lean Conv2d: same values, gradients and tangents as F.conv2d, fewer convolutions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from meanflow.models.layers import Conv2d, conv2d

GEOMETRIES = [dict(stride=1, padding=1), dict(stride=2, padding=0), dict(stride=1, padding=2,
                                                                          dilation=2)]


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, generator=g)
    v = torch.randn(2, 3, 7, 6, dtype=torch.float64, generator=g)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g)
    return x, v, w, b


def _jvp(engine, fn, primals, tangents):
    if engine == "func":
        return torch.func.jvp(fn, primals, tangents)[1]
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)]
        return forward_ad.unpack_dual(fn(*duals))[1]


@pytest.mark.parametrize("geom", GEOMETRIES)
def test_values_and_gradients_match_f_conv2d(tensors, geom):
    x, _, w, b = tensors
    assert torch.equal(conv2d(x, w, b, **geom), F.conv2d(x, w, b, **geom))
    args = tuple(a.clone().requires_grad_() for a in (x, w, b))
    assert torch.autograd.gradcheck(lambda a, m, c: conv2d(a, m, c, **geom), args)


@pytest.mark.parametrize("engine", ["func", "forward_ad"])
@pytest.mark.parametrize("geom", GEOMETRIES)
def test_tangents_match_f_conv2d(tensors, engine, geom):
    """Input-only tangents, all three together, and a bias-only tangent equal F.conv2d's."""
    x, v, w, b = tensors
    wt, bt = torch.randn_like(w), torch.randn_like(b)
    for primals, tangents, pick in [((x,), (v,), lambda a: (a, w, b)),
                                    ((x, w, b), (v, wt, bt), lambda *a: a),
                                    ((b,), (bt,), lambda c: (x, w, c))]:
        ours = _jvp(engine, lambda *a: torch.tanh(conv2d(*pick(*a), **geom)), primals, tangents)
        ref = _jvp(engine, lambda *a: torch.tanh(F.conv2d(*pick(*a), **geom)), primals,
                   tangents)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def _convolutions(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::convolution")


def test_module_jvp_costs_two_convolutions_without_grad():
    """The no-grad JVP of the module makes 2 convolutions (primal + tangent); the native rule
    makes more (the weights' materialised zero tangent); with grad on it is nn.Conv2d."""
    torch.manual_seed(0)
    ours, native = Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(3, 4, 3, padding=1)
    native.load_state_dict(ours.state_dict())
    x, v = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert _convolutions(lambda: torch.func.jvp(ours, (x,), (v,))) == 2
        assert _convolutions(lambda: torch.func.jvp(native, (x,), (v,))) > 2
        torch.testing.assert_close(torch.func.jvp(ours, (x,), (v,)),
                                   torch.func.jvp(native, (x,), (v,)))
    out = ours(x.requires_grad_())
    assert out.grad_fn.name() != "_Conv2dFnBackward"
    assert torch.equal(out, native(x))


def test_bf16_autocast_tangent_matches_f_conv2d():
    torch.manual_seed(0)
    w, b = torch.randn(4, 3, 3, 3), torch.randn(4)
    x, v = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    outs = []
    for fn in (conv2d, F.conv2d):
        with torch.autocast("cpu", dtype=torch.bfloat16), forward_ad.dual_level():
            out = fn(forward_ad.make_dual(x, v), w, b, 1, 1)
            outs.append(forward_ad.unpack_dual(out))
    (p1, t1), (p2, t2) = outs
    assert p1.dtype == p2.dtype and t1.dtype == t2.dtype
    torch.testing.assert_close(p1, p2)
    torch.testing.assert_close(t1, t2)


def test_string_padding_is_refused():
    with pytest.raises(ValueError, match="numeric zero padding"):
        Conv2d(3, 4, 3, padding="same")
