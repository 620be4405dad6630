"""The improved MeanFlow (iMF) objective (Geng, Lu, Wu, Shechtman, Kolter, He 2025, arXiv
2512.02012; docs/imf.md).

Time convention as everywhere in meanflow: **t = 0 is data, t = 1 is noise**, z = (1 - t)·x +
t·e and the conditional velocity v_c = e - x. The network takes (z, t, h = t - r, y) and the
guidance conditions ω, [t_min, t_max] as keywords, and has two heads on one trunk:

    net(z, t, h, y=None, *, omega=None, t_min=None, t_max=None, v_head=False)
        -> u                (v_head=False)
        -> (u, v)           (v_head=True)

(None for omega / t_min / t_max means ω = 1 and the interval [0, 1]). One step, as
docs/imf.md §2-6 states it:

1. (r, t) from the time sampler, the first half of the batch with r = t; noise e.
2. A guidance interval and scale per sample; r = t rows get the interval [0, 1].
3. No-grad v-head calls at h = 0 give v̂ (label y, scale ω′) and v^u (null label, scale 1),
   ω′ = ω inside the sample's interval and 1 outside; the target is
   ṽ = v_c + (1 - 1/ω′)·(v̂ - v^u).
4. Label dropout: dropped rows get the null label and ṽ = v_c, but keep v̂ as tangent.
5. One JVP of u along (dz, dr, dt) = (v̂, 0, 1) gives u, du/dt and the v-head's v.
6. V = u + (t - r)·sg(du/dt); L_u = ||V - sg(ṽ)||², L_v = ||v - sg(ṽ)||², each divided by
   sg((L + c)^p); the loss is L_u + L_v per sample.

The "boundary" variant has no v-head: v̂ is u(z, t, h = 0) and the loss is L_u alone.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from torch import Tensor

from meanflow.errors import ConfigError
from meanflow.objective.checks import (check_choice, check_interval, check_num_classes,
                                       check_number, check_row_layout)
from meanflow.objective.jvp import JVP_CHOICES, JVPStrategy
from meanflow.objective.meanflow_loss import (LABEL_DROP_U, adaptive_weight, check_batch,
                                              check_cond, check_draws, check_output,
                                              expand_like, given_draws, label_drop_mask)
from meanflow.objective.time_sampler import TimeSampler

__all__ = ["IMFLoss", "IMF_VARIANTS", "JVP_VELOCITIES", "GUIDANCE_KEYS",
           "sample_guidance_scale", "guidance_scale_cdf", "sample_guidance_interval",
           "effective_guidance_scale", "imf_guided_velocity"]

Net = Callable[..., Tensor]
Cond = Mapping[str, Tensor]

# "v_head": a second head predicts v (the official code); "boundary": v is u at h = 0
IMF_VARIANTS = ("v_head", "boundary")
# the z-tangent of the JVP: "predicted" = the network's v̂ (iMF), "target" = ṽ (as in MeanFlow)
JVP_VELOCITIES = ("predicted", "target")
# the keywords of the guidance conditions in a network call; a cond mapping may not use them
GUIDANCE_KEYS = ("omega", "t_min", "t_max", "v_head")


def guidance_scale_cdf(omega: Tensor, omega_range: tuple[float, float] = (1.0, 8.0),
                       beta: float = 1.0) -> Tensor:
    """P(ω' <= omega) for ω' on [lo, hi] with density ∝ ω'^(-beta) (docs/imf.md §3)."""
    lo, hi = omega_range
    w = omega.clamp(lo, hi)
    if lo == hi:
        return (omega >= hi).to(omega.dtype)
    span = math.log(hi / lo)
    if beta == 1.0:
        return torch.log(w / lo) / span
    a = 1.0 - beta
    return torch.expm1(a * torch.log(w / lo)) / math.expm1(a * span)


def sample_guidance_scale(u: Tensor, omega_range: tuple[float, float] = (1.0, 8.0),
                          beta: float = 1.0) -> Tensor:
    """ω from uniforms u in [0, 1] (any shape) by the inverse of :func:`guidance_scale_cdf`:
    ω = lo·(hi/lo)^u for beta = 1, ω = lo·(1 + u·((hi/lo)^(1-beta) - 1))^(1/(1-beta))
    otherwise (docs/imf.md §3). beta = 0 is uniform on [lo, hi]; the defaults give ω = 8^u."""
    lo, hi = omega_range
    span = math.log(hi / lo)
    if beta == 1.0:
        return lo * torch.exp(u * span)
    a = 1.0 - beta
    return lo * torch.exp(torch.log1p(u * math.expm1(a * span)) / a)


def sample_guidance_interval(u_min: Tensor, u_max: Tensor,
                             t_min_range: tuple[float, float] = (0.0, 0.5),
                             t_max_range: tuple[float, float] = (0.5, 1.0)
                             ) -> tuple[Tensor, Tensor]:
    """(t_min, t_max) uniform on their ranges, from uniforms u_min, u_max in [0, 1]
    (docs/imf.md §3). The loss replaces them by [0, 1] on r = t rows."""
    (a0, a1), (b0, b1) = t_min_range, t_max_range
    return a0 + (a1 - a0) * u_min, b0 + (b1 - b0) * u_max


def effective_guidance_scale(omega: Tensor, t: Tensor, t_min: Tensor, t_max: Tensor) -> Tensor:
    """ω′ = ω where t_min <= t <= t_max, else 1 (all (B,)); docs/imf.md §4."""
    inside = (t >= t_min) & (t <= t_max)
    return torch.where(inside, omega, torch.ones_like(omega))


def _checked(out: object, z: Tensor, head: str) -> Tensor:
    if head == "v":
        if not isinstance(out, tuple) or len(out) != 2:
            raise ConfigError(f"net(..., v_head=True) returned {type(out).__name__}: a backbone "
                              "with a v-head returns (u, v); without one use variant='boundary'")
        out = out[1]
    return check_output(out, z)


@torch.no_grad()
def imf_guided_velocity(net: Net, z: Tensor, t: Tensor, v: Tensor, y: Tensor | None,
                        omega: Tensor | None, t_min: Tensor | None, t_max: Tensor | None,
                        null_class: int | None, *, variant: str = "v_head",
                        cond: Cond | None = None) -> tuple[Tensor, Tensor]:
    """(ṽ, v̂), both shaped like v: the guided target and the network's instantaneous velocity
    that serves as the JVP tangent (docs/imf.md §4). No gradient.

    With ``omega`` (B,): ω′ = :func:`effective_guidance_scale`; one call of 2B rows at h = 0
    and interval [0, 1] gives v̂ = V(z | y, ω′) and v^u = V(z | null_class, 1), and
    ṽ = v + (1 - 1/ω′)·(v̂ - v^u). V is the v-head (``variant="v_head"``) or u itself
    ("boundary"). With ``omega=None`` (no guidance: an unconditional model) there is one call
    of B rows without guidance keywords and ṽ = v. ``cond`` values (B, ...) reach every call,
    repeated for the doubled batch."""
    extra = check_cond(cond, z.shape[0])
    h0 = torch.zeros_like(t)
    flag = {"v_head": True} if variant == "v_head" else {}
    head = "v" if variant == "v_head" else "u"
    if omega is None:
        v_hat = _checked(net(z, t, h0, y, **flag, **extra), z, head)
        return v, v_hat
    if y is None or null_class is None or t_min is None or t_max is None:
        raise ConfigError("guidance needs labels y, the null class and the interval "
                          "(t_min, t_max): pass them, or omega=None for no guidance")
    w = effective_guidance_scale(omega, t, t_min, t_max)
    both = net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([h0, h0]),
               torch.cat([y, torch.full_like(y, null_class)]),
               omega=torch.cat([w, torch.ones_like(w)]),
               t_min=torch.zeros_like(torch.cat([t, t])), t_max=torch.ones_like(torch.cat([t, t])),
               **flag, **{k: torch.cat([c, c]) for k, c in extra.items()})
    v_hat, v_null = _checked(both, torch.cat([z, z]), head).chunk(2)
    v_tilde = v + expand_like(1.0 - 1.0 / w, v) * (v_hat - v_null)
    return v_tilde, v_hat


def _check_range(name: str, value: object) -> tuple[float, float]:
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a)
        for a in value)
    if not ok or not 1.0 <= value[0] <= value[1]:
        raise ConfigError(f"{name}={value!r} must be [omega_min, omega_max] with "
                          "1 <= omega_min <= omega_max, e.g. [1, 8]")
    return float(value[0]), float(value[1])


class IMFLoss:
    """Improved MeanFlow loss: ``loss_fn(net, x, y=None) -> (loss_per_sample, stats)``.

    Constructor arguments (defaults: the official ImageNet code, docs/imf.md §7), each
    validated here with a one-line ConfigError:

        variant          = "v_head"        # or "boundary" (no v-head, v̂ = u at h = 0)
        time_sampler     = "logit_normal"  # or "uniform"; t = max, r = min of two draws
        mu, sigma        = -0.4, 1.0
        fraction_r_neq_t = 0.5             # share of rows keeping r != t
        r_eq_t_rows      = "first"         # the first floor(B·(1 - f)) rows get r = t, or
                                           # "random" (see TimeSampler)
        omega_range      = (1.0, 8.0)      # guidance scale ω, density ∝ ω^(-beta)
        beta             = 1.0             # 1: log-uniform (ω = 8^U), 0: uniform
        t_min_range      = (0.0, 0.5)      # t_min ~ U(t_min_range), t_max ~ U(t_max_range);
        t_max_range      = (0.5, 1.0)      # r = t rows get [0, 1]
        label_drop       = 0.1             # class dropout to the null class (num_classes)
        label_drop_rows  = "first"         # a Binomial(B, p) count of leading rows, or
                                           # "random" (see label_drop_mask)
        num_classes      = None            # None: unconditional, no guidance
        p, c             = 1.0, 0.01       # each term divided by sg((L + c)^p)
        jvp              = "split"         # a JVP_CHOICES name
        jvp_precision    = "fp32"          # under autocast: JVP in fp32, or "amp"
        jvp_velocity     = "predicted"     # z-tangent: v̂ (iMF) or "target" ṽ (MeanFlow's)

    **Draws.** :meth:`draw` makes every random tensor the loss consumes, in this order (the
    official code's): (r, t), the noise e, then for a class-conditional loss the interval
    "t_min", "t_max", the scale "omega" (each (B,), values before the r = t rows are set to
    [0, 1]) and the label-dropout uniforms. A call without ``draws=`` draws with it.

    ``stats`` holds detached scalars: ``loss`` (weighted, per sample L_u + L_v), ``mse`` (mean
    raw ||V - ṽ||²), ``mse_v`` (mean raw ||v - ṽ||², v-head only), ``loss_u`` / ``loss_v``
    (the official logs: element means of (V - ṽ)² and (v - ṽ)²), ``u_minus_v`` (mean
    ||u - v_c||²), ``weight`` (mean adaptive weight of L_u), ``omega`` (mean sampled ω) and
    ``frac_r_neq_t``.
    """

    def __init__(self, *, variant: str = "v_head", time_sampler: str = "logit_normal",
                 mu: float = -0.4, sigma: float = 1.0, fraction_r_neq_t: float = 0.5,
                 r_eq_t_rows: str = "first", omega_range: tuple[float, float] = (1.0, 8.0),
                 beta: float = 1.0, t_min_range: tuple[float, float] = (0.0, 0.5),
                 t_max_range: tuple[float, float] = (0.5, 1.0), label_drop: float = 0.1,
                 label_drop_rows: str = "first", num_classes: int | None = None,
                 p: float = 1.0, c: float = 0.01, jvp: str = "split",
                 jvp_precision: str = "fp32", jvp_velocity: str = "predicted") -> None:
        self.variant = check_choice("variant", variant, IMF_VARIANTS,
                                    "v_head needs a backbone with a second head")
        check_choice("time_sampler", time_sampler, ("logit_normal", "uniform"),
                     "iMF draws t and r alike")
        self.sampler = TimeSampler(kind=time_sampler, mu=mu, sigma=sigma,
                                   fraction_r_neq_t=fraction_r_neq_t, r_eq_t_rows=r_eq_t_rows)
        self.omega_range = _check_range("omega_range", omega_range)
        self.beta = check_number("beta", beta, hint="1 gives omega = 8^U, 0 a uniform omega")
        self.t_min_range = check_interval("t_min_range", t_min_range)
        self.t_max_range = check_interval("t_max_range", t_max_range)
        self.label_drop = check_number("label_drop", label_drop, lo=0.0, hi=1.0,
                                       hint="use e.g. 0.1")
        self.label_drop_rows = check_row_layout("label_drop_rows", label_drop_rows)
        self.num_classes = check_num_classes(num_classes)
        self.p = check_number("p", p, lo=0.0, hint="use 0 for plain L2, 1 for the paper")
        self.c = check_number("c", c, lo=0.0, lo_open=True,
                              hint="it keeps the adaptive weight finite (iMF uses 0.01)")
        self.jvp_velocity = check_choice("jvp_velocity", jvp_velocity, JVP_VELOCITIES,
                                         "'predicted' is iMF's tangent")
        self.dudt = JVPStrategy(check_choice("jvp", jvp, JVP_CHOICES), "v01",
                                check_choice("jvp_precision", jvp_precision, ("fp32", "amp"),
                                             "fp32: JVP outside autocast, amp: inside it")
                                == "amp")
        self.jvp = jvp
        self.jvp_autocast = self.dudt.autocast

    @property
    def draw_keys(self) -> tuple[str, ...]:
        """The names of :meth:`draw`'s tensors, in draw order."""
        guided = ("t_min", "t_max", "omega", LABEL_DROP_U)
        return ("r", "t", "e") + (guided if self.num_classes is not None else ())

    def draw(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Every random tensor one call on the batch x (B, *S) consumes, from ``generator``
        (None: the global RNG), in order: "r", "t" (B,) float32; "e" (B, *S) in x's dtype;
        class-conditional only: "t_min", "t_max", "omega" (B,) float32 (each from B
        uniforms, :func:`sample_guidance_interval` and :func:`sample_guidance_scale`) and
        "label_drop_u" (B,) float32. Passing them back as ``draws=`` gives the same result
        as ``generator=`` bit for bit."""
        return self._draw_missing(x, generator, {})

    def _draw_missing(self, x: Tensor, generator: torch.Generator | None,
                      given: dict[str, Tensor]) -> dict[str, Tensor]:
        # The one place that defines the draw order: what is not given is drawn, in order.
        B, device = x.shape[0], x.device
        draws = dict(given)
        if "t" not in draws:
            draws["r"], draws["t"] = self.sampler(B, device, generator)
        if "e" not in draws:
            draws["e"] = torch.randn(x.shape, device=device, dtype=x.dtype, generator=generator)
        if self.num_classes is None:
            return draws
        if "t_min" not in draws:                          # t_min and t_max come as a pair
            u_min = torch.rand(B, device=device, generator=generator)
            u_max = torch.rand(B, device=device, generator=generator)
            draws["t_min"], draws["t_max"] = sample_guidance_interval(
                u_min, u_max, self.t_min_range, self.t_max_range)
        if "omega" not in draws:
            u = torch.rand(B, device=device, generator=generator)
            draws["omega"] = sample_guidance_scale(u, self.omega_range, self.beta)
        if LABEL_DROP_U not in draws:
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
            net: an iMF backbone (the contract in this module's docstring); for
                ``variant="boundary"`` one without ``v_head``.
            x: (B, *S) data; y: (B,) integer labels (class-conditional) or None.
            generator, draws, r, t, e: the random draws, as in
                :meth:`meanflow.objective.MeanFlowLoss.__call__`; see :meth:`draw`.
            cond: extra per-sample conditioning, each value (B, ...), passed to every network
                call (the keys in :data:`GUIDANCE_KEYS` are the loss's own).
            jvp_net: the same weights unwrapped (a DDP wrapper's ``.module``): it takes the
                no-grad calls (guidance and the split strategy's JVP).
        """
        check_batch(x, y, self.num_classes)
        B = x.shape[0]
        given = given_draws(x, draws, r=r, t=t, e=e)
        for a, b in (("r", "t"), ("t_min", "t_max")):
            if (a in given) != (b in given):
                raise ConfigError(f"give both {a} and {b}, or neither")
        check_draws(given, x, self.draw_keys)
        if not torch.compiler.is_compiling() and "omega" in given \
                and bool((given["omega"] <= 0).any()):
            raise ConfigError("the guidance scale omega must be positive (1 is no guidance)")
        d = self._draw_missing(x, generator, given)
        extra = check_cond(cond, B)
        taken = sorted(set(extra) & set(GUIDANCE_KEYS))
        if taken:
            raise ConfigError(f"cond may not set {', '.join(taken)}: the iMF loss passes those "
                              "keywords itself")
        r, t, e = d["r"].to(x.dtype), d["t"].to(x.dtype), d["e"]
        z = (1 - expand_like(t, x)) * x + expand_like(t, x) * e
        v_c = e - x
        no_grad_net = net if jvp_net is None else jvp_net

        v_tilde, v_hat, net_cond, omega = v_c, None, extra, None
        if self.num_classes is not None:
            full = r == t                   # r = t rows: interval [0, 1] (docs/imf.md §3)
            t_min = torch.where(full, torch.zeros_like(t), d["t_min"].to(x.dtype))
            t_max = torch.where(full, torch.ones_like(t), d["t_max"].to(x.dtype))
            omega = d["omega"].to(x.dtype)
            v_tilde, v_hat = imf_guided_velocity(no_grad_net, z, t, v_c, y, omega, t_min,
                                                 t_max, self.num_classes,
                                                 variant=self.variant, cond=extra)
            dropped = label_drop_mask(d[LABEL_DROP_U], self.label_drop,
                                      self.label_drop_rows == "first")
            y = torch.where(dropped, torch.full_like(y, self.num_classes), y)
            v_tilde = torch.where(expand_like(dropped, v_c), v_c, v_tilde)
            net_cond = {**extra, "omega": omega, "t_min": t_min, "t_max": t_max}
        elif self.jvp_velocity == "predicted":
            v_hat = imf_guided_velocity(no_grad_net, z, t, v_c, None, None, None, None, None,
                                        variant=self.variant, cond=extra)[1]
        # docs/imf.md §5: dropped rows keep the class-conditional v̂ as their tangent
        tangent = v_hat if self.jvp_velocity == "predicted" else v_tilde

        if self.variant == "v_head":
            u, dudt, v_pred = self.dudt.u_and_dudt(net, z, r, t, tangent, y, jvp_net=jvp_net,
                                                   cond=net_cond, v_head=True)
            check_output(v_pred, z)
        else:
            u, dudt = self.dudt.u_and_dudt(net, z, r, t, tangent, y, jvp_net=jvp_net,
                                           cond=net_cond)
        check_output(u, z)
        target = v_tilde.detach()
        compound = u + expand_like(t - r, x) * dudt.detach()          # V, docs/imf.md §6
        err_u = (compound - target).pow(2).flatten(1).sum(1)           # (B,)
        w_u = adaptive_weight(err_u, self.p, self.c)
        loss = w_u * err_u
        n = v_c[0].numel()
        stats: dict[str, Tensor] = {}
        if self.variant == "v_head":
            err_v = (v_pred - target).pow(2).flatten(1).sum(1)
            loss = loss + adaptive_weight(err_v, self.p, self.c) * err_v
            stats = {"mse_v": err_v.detach().mean(), "loss_v": err_v.detach().mean() / n}
        with torch.no_grad():
            stats.update({
                "loss": loss.mean().detach(),
                "mse": err_u.mean().detach(),
                "loss_u": err_u.mean().detach() / n,
                "u_minus_v": (u.detach() - v_c).pow(2).flatten(1).sum(1).mean(),
                "weight": w_u.mean().detach(),
                "frac_r_neq_t": (r != t).float().mean(),
            })
            if omega is not None:
                stats["omega"] = omega.mean()
        return loss, stats
