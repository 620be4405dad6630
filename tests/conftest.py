"""Shared test helpers: a tiny MLP factory and the exact Gaussian oracle of the linear path."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from meanflow.models import build_model


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Every test net is tiny: one thread is as fast, and it cannot be slowed down by OpenMP
    spin-waiting when another process shares the two cores (seen here: small matmuls many
    times slower with 2 threads than with 1 while another process ran)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class GaussianOracle(nn.Module):
    """Exact average velocity for data x ~ N(m, s² I) on the path z_t = (1 - t)·x + t·e.

    The marginal of z_t is N(m_t, σ_t² I), m_t = (1 - t)·m, σ_t² = (1 - t)²s² + t², and the
    marginal ODE maps z_t affinely to z_r = m_r + (σ_r / σ_t)(z_t - m_t). Hence

        u(z, r, t) = (z - z_r) / (t - r) = -m + k(r, t)·(z - m_t),
        k(r, t) = (σ_t - σ_r) / ((t - r)·σ_t) = ((t + r) - s²(2 - t - r)) / (σ_t (σ_t + σ_r)),

    the last form having no 0/0 at h = t - r = 0 (it gives v(z, t) there). For s = 0 (a point
    mass) k = 1/t exactly. ``shift`` (zero) is a parameter so that backward works; ``wobble``
    adds the z-independent perturbation wobble·(1 + t + h) to every element.
    """

    def __init__(self, m: Tensor, s: float, wobble: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("m", m.to(torch.float64))
        self.s, self.wobble = float(s), float(wobble)
        self.shift = nn.Parameter(torch.zeros_like(self.m))

    def sigma(self, tau: Tensor) -> Tensor:
        return torch.sqrt((1 - tau) ** 2 * self.s ** 2 + tau ** 2)

    def _col(self, a: Tensor, z: Tensor) -> Tensor:
        return a.reshape(-1, *([1] * (z.ndim - 1)))

    def forward(self, z: Tensor, t: Tensor, h: Tensor, y: Tensor | None = None) -> Tensor:
        r = t - h
        if self.s == 0.0:
            k = 1.0 / t
        else:
            st, sr = self.sigma(t), self.sigma(r)
            k = ((t + r) - self.s ** 2 * (2 - t - r)) / (st * (st + sr))
        u = -self.m + self._col(k, z) * (z - self._col(1 - t, z) * self.m)
        return u + self.shift + self.wobble * self._col(1 + t + h, z)

    def marginal_velocity(self, z: Tensor, t: Tensor) -> Tensor:
        """E[e - x | z_t = z] by Gaussian regression: E[v] + Cov(v, z_t)/Var(z_t)·(z - m_t)."""
        cov = t - (1 - t) * self.s ** 2
        return -self.m + self._col(cov / self.sigma(t) ** 2, z) * (z - self._col(1 - t, z) * self.m)

    def flow(self, z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        """The exact ODE map z_t -> z_r."""
        m_t, m_r = self._col(1 - t, z) * self.m, self._col(1 - r, z) * self.m
        return m_r + self._col(self.sigma(r) / self.sigma(t), z) * (z - m_t)


@pytest.fixture
def gaussian_oracle() -> type[GaussianOracle]:
    return GaussianOracle


@pytest.fixture
def tiny_mlp():
    """make(seed=0, dtype=float64, **cfg) -> a small residual MLP (dim 2 unless overridden)."""
    def make(seed: int = 0, dtype: torch.dtype = torch.float64, **cfg) -> nn.Module:
        options = dict(dim=2, width=32, depth=2, emb_dim=16)
        options.update(cfg)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return build_model("mlp", **options).to(dtype)
    return make


class PoolFeatures(nn.Module):
    """A tiny TorchScript-able FID extractor for small images: 2×2 average pool, a linear map
    and tanh (5-d features)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 5)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.lin(torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)))


@pytest.fixture(scope="session")
def pool_extractor(tmp_path_factory) -> Path:
    """The path of a scripted :class:`PoolFeatures` (weights from seed 0)."""
    path = tmp_path_factory.mktemp("extractor") / "feat.pt"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = PoolFeatures().float().eval()
    torch.jit.save(torch.jit.script(net), str(path))
    return path
