"""The total time derivative du/dt of the average velocity along a trajectory (SPEC §1).

    du/dt = v · ∂_z u + ∂_t u,

one Jacobian-vector product of f(z, r, t) = net(z, t, h = t - r, y) with the tangent
(dz, dr, dt) = (v, 0, 1). The JVP primals are (z, r, t), not the network's (z, t, h): with those
the right tangent would be (v, 1, 1), and getting it wrong ruins training (paper Tab. 1b).

Strategies (all exact; they differ in cost, see JVP-NOTES and benchmarks/step_cost.py):

- ``"split"`` (default): du/dt from forward-mode dual tensors (``torch.autograd.forward_ad``)
  under ``torch.no_grad()``, then u from an ordinary forward with grad. The target is
  stop-gradient anyway, so nothing is lost; memory stays that of flow matching and the grad pass
  may use fused kernels or a DDP wrapper (``jvp_net``: the JVP on the unwrapped module, the
  grad pass through the wrapper). The global RNG state is restored between the passes so
  dropout masks are identical. Dual tensors were the faster engine on CPU (README, Results) and
  are the one JVP-NOTES saw working under bf16 autocast.
- ``"split_func"``: the same with ``torch.func.jvp`` for the no-grad JVP.
- ``"func"``: one ``torch.func.jvp`` call returns u (carrying the autograd graph) and du/dt.
- ``"forward_ad"``: one pass on dual tensors; the primal output carries the autograd graph.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor
from torch.autograd import forward_ad

from meanflow.errors import ConfigError
from meanflow.models import layers

__all__ = ["JVP_STRATEGIES", "TANGENTS", "u_and_dudt", "time_derivative", "check_strategy",
           "check_tangent"]

JVP_STRATEGIES = ("split", "split_func", "func", "forward_ad")

# The tangent (dz, dr, dt) of the JVP on primals (z, r, t); dz is always the velocity v.
# "v01" is the correct one; the others are the wrong choices of paper Tab. 1b, kept for ablations.
TANGENTS = {"v01": (0.0, 1.0), "v00": (0.0, 0.0), "v10": (1.0, 0.0), "v11": (1.0, 1.0)}

Net = Callable[..., Tensor]


def check_strategy(strategy: str) -> None:
    if strategy not in JVP_STRATEGIES:
        raise ConfigError(f"unknown JVP strategy {strategy!r}: choose one of "
                          f"{', '.join(JVP_STRATEGIES)}")


@contextlib.contextmanager
def _same_rng(device: torch.device) -> Iterator[Callable[[], None]]:
    """Yields a function that rewinds the global RNG (CPU and the CUDA device) to its state at
    entry, so that a second pass draws the same dropout masks as the first."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def rewind() -> None:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)

    yield rewind


def check_tangent(tangent: str) -> tuple[float, float]:
    """(dr, dt) of a tangent name; only "v01" gives the true du/dt (paper Tab. 1b)."""
    if tangent not in TANGENTS:
        raise ConfigError(f"unknown JVP tangent {tangent!r}: choose one of {', '.join(TANGENTS)} "
                          "((dz, dr, dt) = (v, 0, 1) is the correct one, 'v01')")
    return TANGENTS[tangent]


def _fn(net: Net, y: Tensor | None) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    def f(z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        return net(z, t, t - r, y)
    return f


def _time_tangents(r: Tensor, t: Tensor, dr_dt: tuple[float, float]) -> tuple[Tensor, Tensor]:
    dr, dt = dr_dt
    return torch.full_like(r, dr), torch.full_like(t, dt)


def _jvp_func(f: Callable, z: Tensor, r: Tensor, t: Tensor, v: Tensor,
              dr_dt: tuple[float, float] = (0.0, 1.0)) -> tuple[Tensor, Tensor]:
    return torch.func.jvp(f, (z, r, t), (v, *_time_tangents(r, t, dr_dt)))


def _jvp_forward_ad(f: Callable, z: Tensor, r: Tensor, t: Tensor, v: Tensor,
                    dr_dt: tuple[float, float] = (0.0, 1.0)) -> tuple[Tensor, Tensor]:
    r_dot, t_dot = _time_tangents(r, t, dr_dt)
    passes = layers.FORWARD_AD_PASSES        # read by layers that must know it when compiled
    passes[0] += 1
    try:
        with forward_ad.dual_level():
            out = f(forward_ad.make_dual(z, v),
                    forward_ad.make_dual(r, r_dot),
                    forward_ad.make_dual(t, t_dot))
            u, dudt = forward_ad.unpack_dual(out)
    finally:
        passes[0] -= 1
    if dudt is None:  # the output does not depend on (z, r, t) at all
        dudt = torch.zeros_like(u)
    return u, dudt


def _jvp_precision(device: torch.device, keep_autocast: bool) -> contextlib.AbstractContextManager:
    """Inside an enclosing autocast, leaves it on (``keep_autocast``) or turns it off, so that
    the JVP runs in fp32 (SPEC §4: keep the JVP fp32 unless bf16 is measured as good)."""
    if keep_autocast or not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def u_and_dudt(net: Net, z: Tensor, r: Tensor, t: Tensor, v: Tensor, y: Tensor | None = None,
               strategy: str = "split", jvp_autocast: bool = False,
               tangent: str = "v01", jvp_net: Net | None = None) -> tuple[Tensor, Tensor]:
    """Average velocity and its total time derivative.

    Args:
        net: backbone ``net(z, t, h, y=None)``.
        z: (B, *S) points on the path; v: (B, *S) the velocity along which z moves.
        r, t: (B,) times with r <= t.
        y: optional (B,) labels passed through to ``net``.
        strategy: one of ``JVP_STRATEGIES``.
        jvp_autocast: under an enclosing ``torch.autocast``, run the JVP in autocast too. By
            default it runs in fp32 with autocast off; the split strategies still run the grad
            pass under autocast, the joint ones (one pass for both) then run entirely in fp32.
        tangent: (dz, dr, dt) of the JVP, a ``TANGENTS`` name. Only the default "v01" = (v, 0, 1)
            gives du/dt; the others exist to reproduce the paper's ablation (Tab. 1b).
        jvp_net: the same network for the no-grad JVP pass of the split strategies, when the
            grad pass goes through a wrapper that forward-mode AD cannot run through (DDP:
            ``net`` is the wrapper, ``jvp_net`` its ``.module``). The joint strategies have one
            pass only and refuse a distinct ``jvp_net``: gradients through it would bypass the
            wrapper.

    Returns:
        ``(u, dudt)``, both (B, *S): u = net(z, t, t - r, y) carries the autograd graph when grad
        mode is on; dudt is detached (it only enters the stop-gradient target).
    """
    check_strategy(strategy)
    dr_dt = check_tangent(tangent)
    f = _fn(net, y)
    if strategy in ("func", "forward_ad"):
        if jvp_net is not None and jvp_net is not net:
            raise ConfigError(f"JVP strategy {strategy!r} computes u and du/dt in one pass, so "
                              "it cannot take a separate no-grad jvp_net: use 'split', or "
                              "all-reduce the gradients by hand")
        jvp = _jvp_func if strategy == "func" else _jvp_forward_ad
        with _jvp_precision(z.device, jvp_autocast):
            u, dudt = jvp(f, z, r, t, v, dr_dt)
        return u, dudt.detach()
    jvp = _jvp_func if strategy == "split_func" else _jvp_forward_ad
    f_jvp = f if jvp_net is None else _fn(jvp_net, y)
    with _same_rng(z.device) as rewind:
        with torch.no_grad(), _jvp_precision(z.device, jvp_autocast):
            _, dudt = jvp(f_jvp, z, r, t, v, dr_dt)
        rewind()
        u = f(z, r, t)
    return u, dudt


def time_derivative(net: Net, z: Tensor, r: Tensor, t: Tensor, v: Tensor,
                    y: Tensor | None = None, strategy: str = "split",
                    tangent: str = "v01") -> Tensor:
    """du/dt = v · ∂_z u(z, r, t) + ∂_t u(z, r, t), shape (B, *S), detached.

    Runs only the JVP (no grad pass): ``torch.func.jvp`` for "split_func" and "func",
    forward-mode dual tensors for "split" and "forward_ad".
    """
    check_strategy(strategy)
    dr_dt = check_tangent(tangent)
    jvp = _jvp_func if strategy in ("split_func", "func") else _jvp_forward_ad
    with torch.no_grad():
        return jvp(_fn(net, y), z, r, t, v, dr_dt)[1]
