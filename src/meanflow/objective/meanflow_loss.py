"""The MeanFlow objective (Geng et al. 2025, SPEC §1).

Time convention: **t = 0 is data, t = 1 is noise**. The path is z_t = (1 - t)·x + t·e with
e ~ N(0, I), and the conditional velocity is v = dz_t/dt = e - x.

The network predicts the average velocity u_θ(z, r, t) = net(z, t, h = t - r, y). The MeanFlow
identity u = v - (t - r)·du/dt gives the regression target

    u_tgt = sg( ṽ - (t - r)·(ṽ·∂_z u_θ + ∂_t u_θ) ),

where ṽ is v, or the guided velocity when classifier-free guidance is trained into the model.
The per-sample error ||u_θ - u_tgt||² is summed over all elements and weighted adaptively by
sg(1 / (||Δ||² + c)^p).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from meanflow.errors import ConfigError
from meanflow.objective.jvp import check_strategy, check_tangent, u_and_dudt
from meanflow.objective.time_sampler import TimeSampler, check_row_layout

__all__ = ["MeanFlowLoss", "average_velocity", "guided_velocity", "adaptive_weight",
           "drop_labels", "check_batch", "check_output", "expand_like"]

Net = Callable[..., Tensor]


def expand_like(s: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against x of shape (B, *S)."""
    return s.reshape(-1, *([1] * (x.ndim - 1)))


def check_batch(x: Tensor, y: Tensor | None, num_classes: int | None) -> None:
    """Validates a training batch: x (B, *S) floating, y (B,) integer labels or None."""
    if not isinstance(x, Tensor) or x.ndim < 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ConfigError(f"x must be a floating tensor shaped (batch, *sample_shape), got "
                          f"{shape}: add a batch dimension")
    if num_classes is None:
        if y is not None:
            raise ConfigError("labels y were given to an unconditional loss: set num_classes "
                              "to train a class-conditional model, or pass y=None")
        return
    if y is None:
        raise ConfigError("this loss is class-conditional (num_classes set) but y is None: "
                          "pass labels, or set num_classes=None")
    if y.shape != x.shape[:1] or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ConfigError(f"y must be integer labels shaped ({x.shape[0]},), got "
                          f"{tuple(y.shape)} {y.dtype}")
    # Range-checked on the CPU only: on a GPU the check would stall every step, and the
    # library's datasets validate their labels when they load.
    if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ConfigError(f"labels must lie in [0, {num_classes}), got values in "
                          f"[{int(y.min())}, {int(y.max())}]: fix the labels or num_classes")


def check_output(out: Tensor, z: Tensor) -> Tensor:
    """The backbone contract: the output has the shape of its input z."""
    if not isinstance(out, Tensor) or out.shape != z.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError(f"the network returned {shape} for input {tuple(z.shape)}: a "
                          "backbone must return a tensor shaped like z")
    return out


def average_velocity(net: Net, z: Tensor, r: Tensor, t: Tensor,
                     y: Tensor | None = None) -> Tensor:
    """u(z, r, t) = net(z, t, t - r, y), shape like z. Requires 0 <= r <= t <= 1, r and t (B,)."""
    if r.shape != z.shape[:1] or t.shape != z.shape[:1]:
        raise ConfigError(f"r and t must have shape ({z.shape[0]},), got {tuple(r.shape)} and "
                          f"{tuple(t.shape)}: pass one time per sample")
    if bool((r > t).any()):
        raise ConfigError("r > t for some samples: the average velocity needs r <= t "
                          "(t = 1 is noise, t = 0 is data); swap them")
    if bool((r < 0).any()) or bool((t > 1).any()):
        raise ConfigError("times must lie in [0, 1] (t = 0 data, t = 1 noise): rescale r and t")
    return check_output(net(z, t, t - r, y), z)


def adaptive_weight(err: Tensor, p: float, c: float) -> Tensor:
    """w = sg(1 / (err + c)^p) for per-sample squared errors err (B,). p = 0 gives 1."""
    if p == 0:
        return torch.ones_like(err)
    return (err.detach() + c).pow(-p)


def drop_labels(y: Tensor, prob: float, null_class: int,
                generator: torch.Generator | None = None,
                rows: str = "random") -> tuple[Tensor, Tensor]:
    """Replaces labels y (B,) by ``null_class``: class dropout for classifier-free guidance.

    Both layouts draw the same B uniforms u from ``generator``:

    - ``rows="random"``: label i is dropped when u_i < prob, independently per sample;
    - ``rows="first"``: n = #{i : u_i < prob} ~ Binomial(B, prob) labels are dropped, the first
      n rows of the batch (the official JAX code). Combined with
      ``TimeSampler(r_eq_t_rows="first")`` every dropped row is an r = t row whenever n <= n_eq.

    Returns (labels, dropped mask), both (B,)."""
    check_row_layout("rows", rows)
    dropped = torch.rand(y.shape, device=y.device, generator=generator) < prob
    if rows == "first":  # a tensor comparison, no host sync
        dropped = torch.arange(y.shape[0], device=y.device) < dropped.sum()
    return torch.where(dropped, torch.full_like(y, null_class), y), dropped


@torch.no_grad()
def guided_velocity(net: Net, z: Tensor, t: Tensor, v: Tensor, y: Tensor, null_class: int,
                    omega: float, kappa: float, apply: Tensor | None = None) -> Tensor:
    """ṽ = ω·v + κ·u(z, t, t | y) + (1 - ω - κ)·u(z, t, t | ∅) (SPEC §1, paper Eq. 13-19).

    The network calls are instantaneous (h = 0) and carry no gradient. Samples where ``apply``
    is False keep plain v. The effective guidance scale is ω / (1 - κ).
    """
    if omega == 1.0 and kappa == 0.0:
        return v
    h0 = torch.zeros_like(t)
    null = torch.full_like(y, null_class)
    if kappa == 0.0:
        u_mix = (1.0 - omega) * net(z, t, h0, null)
    else:
        both = net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([h0, h0]),
                   torch.cat([y, null]))
        u_cond, u_null = both.chunk(2)
        u_mix = kappa * u_cond + (1.0 - omega - kappa) * u_null
    v_tilde = omega * v + u_mix
    if apply is None:
        return v_tilde
    return torch.where(expand_like(apply, v), v_tilde, v)


class MeanFlowLoss:
    """EDM-style MeanFlow loss: ``loss_fn(net, x, y=None) -> (loss_per_sample, stats)``.

    Constructor arguments (paper names; defaults are the paper's ImageNet settings, SPEC §2):

        time_sampler     = "logit_normal"  # or "uniform", "v1" (see TimeSampler)
        mu, sigma        = -0.4, 1.0       # LN(mu, sigma) for t and r (Tab. 1d best)
        mu_r, sigma_r    = -4.0, 1.6       # r's sampler, "v1" only
        fraction_r_neq_t = 0.25            # share of samples with r != t (Tab. 1a best)
        r_eq_t_rows      = "random"        # which samples get r = t: "random" decides each
                                           # one alone; "first" takes the first
                                           # floor(B·(1 - fraction_r_neq_t)) rows, as the
                                           # official JAX code does (see TimeSampler)
        p, c             = 1.0, 1e-3       # adaptive weight 1/(||Δ||²+c)^p (Tab. 1e; text's c)
        omega, kappa     = 1.0, 0.0        # guidance in the target; 1, 0 is none
        t_interval       = (0.0, 1.0)      # guidance only for t in [t_min, t_max]
        label_drop       = 0.1             # class dropout to the null class
        label_drop_rows  = "random"        # "random": each label alone with prob. label_drop;
                                           # "first": a Binomial(B, label_drop) count of
                                           # leading rows, as the official JAX code does
                                           # (see drop_labels)
        num_classes      = None            # None: unconditional; null class index = num_classes
        jvp              = "split"         # see meanflow.objective.jvp
        jvp_precision    = "fp32"          # under autocast: JVP in fp32, or "amp" (bf16 too)
        tangent          = "v01"           # JVP tangent (dz, dr, dt) = (v, 0, 1); others are
                                           # the wrong ones of Tab. 1b, for ablations only

    With both layouts "first", dropped labels sit on r = t rows (as long as their count is at
    most the number of r = t rows). Dropped rows always keep the plain v in the target. The
    random draws come in the same order in every layout: (r, t), the noise e, then the B
    label-dropout uniforms.

    ``stats`` holds detached scalars: ``loss`` (weighted), ``mse`` (mean raw ||Δ||²),
    ``u_minus_v`` (mean ||u_θ - v||² against the plain conditional velocity, comparable with a
    flow-matching loss), ``weight`` (mean adaptive weight) and ``frac_r_neq_t``. With p = 1 the
    weighted loss is ≈ 1 always; watch ``mse`` and ``u_minus_v`` instead.
    """

    def __init__(self, *, time_sampler: str = "logit_normal", mu: float = -0.4,
                 sigma: float = 1.0, mu_r: float = -4.0, sigma_r: float = 1.6,
                 fraction_r_neq_t: float = 0.25, p: float = 1.0, c: float = 1e-3,
                 omega: float = 1.0, kappa: float = 0.0,
                 t_interval: tuple[float, float] = (0.0, 1.0), label_drop: float = 0.1,
                 num_classes: int | None = None, jvp: str = "split",
                 jvp_precision: str = "fp32", tangent: str = "v01",
                 r_eq_t_rows: str = "random", label_drop_rows: str = "random") -> None:
        self.sampler = TimeSampler(kind=time_sampler, mu=mu, sigma=sigma, mu_r=mu_r,
                                   sigma_r=sigma_r, fraction_r_neq_t=fraction_r_neq_t,
                                   r_eq_t_rows=r_eq_t_rows)
        check_row_layout("label_drop_rows", label_drop_rows)
        if not (math.isfinite(p) and p >= 0):
            raise ConfigError(f"p={p!r} must be >= 0: use 0 for plain L2, 1 for the paper")
        if not (math.isfinite(c) and c > 0):
            raise ConfigError(f"c={c!r} must be > 0: it keeps the adaptive weight finite "
                              "(the paper uses 1e-3)")
        if not (0.0 <= label_drop <= 1.0):
            raise ConfigError(f"label_drop={label_drop!r} is outside [0, 1]: use e.g. 0.1")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ConfigError(f"num_classes={num_classes!r} must be a positive integer or None")
        if not (math.isfinite(omega) and math.isfinite(kappa)):
            raise ConfigError("omega and kappa must be finite numbers")
        if not (0.0 <= kappa < 1.0):
            raise ConfigError(f"kappa={kappa!r} must lie in [0, 1): the effective scale is "
                              "omega / (1 - kappa)")
        guided = omega != 1.0 or kappa != 0.0
        if guided and num_classes is None:
            raise ConfigError("guidance (omega != 1 or kappa != 0) needs a class-conditional "
                              "model: set num_classes, or omega=1 and kappa=0")
        t_min, t_max = (float(a) for a in t_interval)
        if not (0.0 <= t_min <= t_max <= 1.0):
            raise ConfigError(f"t_interval={tuple(t_interval)!r} must satisfy "
                              "0 <= t_min <= t_max <= 1")
        check_strategy(jvp)
        check_tangent(tangent)
        self.tangent = tangent
        if jvp_precision not in ("fp32", "amp"):
            raise ConfigError(f"jvp_precision={jvp_precision!r}: choose fp32 (JVP outside "
                              "autocast) or amp (JVP inside it)")
        self.jvp_autocast = jvp_precision == "amp"
        self.p, self.c = float(p), float(c)
        self.omega, self.kappa = float(omega), float(kappa)
        self.t_interval = (t_min, t_max)
        self.label_drop = float(label_drop)
        self.label_drop_rows = label_drop_rows
        self.num_classes = num_classes
        self.jvp = jvp

    @property
    def r_eq_t_rows(self) -> str:
        """The sampler's layout of the r = t rows, "random" or "first"."""
        return self.sampler.r_eq_t_rows

    @property
    def effective_guidance_scale(self) -> float:
        """ω′ = ω / (1 - κ) (SPEC §1)."""
        return self.omega / (1.0 - self.kappa)

    def __call__(self, net: Net, x: Tensor, y: Tensor | None = None, *,
                 generator: torch.Generator | None = None,
                 r: Tensor | None = None, t: Tensor | None = None,
                 e: Tensor | None = None,
                 jvp_net: Net | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-sample loss (B,) and a dict of detached scalar stats.

        ``generator`` drives every random draw of the loss (times, noise, label dropout), so a
        seeded generator makes the step reproducible. ``r``, ``t`` (B,) and ``e`` (B, *S) may
        be given by hand (tests, ablations); they are validated. ``jvp_net`` (the same
        weights, unwrapped) takes every no-grad network call, the JVP and the guidance ones,
        while ``net`` takes only the grad-carrying forward: that is how a DDP wrapper is used
        (see :func:`meanflow.objective.jvp.u_and_dudt`; split strategies only).
        """
        check_batch(x, y, self.num_classes)
        B = x.shape[0]
        if (r is None) != (t is None):
            raise ConfigError("give both r and t, or neither")
        if t is None:
            r, t = self.sampler(B, x.device, generator)
        else:
            if r.shape != (B,) or t.shape != (B,):
                raise ConfigError(f"r and t must have shape ({B},): one time per sample")
            # a host sync and, under torch.compile, a graph break: the compiled training step
            # passes times drawn by this loss's own sampler, so the check is left out there
            if not torch.compiler.is_compiling() and (
                    bool((r > t).any()) or bool((r < 0).any()) or bool((t > 1).any())):
                raise ConfigError("times must satisfy 0 <= r <= t <= 1 for every sample "
                                  "(t = 1 is noise): swap r and t where r > t")
        r, t = r.to(x.dtype), t.to(x.dtype)
        if e is None:
            e = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        elif e.shape != x.shape:
            raise ConfigError(f"noise e must have the shape of x {tuple(x.shape)}, got "
                              f"{tuple(e.shape)}")

        tt = expand_like(t, x)
        z = (1 - tt) * x + tt * e
        v = e - x

        v_tilde = v
        if self.num_classes is not None:
            y, dropped = drop_labels(y, self.label_drop, self.num_classes, generator,
                                     self.label_drop_rows)
            t_min, t_max = self.t_interval
            apply = (~dropped) & (t >= t_min) & (t <= t_max)
            no_grad_net = net if jvp_net is None else jvp_net
            v_tilde = guided_velocity(no_grad_net, z, t, v, y, self.num_classes, self.omega,
                                      self.kappa, apply)

        u, dudt = u_and_dudt(net, z, r, t, v_tilde, y, self.jvp, self.jvp_autocast,
                             self.tangent, jvp_net=jvp_net)
        check_output(u, z)
        u_tgt = (v_tilde - expand_like(t - r, x) * dudt).detach()
        err = (u - u_tgt).pow(2).flatten(1).sum(1)                      # (B,)
        w = adaptive_weight(err, self.p, self.c)
        loss = w * err
        with torch.no_grad():
            stats = {
                "loss": loss.mean().detach(),
                "mse": err.mean().detach(),
                "u_minus_v": (u.detach() - v).pow(2).flatten(1).sum(1).mean(),
                "weight": w.mean().detach(),
                "frac_r_neq_t": (r != t).float().mean(),
            }
        return loss, stats
