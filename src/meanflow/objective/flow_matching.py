"""Plain (conditional) flow matching, the baseline MeanFlow is compared with (docs/method.md §1).

Time convention: **t = 0 is data, t = 1 is noise**; z_t = (1 - t)·x + t·e, v = e - x. The same
backbone is used with h = 0, so it predicts the instantaneous velocity v(z, t) = u(z, t, t).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor

from meanflow.objective.checks import (check_choice, check_num_classes, check_number,
                                       check_row_layout)
from meanflow.objective.meanflow_loss import (LABEL_DROP_U, check_batch, check_cond,
                                              check_draws, check_output, expand_like,
                                              given_draws, label_drop_mask)
from meanflow.objective.time_sampler import TimeSampler

__all__ = ["FlowMatchingLoss"]


class FlowMatchingLoss:
    """``loss_fn(net, x, y=None) -> (loss_per_sample, stats)`` with loss = ||v_θ(z_t, t) - v||²
    summed over elements. Constructor arguments, each validated here (one-line ConfigError):

        time_sampler = "logit_normal"  # t ~ LN(mu, sigma); or "uniform" ("v1" is MeanFlow's)
        mu, sigma    = -0.4, 1.0
        label_drop   = 0.1             # for class-conditional models (null class = num_classes)
        num_classes  = None
        label_drop_rows = "random"     # "random": each label alone; "first": a
                                       # Binomial(B, label_drop) count of leading rows (JAX)

    **Draws.** :meth:`draw` makes every random tensor the loss consumes, in the order t, noise
    e, label-dropout uniforms (class-conditional only); a call without ``draws=`` uses it.
    """

    def __init__(self, *, time_sampler: str = "logit_normal", mu: float = -0.4,
                 sigma: float = 1.0, label_drop: float = 0.1,
                 num_classes: int | None = None, label_drop_rows: str = "random") -> None:
        check_choice("time_sampler", time_sampler, ("logit_normal", "uniform"),
                     "'v1' draws r too and is MeanFlow-only")
        self.sampler = TimeSampler(kind=time_sampler, mu=mu, sigma=sigma, fraction_r_neq_t=0.0)
        self.label_drop = check_number("label_drop", label_drop, lo=0.0, hi=1.0,
                                       hint="use e.g. 0.1")
        self.num_classes = check_num_classes(num_classes)
        self.label_drop_rows = check_row_layout("label_drop_rows", label_drop_rows)

    @property
    def draw_keys(self) -> tuple[str, ...]:
        """The names of :meth:`draw`'s tensors, in draw order."""
        return ("t", "e") + ((LABEL_DROP_U,) if self.num_classes is not None else ())

    def draw(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Every random tensor one call on the batch x (B, *S) consumes, from ``generator``
        (None: the global RNG), in order: "t" (B,) float32, "e" (B, *S) in x's dtype,
        "label_drop_u" (B,) float32 (class-conditional only). Passing them back as ``draws=``
        gives the same result as ``generator=`` bit for bit."""
        return self._draw_missing(x, generator, {})

    def _draw_missing(self, x: Tensor, generator: torch.Generator | None,
                      given: dict[str, Tensor]) -> dict[str, Tensor]:
        # The one place that defines the draw order: what is not given is drawn, in order.
        B, device = x.shape[0], x.device
        draws = dict(given)
        if "t" not in draws:
            draws["t"] = self.sampler.sample_t(B, device, generator)
        if "e" not in draws:
            draws["e"] = torch.randn(x.shape, device=device, dtype=x.dtype, generator=generator)
        if self.num_classes is not None and LABEL_DROP_U not in draws:
            draws[LABEL_DROP_U] = torch.rand(B, device=device, generator=generator)
        return draws

    def __call__(self, net: Callable[..., Tensor], x: Tensor, y: Tensor | None = None, *,
                 generator: torch.Generator | None = None,
                 draws: Mapping[str, Tensor] | None = None, t: Tensor | None = None,
                 e: Tensor | None = None,
                 cond: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-sample loss (B,) and detached scalar stats (``loss``, ``mse``, ``u_minus_v``, all
        the mean squared error). ``generator``, ``draws`` (or ``t=``, ``e=``) and ``cond`` as in
        :meth:`meanflow.objective.MeanFlowLoss.__call__`."""
        check_batch(x, y, self.num_classes)
        given = given_draws(x, draws, t=t, e=e)
        check_draws(given, x, self.draw_keys)
        d = self._draw_missing(x, generator, given)
        extra = check_cond(cond, x.shape[0])
        t, e = d["t"].to(x.dtype), d["e"]
        if self.num_classes is not None:
            dropped = label_drop_mask(d[LABEL_DROP_U], self.label_drop,
                                      self.label_drop_rows == "first")
            y = torch.where(dropped, torch.full_like(y, self.num_classes), y)
        tt = expand_like(t, x)
        z = (1 - tt) * x + tt * e
        v = e - x
        v_pred = check_output(net(z, t, torch.zeros_like(t), y, **extra), z)
        err = (v_pred - v).pow(2).flatten(1).sum(1)
        with torch.no_grad():
            stats = {"loss": err.mean().detach(), "mse": err.mean().detach(),
                     "u_minus_v": err.mean().detach()}
        return err, stats
