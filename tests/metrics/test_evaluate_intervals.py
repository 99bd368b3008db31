"""Bootstrap intervals of `metrics.evaluate`: FID, IS and class accuracy of a sample set resampled with
replacement against a fixed reference, reproducible from the seed, and wider for fewer samples.

Uses the seeded "fake-test" extractor of tests/metrics/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from metrics.evaluate import EvaluateConfig, evaluate


def _write(folder: Path, count: int, seed: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    np.savez(folder / "samples.npz", arr_0=rng.integers(0, 256, (count, 8, 8, 3), dtype=np.uint8),
             labels=rng.integers(0, 4, count))
    return folder


def _config(tmp_path: Path, samples: Path, **overrides) -> EvaluateConfig:
    return EvaluateConfig(str(tmp_path / "ref.npz"), str(samples), extractor="fake-test", metrics="fid,is,acc",
                          accelerator="cpu", cache_dir=str(tmp_path / "cache"), isc_splits=2, **overrides)


def test_bootstrap_intervals_are_seeded_and_shrink_with_more_samples(tmp_path: Path, fake_extractor) -> None:
    np.savez(tmp_path / "ref.npz", arr_0=np.random.default_rng(9).integers(0, 256, (64, 8, 8, 3), dtype=np.uint8))
    small, large = _write(tmp_path / "small", 24, 1), _write(tmp_path / "large", 96, 2)
    first = evaluate(_config(tmp_path, small, bootstrap=60, seed=3))
    again = evaluate(_config(tmp_path, small, bootstrap=60, seed=3, out=str(tmp_path / "again.json")))
    other = evaluate(_config(tmp_path, small, bootstrap=60, seed=4, out=str(tmp_path / "other.json")))
    assert first["intervals"] == again["intervals"] and first["intervals"] != other["intervals"]
    assert set(first["intervals"]) == {"fid", "is_mean", "class_accuracy"}
    for interval in first["intervals"].values():
        assert interval["low"] < interval["high"] and interval["resamples"] == 60 and interval["level"] == 0.95
    # the accuracy's interval brackets the point value; FID's sits above it (resampling repeats images)
    accuracy = first["intervals"]["class_accuracy"]
    assert accuracy["low"] <= first["metrics"]["class_accuracy"] <= accuracy["high"]
    assert first["intervals"]["fid"]["high"] > first["metrics"]["fid"]
    wide = accuracy["high"] - accuracy["low"]
    narrow = evaluate(_config(tmp_path, large, bootstrap=60, seed=3))["intervals"]["class_accuracy"]
    assert narrow["high"] - narrow["low"] < wide
