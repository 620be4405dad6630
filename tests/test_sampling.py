"""Samplers against known fields (docs/method.md, Sampling): MeanFlow jumps z_{k+1} = z_k - (t_k - t_{k+1})·
u(z_k, r = t_{k+1}, t = t_k) on a schedule 1 = t_0 > ... > t_K = 0, and Euler steps with
v(z, t) = u(z, t, t). Per-seed noise makes sample i depend only on seeds[i].
"""

from __future__ import annotations

import pytest
import torch

from meanflow import ConfigError, euler_sample, make_schedule, sample, sample_seeded, seeded_noise

F64 = torch.float64
M2 = torch.tensor([1.5, -0.5], dtype=F64)

SCHEDULES = [(1, None), (2, None), (5, None), (2, [1.0, 0.8, 0.0]),
             (5, [1.0, 0.9, 0.55, 0.5, 0.1, 0.0]), (3, torch.tensor([1.0, 0.3, 0.02, 0.0]))]
SCHEDULE_IDS = ["1", "2", "5", "2-custom", "5-custom", "3-tensor"]


def noise(B: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("s", [0.0, 0.6, 2.0])
@pytest.mark.parametrize("steps,schedule", SCHEDULES, ids=SCHEDULE_IDS)
def test_exact_average_velocity_is_sampled_exactly(steps, schedule, s, gaussian_oracle):
    """With the exact u of data N(m, s² I), every jump lands exactly on the ODE trajectory, so
    any number of steps on any schedule maps e to z_0 = m + s·e (σ_1 = 1, σ_0 = s)."""
    e = noise()
    out = sample(gaussian_oracle(M2, s), e, steps, schedule=schedule)
    torch.testing.assert_close(out, M2 + s * e, atol=1e-10, rtol=0)
    # Non-tautology: Euler with the instantaneous velocity is not exact in a few steps.
    if s == 2.0:
        assert float((euler_sample(gaussian_oracle(M2, s), e, steps, schedule=schedule)
                      - (M2 + s * e)).abs().amax()) > 1e-3


def test_meanflow_steps_call_the_net_with_t_and_h():
    """Step k calls net(z_k, t = t_k, h = t_k - t_{k+1}); Euler calls it with h = 0."""
    calls = []

    def spy(z, t, h, y=None):
        calls.append((t.clone(), h.clone()))
        return torch.zeros_like(z)

    times = [1.0, 0.7, 0.2, 0.0]
    sample(spy, noise(4), 3, schedule=times)
    for (t, h), t_k, t_next in zip(calls, times, times[1:]):
        assert torch.equal(t, torch.full((4,), t_k, dtype=F64))
        torch.testing.assert_close(h, torch.full((4,), t_k - t_next, dtype=F64))
    calls.clear()
    euler_sample(spy, noise(4), 3, schedule=times)
    assert len(calls) == 3 and all(bool((h == 0).all()) for _, h in calls)
    assert [float(t[0]) for t, _ in calls] == times[:-1]


@pytest.mark.parametrize("steps,schedule", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("method", [sample, euler_sample])
def test_constant_field(method, steps, schedule):
    """net = c everywhere: the step sizes sum to 1, so both samplers give e - c."""
    c = torch.tensor([0.3, -1.2], dtype=F64)
    e = noise()
    out = method(lambda z, t, h, y=None: c.expand_as(z), e, steps, schedule=schedule)
    torch.testing.assert_close(out, e - c, atol=1e-14, rtol=0)


@pytest.mark.parametrize("steps,schedule", SCHEDULES, ids=SCHEDULE_IDS)
def test_euler_on_linear_and_time_dependent_fields(steps, schedule):
    """Euler on v = a·z gives Π_k (1 - Δt_k·a)·e; on v = t·c it gives e - Σ_k Δt_k·t_k·c
    (the field is evaluated at the left end t_k of each step)."""
    a = torch.tensor([0.7, -1.3], dtype=F64)
    e = noise()
    times = make_schedule(steps, schedule)
    factor = torch.ones(2, dtype=F64)
    for t_k, t_next in zip(times, times[1:]):
        factor = factor * (1 - (t_k - t_next) * a)
    out = euler_sample(lambda z, t, h, y=None: a * z, e, steps, schedule=schedule)
    torch.testing.assert_close(out, factor * e, atol=1e-13, rtol=1e-13)
    c = torch.tensor([1.0, -2.0], dtype=F64)
    shift = sum((t_k - t_next) * t_k for t_k, t_next in zip(times, times[1:]))
    out = euler_sample(lambda z, t, h, y=None: t[:, None] * c, e, steps, schedule=schedule)
    torch.testing.assert_close(out, e - shift * c, atol=1e-13, rtol=0)


def test_one_step_is_noise_minus_u_at_r0_t1(tiny_mlp):
    """1-NFE MeanFlow sampling is x = e - u(e, r = 0, t = 1) = e - net(e, t = 1, h = 1)."""
    net = tiny_mlp(dtype=torch.float32)
    e = noise().float()
    ones = torch.ones(e.shape[0])
    with torch.no_grad():
        expected = e - net(e, ones, ones)
    assert torch.equal(sample(net, e, 1), expected)
    assert sample(net, e, 1).shape == e.shape


@pytest.mark.parametrize("steps", [1, 2])
def test_labels_reach_the_net_when_sampling(steps, tiny_mlp):
    """Class-conditional sampling passes y to every call (1 NFE per step, no CFG mixing)."""
    net = tiny_mlp(dtype=torch.float32, num_classes=3)
    e = noise(6).float()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    out = sample(net, e, steps, y=y)
    with torch.no_grad():
        z = e
        for t_k, t_next in zip(make_schedule(steps), make_schedule(steps)[1:]):
            t = torch.full((6,), t_k)
            z = z - (t_k - t_next) * net(z, t, torch.full((6,), t_k - t_next), y)
    torch.testing.assert_close(out, z, atol=1e-6, rtol=0)
    assert float((sample(net, e, steps, y=(y + 1) % 3) - out).abs().amax()) > 1e-4


def test_make_schedule_defaults_and_custom():
    """Default schedules are uniform from 1 to 0 (2 steps: midpoint 0.5); custom ones pass."""
    assert make_schedule(1) == [1.0, 0.0]
    assert make_schedule(2) == [1.0, 0.5, 0.0]
    assert make_schedule(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert make_schedule(2, [1.0, 0.3, 0.0]) == [1.0, 0.3, 0.0]
    assert make_schedule(2, torch.tensor([1.0, 0.25, 0.0])) == [1.0, 0.25, 0.0]


@pytest.mark.parametrize("steps,schedule", [
    (0, None), (-1, None), (1.5, None), (2, [1.0, 0.0]), (1, [1.0, 0.5, 0.0]),
    (2, [1.0, 0.5, 0.1]), (2, [0.9, 0.5, 0.0]), (2, [1.0, 1.0, 0.0]), (2, [1.0, 0.2, 0.4]),
    (2, [0.0, 0.5, 1.0])])
def test_invalid_schedules(steps, schedule):
    """Schedules must have steps + 1 times decreasing strictly from 1 to 0; steps >= 1."""
    with pytest.raises(ConfigError):
        make_schedule(steps, schedule)
    with pytest.raises(ConfigError):
        sample(lambda z, t, h, y=None: z, noise(2), steps, schedule=schedule)


def test_seeded_noise_rows_depend_only_on_their_seed():
    """Row i of seeded_noise is a function of seeds[i] alone (bitwise)."""
    batch = seeded_noise([3, 7, 11], (3, 4, 4))
    alone = seeded_noise([7], (3, 4, 4))
    assert batch.shape == (3, 3, 4, 4)
    assert torch.equal(batch[1], alone[0])
    assert torch.equal(seeded_noise([11, 3], (3, 4, 4))[1], batch[0])
    assert not torch.equal(batch[0], batch[2])
    assert torch.equal(seeded_noise([7], (2,), dtype=F64)[0], seeded_noise([7], (2,))[0].double())
    with pytest.raises(ConfigError):
        seeded_noise([], (2,))


@pytest.mark.parametrize("method,steps", [("meanflow", 1), ("meanflow", 2), ("euler", 3)])
def test_sample_seeded_is_independent_of_batch_size(method, steps, tiny_mlp):
    """The same seeds give the same samples for batch sizes 1, 2 and 5 (float32 MLP; matmul
    blocking may differ with the batch, hence 1e-6), labels travelling with their seeds."""
    net = tiny_mlp(dtype=torch.float32, num_classes=3)
    seeds = [5, 0, 17, 2, 9]
    y = torch.tensor([0, 1, 2, 3, 1])
    outs = [sample_seeded(net, seeds, (2,), steps, y=y, method=method, batch_size=b)
            for b in (1, 2, 5)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-6, rtol=0)
    with torch.no_grad():
        fn = sample if method == "meanflow" else euler_sample
        direct = fn(net, seeded_noise(seeds, (2,)), steps, y=y)
    torch.testing.assert_close(outs[0], direct, atol=1e-6, rtol=0)
    assert not torch.allclose(outs[0][0], outs[0][1])


def test_sample_seeded_invalid_arguments(tiny_mlp):
    """Unknown method, non-positive batch size and a label count that does not match raise."""
    net = tiny_mlp(dtype=torch.float32)
    with pytest.raises(ConfigError):
        sample_seeded(net, [0, 1], (2,), method="heun")
    with pytest.raises(ConfigError):
        sample_seeded(net, [0, 1], (2,), batch_size=0)
    with pytest.raises(ConfigError):
        sample_seeded(net, [0, 1], (2,), y=torch.tensor([0, 1, 2]))
