"""Tests for `metrics.fid`: the Frechet distance against an independent scipy formula (identical stats,
singular covariances, shape errors) and the `FeatureStats` .npz round trip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

from metrics.fid import FeatureStats, feature_stats, frechet_distance


def _scipy_fid(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))


def test_fid_identical_stats_is_zero() -> None:
    mu, sigma = feature_stats(np.random.default_rng(0).normal(size=(200, 16)))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_matches_scipy_reference() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 12)), rng.normal(0.3, 1.5, size=(250, 12))
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    got = frechet_distance(*feature_stats(a), *feature_stats(b))
    assert got > 1.0
    assert abs(got - _scipy_fid(mu1, s1, mu2, s2)) < 1e-6


def test_fid_singular_covariance_and_shape_error() -> None:
    feats = np.random.default_rng(0).normal(size=(5, 10))  # N < D: rank-deficient covariance
    mu, sigma = feature_stats(feats)
    assert np.isfinite(frechet_distance(mu, sigma, mu + 0.1, sigma))
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


def test_stats_npz_roundtrip_and_missing_keys(tmp_path: Path) -> None:
    stats = FeatureStats.from_features(np.random.default_rng(0).normal(size=(20, 4)))
    stats.save_npz(tmp_path / "s.npz")
    back = FeatureStats.load_npz(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.mu, stats.mu)
    assert back.num_samples == 20
    np.savez(tmp_path / "bad.npz", mu=stats.mu)
    with pytest.raises(KeyError, match="sigma"):
        FeatureStats.load_npz(tmp_path / "bad.npz")
