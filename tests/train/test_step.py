"""One optimiser step (meanflow.train.step): gradient accumulation, the JVP's precision under
bf16 autocast, the loss call (draws given, augmentation labels as cond), the compiled path's
draws and the compiled-loss start-up check."""

from __future__ import annotations

import copy

import pytest
import torch

from meanflow import FlowMatchingLoss, MeanFlowLoss
from meanflow.errors import ConfigError
from meanflow.models import build_model
from meanflow.runs.config import load_config
from meanflow.train.ema import EMA
from meanflow.train.loop import train
from meanflow.train.step import TrainStep, amp_context, check_compiled, make_loss_call
from meanflow.world import World

TINY_UNET = {"channels": 8, "channel_mult": [1, 2], "blocks_per_res": 1,
             "attn_resolutions": [], "dropout": 0.0}


def test_gradient_accumulation_equals_the_whole_batch():
    """Two micro-batches of 8 give the gradient of one batch of 16 (same r, t, e per sample)."""
    torch.manual_seed(0)
    net = build_model("mlp", dim=2, width=16, depth=2, emb_dim=8)
    x = torch.randn(16, 2)
    t = torch.rand(16) * 0.9 + 0.1
    r = t * torch.rand(16)
    e = torch.randn(16, 2)
    loss_fn = MeanFlowLoss(p=0.5)

    def grads(parts: int) -> list[torch.Tensor]:
        net.zero_grad()
        size = 16 // parts
        for i in range(parts):
            s = slice(i * size, (i + 1) * size)
            loss, _ = loss_fn(net, x[s], r=r[s], t=t[s], e=e[s])
            (loss.mean() / parts).backward()
        return [p.grad.clone() for p in net.parameters()]

    for a, b in zip(grads(1), grads(2)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_jvp_runs_in_fp32_under_autocast_unless_asked():
    """objective.jvp_precision: by default the split JVP pass leaves autocast (its du/dt equals
    the fp32 one exactly); with "amp" it runs in bf16 and differs."""
    from meanflow.objective.jvp import time_derivative, u_and_dudt
    torch.manual_seed(0)
    net = build_model("mlp", dim=2, width=32, depth=2, emb_dim=16)
    z, v = torch.randn(64, 2), torch.randn(64, 2)
    t = torch.rand(64) * 0.5 + 0.5
    r = t * torch.rand(64)
    ref = time_derivative(net, z, r, t, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u, fp32 = u_and_dudt(net, z, r, t, v)
        _, low = u_and_dudt(net, z, r, t, v, jvp_autocast=True)
    assert u.dtype == torch.bfloat16          # the grad pass did run under autocast
    assert fp32.dtype == torch.float32 and torch.equal(fp32, ref)
    assert low.dtype == torch.bfloat16 and not torch.equal(low.float(), ref)


class _DropsTangents(torch.nn.Module):
    """Stands in for a compiler that loses forward-mode tangents (docs/design.md, torch.compile:
    a compiled graph can drop a custom autograd Function's jvp rule)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, z, t, h, y=None):
        from torch.autograd import forward_ad
        strip = lambda a: forward_ad.unpack_dual(a).primal if a is not None else a  # noqa: E731
        return self.net(strip(z), strip(t), strip(h), y)


@pytest.mark.parametrize("model", ["mlp", "unet"])
def test_compile_check_accepts_eager_and_refuses_lost_tangents(model):
    """The check runs on a perturbed copy: a fresh U-Net's zero output would make du/dt 0 and
    hide a compiler that drops tangents."""
    torch.manual_seed(0)
    if model == "mlp":
        net, x = build_model("mlp", dim=2, width=16, depth=2, emb_dim=8), torch.randn(16, 2)
    else:
        net = build_model("unet-small", in_channels=1, input_size=8, **TINY_UNET)
        x = torch.randn(4, 1, 8, 8)
    loss_fn = MeanFlowLoss()
    assert check_compiled(net, loss_fn, make_loss_call(loss_fn), x, None) == 0.0

    def dropping(net, x, y, aug=None, *, draws=None, generator=None, jvp_net=None):
        return loss_fn(_DropsTangents(net), x, y, generator=generator, draws=draws)
    with pytest.raises(ConfigError, match="compiled JVP is wrong"):
        check_compiled(net, loss_fn, dropping, x, None)


def test_compile_failure_is_one_clear_error():
    net = build_model("mlp", dim=2, width=16, depth=2, emb_dim=8)

    def broken(*args, **kwargs):
        raise RuntimeError("backend exploded\nmore lines")
    with pytest.raises(ConfigError, match="backend exploded.*train.compile=false"):
        check_compiled(net, MeanFlowLoss(), broken, torch.randn(4, 2), None)


def test_pre_drawn_times_and_noise_reproduce_the_loss_own_draws():
    """The compiled path draws (r, t, e) before the loss; the values equal the loss's own."""
    torch.manual_seed(0)
    net = build_model("mlp", dim=2, width=16, depth=2, emb_dim=8)
    x = torch.randn(32, 2)
    for loss_fn in (MeanFlowLoss(fraction_r_neq_t=0.5), FlowMatchingLoss()):
        own = loss_fn(net, x, generator=torch.Generator().manual_seed(3))[0]
        draws = loss_fn.draw(x, torch.Generator().manual_seed(3))
        given = make_loss_call(loss_fn)(net, x, None, None, draws=draws)[0]
        assert torch.equal(own, given)


@pytest.mark.slow
def test_real_torch_compile_passes_the_check_on_cpu(tmp_path):
    """A short compiled run on CPU (needs a C++ compiler; slow): the start-up check passes."""
    cfg = load_config(None, ["train.steps=2", "train.batch_size=16", "train.compile=true",
                             "train.progress=false", "train.sample_count=0",
                             "model.options={width: 16, depth: 1, emb_dim: 8}"])
    train(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "step_0000002").is_dir()


def test_the_loss_call_hands_the_augmentation_labels_as_cond():
    """The loss call hands each sample its own augmentation label (cond={"aug": ...}),
    repeated for doubled (guidance) batches."""
    seen = []

    def model(z, t, h, y=None, aug=None):
        seen.append(aug)
        return z

    labels = torch.arange(6.).reshape(2, 3)
    guided = MeanFlowLoss(num_classes=3, omega=1.5, kappa=0.2, label_drop=0.0)
    make_loss_call(guided)(model, torch.zeros(2, 1), torch.tensor([0, 1]), labels,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen[0], torch.cat([labels, labels]))       # guidance: 2B at once
    assert len(seen) == 3 and all(torch.equal(a, labels) for a in seen[1:])  # JVP, grad pass


def test_compiled_split_with_attention_passes_the_check_and_forward_ad_names_the_fix():
    """Under torch.compile (the "aot_eager" backend: the same traced graphs as inductor) the
    lean autograd.Functions step aside and attention in the JVP pass takes the math path: a
    custom Function's jvp rule would be dropped, and a dual tensor is invisible while tracing
    (the split pass failed with "forward AD with _scaled_dot_product_flash_attention_for_cpu"
    before). The joint forward_ad pass does not compile in this torch: one line names the fix."""
    from meanflow.models.attention import set_jvp_attention
    torch.manual_seed(0)
    net = build_model("dit-s/2", in_channels=3, input_size=8, depth=1, width=32, heads=2)
    set_jvp_attention(net, "chunked")
    x = torch.randn(4, 3, 8, 8)
    torch._dynamo.reset()
    split = MeanFlowLoss(jvp="split")
    assert check_compiled(net, split, make_loss_call(split, True, "aot_eager"), x, None) < 1e-5
    torch._dynamo.reset()
    joint = MeanFlowLoss(jvp="forward_ad")
    with pytest.raises(ConfigError, match="forward_ad does not compile: use split or func"):
        check_compiled(net, joint, make_loss_call(joint, True, "aot_eager"), x, None)


def test_a_compiled_step_draws_outside_the_loss_call_as_eager_draws_inside():
    """TrainStep(compiled=True) makes every draw of the loss (r, t, e, label dropout) outside
    the loss call with the loss's own draw() and hands them over as draws=, with no generator;
    the step equals the eager one, which draws inside, bit for bit (2 micro-batches)."""
    torch.manual_seed(0)
    net = build_model("mlp", dim=2, num_classes=4, width=16, depth=2, emb_dim=8)
    loss_fn = MeanFlowLoss(num_classes=4, omega=1.5, kappa=0.2, label_drop=0.3)
    x, y = torch.randn(16, 2), torch.arange(16) % 4
    calls, results = [], {}
    for compiled in (False, True):
        model = copy.deepcopy(net)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        eager = make_loss_call(loss_fn)

        def recording(*args, **kwargs):
            calls.append((compiled, sorted(kwargs), sorted(kwargs.get("draws") or {})))
            return eager(*args, **kwargs)
        step = TrainStep(model, loss_fn, recording, opt, EMA(model, [0.9]), world=World(),
                         device=torch.device("cpu"), micro=8, accumulation=2,
                         compiled=compiled, autocast=amp_context("none", torch.device("cpu")),
                         grad_clip=None, fsdp=False)
        stats = step(0, x, y, None, torch.Generator().manual_seed(5), 1e-2)
        results[compiled] = (stats, [p.detach().clone() for p in model.parameters()])
    assert calls == [(False, ["generator", "jvp_net"], [])] * 2 + \
        [(True, ["draws", "jvp_net"], sorted(loss_fn.draw_keys))] * 2
    assert all(torch.equal(a, b) for a, b in zip(results[False][1], results[True][1]))
    assert {k: float(v) for k, v in results[False][0].items()} == \
        {k: float(v) for k, v in results[True][0].items()}
