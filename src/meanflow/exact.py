"""Exact flow fields of an isotropic Gaussian mixture: the truth MeanFlow is trying to learn.

Time convention (as everywhere in meanflow): **t = 0 is data, t = 1 is noise**. The path is
z_t = (1 - t)·x + t·e with x ~ Σ_k π_k N(m_k, s² I) and e ~ N(0, I); the conditional velocity is
v = e - x.

Given the component k, (x, e) is Gaussian, so z_t | k ~ N((1 - t)·m_k, σ_t² I) with

    σ_t² = (1 - t)²·s² + t²,

and v and z_t are jointly Gaussian with E[v | k] = -m_k and Cov(v, z_t | k) = (t - (1 - t)·s²)·I.
Gaussian regression gives the per-component conditional mean

    E[v | z_t = z, k] = -m_k + (t - (1 - t)·s²) / σ_t² · (z - (1 - t)·m_k),

and the **marginal velocity** is its posterior average over the components,

    v(z, t) = Σ_k w_k(z, t)·E[v | z_t = z, k],   w_k ∝ π_k·N(z; (1 - t)·m_k, σ_t² I).

(σ_t is common to all components, so w_k is a softmax of log π_k - |z - (1 - t)m_k|² / (2σ_t²).)
For s > 0, σ_t² >= s² / (1 + s²) > 0 on all of [0, 1], so nothing divides by zero: at t = 0,
v(z, 0) = -z (E[e | x] = 0), and at t = 1 every w_k = π_k and v(z, 1) = z - Σ π_k m_k.

The marginal ODE dz/ds = v(z, s) moves samples of p_t to samples of p_r. It has no closed form
for K > 1; :meth:`GaussianMixtureFlow.flow` integrates it with classical RK4 in float64. The
**average velocity** is u(z_t, r, t) = (z_t - z_r) / (t - r) = 1/(t - r)·∫_r^t v(z_s, s) ds; it
is computed as the mean of the RK4 slopes over equal sub-steps, which is the same number but has
no 0/0 as r -> t (it tends to v(z, t) continuously, and equals it at r = t). The exact 1-step
map from noise to data is z_0 = flow(e, t = 1, r = 0) = e - u(e, 0, 1).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from meanflow.data import EightGaussians
from meanflow.errors import ConfigError

__all__ = ["GaussianMixtureFlow", "DEFAULT_STEPS"]

#: RK4 steps per call: the 8-Gaussian ring's 1-step map is then within ~1e-7 of its limit
#: (largest error over 4000 noise points; 100 steps: ~2e-6, 400 steps: ~7e-9).
DEFAULT_STEPS = 200


def _times(value: float | Tensor, batch: int, like: Tensor) -> Tensor:
    """A time (a number or a (B,) tensor) as a (B, 1) float64 column on ``like``'s device."""
    t = torch.as_tensor(value, dtype=torch.float64, device=like.device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ConfigError(f"a time must be a number or a ({batch},) tensor, got shape "
                          f"{tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or bool((t > 1).any()):
        raise ConfigError("times must lie in [0, 1] (t = 0 is data, t = 1 is noise)")
    return t.reshape(batch, 1)


class GaussianMixtureFlow:
    """Exact marginal velocity, flow, average velocity and 1-step map of an isotropic Gaussian
    mixture Σ_k π_k N(m_k, s² I) on the linear path z_t = (1 - t)·x + t·e (module docstring).

    Args:
        means: (K, D) component means m_k.
        std: common per-coordinate standard deviation s (> 0).
        weights: (K,) mixture weights π_k (normalised here); None for equal weights.

    All computations are in float64; inputs are cast, outputs are float64 on the input's device.
    """

    def __init__(self, means: Tensor | Sequence[Sequence[float]], std: float,
                 weights: Tensor | Sequence[float] | None = None) -> None:
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ConfigError(f"means must be a (K, D) tensor, got shape {tuple(means.shape)}")
        std = float(std)
        if not math.isfinite(std) or std <= 0:
            raise ConfigError(f"std={std!r} must be > 0: with s = 0 the velocity is singular "
                              "at t = 0")
        if weights is None:
            weights = torch.full((means.shape[0],), 1.0 / means.shape[0], dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (means.shape[0],) or bool((weights <= 0).any()):
            raise ConfigError(f"weights must be ({means.shape[0]},) positive numbers")
        self.means = means
        self.std = std
        self.weights = weights / weights.sum()
        self.log_weights = self.weights.log()

    @classmethod
    def from_eight_gaussians(cls, dataset: object | None = None) -> "GaussianMixtureFlow":
        """The mixture of :class:`meanflow.data.EightGaussians` (default radius 4, std 0.5):
        eight equally weighted components at radius·(cos 2πk/8, sin 2πk/8). The means are
        recomputed in float64 from the dataset's radius (its ``centers`` are float32)."""
        if dataset is None:
            dataset = EightGaussians()
        radius, std = float(dataset.radius), float(dataset.std)
        angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
        return cls(means, std)

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def _check_points(self, z: Tensor) -> Tensor:
        if not isinstance(z, Tensor) or z.ndim != 2 or z.shape[1] != self.dim:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ConfigError(f"points must be a (B, {self.dim}) tensor, got {shape}")
        return z.to(torch.float64)

    def sigma2(self, t: Tensor) -> Tensor:
        """σ_t² = (1 - t)²s² + t², the per-coordinate variance of z_t given a component."""
        return (1 - t) ** 2 * self.std ** 2 + t ** 2

    def _log_joint(self, z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(B, K) log π_k + log N(z; (1 - t)m_k, σ_t² I), and σ_t² (B, 1); t is (B, 1)."""
        s2 = self.sigma2(t)
        means = self.means.to(z.device)
        sq = ((z[:, None, :] - (1 - t)[:, :, None] * means[None]) ** 2).sum(-1)     # (B, K)
        log_norm = -0.5 * self.dim * torch.log(2 * math.pi * s2)                    # (B, 1)
        return self.log_weights.to(z.device) + log_norm - sq / (2 * s2), s2

    def log_density(self, z: Tensor, t: float | Tensor) -> Tensor:
        """log p_t(z) of the marginal of z_t, shape (B,)."""
        z = self._check_points(z)
        t = _times(t, z.shape[0], z)
        return torch.logsumexp(self._log_joint(z, t)[0], dim=1)

    def posterior(self, z: Tensor, t: float | Tensor) -> Tensor:
        """(B, K) posterior weights w_k(z, t) = P(component k | z_t = z)."""
        z = self._check_points(z)
        t = _times(t, z.shape[0], z)
        return torch.softmax(self._log_joint(z, t)[0], dim=1)

    def _velocity(self, z: Tensor, t: Tensor) -> Tensor:
        """v(z, t) for float64 z (B, D) and t (B, 1), unchecked (the RK4 inner loop)."""
        log_joint, s2 = self._log_joint(z, t)
        w = torch.softmax(log_joint, dim=1)                                          # (B, K)
        gain = (t - (1 - t) * self.std ** 2) / s2                                    # (B, 1)
        mean_m = w @ self.means.to(z.device)                                         # Σ w_k m_k
        # Σ_k w_k (-m_k + gain·(z - (1 - t) m_k)) = gain·z - (1 + gain·(1 - t))·Σ_k w_k m_k
        return gain * z - (1 + gain * (1 - t)) * mean_m

    def marginal_velocity(self, z: Tensor, t: float | Tensor) -> Tensor:
        """v(z, t) = E[e - x | z_t = z], shape (B, D) float64 (closed form, module docstring)."""
        z = self._check_points(z)
        return self._velocity(z, _times(t, z.shape[0], z))

    def _integrate(self, z: Tensor, t: float | Tensor, r: float | Tensor,
                   steps: int) -> tuple[Tensor, Tensor]:
        """RK4 from time t to time r (either direction, per sample) in ``steps`` equal steps.

        Returns (z_r, mean slope); the mean slope ū satisfies z_r = z_t + (r - t)·ū, i.e. it
        is the average velocity u(z_t, r, t) when r < t (and v(z_t, t) when r = t)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps={steps!r} must be a positive integer")
        z = self._check_points(z)
        B = z.shape[0]
        t, r = _times(t, B, z), _times(r, B, z)
        ds = (r - t) / steps
        slope_sum = torch.zeros_like(z)
        for i in range(steps):
            s = t + i * ds
            k1 = self._velocity(z, s)
            k2 = self._velocity(z + 0.5 * ds * k1, s + 0.5 * ds)
            k3 = self._velocity(z + 0.5 * ds * k2, s + 0.5 * ds)
            k4 = self._velocity(z + ds * k3, s + ds)
            slope = (k1 + 2 * k2 + 2 * k3 + k4) / 6
            z = z + ds * slope
            slope_sum = slope_sum + slope
        return z, slope_sum / steps

    def flow(self, z: Tensor, t: float | Tensor, r: float | Tensor,
             steps: int = DEFAULT_STEPS) -> Tensor:
        """The ODE map z_t -> z_r of dz/ds = v(z, s) (RK4, ``steps`` steps, float64).

        ``t`` and ``r`` are numbers or (B,) tensors in [0, 1]; r < t moves towards the data."""
        return self._integrate(z, t, r, steps)[0]

    def average_velocity(self, z: Tensor, r: float | Tensor, t: float | Tensor,
                         steps: int = DEFAULT_STEPS) -> Tensor:
        """u(z, r, t) = (z - flow(z, t, r)) / (t - r) for r <= t; v(z, t) where r = t.

        Computed as the mean RK4 slope (no cancellation as r -> t)."""
        z = self._check_points(z)
        B = z.shape[0]
        if bool((_times(r, B, z) > _times(t, B, z)).any()):
            raise ConfigError("the average velocity needs r <= t for every sample")
        return self._integrate(z, t, r, steps)[1]

    def one_step_map(self, e: Tensor, steps: int = DEFAULT_STEPS) -> Tensor:
        """The exact noise-to-data map e -> z_0 = flow(e, 1, 0) = e - u(e, 0, 1)."""
        return self.flow(e, 1.0, 0.0, steps)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n data points x ~ Σ π_k N(m_k, s² I), float64, drawn from ``generator``."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[k] + self.std * noise

    def __repr__(self) -> str:
        return f"GaussianMixtureFlow(K={self.means.shape[0]}, dim={self.dim}, std={self.std})"
