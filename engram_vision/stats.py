"""Interval statistics of the study: percentile-bootstrap intervals of a mean, of a ratio of paired means
and of any statistic of a sample set (FID, IS, class accuracy), a paired sign-flip permutation test, and
Student-t intervals across training seeds. numpy (and scipy.stats for t quantiles); every resampling
function takes an explicit `numpy.random.Generator`, so a run is reproducible from its seed.

The values come from others: the probes (`probes.py`), the metrics (`metrics.evaluate`) and the report.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _as_vector(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{name}: no values to resample")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: values must be finite")
    return array


def _resample_index(size: int, num_resamples: int, rng: np.random.Generator) -> np.ndarray:
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    return rng.integers(0, size, size=(num_resamples, size))


def _interval(estimate: float, replicates: np.ndarray, level: float) -> dict[str, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    tail = (1 - level) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail])
    return {"mean": float(estimate), "low": float(low), "high": float(high)}


def bootstrap_mean(values, rng: np.random.Generator, num_resamples: int = 2000,
                   level: float = 0.95) -> dict[str, float]:
    """{"mean", "low", "high"}: the mean of `values` [N] with a percentile-bootstrap interval."""
    array = _as_vector(values, "bootstrap_mean")
    replicates = array[_resample_index(array.size, num_resamples, rng)].mean(axis=1)
    return _interval(array.mean(), replicates, level)


def bootstrap_ratio(numerator, denominator, rng: np.random.Generator, num_resamples: int = 2000,
                    level: float = 0.95) -> dict[str, float]:
    """mean(numerator) / mean(denominator) for paired per-item values [N], with a bootstrap interval that
    resamples items (pairs stay together). Infinite when the denominator's mean is 0."""
    top, bottom = _as_vector(numerator, "bootstrap_ratio"), _as_vector(denominator, "bootstrap_ratio")
    if top.shape != bottom.shape:
        raise ValueError(f"bootstrap_ratio: paired values need equal lengths, got {top.size} and {bottom.size}")
    index = _resample_index(top.size, num_resamples, rng)
    with np.errstate(divide="ignore", invalid="ignore"):
        replicates = top[index].mean(axis=1) / bottom[index].mean(axis=1)
        estimate = top.mean() / bottom.mean()
    return _interval(estimate, np.nan_to_num(replicates, nan=np.inf), level)


def paired_permutation_test(first, second, rng: np.random.Generator,
                            num_permutations: int = 10_000) -> dict[str, float]:
    """Two-sided test of "the paired values [N] have the same mean": under the null each difference's sign
    is exchangeable, so random sign flips give its distribution. The p-value counts the observed statistic
    as one permutation, so it is never 0. Returns {"mean_difference", "p_value", "permutations"}."""
    a, b = _as_vector(first, "paired_permutation_test"), _as_vector(second, "paired_permutation_test")
    if a.shape != b.shape:
        raise ValueError(f"paired_permutation_test: paired values need equal lengths, got {a.size} and {b.size}")
    if num_permutations < 1:
        raise ValueError(f"num_permutations must be >= 1, got {num_permutations}")
    difference = a - b
    observed = abs(difference.mean())
    extreme = 0
    for start in range(0, num_permutations, 1000):  # chunks bound the memory at 1000 x N signs
        count = min(1000, num_permutations - start)
        signs = rng.choice((-1.0, 1.0), size=(count, difference.size))
        # A relative tolerance so that exact ties (e.g. all differences 0) count as "as extreme".
        extreme += int((np.abs((signs * difference).mean(axis=1)) >= observed * (1 - 1e-12)).sum())
    return {"mean_difference": float(difference.mean()), "p_value": (extreme + 1) / (num_permutations + 1),
            "permutations": num_permutations}


def bootstrap_statistic(statistic: Callable[[np.ndarray], float], size: int, rng: np.random.Generator,
                        num_resamples: int = 200, level: float = 0.95) -> dict[str, float]:
    """{"low", "high", "resamples"}: a percentile-bootstrap interval of `statistic(index)`, a number computed
    from the items `index` [size] of a sample set drawn with replacement (e.g. FID of those samples)."""
    if size < 2:
        raise ValueError(f"bootstrap_statistic: need at least 2 items, got {size}")
    replicates = np.array([statistic(index) for index in _resample_index(size, num_resamples, rng)], np.float64)
    replicates = replicates[np.isfinite(replicates)]
    if replicates.size == 0:
        raise ValueError("bootstrap_statistic: the statistic was not finite on any resample")
    interval = _interval(float("nan"), replicates, level)
    return {"low": interval["low"], "high": interval["high"], "resamples": int(replicates.size)}


def t_interval(values, level: float = 0.95) -> dict[str, float | int | None]:
    """{"mean", "low", "high", "n", "std"}: the mean of independent values (e.g. one per training seed) with
    a Student-t interval; low/high/std are None for a single value (no spread can be estimated)."""
    array = _as_vector(values, "t_interval")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    mean = float(array.mean())
    if array.size < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1, "std": None}
    from scipy import stats

    std = float(array.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, array.size - 1) * std / np.sqrt(array.size))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": int(array.size), "std": std}


def welch_interval(first, second, level: float = 0.95) -> dict[str, float | int | None]:
    """{"mean", "low", "high", "n"}: mean(first) - mean(second) for two independent groups (e.g. a run's
    seeds against the baseline's) with a Welch t interval; None bounds when a group has a single value."""
    a, b = _as_vector(first, "welch_interval"), _as_vector(second, "welch_interval")
    difference = float(a.mean() - b.mean())
    if a.size < 2 or b.size < 2:
        return {"mean": difference, "low": None, "high": None, "n": int(min(a.size, b.size))}
    from scipy import stats

    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = float(np.sqrt(va + vb))
    if se == 0:
        return {"mean": difference, "low": difference, "high": difference, "n": int(min(a.size, b.size))}
    dof = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = float(stats.t.ppf(0.5 + level / 2, dof)) * se
    return {"mean": difference, "low": difference - half, "high": difference + half, "n": int(min(a.size, b.size))}


__all__ = ["bootstrap_mean", "bootstrap_ratio", "bootstrap_statistic", "paired_permutation_test", "t_interval",
           "welch_interval"]
