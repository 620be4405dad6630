"""Feature-space sample-quality metrics: Fréchet distance (FID), KID and precision/recall.

All three compare two sets of feature vectors (for FID: Inception-v3 pool3 features, see
docs/method.md §12). Everything is computed in float64.

* :class:`FeatureStats` holds the mean and covariance of a feature set and saves / loads them
  as a ``.npz`` file, so reference statistics are computed once.
* :func:`frechet_distance` is the Fréchet distance between the two Gaussians with those means
  and covariances (FID when the features are Inception features).
* :func:`kid` is the Kernel Inception Distance: the unbiased MMD² with the cubic polynomial
  kernel, averaged over random subsets, with its standard error. Unlike FID it has no bias
  at small sample sizes.
* :func:`precision_recall` estimates how much of the generated set lies on the real data
  manifold (precision: quality) and how much of the real manifold the generated set covers
  (recall: diversity), with k-NN balls as manifold estimates (Kynkäänniemi et al., 2019).
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from meanflow.errors import ConfigError, DataError
from meanflow.fileio import atomic_path

__all__ = ["FeatureStats", "frechet_distance", "kid", "precision_recall"]

ArrayLike = Union[Tensor, np.ndarray]

#: Rows converted to float64 at a time when accumulating statistics (bounds memory).
_STATS_CHUNK = 4096
#: Version tag written into stats files.
_STATS_FORMAT = "meanflow-feature-stats/1"
_STATS_KEYS = ("mu", "sigma", "n", "meta")


def _features_tensor(x: ArrayLike, name: str, min_points: int) -> Tensor:
    """Validate an ``(N, D)`` feature array and return it as a (not yet float64) tensor."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise ConfigError(f"{name} must be a torch.Tensor or numpy array, got "
                          f"{type(x).__name__}; convert it with torch.as_tensor")
    if x.dim() != 2:
        raise ConfigError(f"{name} must be a 2-D (N, D) array of features, got shape "
                          f"{tuple(x.shape)}; flatten each sample's features to one row")
    if x.shape[0] < min_points or x.shape[1] < 1:
        raise ConfigError(f"{name} has shape {tuple(x.shape)}, need at least {min_points} "
                          "rows and 1 feature; give more samples")
    if x.is_complex() or x.dtype == torch.bool:
        raise ConfigError(f"{name} has dtype {x.dtype}; give real-valued features")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ConfigError(f"{name} contains NaN or infinite values; "
                          "drop or fix those samples before scoring")
    return x.detach()


# --------------------------------------------------------------------------------------------
# Feature statistics
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class FeatureStats:
    """Mean ``mu`` (D,) and unbiased covariance ``sigma`` (D, D) of ``n`` feature vectors.

    ``meta`` is free-form JSON-serialisable information (extractor, data set, sample count,
    preprocessing...) that travels with the statistics in the saved file. ``features``
    optionally keeps (a subset of) the raw feature rows as float32, for KID and
    precision/recall, which need more than the first two moments.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    meta: dict[str, Any] = field(default_factory=dict)
    features: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.mu, self.sigma = _check_mu_sigma(self.mu, self.sigma, "stats")
        if isinstance(self.n, bool) or not isinstance(self.n, (int, np.integer)) or self.n < 1:
            raise ConfigError(f"stats.n must be a positive integer, got {self.n!r}; "
                              "pass the number of feature vectors")
        self.n = int(self.n)
        if not isinstance(self.meta, dict):
            raise ConfigError(f"stats.meta must be a dict, got {type(self.meta).__name__}")
        if self.features is not None:
            f = np.asarray(self.features)
            if f.ndim != 2 or f.shape[1] != self.dim or f.shape[0] < 2:
                raise ConfigError(f"stats.features must be (N >= 2, {self.dim}) rows, got "
                                  f"shape {f.shape}")
            self.features = f.astype(np.float32, copy=False)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @classmethod
    def from_features(cls, feats: ArrayLike, meta: dict[str, Any] | None = None,
                      keep: int = 0) -> "FeatureStats":
        """Statistics of ``feats`` (N, D), N >= 2: mean and covariance with divisor N - 1.
        ``keep`` > 0 also keeps the first ``keep`` rows (float32) for KID.

        Rows are converted to float64 chunk by chunk, so a float32 input of tens of thousands
        of 2048-d rows is never copied to float64 as a whole. Two passes (mean, then centred
        outer products) avoid the cancellation of the one-pass ``E[xx^T] - mu mu^T`` formula.
        """
        x = _features_tensor(feats, "feats", min_points=2)
        n, d = x.shape
        total = torch.zeros(d, dtype=torch.float64, device=x.device)
        for start in range(0, n, _STATS_CHUNK):
            total += x[start:start + _STATS_CHUNK].to(torch.float64).sum(0)
        mu = total / n
        scatter = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        for start in range(0, n, _STATS_CHUNK):
            xc = x[start:start + _STATS_CHUNK].to(torch.float64) - mu
            scatter += xc.T @ xc
        sigma = scatter / (n - 1)
        sigma = 0.5 * (sigma + sigma.T)  # exactly symmetric
        kept = (x[:keep].to(torch.float32).cpu().numpy() if keep > 0 and min(n, keep) >= 2
                else None)
        return cls(mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy(), n=n,
                   meta=dict(meta) if meta else {}, features=kept)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``mu``, ``sigma``, ``n`` and ``meta`` (as JSON) to a ``.npz`` file, atomically.

        The file is written next to its destination under a temporary name and renamed into
        place, so a crash never leaves a half-written stats file behind.
        """
        path = Path(path)
        try:
            meta_json = json.dumps(self.meta, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"stats.meta is not JSON-serialisable ({exc}); keep only "
                              "strings, numbers, lists and dicts in meta") from None
        with atomic_path(path) as tmp:
            extra = {} if self.features is None else {"features": self.features}
            np.savez(tmp, mu=self.mu, sigma=self.sigma, n=np.int64(self.n),
                     meta=np.array(meta_json), format=np.array(_STATS_FORMAT), **extra)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        """Read statistics written by :meth:`save`; any problem raises :class:`DataError`."""
        path = Path(path)
        fix = "recompute the statistics (FeatureStats.from_features(...).save(path))"
        if not path.is_file():
            raise DataError(f"feature stats file {path} does not exist; check the path or {fix}")
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive of named arrays")
            with data:
                missing = [k for k in _STATS_KEYS if k not in data.files]
                if missing:
                    raise DataError(f"feature stats file {path} lacks the key(s) "
                                    f"{', '.join(missing)}; {fix}")
                mu = np.array(data["mu"], dtype=np.float64)
                sigma = np.array(data["sigma"], dtype=np.float64)
                n_arr = np.array(data["n"])
                meta_arr = np.array(data["meta"])
                feats = (np.array(data["features"], dtype=np.float32)
                         if "features" in data.files else None)
        except DataError:
            raise
        except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"feature stats file {path} is unreadable or corrupt ({msg}); "
                            f"{fix}") from None
        try:
            if n_arr.shape != () or n_arr.dtype.kind not in "iu":
                raise ValueError(f"n has shape {n_arr.shape} and dtype {n_arr.dtype}")
            if meta_arr.shape != () or meta_arr.dtype.kind != "U":
                raise ValueError("meta is not a JSON string")
            meta = json.loads(str(meta_arr))
            if not isinstance(meta, dict):
                raise ValueError("meta is not a JSON object")
            return cls(mu=mu, sigma=sigma, n=int(n_arr), meta=meta, features=feats)
        except (ValueError, ConfigError) as exc:
            msg = str(exc).splitlines()[0]
            raise DataError(f"feature stats file {path} is malformed ({msg}); {fix}") from None


def _check_mu_sigma(mu: Any, sigma: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(mu, sigma)`` as float64 numpy arrays after checking shapes and finiteness."""
    if isinstance(mu, Tensor):
        mu = mu.detach().cpu().numpy()
    if isinstance(sigma, Tensor):
        sigma = sigma.detach().cpu().numpy()
    try:
        mu = np.asarray(mu, dtype=np.float64)
        sigma = np.asarray(sigma, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: mu and sigma must be real numeric arrays") from None
    if mu.ndim != 1 or mu.shape[0] < 1:
        raise ConfigError(f"{name}: mu must have shape (D,), got {mu.shape}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise ConfigError(f"{name}: sigma must have shape ({d}, {d}) to match mu, got "
                          f"{sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ConfigError(f"{name}: mu or sigma contains NaN or infinite values; recompute the "
                          "statistics from finite features")
    return mu, sigma


def _as_mu_sigma(s: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(s, FeatureStats):
        return s.mu, s.sigma
    if isinstance(s, (tuple, list)) and len(s) == 2:
        return _check_mu_sigma(s[0], s[1], name)
    raise ConfigError(f"{name} must be a FeatureStats or a (mu, sigma) pair, got "
                      f"{type(s).__name__}")


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------


def _psd_factor(sigma: np.ndarray) -> tuple[np.ndarray, float]:
    """Return ``(F, tr)`` with ``F F^T`` the PSD part of ``sigma`` and ``tr`` its trace.

    ``F = U diag(sqrt(max(lambda, 0)))`` from the symmetric eigendecomposition; rounding can
    make eigenvalues of a singular covariance slightly negative, and they are clipped to 0.
    """
    lam, u = np.linalg.eigh(0.5 * (sigma + sigma.T))
    lam = np.clip(lam, 0.0, None)
    return u * np.sqrt(lam), float(lam.sum())


def frechet_distance(a: FeatureStats | tuple[ArrayLike, ArrayLike],
                     b: FeatureStats | tuple[ArrayLike, ArrayLike]) -> float:
    """Fréchet distance ``|mu_a - mu_b|² + tr Sa + tr Sb - 2 tr sqrt(Sa Sb)``, in float64.

    ``a`` and ``b`` are :class:`FeatureStats` or ``(mu, sigma)`` pairs.

    Method (no non-symmetric ``sqrtm``, no ``eps·I`` offset): factor each covariance as
    ``S = F F^T`` with ``F = U sqrt(Λ)`` from ``eigh`` (tiny negative eigenvalues clipped).
    The eigenvalues of ``Sa Sb = Fa Fa^T Fb Fb^T`` are those of ``C C^T`` with
    ``C = Fa^T Fb``, so ``tr sqrt(Sa Sb)`` is the sum of the singular values of ``C``
    (its nuclear norm), computed by an SVD. Singular values carry an absolute error of about
    ``eps·|C|``, whereas taking square roots of computed eigenvalues of ``Sa Sb`` would turn
    the rounding of its (near-)zero eigenvalues into errors of order ``sqrt(eps)`` — which is
    what happens with rank-deficient covariances (fewer samples than features). The traces
    are the sums of the same clipped eigenvalues, so by Cauchy–Schwarz
    (``|C|_* <= |Fa|_F |Fb|_F``) the result is >= 0 up to rounding; a last clamp makes it
    exactly non-negative. For identical inputs the result is 0 up to ``~eps·D·|S|``.
    """
    mu_a, sig_a = _as_mu_sigma(a, "a")
    mu_b, sig_b = _as_mu_sigma(b, "b")
    if mu_a.shape != mu_b.shape:
        raise ConfigError(f"a and b have different feature dimensions ({mu_a.shape[0]} vs "
                          f"{mu_b.shape[0]}); compare statistics of the same feature extractor")
    f_a, tr_a = _psd_factor(sig_a)
    f_b, tr_b = _psd_factor(sig_b)
    tr_sqrt = float(np.linalg.svd(f_a.T @ f_b, compute_uv=False).sum())
    diff = mu_a - mu_b
    value = float(diff @ diff) + tr_a + tr_b - 2.0 * tr_sqrt
    return max(value, 0.0)


# --------------------------------------------------------------------------------------------
# Kernel Inception Distance
# --------------------------------------------------------------------------------------------


def _poly_mmd2(x: Tensor, y: Tensor, unbiased: bool = True) -> float:
    """MMD² of two float64 sets with ``k(u, v) = (u·v / D + 1)^3``.

    ``unbiased=True`` is the U-statistic (diagonals of the within-set kernel matrices left out,
    divisor ``m(m-1)``); ``False`` is the biased V-statistic (diagonals kept, divisor ``m²``),
    whose expectation is positive even for two samples of one distribution.
    """
    d = x.shape[1]
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    m, n = x.shape[0], y.shape[0]
    if unbiased:
        xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
        yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    else:
        xx = k_xx.sum() / (m * m)
        yy = k_yy.sum() / (n * n)
    return float(xx + yy - 2.0 * k_xy.mean())


def _feature_pair(a: Any, b: Any, name_a: str, name_b: str) -> tuple[Tensor, Tensor]:
    """Two (N, D) float64 feature sets of the same D, at least 2 points each."""
    x = _features_tensor(a, name_a, min_points=2)
    y = _features_tensor(b, name_b, min_points=2)
    if x.shape[1] != y.shape[1]:
        raise ConfigError(f"{name_a} and {name_b} have different dimensions ({x.shape[1]} vs "
                          f"{y.shape[1]}); use features of the same extractor")
    return x, y


def kid(feats_a: ArrayLike, feats_b: ArrayLike, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0, generator: torch.Generator | None = None) -> tuple[float, float]:
    """Kernel Inception Distance: ``(mean, standard error)`` of the unbiased MMD².

    The kernel is ``k(x, y) = (x·y / D + 1)^3``. For each of ``subsets`` rounds, ``m`` rows of
    each set are drawn without replacement, with ``m = min(subset_size, N_a, N_b)``, and the
    unbiased MMD² of the two subsets is computed; the result is the mean over rounds and
    ``std(ddof=1) / sqrt(subsets)``. The mean can be slightly negative: that is the unbiased
    estimator working, not a bug. ``generator`` (a CPU ``torch.Generator``) overrides ``seed``.
    Note that when ``m`` equals both set sizes every round sees the same points and the
    standard error is 0; it measures subset-sampling noise only.
    """
    x, y = _feature_pair(feats_a, feats_b, "feats_a", "feats_b")
    if isinstance(subsets, bool) or not isinstance(subsets, int) or subsets < 2:
        raise ConfigError(f"subsets must be an integer >= 2 (a standard error needs two), "
                          f"got {subsets!r}")
    if isinstance(subset_size, bool) or not isinstance(subset_size, int) or subset_size < 2:
        raise ConfigError(f"subset_size must be an integer >= 2, got {subset_size!r}")
    x = x.to(torch.float64)
    y = y.to(device=x.device, dtype=torch.float64)
    m = min(subset_size, x.shape[0], y.shape[0])
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        ia = torch.randperm(x.shape[0], generator=gen)[:m].to(x.device)
        ib = torch.randperm(y.shape[0], generator=gen)[:m].to(x.device)
        values.append(_poly_mmd2(x[ia], y[ib], unbiased=True))
    v = np.asarray(values)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(subsets))


# --------------------------------------------------------------------------------------------
# Precision and recall (k-NN manifolds)
# --------------------------------------------------------------------------------------------

#: Rows per block of pairwise distances (a block is ``_PR_CHUNK × N`` float64 values).
_PR_CHUNK = 512


def _knn_radii(x: Tensor, k: int) -> Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row (the row itself excluded)."""
    radii = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], _PR_CHUNK):
        d = torch.cdist(x[start:start + _PR_CHUNK], x)
        # The k+1 smallest include the point itself at distance 0.
        radii[start:start + _PR_CHUNK] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return radii


def _coverage(manifold: Tensor, radii: Tensor, queries: Tensor) -> float:
    """Share of ``queries`` within ``radii[i]`` of some ``manifold[i]``."""
    inside = 0
    for start in range(0, queries.shape[0], _PR_CHUNK):
        d = torch.cdist(queries[start:start + _PR_CHUNK], manifold)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(real: ArrayLike, fake: ArrayLike, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) of ``fake`` against ``real``.

    Each set's manifold is the union of balls around its points, the radius of a ball being
    the distance to the point's k-th nearest neighbour within its own set. Precision is the
    share of fake points inside the real manifold (sample quality); recall is the share of
    real points inside the fake manifold (coverage / diversity). Distances are float64 and
    computed in blocks, so memory is ``O(chunk · N)`` and ~10k points per set are fine.
    """
    x, y = _feature_pair(real, fake, "real", "fake")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    if k >= min(x.shape[0], y.shape[0]):
        raise ConfigError(f"k = {k} needs more than k points in each set, got "
                          f"{x.shape[0]} real and {y.shape[0]} fake; lower k or add samples")
    x = x.to(torch.float64)
    y = y.to(device=x.device, dtype=torch.float64)
    precision = _coverage(x, _knn_radii(x, k), y)
    recall = _coverage(y, _knn_radii(y, k), x)
    return precision, recall
