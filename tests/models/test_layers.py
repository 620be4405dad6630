"""The JVP-lean Linear: same values, gradients and tangents as torch.nn.Linear, fewer products."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from meanflow.models.layers import Linear, linear


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 7, dtype=torch.float64, generator=g)   # extra leading dim on purpose
    v = torch.randn(5, 3, 7, dtype=torch.float64, generator=g)
    w = torch.randn(4, 7, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g)
    return x, v, w, b


def test_values_and_gradients_match_f_linear(tensors):
    """Forward equals F.linear; gradients pass torch.autograd.gradcheck in float64."""
    x, _, w, b = tensors
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    args = tuple(a.clone().requires_grad_() for a in (x, w, b))
    assert torch.autograd.gradcheck(linear, args)
    assert torch.autograd.gradcheck(lambda a, m: linear(a, m, None), args[:2])


@pytest.mark.parametrize("engine", ["func", "forward_ad"])
def test_tangents_match_f_linear(tensors, engine):
    """JVP w.r.t. the input, and w.r.t. input, weight and bias together, equal F.linear's."""
    x, v, w, b = tensors
    wt, bt = torch.randn_like(w), torch.randn_like(b)

    def run(fn, primals, tangents):
        if engine == "func":
            return torch.func.jvp(fn, primals, tangents)[1]
        with forward_ad.dual_level():
            duals = [forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)]
            return forward_ad.unpack_dual(fn(*duals))[1]

    ours = run(lambda a: torch.tanh(linear(a, w, b)), (x,), (v,))
    ref = run(lambda a: torch.tanh(F.linear(a, w, b)), (x,), (v,))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    ours = run(linear, (x, w, b), (v, wt, bt))
    ref = run(F.linear, (x, w, b), (v, wt, bt))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def _products(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))


def test_jvp_skips_the_weights_zero_tangent(tensors):
    """A JVP w.r.t. the input costs 2 products (primal + tangent), where F.linear's rule pays
    a third one for the weights' materialised zero tangent."""
    x, v, w, b = tensors
    x2, v2 = x.reshape(-1, 7), v.reshape(-1, 7)
    with torch.no_grad():
        ours = _products(lambda: torch.func.jvp(lambda a: linear(a, w, b), (x2,), (v2,)))
        native = _products(lambda: torch.func.jvp(lambda a: F.linear(a, w, b), (x2,), (v2,)))
    assert ours == 2
    assert native > ours


def test_module_is_a_drop_in_for_nn_linear():
    """Same parameters and state-dict keys as nn.Linear, so checkpoints are interchangeable."""
    torch.manual_seed(0)
    ours = Linear(6, 3)
    ref = torch.nn.Linear(6, 3)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6)
    assert torch.equal(ours(x), ref(x))
    assert set(ours.state_dict()) == {"weight", "bias"}


def test_bias_only_tangent(tensors):
    """A tangent on the bias alone is broadcast over the batch (the rule has no other term)."""
    x, _, w, b = tensors
    bt = torch.randn_like(b)
    ours = torch.func.jvp(lambda c: linear(x, w, c), (b,), (bt,))[1]
    ref = torch.func.jvp(lambda c: F.linear(x, w, c), (b,), (bt,))[1]
    torch.testing.assert_close(ours, ref)


def test_bf16_autocast_matches_nn_linear():
    """Under CPU bf16 autocast the lean function's outputs, gradients and tangents match
    F.linear's (dtypes included)."""
    torch.manual_seed(0)
    w, b = torch.randn(4, 8, requires_grad=True), torch.randn(4, requires_grad=True)
    x = torch.randn(3, 8, requires_grad=True)
    v = torch.randn(3, 8)
    results = []
    for fn in (linear, F.linear):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x, w, b)
            with forward_ad.dual_level():
                tangent = forward_ad.unpack_dual(fn(forward_ad.make_dual(x.detach(), v),
                                                    w.detach(), b.detach()))[1]
        grads = torch.autograd.grad(y.float().square().sum(), (x, w, b))
        results.append((y, tangent, grads))
    (y1, t1, g1), (y2, t2, g2) = results
    assert y1.dtype == y2.dtype == torch.bfloat16 and t1.dtype == t2.dtype == torch.bfloat16
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(t1, t2)
    for a, c in zip(g1, g2):
        assert a.dtype == c.dtype
        torch.testing.assert_close(a, c, rtol=2e-2, atol=2e-2)


def test_module_uses_the_lean_rule_only_without_grad():
    """The module's no-grad JVP (the split strategies' pass) makes 2 products; with grad on it
    is plain F.linear (native backward)."""
    torch.manual_seed(0)
    layer = Linear(8, 4)
    x, v = torch.randn(3, 8), torch.randn(3, 8)
    with torch.no_grad():
        assert _products(lambda: torch.func.jvp(layer, (x,), (v,))) == 2
    assert layer(x.requires_grad_()).grad_fn.name() != "_LinearFnBackward"
