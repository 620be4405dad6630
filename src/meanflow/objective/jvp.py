"""The total time derivative du/dt of the average velocity along a trajectory.

    du/dt = v · ∂_z u + ∂_t u,

one Jacobian-vector product of f(z, r, t) = net(z, t, h = t - r, y) with the tangent
(dz, dr, dt) = (v, 0, 1) (paper §4.1 and Alg. 1; docs/method.md §4). The JVP primals are
(z, r, t), not the network's (z, t, h): with those the right tangent would be (v, 1, 1), and
getting it wrong ruins training (paper Tab. 1b).

Strategies (all exact; they differ in cost, docs/design.md lists the measurements):

- ``"split"`` (the default): du/dt from forward-mode dual tensors (``torch.autograd.forward_ad``)
  under ``torch.no_grad()``, then u from an ordinary forward with grad. The target is
  stop-gradient anyway, so nothing is lost; memory stays that of flow matching and the grad pass
  may use fused kernels or a DDP wrapper (``jvp_net``: the JVP on the unwrapped module, the
  grad pass through the wrapper). The global RNG is rewound between the passes so dropout masks
  are identical. Works under torch.compile and FSDP; the one form that runs through DDP.
- ``"func"``: one ``torch.func.jvp`` call returns u (carrying the autograd graph) and du/dt.
  The official PyTorch code's form; works under torch.compile and FSDP. On a GPU it at best
  matched ``split``'s time (dit-b/2, fp32) with 3.3-5.3x flow matching's step memory.
- ``"forward_ad"``: one pass on dual tensors; the primal output carries the autograd graph.
  The fastest eager strategy on the CPU for the image backbones; refused under FSDP and does
  not compile.
- ``"auto"``: :func:`resolve_jvp` picks one of the above from where the step runs.

Every JVP evaluation runs inside :func:`meanflow.models.forward_mode.jvp_pass`, so that layers
know they are in a JVP pass while torch.compile traces (where dual tensors cannot be seen).
Extra per-sample conditioning of the network (``cond``, e.g. ``{"aug": labels}``) is passed as
keyword arguments to every network call and carries no tangent.

A network with a second, instantaneous-velocity head (the improved MeanFlow contract,
docs/imf.md §1, §6) is driven with ``v_head=True``: every strategy then also returns that
head's output, with its autograd graph and without tangent.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from torch import Tensor
from torch.autograd import forward_ad

from meanflow.errors import ConfigError
from meanflow.models import backbone_family
from meanflow.models.forward_mode import jvp_pass

__all__ = ["JVP_STRATEGIES", "JVP_CHOICES", "TANGENTS", "JVPStrategy", "u_and_dudt",
           "time_derivative", "resolve_jvp", "check_strategy", "check_tangent"]

# the strategies that compute du/dt; "auto" (in JVP_CHOICES) is resolved to one of them
JVP_STRATEGIES = ("split", "func", "forward_ad")
# every name a user may give: what a config setting accepts
JVP_CHOICES = ("auto", *JVP_STRATEGIES)
# backbone families on which "auto" takes forward_ad on the CPU (registry names start with these)
IMAGE_BACKBONES = ("unet", "dit")

# The tangent (dz, dr, dt) of the JVP on primals (z, r, t); dz is always the velocity v.
# "v01" is the correct one; the others are the wrong choices of paper Tab. 1b, kept for ablations.
TANGENTS = {"v01": (0.0, 1.0), "v00": (0.0, 0.0), "v10": (1.0, 0.0), "v11": (1.0, 1.0)}

Net = Callable[..., Tensor]
Cond = Mapping[str, Tensor]


def check_strategy(strategy: object) -> None:
    """Raises ConfigError unless ``strategy`` is one of :data:`JVP_CHOICES`."""
    if not isinstance(strategy, str) or strategy not in JVP_CHOICES:
        raise ConfigError(f"unknown JVP strategy {strategy!r}: choose one of "
                          f"{', '.join(JVP_CHOICES)}")


def check_tangent(tangent: object) -> tuple[float, float]:
    """(dr, dt) of a tangent name; only "v01" gives the true du/dt (paper Tab. 1b)."""
    if not isinstance(tangent, str) or tangent not in TANGENTS:
        raise ConfigError(f"unknown JVP tangent {tangent!r}: choose one of {', '.join(TANGENTS)} "
                          "((dz, dr, dt) = (v, 0, 1) is the correct one, 'v01')")
    return TANGENTS[tangent]


def resolve_jvp(strategy: str, *, device_type: str, backbone: str | None = None,
                fsdp: bool = False, compiled: bool = False) -> str:
    """The du/dt strategy to run: ``strategy`` itself, checked against where the step runs, or
    what "auto" picks there.

    "auto" is ``forward_ad`` on the CPU for the image backbones (U-Net, DiT) when neither FSDP
    nor torch.compile is on: there it was the fastest eager strategy (1.66x a flow-matching step
    against 1.96x for ``split`` on unet-small, 1.57x / 1.49x against 1.69x / 1.84x on dit-s/2).
    Everywhere else it is ``split``: fastest for the MLP on the CPU (1.96-2.00x against
    2.13-2.87x), flow matching's step memory on a GPU (``func`` needs 3.3-5.3x and is never
    faster), and it works under FSDP, torch.compile and DDP. docs/design.md has the
    measurements.

    Args:
        strategy: one of :data:`JVP_CHOICES`.
        device_type: ``torch.device.type`` of the training step ("cpu", "cuda", ...).
        backbone: the model's registry name ("unet-small", "dit-b/2", "mlp") or family ("unet",
            "dit", "mlp"); None: unknown, treated as not an image backbone.
        fsdp: the model is sharded with FSDP2.
        compiled: the loss evaluation runs under torch.compile.

    Raises ConfigError for an unknown name, and for ``forward_ad`` under FSDP or compile.
    """
    check_strategy(strategy)
    if strategy == "forward_ad" and fsdp:
        raise ConfigError("JVP strategy forward_ad fails under FSDP (FSDP2's post-backward hook "
                          "has no forward-mode rule that torch accepts): use split or func")
    if strategy == "forward_ad" and compiled:
        raise ConfigError("JVP strategy forward_ad does not compile (a compiled graph's autograd "
                          "Function has no jvp rule): use split or func, or turn compile off")
    if strategy != "auto":
        return strategy
    family = (backbone or "").split("-")[0]
    if device_type == "cpu" and family in IMAGE_BACKBONES and not fsdp and not compiled:
        return "forward_ad"
    return "split"


def _is_fsdp(net: object) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed support
        return False
    return isinstance(net, FSDPModule)


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


def _fn(net: Net, y: Tensor | None,
        cond: Cond | None = None) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """f(z, r, t) = net(z, t, t - r, y, **cond); y and cond are constants of the JVP."""
    extra = dict(cond) if cond else {}

    def f(z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        return net(z, t, t - r, y, **extra)
    return f


def _fn_with_v(net: Net, y: Tensor | None,
               cond: Cond | None = None) -> Callable[[Tensor, Tensor, Tensor], tuple]:
    """f(z, r, t) = net(z, t, t - r, y, **cond, v_head=True) -> (u, v): a backbone with a
    second (instantaneous-velocity) head (docs/imf.md §6)."""
    extra = dict(cond) if cond else {}

    def f(z: Tensor, r: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        out = net(z, t, t - r, y, v_head=True, **extra)
        if not isinstance(out, tuple) or len(out) != 2:
            raise ConfigError(f"net(..., v_head=True) returned {type(out).__name__}: a "
                              "backbone with a v-head must return the pair (u, v); for a "
                              "network without one use the boundary variant")
        return out
    return f


def _time_tangents(r: Tensor, t: Tensor, dr_dt: tuple[float, float]) -> tuple[Tensor, Tensor]:
    dr, dt = dr_dt
    return torch.full_like(r, dr), torch.full_like(t, dt)


def _jvp_func(f: Callable, z: Tensor, r: Tensor, t: Tensor, v: Tensor,
              dr_dt: tuple[float, float] = (0.0, 1.0)) -> tuple[Tensor, Tensor]:
    """(f(z, r, t), JVP along (v, dr, dt)) through ``torch.func.jvp``."""
    with jvp_pass():
        return torch.func.jvp(f, (z, r, t), (v, *_time_tangents(r, t, dr_dt)))


def _jvp_forward_ad(f: Callable, z: Tensor, r: Tensor, t: Tensor, v: Tensor,
                    dr_dt: tuple[float, float] = (0.0, 1.0)) -> tuple[Tensor, Tensor]:
    """(f(z, r, t), JVP along (v, dr, dt)) on forward-AD dual tensors."""
    r_dot, t_dot = _time_tangents(r, t, dr_dt)
    with jvp_pass(), forward_ad.dual_level():
        out = f(forward_ad.make_dual(z, v),
                forward_ad.make_dual(r, r_dot),
                forward_ad.make_dual(t, t_dot))
        u, dudt = forward_ad.unpack_dual(out)
    if dudt is None:  # the output does not depend on (z, r, t) at all
        dudt = torch.zeros_like(u)
    return u, dudt


def _jvp_func_with_v(f: Callable, z: Tensor, r: Tensor, t: Tensor, v: Tensor,
                     dr_dt: tuple[float, float]) -> tuple[Tensor, Tensor, Tensor]:
    """(u, JVP of u, v-head output) through ``torch.func.jvp`` with the v output as auxiliary:
    it carries the autograd graph and no tangent."""
    with jvp_pass():
        return torch.func.jvp(f, (z, r, t), (v, *_time_tangents(r, t, dr_dt)), has_aux=True)


def _jvp_forward_ad_with_v(f: Callable, z: Tensor, r: Tensor, t: Tensor, v: Tensor,
                           dr_dt: tuple[float, float]) -> tuple[Tensor, Tensor, Tensor]:
    """(u, JVP of u, v-head output) on forward-AD dual tensors; the v output's tangent is
    dropped, its primal keeps the autograd graph."""
    r_dot, t_dot = _time_tangents(r, t, dr_dt)
    with jvp_pass(), forward_ad.dual_level():
        out_u, out_v = f(forward_ad.make_dual(z, v),
                         forward_ad.make_dual(r, r_dot),
                         forward_ad.make_dual(t, t_dot))
        u, dudt = forward_ad.unpack_dual(out_u)
        v_out = forward_ad.unpack_dual(out_v).primal
    if dudt is None:
        dudt = torch.zeros_like(u)
    return u, dudt, v_out


def _jvp_precision(device: torch.device, keep_autocast: bool) -> contextlib.AbstractContextManager:
    """Inside an enclosing autocast, leaves it on (``keep_autocast``) or turns it off, so that
    the JVP runs in fp32 (docs/design.md, precision: bf16 du/dt is 0.5-3.5 % off fp32)."""
    if keep_autocast or not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


@dataclass(frozen=True)
class JVPStrategy:
    """A validated way to compute du/dt: the strategy (a ``JVP_CHOICES`` name), the tangent (a
    ``TANGENTS`` name) and whether the JVP stays under an enclosing autocast. Validated once at
    construction (ConfigError); the losses hold one and call it every step.

    strategy -- "split", "func", "forward_ad", or "auto" (resolved per call, see
                :meth:`resolve`).
    tangent  -- (dz, dr, dt) = (v, dr, dt); only "v01" = (v, 0, 1) gives du/dt, the others are
                the wrong tangents of paper Tab. 1b, for ablations.
    autocast -- under an enclosing ``torch.autocast``, run the JVP in autocast too; by default
                it runs in fp32 with autocast off.
    """

    strategy: str = "split"
    tangent: str = "v01"
    autocast: bool = False

    def __post_init__(self) -> None:
        check_strategy(self.strategy)
        check_tangent(self.tangent)

    def resolve(self, net: Net, z: Tensor, jvp_net: Net | None = None) -> str:
        """The strategy this call runs: the one given, or what "auto" picks from what the call
        can see (:func:`resolve_jvp` with z's device, the backbone's class, FSDP, and whether
        torch.compile is tracing). With a separate ``jvp_net`` (``net`` a DDP wrapper) "auto"
        is "split", the form that runs through the wrapper."""
        if self.strategy != "auto":
            return self.strategy
        if jvp_net is not None and jvp_net is not net:
            return "split"
        return resolve_jvp("auto", device_type=z.device.type, backbone=backbone_family(net),
                           fsdp=_is_fsdp(net), compiled=torch.compiler.is_compiling())

    def u_and_dudt(self, net: Net, z: Tensor, r: Tensor, t: Tensor, v: Tensor,
                   y: Tensor | None = None, *, jvp_net: Net | None = None,
                   cond: Cond | None = None,
                   v_head: bool = False) -> tuple[Tensor, ...]:
        """(u, du/dt), both (B, *S); with ``v_head`` (u, du/dt, v); the arguments as in
        :func:`u_and_dudt`."""
        strategy, dr_dt = self.resolve(net, z, jvp_net), TANGENTS[self.tangent]
        f = _fn(net, y, cond)
        if strategy in ("func", "forward_ad"):
            if jvp_net is not None and jvp_net is not net:
                raise ConfigError(f"JVP strategy {strategy!r} computes u and du/dt in one pass, "
                                  "so it cannot take a separate no-grad jvp_net: use 'split', "
                                  "or all-reduce the gradients by hand")
            if v_head:
                jvp_v = _jvp_func_with_v if strategy == "func" else _jvp_forward_ad_with_v
                with _jvp_precision(z.device, self.autocast):
                    u, dudt, v_out = jvp_v(_fn_with_v(net, y, cond), z, r, t, v, dr_dt)
                return u, dudt.detach(), v_out
            jvp = _jvp_func if strategy == "func" else _jvp_forward_ad
            with _jvp_precision(z.device, self.autocast):
                u, dudt = jvp(f, z, r, t, v, dr_dt)
            return u, dudt.detach()
        f_jvp = f if jvp_net is None else _fn(jvp_net, y, cond)
        with _same_rng(z.device) as rewind:
            with torch.no_grad(), _jvp_precision(z.device, self.autocast):
                _, dudt = _jvp_forward_ad(f_jvp, z, r, t, v, dr_dt)
            rewind()
            if v_head:   # the JVP pass ran the u-head alone; the grad pass runs both heads
                u, v_out = _fn_with_v(net, y, cond)(z, r, t)
                return u, dudt, v_out
            u = f(z, r, t)
        return u, dudt

    def time_derivative(self, net: Net, z: Tensor, r: Tensor, t: Tensor, v: Tensor,
                        y: Tensor | None = None, *, cond: Cond | None = None) -> Tensor:
        """du/dt alone, (B, *S), detached; see :func:`time_derivative`. Under an enclosing
        autocast it runs in fp32 unless ``autocast`` is set, as in :meth:`u_and_dudt`."""
        jvp = _jvp_func if self.resolve(net, z) == "func" else _jvp_forward_ad
        with torch.no_grad(), _jvp_precision(z.device, self.autocast):
            return jvp(_fn(net, y, cond), z, r, t, v, TANGENTS[self.tangent])[1]


def u_and_dudt(net: Net, z: Tensor, r: Tensor, t: Tensor, v: Tensor, y: Tensor | None = None,
               strategy: str = "split", jvp_autocast: bool = False,
               tangent: str = "v01", jvp_net: Net | None = None,
               cond: Cond | None = None, v_head: bool = False) -> tuple[Tensor, ...]:
    """Average velocity and its total time derivative (and, with ``v_head``, the output of the
    network's instantaneous-velocity head).

    Args:
        net: backbone ``net(z, t, h, y=None, **cond)``.
        z: (B, *S) points on the path; v: (B, *S) the velocity along which z moves.
        r, t: (B,) times with r <= t.
        y: optional (B,) labels passed through to ``net``.
        strategy: one of ``JVP_CHOICES`` ("auto": see :meth:`JVPStrategy.resolve`).
        jvp_autocast: under an enclosing ``torch.autocast``, run the JVP in autocast too. By
            default it runs in fp32 with autocast off; the split strategy still runs the grad
            pass under autocast, the joint ones (one pass for both) then run entirely in fp32.
        tangent: (dz, dr, dt) of the JVP, a ``TANGENTS`` name. Only the default "v01" = (v, 0, 1)
            gives du/dt; the others exist to reproduce the paper's ablation (Tab. 1b).
        jvp_net: the same network for the no-grad JVP pass of the split strategy, when the
            grad pass goes through a wrapper that forward-mode AD cannot run through (DDP:
            ``net`` is the wrapper, ``jvp_net`` its ``.module``). The joint strategies have one
            pass only and refuse a distinct ``jvp_net``: gradients through it would bypass the
            wrapper.
        cond: extra per-sample conditioning, each value (B, ...), passed to every network call
            as keyword arguments (e.g. ``{"aug": labels}`` for a U-Net with augment_dim); held
            constant by the JVP.
        v_head: the network has a second head (the iMF contract, docs/imf.md §6):
            ``net(..., v_head=True)`` returns (u, v). Its v is returned too, from the same
            evaluation where the strategy has one pass ("func": an auxiliary output without
            tangent; "forward_ad": the primal of the dual output); "split" runs its no-grad JVP
            without the flag (u alone) and its grad pass with it.

    Returns:
        ``(u, dudt)``, both (B, *S): u = net(z, t, t - r, y, **cond) carries the autograd graph
        when grad mode is on; dudt is detached (it only enters the stop-gradient target). With
        ``v_head``: ``(u, dudt, v)``, v carrying the autograd graph like u.
    """
    return JVPStrategy(strategy, tangent, jvp_autocast).u_and_dudt(
        net, z, r, t, v, y, jvp_net=jvp_net, cond=cond, v_head=v_head)


def time_derivative(net: Net, z: Tensor, r: Tensor, t: Tensor, v: Tensor,
                    y: Tensor | None = None, strategy: str = "split",
                    tangent: str = "v01", cond: Cond | None = None,
                    jvp_autocast: bool = False) -> Tensor:
    """du/dt = v · ∂_z u(z, r, t) + ∂_t u(z, r, t), shape (B, *S), detached.

    Runs only the JVP (no grad pass): ``torch.func.jvp`` for "func", forward-mode dual tensors
    for "split" and "forward_ad" ("auto" as :meth:`JVPStrategy.resolve` picks). ``cond`` and
    ``jvp_autocast`` as in :func:`u_and_dudt` (under an enclosing autocast the JVP runs in fp32
    unless ``jvp_autocast``).
    """
    return JVPStrategy(strategy, tangent, jvp_autocast).time_derivative(net, z, r, t, v, y,
                                                                         cond=cond)
