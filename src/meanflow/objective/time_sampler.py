"""Sampling of the time pair (r, t) with 0 <= r <= t <= 1 (paper §4.3; docs/method.md §7).

Time convention used everywhere in meanflow: **t = 0 is data, t = 1 is noise**.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from meanflow.objective.checks import (ROW_LAYOUTS, check_choice, check_number,
                                       check_row_layout)

# check_row_layout and ROW_LAYOUTS live in objective/checks.py; kept importable from here
__all__ = ["TimeSampler", "TIME_SAMPLERS", "ROW_LAYOUTS", "check_row_layout"]

TIME_SAMPLERS = ("logit_normal", "uniform", "v1")


@dataclass(frozen=True)
class TimeSampler:
    """Draws (r, t) per sample.

    kind             -- "logit_normal": two draws of LN(mu, sigma), t = max, r = min (paper);
                        "uniform": the same with U(0, 1);
                        "v1": t ~ LN(mu, sigma) and r ~ LN(mu_r, sigma_r) independently,
                        then r := min(r, t) (the improved CIFAR-10 sampler, not in the paper).
    mu, sigma        -- logit-normal parameters of t (and of r, except for "v1").
    mu_r, sigma_r    -- logit-normal parameters of r for "v1" only.
    fraction_r_neq_t -- share f of samples that keep r != t; the others get r := t. The paper's
                        ImageNet default is 0.25 (Tab. 1a); CIFAR-10 uses 0.75.
    r_eq_t_rows      -- how the r := t samples are chosen:
                        "random": each sample independently, keeping r != t with probability f
                        (one extra uniform draw per sample; the official PyTorch code);
                        "first": no extra draw; the first n_eq = floor(B·(1 - f)) rows of every
                        batch of B get r := t and the rest keep their two draws (the official
                        JAX ImageNet code). The share of r != t is then exactly (B - n_eq) / B.

    The (r, t) draws themselves, and their order in the generator, do not depend on
    ``r_eq_t_rows``.
    """

    kind: str = "logit_normal"
    mu: float = -0.4
    sigma: float = 1.0
    fraction_r_neq_t: float = 0.25
    mu_r: float = -4.0
    sigma_r: float = 1.6
    r_eq_t_rows: str = "random"

    def __post_init__(self) -> None:
        check_choice("time_sampler", self.kind, TIME_SAMPLERS,
                     "logit_normal is the paper's, v1 the improved CIFAR-10 one")
        check_row_layout("r_eq_t_rows", self.r_eq_t_rows)
        check_number("fraction_r_neq_t", self.fraction_r_neq_t, lo=0.0, hi=1.0,
                     hint="give a fraction such as 0.25")
        for name in ("sigma", "sigma_r"):
            check_number(name, getattr(self, name), lo=0.0, lo_open=True,
                         hint="the logit-normal needs a positive standard deviation such as 1.0")
        for name in ("mu", "mu_r"):
            check_number(name, getattr(self, name), hint="e.g. -0.4")

    def num_r_eq_t(self, batch_size: int) -> int:
        """n_eq = floor(batch_size·(1 - fraction_r_neq_t)), the number of leading rows with
        r = t under ``r_eq_t_rows="first"``. A 1e-9 slack absorbs the rounding of 1 - f in
        binary floating point (B = 10, f = 0.9 gives 1 row, not 0)."""
        return max(0, min(batch_size,
                          math.floor(batch_size * (1.0 - self.fraction_r_neq_t) + 1e-9)))

    def _draw(self, mu: float, sigma: float, n: int, device: torch.device,
              generator: torch.Generator | None) -> Tensor:
        if self.kind == "uniform":
            return torch.rand(n, device=device, generator=generator)
        noise = torch.randn(n, device=device, generator=generator)
        return torch.sigmoid(mu + sigma * noise)

    def sample_t(self, batch_size: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> Tensor:
        """One time per sample from LN(mu, sigma) (or U(0, 1)), shape (batch_size,). Used by
        flow matching, which needs no r."""
        return self._draw(self.mu, self.sigma, batch_size, torch.device(device), generator)

    def __call__(self, batch_size: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Returns (r, t), each of shape (batch_size,), float32, with r <= t. Under
        ``r_eq_t_rows="first"`` rows [0, n_eq) have r = t, see :meth:`num_r_eq_t`."""
        device = torch.device(device)
        if self.kind == "v1":
            t = self._draw(self.mu, self.sigma, batch_size, device, generator)
            r = self._draw(self.mu_r, self.sigma_r, batch_size, device, generator)
        else:
            a = self._draw(self.mu, self.sigma, batch_size, device, generator)
            b = self._draw(self.mu, self.sigma, batch_size, device, generator)
            t, r = torch.maximum(a, b), torch.minimum(a, b)
        if self.r_eq_t_rows == "first":
            keep = torch.arange(batch_size, device=device) >= self.num_r_eq_t(batch_size)
        else:
            keep = (torch.rand(batch_size, device=device, generator=generator)
                    < self.fraction_r_neq_t)
        r = torch.where(keep, r, t)
        return torch.minimum(r, t), t
