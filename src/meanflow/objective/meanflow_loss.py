"""The MeanFlow objective (Geng et al. 2025; docs/method.md §1-8).

Time convention: **t = 0 is data, t = 1 is noise**. The path is z_t = (1 - t)·x + t·e with
e ~ N(0, I), and the conditional velocity is v = dz_t/dt = e - x.

The network predicts the average velocity u_θ(z, r, t) = net(z, t, h = t - r, y). The MeanFlow
identity u = v - (t - r)·du/dt (paper §4.1; docs/method.md §3) gives the regression target

    u_tgt = sg( ṽ - (t - r)·(ṽ·∂_z u_θ + ∂_t u_θ) ),

where ṽ is v, or the guided velocity when classifier-free guidance is trained into the model.
The per-sample error ||u_θ - u_tgt||² is summed over all elements and weighted adaptively by
sg(1 / (||Δ||² + c)^p).

**Random draws.** Every random tensor a loss consumes comes from its :meth:`MeanFlowLoss.draw`
(:meth:`FlowMatchingLoss.draw`), in one fixed order; a call without ``draws=`` uses that same
method, so handing a call the draws made outside it (e.g. outside a compiled region) gives
bit-identical results and needs no generator inside.

**Conditioning.** ``cond={"aug": labels}`` (any per-sample tensors, (B, ...)) reaches every
network call of the loss as keyword arguments, repeated where the loss doubles the batch
(guidance), and constant under the JVP.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor

from meanflow.errors import ConfigError
from meanflow.objective.checks import (check_choice, check_interval, check_num_classes,
                                       check_number, check_row_layout)
from meanflow.objective.jvp import JVP_CHOICES, TANGENTS, JVPStrategy
from meanflow.objective.time_sampler import TimeSampler

__all__ = ["MeanFlowLoss", "average_velocity", "guided_velocity", "adaptive_weight",
           "drop_labels", "label_drop_mask", "check_batch", "check_output", "check_cond",
           "check_draws", "given_draws", "expand_like", "LABEL_DROP_U"]

Net = Callable[..., Tensor]
Cond = Mapping[str, Tensor]

# the key of the label-dropout uniforms in a loss's draws
LABEL_DROP_U = "label_drop_u"


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


def check_cond(cond: Cond | None, batch_size: int) -> dict[str, Tensor]:
    """Validates extra per-sample conditioning for the network: a mapping of keyword names to
    tensors shaped (batch_size, ...). Returns it as a dict ({} for None)."""
    if cond is None:
        return {}
    if not isinstance(cond, Mapping):
        raise ConfigError(f"cond must be a mapping of keyword to tensor, e.g. "
                          f"{{'aug': labels}}, got {type(cond).__name__}")
    for key, value in cond.items():
        if not isinstance(key, str) or not isinstance(value, Tensor) or value.ndim < 1 \
                or value.shape[0] != batch_size:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ConfigError(f"cond[{key!r}] is {shape}: give a tensor with one row per "
                              f"sample, ({batch_size}, ...)")
    return dict(cond)


def check_draws(draws: Mapping[str, Tensor], x: Tensor, keys: tuple[str, ...]) -> None:
    """Validates draws given to a loss call: only ``keys``; times and uniforms (B,), noise
    "e" shaped like x; 0 <= r <= t <= 1 where given. The value checks need a host sync and,
    under torch.compile, a graph break, so they are left out while compiling (the compiled
    training step passes draws made by the loss's own :meth:`draw`)."""
    unknown = sorted(set(draws) - set(keys))
    if unknown:
        raise ConfigError(f"unknown draws {', '.join(map(repr, unknown))}: this loss draws "
                          f"{', '.join(keys)}")
    B = x.shape[0]
    for key, value in draws.items():
        want = tuple(x.shape) if key == "e" else (B,)
        if not isinstance(value, Tensor) or tuple(value.shape) != want:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            what = "the noise e must have the shape of x" if key == "e" else \
                f"{key} must have one value per sample"
            raise ConfigError(f"{what}, {want}; got {shape}")
    if torch.compiler.is_compiling():
        return
    t, r = draws.get("t"), draws.get("r")
    if t is not None and (bool((t < 0).any()) or bool((t > 1).any())):
        raise ConfigError("times t must lie in [0, 1] (t = 0 data, t = 1 noise): rescale them")
    if r is not None and (bool((r < 0).any()) or bool((r > t).any())):
        raise ConfigError("times must satisfy 0 <= r <= t <= 1 for every sample "
                          "(t = 1 is noise): swap r and t where r > t")


def given_draws(x: Tensor, draws: Mapping[str, Tensor] | None,
                **named: Tensor | None) -> dict[str, Tensor]:
    """The draws a caller gives: the ``draws`` mapping and the keywords (r=, t=, e=) that are
    not None; a key given both ways is refused."""
    given = dict(draws) if draws is not None else {}
    for key, value in named.items():
        if value is None:
            continue
        if key in given:
            raise ConfigError(f"{key} is given twice, in draws and as {key}=: give it once")
        given[key] = value
    return given


def average_velocity(net: Net, z: Tensor, r: Tensor, t: Tensor, y: Tensor | None = None,
                     cond: Cond | None = None) -> Tensor:
    """u(z, r, t) = net(z, t, t - r, y, **cond), shape like z. Requires 0 <= r <= t <= 1, r
    and t (B,)."""
    if r.shape != z.shape[:1] or t.shape != z.shape[:1]:
        raise ConfigError(f"r and t must have shape ({z.shape[0]},), got {tuple(r.shape)} and "
                          f"{tuple(t.shape)}: pass one time per sample")
    if bool((r > t).any()):
        raise ConfigError("r > t for some samples: the average velocity needs r <= t "
                          "(t = 1 is noise, t = 0 is data); swap them")
    if bool((r < 0).any()) or bool((t > 1).any()):
        raise ConfigError("times must lie in [0, 1] (t = 0 data, t = 1 noise): rescale r and t")
    return check_output(net(z, t, t - r, y, **check_cond(cond, z.shape[0])), z)


def adaptive_weight(err: Tensor, p: float, c: float) -> Tensor:
    """w = sg(1 / (err + c)^p) for per-sample squared errors err (B,). p = 0 gives 1."""
    if p == 0:
        return torch.ones_like(err)
    return (err.detach() + c).pow(-p)


def label_drop_mask(u: Tensor, prob: float, first_rows: bool = False) -> Tensor:
    """Which labels class dropout replaces, from B uniforms u (B,) -> bool (B,):

    - ``first_rows=False``: label i is dropped when u_i < prob, independently per sample;
    - ``first_rows=True``: n = #{i : u_i < prob} ~ Binomial(B, prob) labels are dropped, the
      first n rows of the batch (the official JAX code). Combined with
      ``TimeSampler(r_eq_t_rows="first")`` every dropped row is an r = t row whenever n <= n_eq.
    """
    dropped = u < prob
    if first_rows:  # a tensor comparison, no host sync
        dropped = torch.arange(u.shape[0], device=u.device) < dropped.sum()
    return dropped


def drop_labels(y: Tensor, prob: float, null_class: int,
                generator: torch.Generator | None = None,
                rows: str = "random") -> tuple[Tensor, Tensor]:
    """Replaces labels y (B,) by ``null_class``: class dropout for classifier-free guidance.
    Draws B uniforms from ``generator`` and applies :func:`label_drop_mask` with
    ``rows="random"`` (each label alone) or ``"first"`` (a prefix, the official JAX code).

    Returns (labels, dropped mask), both (B,)."""
    check_row_layout("rows", rows)
    u = torch.rand(y.shape, device=y.device, generator=generator)
    dropped = label_drop_mask(u, prob, rows == "first")
    return torch.where(dropped, torch.full_like(y, null_class), y), dropped


def _repeat(cond: dict[str, Tensor], times: int) -> dict[str, Tensor]:
    return {k: torch.cat([c] * times) for k, c in cond.items()}


@torch.no_grad()
def guided_velocity(net: Net, z: Tensor, t: Tensor, v: Tensor, y: Tensor, null_class: int,
                    omega: float, kappa: float, apply: Tensor | None = None,
                    cond: Cond | None = None) -> Tensor:
    """ṽ = ω·v + κ·u(z, t, t | y) + (1 - ω - κ)·u(z, t, t | ∅) (paper Eq. 13-19;
    docs/method.md §8), shape like v.

    The network calls are instantaneous (h = 0) and carry no gradient. Samples where ``apply``
    (B,) is False keep plain v. The effective guidance scale is ω / (1 - κ). ``cond`` (each
    value (B, ...)) goes to the network as keyword arguments; for κ != 0 the conditional and
    unconditional calls are one batch of 2B, and every cond tensor is repeated to match.
    """
    if omega == 1.0 and kappa == 0.0:
        return v
    extra = check_cond(cond, z.shape[0])
    h0 = torch.zeros_like(t)
    null = torch.full_like(y, null_class)
    if kappa == 0.0:
        u_mix = (1.0 - omega) * net(z, t, h0, null, **extra)
    else:
        both = net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([h0, h0]),
                   torch.cat([y, null]), **_repeat(extra, 2))
        u_cond, u_null = both.chunk(2)
        u_mix = kappa * u_cond + (1.0 - omega - kappa) * u_null
    v_tilde = omega * v + u_mix
    if apply is None:
        return v_tilde
    return torch.where(expand_like(apply, v), v_tilde, v)


class MeanFlowLoss:
    """EDM-style MeanFlow loss: ``loss_fn(net, x, y=None) -> (loss_per_sample, stats)``.

    Constructor arguments (paper names; defaults are the paper's ImageNet settings,
    docs/method.md §10), each validated here with a one-line ConfigError:

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
                                           # (see label_drop_mask)
        num_classes      = None            # None: unconditional; null class index = num_classes
        jvp              = "split"         # a JVP_CHOICES name, see meanflow.objective.jvp
        jvp_precision    = "fp32"          # under autocast: JVP in fp32, or "amp" (bf16 too)
        tangent          = "v01"           # JVP tangent (dz, dr, dt) = (v, 0, 1); others are
                                           # the wrong ones of Tab. 1b, for ablations only

    With both layouts "first", dropped labels sit on r = t rows (as long as their count is at
    most the number of r = t rows). Dropped rows always keep the plain v in the target.

    **Draws.** :meth:`draw` makes every random tensor the loss consumes, in this order: (r, t)
    from the time sampler, the noise e, then (class-conditional only) the B label-dropout
    uniforms; the layouts do not change it. A call without ``draws=`` draws with that method.

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
        self.p = check_number("p", p, lo=0.0, hint="use 0 for plain L2, 1 for the paper")
        self.c = check_number("c", c, lo=0.0, lo_open=True,
                              hint="it keeps the adaptive weight finite (the paper uses 1e-3)")
        self.label_drop = check_number("label_drop", label_drop, lo=0.0, hi=1.0,
                                       hint="use e.g. 0.1")
        self.num_classes = check_num_classes(num_classes)
        self.omega = check_number("omega", omega, hint="1 is no guidance")
        self.kappa = check_number("kappa", kappa, lo=0.0, hi=1.0, hi_open=True,
                                  hint="the effective scale is omega / (1 - kappa)")
        if (self.omega != 1.0 or self.kappa != 0.0) and num_classes is None:
            raise ConfigError("guidance (omega != 1 or kappa != 0) needs a class-conditional "
                              "model: set num_classes, or omega=1 and kappa=0")
        self.t_interval = check_interval("t_interval", t_interval)
        self.dudt = JVPStrategy(check_choice("jvp", jvp, JVP_CHOICES),
                                check_choice("tangent", tangent, tuple(TANGENTS),
                                             "'v01' = (v, 0, 1) is the correct one"),
                                check_choice("jvp_precision", jvp_precision, ("fp32", "amp"),
                                             "fp32: JVP outside autocast, amp: inside it")
                                == "amp")
        self.label_drop_rows = label_drop_rows
        self.jvp, self.tangent = jvp, tangent
        self.jvp_autocast = self.dudt.autocast

    @property
    def r_eq_t_rows(self) -> str:
        """The sampler's layout of the r = t rows, "random" or "first"."""
        return self.sampler.r_eq_t_rows

    @property
    def effective_guidance_scale(self) -> float:
        """ω′ = ω / (1 - κ) (docs/method.md §8)."""
        return self.omega / (1.0 - self.kappa)

    @property
    def draw_keys(self) -> tuple[str, ...]:
        """The names of :meth:`draw`'s tensors, in draw order."""
        return ("r", "t", "e") + ((LABEL_DROP_U,) if self.num_classes is not None else ())

    def draw(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Every random tensor one call of the loss on the batch x (B, *S) consumes, drawn from
        ``generator`` (None: the global RNG), in the loss's fixed order:

            "r", "t"        (B,) float32 times with r <= t, from the time sampler
            "e"             (B, *S) noise in x's dtype
            "label_drop_u"  (B,) float32 uniforms of class dropout (class-conditional only)

        ``loss_fn(net, x, y, draws=loss_fn.draw(x, g))`` equals ``loss_fn(net, x, y,
        generator=g)`` bit for bit, and needs no generator inside (a compiled loss call)."""
        return self._draw_missing(x, generator, {})

    def _draw_missing(self, x: Tensor, generator: torch.Generator | None,
                      given: dict[str, Tensor]) -> dict[str, Tensor]:
        # The one place that defines the draw order: what is not given is drawn, in order.
        B, device = x.shape[0], x.device
        draws = dict(given)
        if "t" not in draws:                              # r and t come as a pair
            draws["r"], draws["t"] = self.sampler(B, device, generator)
        if "e" not in draws:
            draws["e"] = torch.randn(x.shape, device=device, dtype=x.dtype, generator=generator)
        if self.num_classes is not None and LABEL_DROP_U not in draws:
            draws[LABEL_DROP_U] = torch.rand(B, device=device, generator=generator)
        return draws

    def __call__(self, net: Net, x: Tensor, y: Tensor | None = None, *,
                 generator: torch.Generator | None = None,
                 draws: Mapping[str, Tensor] | None = None,
                 r: Tensor | None = None, t: Tensor | None = None, e: Tensor | None = None,
                 cond: Cond | None = None,
                 jvp_net: Net | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-sample loss (B,) and a dict of detached scalar stats.

        Args:
            net: backbone ``net(z, t, h, y=None, **cond)``.
            x: (B, *S) data; y: (B,) integer labels (class-conditional) or None.
            generator: drives every random draw that is not given (times, noise, label
                dropout), so a seeded generator makes the step reproducible.
            draws: some or all of :meth:`draw`'s tensors, made beforehand (e.g. outside a
                compiled region, or by hand in tests); the rest are drawn in order. ``r``,
                ``t`` (B,) and ``e`` (B, *S) may also be given as keywords. Given draws are
                validated (shapes always; 0 <= r <= t <= 1 when not compiling).
            cond: extra per-sample conditioning for the network, each value (B, ...), passed
                as keyword arguments to every network call (the grad pass, the JVP, guidance),
                repeated where guidance doubles the batch, constant under the JVP. E.g.
                ``{"aug": labels}`` for a U-Net with augment_dim.
            jvp_net: the same weights, unwrapped: it takes every no-grad network call, the JVP
                and the guidance ones, while ``net`` takes only the grad-carrying forward; that
                is how a DDP wrapper is used (see :func:`meanflow.objective.jvp.u_and_dudt`;
                split strategy only).
        """
        check_batch(x, y, self.num_classes)
        B = x.shape[0]
        given = given_draws(x, draws, r=r, t=t, e=e)
        if ("r" in given) != ("t" in given):
            raise ConfigError("give both r and t, or neither")
        check_draws(given, x, self.draw_keys)
        d = self._draw_missing(x, generator, given)
        extra = check_cond(cond, B)
        r, t, e = d["r"].to(x.dtype), d["t"].to(x.dtype), d["e"]

        tt = expand_like(t, x)
        z = (1 - tt) * x + tt * e
        v = e - x

        v_tilde = v
        if self.num_classes is not None:
            dropped = label_drop_mask(d[LABEL_DROP_U], self.label_drop,
                                      self.label_drop_rows == "first")
            y = torch.where(dropped, torch.full_like(y, self.num_classes), y)
            t_min, t_max = self.t_interval
            apply = (~dropped) & (t >= t_min) & (t <= t_max)
            no_grad_net = net if jvp_net is None else jvp_net
            v_tilde = guided_velocity(no_grad_net, z, t, v, y, self.num_classes, self.omega,
                                      self.kappa, apply, extra)

        u, dudt = self.dudt.u_and_dudt(net, z, r, t, v_tilde, y, jvp_net=jvp_net, cond=extra)
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

