"""The losses' random draws (``draw``), network conditioning (``cond``), the choice of du/dt
strategy (``resolve_jvp``, "auto") and the validation of every objective setting.

- ``loss_fn.draw(x, g)`` makes every random tensor of a call, in the documented order (checked
  against draws made by hand from the same generator); giving them back as ``draws=`` is
  bit-identical to ``generator=g`` and consumes no other randomness.
- ``cond={"aug": labels}`` reaches every network call (grad pass, JVP, guidance), repeated for
  guidance's doubled batch, constant under the JVP: bit-identical to wrapping the network.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from meanflow import JVP_STRATEGIES, ConfigError, FlowMatchingLoss, MeanFlowLoss
from meanflow.models import backbone_family, build_model
from meanflow.objective import (JVP_CHOICES, JVPStrategy, TimeSampler, resolve_jvp,
                                time_derivative, u_and_dudt)

F64 = torch.float64
K = 3

UNET = dict(in_channels=3, input_size=8, num_classes=K, channels=8, channel_mult=[1, 2],
            blocks_per_res=1, attn_resolutions=[4], emb_mult=2, dropout=0.3, heads=2,
            augment_dim=6)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def aug_unet() -> nn.Module:
    """A float64 U-Net with a 6-wide augmentation label and every weight random (zero-init
    branches would hide the label), in train mode (dropout on)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = build_model("unet-small", **UNET).double()
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0.0, 0.2)
    return net.train()


class WithAug:
    """What the training loop's WithAugmentLabels did before losses took ``cond``: appends
    ``aug=labels`` to every call, the labels repeated for a batch the loss doubled."""

    def __init__(self, model, labels: Tensor) -> None:
        self.model, self.labels = model, labels

    def __call__(self, z, t, h, y=None):
        labels = self.labels
        if z.shape[0] != labels.shape[0]:
            labels = labels.repeat(z.shape[0] // labels.shape[0], 1)
        return self.model(z, t, h, y, aug=labels)


def _grads(net: nn.Module) -> list[Tensor]:
    return [p.grad.clone() for p in net.parameters() if p.grad is not None]


# ----------------------------------------------------------------------------- draws
def hand_draws(loss_fn, x: Tensor, seed: int) -> dict[str, Tensor]:
    """The documented order, re-derived: (r, t) from the time sampler, the noise e, then the B
    label-dropout uniforms (class-conditional only); flow matching has t alone."""
    g = gen(seed)
    B = x.shape[0]
    out = {}
    if isinstance(loss_fn, MeanFlowLoss):
        out["r"], out["t"] = loss_fn.sampler(B, x.device, g)
    else:
        out["t"] = loss_fn.sampler.sample_t(B, x.device, g)
    out["e"] = torch.randn(x.shape, generator=g, dtype=x.dtype)
    if loss_fn.num_classes is not None:
        out["label_drop_u"] = torch.rand(B, generator=g)
    return out


LOSSES = {
    "mf": lambda: MeanFlowLoss(fraction_r_neq_t=0.5),
    "mf_cond_first": lambda: MeanFlowLoss(num_classes=K, omega=1.5, kappa=0.3, label_drop=0.4,
                                          r_eq_t_rows="first", label_drop_rows="first"),
    "mf_v1": lambda: MeanFlowLoss(time_sampler="v1", num_classes=K, jvp="func"),
    "fm": lambda: FlowMatchingLoss(),
    "fm_cond": lambda: FlowMatchingLoss(num_classes=K, label_drop=0.5, label_drop_rows="first"),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_draw_order_and_bit_identical_given_draws(name, tiny_mlp):
    """draw() equals the hand-made draws bit for bit, its keys come in draw order, and a call
    given draw()'s tensors (or some of them) equals the call that draws them itself."""
    loss_fn = LOSSES[name]()
    conditional = loss_fn.num_classes is not None
    net = tiny_mlp(num_classes=K) if conditional else tiny_mlp()
    x = torch.randn(16, 2, generator=gen(1), dtype=F64)
    y = torch.arange(16) % K if conditional else None
    draws = loss_fn.draw(x, gen(3))
    expected = hand_draws(loss_fn, x, 3)
    assert list(draws) == list(expected) == list(loss_fn.draw_keys)
    for key in expected:
        assert torch.equal(draws[key], expected[key]), key
    own, own_stats = loss_fn(net, x, y, generator=gen(3))
    given, given_stats = loss_fn(net, x, y, draws=draws)
    assert torch.equal(own, given)
    assert all(torch.equal(own_stats[k], given_stats[k]) for k in own_stats)
    # a part given: the rest is drawn in order from the generator (here: what follows them)
    g = gen(3)
    if isinstance(loss_fn, FlowMatchingLoss):
        first = {"t": loss_fn.sampler.sample_t(16, "cpu", g)}
    else:
        first = dict(zip(("r", "t"), loss_fn.sampler(16, "cpu", g)))
    partial, _ = loss_fn(net, x, y, generator=g, **first)
    assert torch.equal(partial, own)
    assert not torch.equal(loss_fn(net, x, y, generator=gen(4))[0], own)


def test_a_call_given_every_draw_uses_no_other_randomness(tiny_mlp):
    """With all draws given (a compiled call's situation) the loss needs no generator and
    leaves the global RNG where it was (the net has no dropout)."""
    net = tiny_mlp(num_classes=K)
    x = torch.randn(8, 2, generator=gen(1), dtype=F64)
    y = torch.arange(8) % K
    loss_fn = MeanFlowLoss(num_classes=K, omega=2.0)
    draws = loss_fn.draw(x, gen(5))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a, _ = loss_fn(net, x, y, draws=draws)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, loss_fn(net, x, y, generator=gen(5))[0])


def test_draw_uses_the_global_rng_without_a_generator():
    x = torch.randn(6, 2, dtype=F64)
    loss_fn = MeanFlowLoss(num_classes=K)
    torch.manual_seed(9)
    a = loss_fn.draw(x)
    torch.manual_seed(9)
    b = loss_fn.draw(x)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_given_draws_are_validated(tiny_mlp):
    net = tiny_mlp()
    x = torch.randn(4, 2, dtype=F64)
    mf, fm = MeanFlowLoss(), FlowMatchingLoss()
    draws = mf.draw(x, gen(0))
    bad = [({"draws": {**draws, "label_drop_u": torch.rand(4)}}, "unknown draws"),
           ({"draws": {**draws, "noise": draws["e"]}}, "unknown draws"),
           ({"draws": draws, "e": draws["e"]}, "given twice"),
           ({"draws": {"t": draws["t"]}}, "both r and t"),
           ({"draws": {**draws, "e": draws["e"][:, :1]}}, "shape of x"),
           ({"draws": {**draws, "r": draws["t"] + 0.1}}, "r <= t"),
           ({"draws": {**draws, "t": draws["t"][:3], "r": draws["r"][:3]}}, "per sample")]
    for kwargs, match in bad:
        with pytest.raises(ConfigError, match=match) as info:
            mf(net, x, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="unknown draws 'r'"):
        fm(net, x, draws=draws)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        fm(net, x, t=torch.full((4,), 1.5, dtype=F64))


# ----------------------------------------------------------------------------- cond
@pytest.mark.parametrize("strategy", JVP_STRATEGIES)
@pytest.mark.parametrize("omega,kappa", [(1.0, 0.0), (2.0, 0.0), (1.5, 0.3)])
def test_cond_equals_wrapping_the_net_bit_for_bit(strategy, omega, kappa):
    """A U-Net with augment_dim: loss(net, ..., cond={"aug": labels}) equals the loss of the
    wrapped net (the loop's former WithAugmentLabels) bit for bit, loss and gradients, with
    dropout on and guidance doubling the batch."""
    net = aug_unet()
    x = torch.randn(4, 3, 8, 8, generator=gen(1), dtype=F64)
    y = torch.tensor([0, 1, 2, 1])
    aug = torch.randn(4, 6, generator=gen(2), dtype=F64)
    loss_fn = MeanFlowLoss(jvp=strategy, num_classes=K, omega=omega, kappa=kappa,
                           label_drop=0.3, fraction_r_neq_t=1.0, p=0.5)
    results = []
    for call in (lambda g: loss_fn(net, x, y, generator=g, cond={"aug": aug}),
                 lambda g: loss_fn(WithAug(net, aug), x, y, generator=g)):
        net.zero_grad()
        torch.manual_seed(11)
        loss, _ = call(gen(3))
        loss.mean().backward()
        results.append((loss.detach(), _grads(net)))
    (a, ga), (b, gb) = results
    assert torch.equal(a, b)
    assert len(ga) == len(gb) and all(torch.equal(u, w) for u, w in zip(ga, gb))
    net.zero_grad()
    torch.manual_seed(11)
    other, _ = loss_fn(net, x, y, generator=gen(3), cond={"aug": aug.flip(0)})
    assert float((other.detach() - a).abs().max()) > 1e-8   # the label reaches the net


@pytest.mark.parametrize("strategy", JVP_STRATEGIES)
def test_cond_reaches_every_call_and_is_repeated_for_the_guided_batch(strategy):
    """Every network call gets aug=: the guidance call (one batch of 2B, labels repeated), the
    JVP and the grad pass (the labels themselves)."""
    net = aug_unet()
    seen = []

    def spy(z, t, h, y=None, aug=None):
        seen.append((z.shape[0], aug))
        return net(z, t, h, y, aug=aug)

    x = torch.randn(4, 3, 8, 8, generator=gen(1), dtype=F64)
    y = torch.tensor([0, 1, 2, 1])
    aug = torch.randn(4, 6, generator=gen(2), dtype=F64)
    MeanFlowLoss(jvp=strategy, num_classes=K, omega=1.5, kappa=0.3)(
        spy, x, y, generator=gen(3), cond={"aug": aug})
    sizes = [s for s, _ in seen]
    assert sizes == ([8, 4, 4] if strategy == "split" else [8, 4])
    assert torch.equal(seen[0][1], torch.cat([aug, aug]))
    assert all(torch.equal(a, aug) for _, a in seen[1:])
    seen.clear()
    FlowMatchingLoss(num_classes=K)(spy, x, y, generator=gen(3), cond={"aug": aug})
    assert len(seen) == 1 and torch.equal(seen[0][1], aug)


@pytest.mark.parametrize("strategy", JVP_STRATEGIES)
def test_cond_is_constant_under_the_jvp(strategy):
    """du/dt with cond equals the JVP along (v, 0, 1) with the label as a primal of zero
    tangent, and u_and_dudt's u is the net with the label."""
    net = aug_unet().eval()
    g = gen(6)
    z = torch.randn(2, 3, 8, 8, dtype=F64, generator=g)
    v = torch.randn(2, 3, 8, 8, dtype=F64, generator=g)
    t = torch.tensor([0.6, 0.9], dtype=F64)
    r = torch.tensor([0.2, 0.5], dtype=F64)
    y = torch.tensor([1, K])
    aug = torch.randn(2, 6, dtype=F64, generator=g)
    _, want = torch.func.jvp(lambda z_, t_, a_: net(z_, t_, t_ - r, y, aug=a_), (z, t, aug),
                             (v, torch.ones_like(t), torch.zeros_like(aug)))
    got = time_derivative(net, z, r, t, v, y, strategy=strategy, cond={"aug": aug})
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    u, dudt = u_and_dudt(net, z, r, t, v, y, strategy=strategy, cond={"aug": aug})
    torch.testing.assert_close(dudt, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(u, net(z, t, t - r, y, aug=aug), rtol=1e-12, atol=1e-12)


def test_bad_cond_is_refused(tiny_mlp):
    net = tiny_mlp()
    x = torch.randn(4, 2, dtype=F64)
    for cond in ({"aug": torch.zeros(3, 6)}, {"aug": 1.0}, [("aug", torch.zeros(4, 6))]):
        with pytest.raises(ConfigError, match="cond") as info:
            MeanFlowLoss()(net, x, generator=gen(0), cond=cond)
        assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- strategies
def test_resolve_jvp_auto_and_explicit_choices():
    assert JVP_CHOICES == ("auto", "split", "func", "forward_ad")
    assert "split_func" not in JVP_CHOICES
    cpu = dict(device_type="cpu", fsdp=False, compiled=False)
    for backbone in ("unet-small", "unet-cifar10", "dit-s/2", "dit-b/2", "unet", "dit"):
        assert resolve_jvp("auto", backbone=backbone, **cpu) == "forward_ad"
    for backbone in ("mlp", None, "mystery"):
        assert resolve_jvp("auto", backbone=backbone, **cpu) == "split"
    assert resolve_jvp("auto", device_type="cuda", backbone="dit-b/2") == "split"
    assert resolve_jvp("auto", device_type="cpu", backbone="unet-small", fsdp=True) == "split"
    assert resolve_jvp("auto", device_type="cpu", backbone="dit-s/2", compiled=True) == "split"
    for strategy in ("split", "func", "forward_ad"):
        assert resolve_jvp(strategy, device_type="cuda", backbone="mlp") == strategy
    for strategy in ("split", "func"):
        assert resolve_jvp(strategy, device_type="cuda", backbone="dit-b/2", fsdp=True,
                           compiled=True) == strategy
    for kwargs, match in [(dict(fsdp=True), "FSDP"), (dict(compiled=True), "compile")]:
        with pytest.raises(ConfigError, match=f"{match}.*use split or func") as info:
            resolve_jvp("forward_ad", device_type="cpu", backbone="unet-small", **kwargs)
        assert "\n" not in str(info.value)
    for bad in ("split_func", "Split", None):
        with pytest.raises(ConfigError, match="choose one of auto, split, func, forward_ad"):
            resolve_jvp(bad, device_type="cpu")


def test_backbone_family_sees_through_wrappers(tiny_mlp):
    unet = build_model("unet-small", in_channels=1, input_size=8, channels=8,
                       channel_mult=[1, 2], blocks_per_res=1, attn_resolutions=[4])
    dit = build_model("dit-s/2", in_channels=1, input_size=8, depth=1, width=32, heads=2)

    class Wrapper(nn.Module):   # stands in for DDP: the model is its .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert backbone_family(unet) == "unet" and backbone_family(dit) == "dit"
    assert backbone_family(tiny_mlp()) == "mlp"
    assert backbone_family(Wrapper(unet)) == "unet"
    assert backbone_family(lambda *a: None) is None and backbone_family(nn.Linear(2, 2)) is None


def test_auto_resolves_per_call_from_what_the_call_sees(tiny_mlp):
    """MeanFlowLoss(jvp="auto") on the CPU: the U-Net takes forward_ad (one pass with grad),
    the MLP split (a no-grad JVP pass, then the grad pass); with a separate jvp_net, split."""
    unet = aug_unet()
    mlp = tiny_mlp()
    auto = JVPStrategy("auto")
    z = torch.zeros(2, 3, 8, 8, dtype=F64)
    assert auto.resolve(unet, z) == "forward_ad"
    assert auto.resolve(mlp, torch.zeros(2, 2, dtype=F64)) == "split"
    assert auto.resolve(lambda *a: unet(*a), z, jvp_net=unet) == "split"
    grad_modes = []

    def spy(z_, t_, h_, y_=None):
        grad_modes.append(torch.is_grad_enabled())
        return mlp(z_, t_, h_, y_)

    x = torch.randn(4, 2, dtype=F64)
    loss_fn = MeanFlowLoss(jvp="auto")
    assert loss_fn.jvp == "auto"
    loss_fn(spy, x, generator=gen(0))
    assert grad_modes == [False, True]                     # not a backbone: split
    a, _ = loss_fn(mlp, x, generator=gen(0))
    b, _ = MeanFlowLoss(jvp="split")(mlp, x, generator=gen(0))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs,name", [
    (dict(p="1"), "p="), (dict(p=True), "p="), (dict(c=None), "c="), (dict(c=float("inf")), "c="),
    (dict(omega="2"), "omega="), (dict(kappa=True), "kappa="), (dict(label_drop="0.1"),
                                                                "label_drop="),
    (dict(t_interval=(0.0, 0.5, 1.0)), "t_interval="), (dict(t_interval="01"), "t_interval="),
    (dict(t_interval=(0, None)), "t_interval="), (dict(num_classes=True), "num_classes="),
    (dict(num_classes=2.0), "num_classes="), (dict(jvp="split_func"), "jvp"),
    (dict(jvp=None), "jvp"), (dict(jvp_precision="bf16"), "jvp_precision"),
    (dict(tangent="v02"), "tangent"), (dict(time_sampler=None), "time_sampler"),
    (dict(mu="x"), "mu="), (dict(sigma=None), "sigma="), (dict(mu_r=[1]), "mu_r="),
    (dict(sigma_r=-1), "sigma_r="), (dict(fraction_r_neq_t=True), "fraction_r_neq_t="),
    (dict(r_eq_t_rows=0), "r_eq_t_rows="), (dict(label_drop_rows="last"), "label_drop_rows="),
    (dict(omega=2.0), "num_classes")])
def test_every_setting_is_checked_by_the_constructor(kwargs, name):
    """Each objective setting the config has is validated by MeanFlowLoss's constructor with
    a one-line ConfigError that names it."""
    with pytest.raises(ConfigError, match=name) as info:
        MeanFlowLoss(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs,name", [
    (dict(time_sampler="v1"), "MeanFlow-only"), (dict(mu=None), "mu="),
    (dict(sigma=0), "sigma="), (dict(label_drop=2), "label_drop="),
    (dict(num_classes=0), "num_classes="), (dict(label_drop_rows=None), "label_drop_rows=")])
def test_flow_matching_settings_are_checked_by_the_constructor(kwargs, name):
    with pytest.raises(ConfigError, match=name) as info:
        FlowMatchingLoss(**kwargs)
    assert "\n" not in str(info.value)


def test_valid_settings_are_kept_as_given():
    loss_fn = MeanFlowLoss(p=0, c=1, omega=2, kappa=0.5, t_interval=[0, 1], num_classes=K,
                           label_drop=0, jvp="auto", jvp_precision="amp", tangent="v11")
    assert (loss_fn.p, loss_fn.c, loss_fn.omega, loss_fn.kappa) == (0.0, 1.0, 2.0, 0.5)
    assert loss_fn.t_interval == (0.0, 1.0) and loss_fn.jvp_autocast
    assert (loss_fn.jvp, loss_fn.tangent) == ("auto", "v11")
    assert TimeSampler(fraction_r_neq_t=1).fraction_r_neq_t == 1


def test_settings_are_not_revalidated_per_call(monkeypatch, tiny_mlp):
    """The constructors validate once; a loss call does not run the settings' checks again."""
    import meanflow.objective.checks as checks
    import meanflow.objective.flow_matching as fm_module
    import meanflow.objective.jvp as jvp_module
    import meanflow.objective.meanflow_loss as mf_module
    import meanflow.objective.time_sampler as ts_module
    net = tiny_mlp(num_classes=K)
    x, y = torch.randn(6, 2, dtype=F64), torch.arange(6) % K
    losses = [MeanFlowLoss(num_classes=K, omega=1.5, kappa=0.2, jvp=s) for s in JVP_STRATEGIES]
    losses.append(FlowMatchingLoss(num_classes=K))

    def refuse(*args, **kwargs):
        raise AssertionError("a setting was validated again during a call")

    for module in (checks, fm_module, jvp_module, mf_module, ts_module):
        for name in ("check_number", "check_choice", "check_row_layout", "check_interval",
                     "check_num_classes", "check_strategy", "check_tangent"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse)
    for loss_fn in losses:
        loss_fn(net, x, y, generator=gen(0))
