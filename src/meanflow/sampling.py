"""Samplers: MeanFlow's one- and few-step jumps, and the Euler baseline for flow matching.

Time convention: **t = 1 is noise, t = 0 is data**. A schedule is a decreasing sequence
1 = t_0 > t_1 > ... > t_K = 0.

- MeanFlow (docs/method.md, Sampling): z_{k+1} = z_k - (t_k - t_{k+1})·u(z_k, r = t_{k+1},
  t = t_k). One step is x = e - u(e, 0, 1): one network call (1 NFE).
- Euler for flow matching: z_{k+1} = z_k - (t_k - t_{k+1})·v(z_k, t_k), with v(z, t) = u(z, t, t).

Seeded sampling: sample i is drawn from its own ``torch.Generator`` seeded with ``seeds[i]`` on the
CPU, so its noise depends only on its seed, not on the batch size, the device or the number of
GPUs. The sample itself agrees across batch sizes to float rounding, not always bit for bit:
CPU kernels pick their blocking by batch size, so a trained network's sample can differ in
the last bits between batch compositions (tests/runs/test_load.py bounds it); the same batch
size gives the same bits.
:func:`generate` is the one path from seeds to results that every consumer takes (the CLI's
``sample`` and ``fid calc``, FID and sample grids during training, ``meanflow.load(run).sample``):
seeds shared out over the ranks, sampled in batches, optionally decoded batch by batch, and
gathered back in seed order.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from meanflow.errors import ConfigError
from meanflow.objective.meanflow_loss import check_output
from meanflow.world import World, broadcast_object, check_fits, gather_sharded, shard

__all__ = ["sample", "euler_sample", "make_schedule", "seeded_noise", "sample_seeded",
           "SAMPLING_METHODS", "sampling_method", "generate", "SEED_LIMIT", "check_sampling",
           "GuidedNet", "with_guidance", "check_guidance"]

#: Seeds are 64-bit unsigned in every command: 0 <= seed < 2**64 (what torch.Generator takes).
SEED_LIMIT = 2 ** 64

Net = Callable[..., Tensor]
SAMPLING_METHODS = ("meanflow", "euler")


def make_schedule(steps: int = 1, schedule: Sequence[float] | Tensor | None = None) -> list[float]:
    """Returns the times [t_0 = 1, ..., t_K = 0].

    With ``schedule=None`` the K + 1 times are uniform (the 2-step midpoint is 0.5, the common
    choice; the paper does not state its own). A given schedule must start at 1, end at 0, be
    strictly decreasing and have ``steps + 1`` entries.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps!r} must be a positive integer (1 for one-step sampling)")
    if schedule is None:
        return [1.0 - k / steps for k in range(steps)] + [0.0]
    times = [float(s) for s in (schedule.tolist() if isinstance(schedule, Tensor) else schedule)]
    if len(times) != steps + 1:
        raise ConfigError(f"a schedule for {steps} steps needs {steps + 1} times, got "
                          f"{len(times)}: give 1 = t_0 > ... > t_K = 0")
    if times[0] != 1.0 or times[-1] != 0.0 or any(a <= b for a, b in zip(times, times[1:])):
        raise ConfigError(f"schedule {times} must decrease strictly from 1 (noise) to 0 (data)")
    return times


def _integrate(net: Net, noise: Tensor, times: list[float], y: Tensor | None,
               mean_flow: bool) -> Tensor:
    if not isinstance(noise, Tensor) or noise.ndim < 2 or not noise.is_floating_point():
        raise ConfigError("noise must be a floating tensor shaped (batch, *sample_shape)")
    if y is not None and y.shape != noise.shape[:1]:
        raise ConfigError(f"y must have shape ({noise.shape[0]},), got {tuple(y.shape)}")
    z = noise
    B = noise.shape[0]
    for t_k, t_next in zip(times, times[1:]):
        t = torch.full((B,), t_k, device=noise.device, dtype=noise.dtype)
        h = torch.full_like(t, t_k - t_next) if mean_flow else torch.zeros_like(t)
        z = z - (t_k - t_next) * check_output(net(z, t, h, y), z)
    return z


@torch.no_grad()
def sample(net: Net, noise: Tensor, steps: int = 1, y: Tensor | None = None,
           schedule: Sequence[float] | Tensor | None = None) -> Tensor:
    """MeanFlow sampling from noise (B, *S) to data (B, *S) in ``steps`` network calls."""
    return _integrate(net, noise, make_schedule(steps, schedule), y, mean_flow=True)


@torch.no_grad()
def euler_sample(net: Net, noise: Tensor, steps: int = 1, y: Tensor | None = None,
                 schedule: Sequence[float] | Tensor | None = None) -> Tensor:
    """Euler integration of the flow-matching ODE dz/dt = v(z, t) from t = 1 to t = 0."""
    return _integrate(net, noise, make_schedule(steps, schedule), y, mean_flow=False)


def seeded_noise(seeds: Iterable[int], shape: Sequence[int],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """(N, *shape) standard normal noise; row i is drawn on the CPU from seed ``seeds[i]``."""
    seeds = [int(s) for s in seeds]
    if seeds and not (0 <= min(seeds) and max(seeds) < SEED_LIMIT):
        raise ConfigError(f"seeds {min(seeds)}..{max(seeds)} leave [0, 2**64): give seeds "
                          "that are 64-bit unsigned integers")
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(s))
            for s in seeds]
    if not rows:
        raise ConfigError("no seeds given: pass at least one seed")
    return torch.stack(rows).to(device=device, dtype=dtype)


def sample_seeded(net: Net, seeds: Sequence[int], shape: Sequence[int], steps: int = 1,
                  y: Tensor | None = None, schedule: Sequence[float] | Tensor | None = None,
                  method: str = "meanflow", batch_size: int = 1024,
                  device: torch.device | str = "cpu", progress: bool = False,
                  dtype: torch.dtype | None = None) -> Tensor:
    """Samples (N, *shape) where sample i depends only on ``seeds[i]`` (and ``y[i]``).

    ``method`` is "meanflow" (``sample``) or "euler" (``euler_sample``). Work is done in chunks of
    ``batch_size``; the result is returned on the CPU. The noise takes ``dtype``, by default
    that of the network's first parameter (float32 for parameter-free callables).
    """
    if method not in SAMPLING_METHODS:
        raise ConfigError(f"unknown sampling method {method!r}: choose one of "
                          f"{', '.join(SAMPLING_METHODS)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
    seeds = list(seeds)
    if y is not None and y.shape != (len(seeds),):
        raise ConfigError(f"y must hold one label per seed ({len(seeds)},), got {tuple(y.shape)}")
    fn = sample if method == "meanflow" else euler_sample
    if dtype is None:
        first = next(iter(net.parameters()), None) if isinstance(net, torch.nn.Module) else None
        dtype = first.dtype if first is not None else torch.float32
    chunks = range(0, len(seeds), batch_size)
    if progress:
        chunks = tqdm(chunks, desc=f"sampling {len(seeds)}", unit="batch", disable=None)
    out = []
    for i in chunks:
        noise = seeded_noise(seeds[i:i + batch_size], shape, device, dtype)
        yi = None if y is None else y[i:i + batch_size].to(device)
        out.append(fn(net, noise, steps, yi, schedule).cpu())
    return torch.cat(out)


def check_guidance(omega: float, interval: Sequence[float] | None = None
                   ) -> tuple[float, tuple[float, float]]:
    """(ω, (t_min, t_max)) of sampling-time guidance, checked: ω >= 1 (1 is no guidance) and
    0 <= t_min <= t_max <= 1 (default the whole path, [0, 1]). One-line ConfigError."""
    if isinstance(omega, bool) or not isinstance(omega, (int, float)) \
            or not math.isfinite(omega) or omega < 1:
        raise ConfigError(f"guidance scale {omega!r} must be a number >= 1 (1: no guidance; "
                          "the iMF paper samples with 7.5 to 10.5 at 1 NFE)")
    pair = (0.0, 1.0) if interval is None else tuple(interval)
    if (len(pair) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                  and math.isfinite(v) for v in pair)
            or not 0 <= pair[0] <= pair[1] <= 1):
        raise ConfigError(f"guidance interval {interval!r} must be two times 0 <= t_min <= "
                          "t_max <= 1, e.g. 0.4,0.65")
    return float(omega), (float(pair[0]), float(pair[1]))


class GuidedNet(torch.nn.Module):
    """A network conditioned on a guidance scale and interval (an iMF backbone, docs/imf.md
    §9), sampled with the scale and interval chosen now: every call gives all rows ω and
    [t_min, t_max]. It holds the network as a submodule, so its parameters (and dtype) show
    through."""

    def __init__(self, net: torch.nn.Module, omega: float,
                 interval: tuple[float, float]) -> None:
        super().__init__()
        self.net = net
        self.omega, self.interval = omega, interval

    def forward(self, z: Tensor, t: Tensor, h: Tensor, y: Tensor | None = None) -> Tensor:
        def rows(value: float) -> Tensor:
            return torch.full((z.shape[0],), value, device=z.device, dtype=z.dtype)
        return self.net(z, t, h, y, omega=rows(self.omega), t_min=rows(self.interval[0]),
                        t_max=rows(self.interval[1]))


def with_guidance(net: Net, omega: float | None, interval: Sequence[float] | None = None,
                  class_conditional: bool = True) -> Net:
    """``net`` sampled with guidance scale ``omega`` on ``interval`` (:class:`GuidedNet`), or
    ``net`` itself when ``omega`` is None and no interval is given. Refused with one line for
    a network that takes no guidance conditions (MeanFlow trains its guidance into the
    network: its scale is fixed at training) and for an unconditional one."""
    if omega is None and interval is None:
        return net
    omega, pair = check_guidance(1.0 if omega is None else omega, interval)
    if not getattr(net, "takes_guidance", False):
        raise ConfigError("this model was not trained with guidance conditioning (an iMF "
                          "backbone, objective.kind imf); a MeanFlow model's guidance is "
                          "trained in (objective.omega): drop --guidance / --interval")
    if not class_conditional:
        raise ConfigError("guidance needs a class-conditional model and this one is "
                          "unconditional: drop --guidance / --interval")
    return GuidedNet(net, omega, pair)


def sampling_method(kind: str) -> str:
    """The sampler of a run trained with objective ``kind``: "euler" for "flow_matching" (its
    network is a velocity field), "meanflow" (the average-velocity jump) otherwise."""
    return "euler" if kind == "flow_matching" else "meanflow"


def _param_dtype(net: Net) -> torch.dtype:
    first = next(iter(net.parameters()), None) if isinstance(net, torch.nn.Module) else None
    return first.dtype if first is not None else torch.float32


def _gather(parts: list[Tensor], n: int, world: World | None, device: torch.device | str,
            empty: tuple[tuple[int, ...], torch.dtype] | None) -> Tensor:
    """This rank's rows (``parts``, concatenated) gathered to every rank in seed order. A rank
    without rows sends (0, *row) of ``empty``'s (row shape, dtype), or, when that is None,
    rank 0's, which it broadcasts (rank 0 always holds row 0)."""
    local = torch.cat(parts) if parts else None
    if world is not None and world.enabled and n < world.size and empty is None:
        mine = None if local is None else (tuple(local.shape[1:]), local.dtype)
        empty = broadcast_object(mine, world)            # every rank calls it: same n and W
    if local is None:
        row, dtype = empty
        local = torch.zeros((0, *row), dtype=dtype)
    return gather_sharded(local, n, world, device)


def generate(net: Net, seeds: Sequence[int], shape: Sequence[int], *,
             labels: Tensor | None = None, steps: int = 1,
             schedule: Sequence[float] | Tensor | None = None, method: str = "meanflow",
             decode: Callable[[Tensor], Tensor] | None = None, batch_size: int = 500,
             device: torch.device | str = "cpu", world: World | None = None,
             progress: bool = False, keep_samples: bool = True,
             dtype: torch.dtype | None = None) -> tuple[Tensor | None, Tensor | None]:
    """Samples for N seeds, optionally decoded, computed over the ranks and returned in order.

    Sample i is :func:`sample_seeded` of ``seeds[i]`` (and ``labels[i]``), so it depends on
    neither the batch size nor the number of processes. Under torchrun (``world`` from
    :func:`meanflow.world.setup`) rank r computes samples r, r + W, ... and every rank gets
    all N back. Work goes in batches of ``batch_size`` seeds: each batch is sampled on
    ``device`` and handed at once to ``decode`` (the VAE of a latent run, or an FID's feature
    extractor), so that with ``keep_samples=False`` only what ``decode`` returns is held,
    never all samples or images.

    Args:
        net: the backbone, ``net(z, t, h, y) -> u``.
        seeds: N ints; labels: (N,) class labels or None.
        shape: one sample's shape, e.g. (C, H, W).
        method: "meanflow" or "euler" (:func:`sampling_method` picks it for a run).
        decode: maps a batch of samples (b, *shape), on the CPU, to b rows (b, *row) of
            any tensor: images, features; None keeps the samples alone.
        keep_samples: False drops the samples once decoded (FID of many images).
        dtype: of the noise; by default the network's first parameter's.

    Returns:
        ``(samples, decoded)``: (N, *shape) on the CPU (None with ``keep_samples=False``) and
        (N, *row) of ``decode`` on the CPU (None without ``decode``), both in seed order.
    """
    seeds = [int(s) for s in seeds]
    n = len(seeds)
    if n < 1:
        raise ConfigError("no seeds given: pass at least one seed")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
    if labels is not None and tuple(labels.shape) != (n,):
        raise ConfigError(f"labels must hold one label per seed ({n},), got "
                          f"{tuple(labels.shape)}")
    if not keep_samples and decode is None:
        raise ConfigError("keep_samples=False keeps nothing without decode: give decode, or "
                          "keep the samples")
    dtype = _param_dtype(net) if dtype is None else dtype
    world = world if world is not None else World()
    mine = shard(range(n), world)
    chunks = range(0, len(mine), batch_size)
    if progress:
        what = "sampling + decoding" if decode is not None else "sampling"
        chunks = tqdm(chunks, desc=f"{what} {len(mine)}", unit="batch", disable=None)
    samples, decoded = [], []
    for i in chunks:
        index = mine[i:i + batch_size]
        x = sample_seeded(net, [seeds[j] for j in index], shape, steps=steps,
                          y=None if labels is None else labels[index], schedule=schedule,
                          method=method, batch_size=batch_size, device=device, dtype=dtype)
        if decode is not None:
            decoded.append(decode(x).cpu())
        if keep_samples:
            samples.append(x)
    kept = (_gather(samples, n, world, device, (tuple(shape), dtype)) if keep_samples
            else None)
    out = _gather(decoded, n, world, device, None) if decode is not None else None
    return kept, out


def check_sampling(n: int, shape: Sequence[int], batch_size: int, seed: int = 0,
                   device: torch.device | str = "cpu", keep_samples: bool = True,
                   row_bytes: int = 0) -> None:
    """Before sampling ``n`` samples of ``shape`` from seeds ``seed .. seed + n - 1``: the
    seeds stay 64-bit unsigned, all samples (``keep_samples``; a seed each, ``row_bytes`` of
    decoded output each) fit the machine's RAM, and one batch (noise, state, output, with the
    network's activations on top) fits ``device``. One-line ConfigErrors naming the flag."""
    if not 0 <= seed or seed + n > SEED_LIMIT:
        raise ConfigError(f"seeds {seed}..{seed + n - 1} leave [0, 2**64): lower --seed or --n")
    numel = math.prod(shape)
    per_sample = 64 + row_bytes + (4 * numel if keep_samples else 0)  # seed, label, rows
    check_fits(n * per_sample, f"sampling {n} of shape {tuple(shape)}", "lower --n",
               "cpu")
    check_fits(4 * 4 * min(n, batch_size) * numel, f"sampling batches of {min(n, batch_size)} "
               f"of shape {tuple(shape)}", "lower --batch-size", device)
