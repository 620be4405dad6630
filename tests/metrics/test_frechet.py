"""Fréchet distance, KID and precision/recall: closed forms, references and estimator bias."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.linalg
import torch

from meanflow.errors import ConfigError, DataError
from meanflow.metrics import FeatureStats, frechet_distance, kid, precision_recall
from meanflow.metrics import frechet as fr


def randn(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d))


def correlated(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Gaussian features with a random non-diagonal covariance and a shifted mean."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ mix + shift + rng.standard_normal(d) * 0.1


def orthogonal(d: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def scipy_fid(mu1, s1, mu2, s2) -> float:
    """The usual reference: the principal square root of the non-symmetric product."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


# --------------------------------------------------------------------------------- stats ----


def test_from_features_matches_numpy_cov(monkeypatch):
    monkeypatch.setattr(fr, "_STATS_CHUNK", 7)  # exercise the chunked accumulation
    x = correlated(50, 5, seed=0).astype(np.float32)
    stats = FeatureStats.from_features(torch.from_numpy(x), meta={"extractor": "test"})
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(stats.mu, x64.mean(0), rtol=0, atol=1e-13)
    np.testing.assert_allclose(stats.sigma, np.cov(x64, rowvar=False), rtol=1e-12, atol=1e-14)
    assert stats.n == 50 and stats.meta == {"extractor": "test"}
    assert stats.mu.dtype == np.float64 and np.array_equal(stats.sigma, stats.sigma.T)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    stats = FeatureStats.from_features(correlated(40, 16, seed=1),
                                       meta={"extractor": "x", "nfe": 1, "tags": [1, "a"]})
    path = stats.save(tmp_path / "sub" / "ref.npz")
    back = FeatureStats.load(path)
    assert np.array_equal(back.mu, stats.mu) and np.array_equal(back.sigma, stats.sigma)
    assert back.mu.tobytes() == stats.mu.tobytes()
    assert back.n == stats.n and back.meta == stats.meta
    assert sorted(p.name for p in path.parent.iterdir()) == ["ref.npz"]  # no temp file left
    assert frechet_distance(back, stats) < 1e-10 * np.trace(stats.sigma)


def _write_truncated(path, tmp_path):
    FeatureStats.from_features(randn(10, 4, 0)).save(tmp_path / "full.npz")
    data = (tmp_path / "full.npz").read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write_missing_key(path, tmp_path):
    with open(path, "wb") as fh:
        np.savez(fh, mu=np.zeros(3), sigma=np.eye(3))


def _write_pickle(path, tmp_path):
    with open(path, "wb") as fh:
        pickle.dump({"mu": np.zeros(3), "sigma": np.eye(3), "n": 3, "meta": "{}"}, fh)


def _write_object_array(path, tmp_path):
    with open(path, "wb") as fh:
        np.savez(fh, mu=np.zeros(3), sigma=np.eye(3), n=np.int64(3),
                 meta=np.array([{"a": 1}], dtype=object))


def _write_bad_shapes(path, tmp_path):
    with open(path, "wb") as fh:
        np.savez(fh, mu=np.zeros(3), sigma=np.eye(4), n=np.int64(3), meta=np.array("{}"))


def _write_npy(path, tmp_path):
    with open(path, "wb") as fh:
        np.save(fh, np.zeros(3))


@pytest.mark.parametrize("writer", [None, _write_truncated, _write_missing_key, _write_pickle,
                                    _write_object_array, _write_bad_shapes, _write_npy])
def test_load_bad_file_raises_data_error(tmp_path, writer):
    path = tmp_path / "stats.npz"
    if writer is not None:
        writer(path, tmp_path)
    with pytest.raises(DataError) as info:
        FeatureStats.load(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "recompute" in msg


# --------------------------------------------------------------------------------- FID ------


def test_fid_with_itself_is_zero_even_rank_deficient():
    for n, d in [(500, 64), (20, 64)]:  # the second has rank 19 < 64
        stats = FeatureStats.from_features(correlated(n, d, seed=2))
        scale = np.trace(stats.sigma)
        assert 0.0 <= frechet_distance(stats, stats) < 1e-8 * scale
        copy = (stats.mu.copy(), stats.sigma.copy())
        assert frechet_distance(copy, stats) < 1e-8 * scale


def test_fid_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(3)
    d = 32
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.0, 3.0, d)
    s2[:4] = 0.0  # singular covariance
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = frechet_distance((mu1, np.diag(s1)), (torch.from_numpy(mu2), torch.diag(
        torch.from_numpy(s2))))
    assert got == pytest.approx(expected, rel=1e-10)


def test_fid_commuting_full_covariances_closed_form():
    rng = np.random.default_rng(4)
    d = 48
    q = orthogonal(d, seed=5)
    a, b = rng.uniform(0.01, 4.0, d), rng.uniform(0.01, 4.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance((mu1, s1), (mu2, s2)) == pytest.approx(expected, rel=1e-9)


def test_fid_agrees_with_scipy_sqrtm_on_random_features():
    a = FeatureStats.from_features(correlated(500, 64, seed=6))
    b = FeatureStats.from_features(correlated(500, 64, seed=7, shift=0.3))
    ref = scipy_fid(a.mu, a.sigma, b.mu, b.sigma)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)


def test_fid_symmetric_and_rotation_invariant():
    x, y = correlated(300, 32, seed=8), correlated(300, 32, seed=9, shift=0.2)
    q = orthogonal(32, seed=10)
    a, b = FeatureStats.from_features(x), FeatureStats.from_features(y)
    ra, rb = FeatureStats.from_features(x @ q.T), FeatureStats.from_features(y @ q.T)
    fid = frechet_distance(a, b)
    assert fid > 1.0
    assert frechet_distance(b, a) == pytest.approx(fid, rel=1e-12)
    assert frechet_distance(ra, rb) == pytest.approx(fid, rel=1e-10)


def test_fid_input_checks():
    a = FeatureStats.from_features(randn(10, 4, 0))
    b = FeatureStats.from_features(randn(10, 5, 1))
    with pytest.raises(ConfigError):
        frechet_distance(a, b)
    with pytest.raises(ConfigError):
        frechet_distance(a, (np.zeros(4), np.eye(5)))
    with pytest.raises(ConfigError):
        frechet_distance(a, (np.full(4, np.nan), np.eye(4)))
    with pytest.raises(ConfigError):
        FeatureStats.from_features(np.array([[1.0, np.inf], [0.0, 0.0]]))
    with pytest.raises(ConfigError):
        FeatureStats.from_features(np.zeros((1, 3)))


# --------------------------------------------------------------------------------- KID ------


def brute_unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]

    def k(u, v):
        return (u @ v / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_definition_on_whole_sets():
    x, y = randn(12, 3, 11), randn(12, 3, 12) + 0.5
    mean, se = kid(x, y, subsets=3, subset_size=50)  # clipped to 12 -> always the whole sets
    assert mean == pytest.approx(brute_unbiased_mmd2(x, y), rel=1e-12)
    assert se == pytest.approx(0.0, abs=1e-15)


def test_kid_same_distribution_near_zero_and_shift_positive():
    # The standard error only sees subset-to-subset noise, so the pools are made much larger
    # than a subset: then subsets barely overlap and it is an honest error bar.
    x, y = randn(5000, 16, 13), randn(5000, 16, 14)
    mean, se = kid(torch.from_numpy(x).float(), y, subsets=100, subset_size=50, seed=0)
    assert se > 0 and abs(mean) < 3 * se
    mean_s, se_s = kid(x, y + 1.0, subsets=40, subset_size=100, seed=0)
    assert mean_s > 0.5 and mean_s > 20 * se_s
    # Reproducible from the seed or a generator.
    assert kid(x, y, subsets=5, subset_size=50, seed=3) == kid(
        x, y, subsets=5, subset_size=50, generator=torch.Generator().manual_seed(3))


def test_kid_unbiased_over_many_draws_while_v_statistic_is_biased():
    rng = np.random.default_rng(15)
    draws, m, d = 400, 20, 4
    unbiased, biased = [], []
    for _ in range(draws):
        x = torch.from_numpy(rng.standard_normal((m, d)))
        y = torch.from_numpy(rng.standard_normal((m, d)))
        unbiased.append(fr._poly_mmd2(x, y, unbiased=True))
        biased.append(fr._poly_mmd2(x, y, unbiased=False))
    u, b = np.asarray(unbiased), np.asarray(biased)
    se_u, se_b = u.std(ddof=1) / np.sqrt(draws), b.std(ddof=1) / np.sqrt(draws)
    assert abs(u.mean()) < 3 * se_u
    assert b.mean() > 10 * se_b


def test_kid_input_checks():
    x = randn(10, 3, 0)
    with pytest.raises(ConfigError):
        kid(x, randn(10, 4, 1))
    with pytest.raises(ConfigError):
        kid(x, x, subsets=1)
    with pytest.raises(ConfigError):
        kid(x, x, subset_size=1)


# ----------------------------------------------------------------------- precision/recall ---


def brute_precision(real: np.ndarray, fake: np.ndarray, k: int) -> float:
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=-1)
    radii = np.sort(d_rr, axis=1)[:, k]
    d_fr = np.linalg.norm(fake[:, None] - real[None], axis=-1)
    return float(np.mean((d_fr <= radii[None]).any(axis=1)))


def test_precision_recall_identical_far_and_collapsed(monkeypatch):
    monkeypatch.setattr(fr, "_PR_CHUNK", 64)  # exercise the blocked distance computation
    real = randn(300, 2, 16)
    assert precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
    # Mode collapse onto one half: every fake point is real (precision 1), half is missed.
    half = real[real[:, 0] > 0]
    p, r = precision_recall(real, half, k=3)
    assert p == 1.0 and 0.4 < r < 0.8
    fake = randn(200, 2, 17) * 1.5 + 0.5
    p, r = precision_recall(real, fake, k=5)
    assert p == pytest.approx(brute_precision(real, fake, 5), abs=1e-12)
    assert r == pytest.approx(brute_precision(fake, real, 5), abs=1e-12)


def test_precision_recall_input_checks():
    with pytest.raises(ConfigError):
        precision_recall(randn(3, 2, 0), randn(10, 2, 1), k=3)
    with pytest.raises(ConfigError):
        precision_recall(randn(10, 2, 0), randn(10, 3, 1))
