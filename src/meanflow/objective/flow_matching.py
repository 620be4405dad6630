"""Plain (conditional) flow matching, the baseline MeanFlow is compared with (SPEC §1).

Time convention: **t = 0 is data, t = 1 is noise**; z_t = (1 - t)·x + t·e, v = e - x. The same
backbone is used with h = 0, so it predicts the instantaneous velocity v(z, t) = u(z, t, t).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from meanflow.errors import ConfigError
from meanflow.objective.meanflow_loss import check_batch, check_output, drop_labels, expand_like
from meanflow.objective.time_sampler import TimeSampler, check_row_layout

__all__ = ["FlowMatchingLoss"]


class FlowMatchingLoss:
    """``loss_fn(net, x, y=None) -> (loss_per_sample, stats)`` with loss = ||v_θ(z_t, t) - v||²
    summed over elements.

        time_sampler = "logit_normal"  # t ~ LN(mu, sigma); or "uniform"
        mu, sigma    = -0.4, 1.0
        label_drop   = 0.1             # for class-conditional models (null class = num_classes)
        num_classes  = None
        label_drop_rows = "random"     # "random": each label alone; "first": a
                                       # Binomial(B, label_drop) count of leading rows (JAX)

    The random draws come in the order t, noise e, label-dropout uniforms.
    """

    def __init__(self, *, time_sampler: str = "logit_normal", mu: float = -0.4,
                 sigma: float = 1.0, label_drop: float = 0.1,
                 num_classes: int | None = None, label_drop_rows: str = "random") -> None:
        if time_sampler not in ("logit_normal", "uniform"):
            raise ConfigError(f"flow matching samples t with 'logit_normal' or 'uniform', got "
                              f"{time_sampler!r}")
        self.sampler = TimeSampler(kind=time_sampler, mu=mu, sigma=sigma, fraction_r_neq_t=0.0)
        if not (0.0 <= label_drop <= 1.0):
            raise ConfigError(f"label_drop={label_drop!r} is outside [0, 1]: use e.g. 0.1")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ConfigError(f"num_classes={num_classes!r} must be a positive integer or None")
        check_row_layout("label_drop_rows", label_drop_rows)
        self.label_drop = float(label_drop)
        self.label_drop_rows = label_drop_rows
        self.num_classes = num_classes

    def __call__(self, net: Callable[..., Tensor], x: Tensor, y: Tensor | None = None, *,
                 generator: torch.Generator | None = None, t: Tensor | None = None,
                 e: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        check_batch(x, y, self.num_classes)
        B = x.shape[0]
        if t is None:
            t = self.sampler.sample_t(B, x.device, generator)
        elif t.shape != (B,) or (not torch.compiler.is_compiling()   # as in MeanFlowLoss
                                 and (bool((t < 0).any()) or bool((t > 1).any()))):
            raise ConfigError(f"t must have shape ({B},) with values in [0, 1]")
        t = t.to(x.dtype)
        if e is None:
            e = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        elif e.shape != x.shape:
            raise ConfigError(f"noise e must have the shape of x {tuple(x.shape)}")
        if self.num_classes is not None:
            y, _ = drop_labels(y, self.label_drop, self.num_classes, generator,
                               self.label_drop_rows)
        tt = expand_like(t, x)
        z = (1 - tt) * x + tt * e
        v = e - x
        v_pred = check_output(net(z, t, torch.zeros_like(t), y), z)
        err = (v_pred - v).pow(2).flatten(1).sum(1)
        with torch.no_grad():
            stats = {"loss": err.mean().detach(), "mse": err.mean().detach(),
                     "u_minus_v": err.mean().detach()}
        return err, stats
