"""bf16 autocast: every objective and du/dt strategy runs and back-propagates (bf16 is the
precision path, docs/design.md, precision), and du/dt stays close to the fp32 value."""

from __future__ import annotations

import pytest
import torch

from meanflow import JVP_STRATEGIES, FlowMatchingLoss, MeanFlowLoss, time_derivative
from meanflow.models import build_model


@pytest.mark.parametrize("make_loss", [lambda: FlowMatchingLoss()] + [
    (lambda s=s: MeanFlowLoss(jvp=s, fraction_r_neq_t=1.0)) for s in JVP_STRATEGIES])
def test_losses_run_under_bf16_autocast(make_loss):
    torch.manual_seed(0)
    net = build_model("mlp", dim=2, width=32, depth=2, emb_dim=16)
    x = torch.randn(64, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = make_loss()(net, x, generator=torch.Generator().manual_seed(1))
    loss.float().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all()
               for g in grads)


@pytest.mark.parametrize("strategy", JVP_STRATEGIES)
def test_bf16_dudt_close_to_fp32(strategy):
    torch.manual_seed(0)
    net = build_model("mlp", dim=2, width=32, depth=2, emb_dim=16)
    z, v = torch.randn(128, 2), torch.randn(128, 2)
    t = torch.rand(128) * 0.5 + 0.5
    r = t * torch.rand(128)
    ref = time_derivative(net, z, r, t, v, strategy=strategy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = time_derivative(net, z, r, t, v, strategy=strategy, jvp_autocast=True)
        kept = time_derivative(net, z, r, t, v, strategy=strategy)   # default: JVP in fp32
    rel = (low.float() - ref).norm() / ref.norm()
    assert 0 < rel < 0.05, f"bf16 du/dt is {rel:.3f} away from fp32"
    assert kept.dtype == torch.float32
    torch.testing.assert_close(kept, ref, rtol=1e-6, atol=1e-7)
