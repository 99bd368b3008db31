"""engram_vision/stats.py's interval functions against closed forms and scipy: the t interval across seeds,
Welch's interval of a difference, and the bootstrap interval of an arbitrary statistic."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from engram_vision.stats import bootstrap_statistic, t_interval, welch_interval


def test_t_interval_matches_scipy_and_needs_two_values() -> None:
    values = [5.1, 5.3, 4.9, 5.6]
    low, high = scipy_stats.t.interval(0.95, 3, loc=np.mean(values), scale=scipy_stats.sem(values))
    result = t_interval(values)
    assert result["low"] == pytest.approx(low) and result["high"] == pytest.approx(high) and result["n"] == 4
    assert t_interval([2.0]) == {"mean": 2.0, "low": None, "high": None, "n": 1, "std": None}


def test_welch_interval_matches_scipy() -> None:
    a, b = [1.0, 2.0, 4.0], [2.5, 3.0, 3.5, 6.0]
    test = scipy_stats.ttest_ind(a, b, equal_var=False)
    ci = test.confidence_interval(0.95)
    result = welch_interval(a, b)
    assert result["mean"] == pytest.approx(np.mean(a) - np.mean(b))
    assert result["low"] == pytest.approx(ci.low) and result["high"] == pytest.approx(ci.high)
    assert welch_interval([1.0], b)["low"] is None


def test_bootstrap_statistic_is_seeded_and_brackets_a_mean() -> None:
    values = np.random.default_rng(0).normal(3.0, 1.0, 400)
    first = bootstrap_statistic(lambda i: values[i].mean(), values.size, np.random.default_rng(1), 300)
    again = bootstrap_statistic(lambda i: values[i].mean(), values.size, np.random.default_rng(1), 300)
    assert first == again and first["resamples"] == 300
    assert first["low"] < values.mean() < first["high"]
    # about 2 * 1.96 * sigma / sqrt(n) wide
    assert first["high"] - first["low"] == pytest.approx(2 * 1.96 / 20, rel=0.25)
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_statistic(lambda i: 0.0, 1, np.random.default_rng(0))
