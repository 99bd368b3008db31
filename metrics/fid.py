"""Frechet distance between Gaussians fitted to features, and the `.npz` statistics files that hold them.

Computes everything in float64 with `scipy.linalg.sqrtm`, like the ADM evaluator and pytorch-fid, so our
numbers are comparable with published FIDs given the same features. Inputs are checked first
(`metrics.checks`): NaN/inf features or statistics, or statistics of two feature sizes, are a ValueError
naming them. Feature extraction lives in `metrics.features`; where statistics come from and how they are
cached lives in `metrics.reference`.
"""

from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg

from metrics.checks import check_stats, require_finite
from tokenizers_vq.files import atomic_write

# Follows pytorch-fid / guided-diffusion's evaluator: offset the diagonal when the product is singular and
# accept a tiny imaginary part from sqrtm's round-off, but refuse a large one (a sign of broken stats).
_EPS = 1e-6
_IMAG_ATOL = 1e-3


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     names: tuple[str, str] = ("the first statistics", "the second statistics")) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), float64. mu [D], sigma [D,D].

    names: what the two sets of statistics are, for the errors (e.g. the samples and the reference file)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape} "
            f"({names[0]} vs {names[1]}); compare statistics made with the same extractor"
        )
    # Before sqrtm: a NaN there is scipy's own error (or a NaN FID) that names neither input.
    check_stats(mu1, sigma1, names[0])
    check_stats(mu2, sigma2, names[1])
    diff = mu1 - mu2
    covmean, _ = scipy.linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: sigma1 @ sigma2 is singular; adding {_EPS} to the diagonals", stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * _EPS
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=_IMAG_ATOL):
            raise ValueError(f"FID: sqrtm has a large imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_stats(features: np.ndarray, what: str = "the features") -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D,D] of `features` [N,D], both float64 (`what` names them in errors)."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"{what}: need features [N>=2, D], got shape {feats.shape}")
    require_finite(feats, what, "the extractor gave non-finite features: check its weights and the images")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


@dataclass
class FeatureStats:
    """Gaussian statistics of a feature set: `mu` [D] and `sigma` [D,D] float64, from `num_samples` images."""

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int | None = None
    source: str | None = None
    """What the statistics are of (a file, "the samples"), named in errors; None: unnamed."""

    @classmethod
    def from_features(cls, features: np.ndarray, source: str | None = None) -> FeatureStats:
        """Statistics of `features` [N,D]; `source` names them in errors."""
        mu, sigma = feature_stats(features, f"the features of {source}" if source else "the features")
        return cls(mu, sigma, int(np.asarray(features).shape[0]), source)

    def fid(self, other: FeatureStats) -> float:
        """Frechet distance to `other`."""
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma,
                                (self.source or "the first statistics", other.source or "the second statistics"))

    def save_npz(self, path: str | Path, **extra: np.ndarray) -> None:
        """Write ADM-layout `mu`/`sigma` (+ `num_samples`, + `extra` arrays) atomically."""
        arrays = {"mu": np.asarray(self.mu, np.float64), "sigma": np.asarray(self.sigma, np.float64), **extra}
        if self.num_samples is not None:
            arrays["num_samples"] = np.asarray(self.num_samples, np.int64)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object stops np.savez from appending ".npz" to the tmp name
                np.savez(f, **arrays)

        atomic_write(path, write)

    @classmethod
    def load_npz(cls, path: str | Path) -> FeatureStats:
        """Read `mu`/`sigma` (ADM reference batches or our cache); errors name the file and the missing keys,
        and a file that is no readable .npz or holds malformed or non-finite statistics is a ValueError."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"statistics file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in ("mu", "sigma") if k not in data.files]
                if missing:
                    raise KeyError(f"{path}: missing key(s) {missing}; found {data.files} (need ADM-style "
                                   f"'mu', 'sigma')")
                num = int(data["num_samples"]) if "num_samples" in data.files else None
                stats = cls(data["mu"].astype(np.float64), data["sigma"].astype(np.float64), num, str(path))
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"statistics file {path} cannot be read ({type(error).__name__}: {error}); it is "
                             f"cut short or not an .npz: make it again") from error
        check_stats(stats.mu, stats.sigma, f"the statistics in {path}")
        return stats
