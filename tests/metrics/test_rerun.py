"""Reruns of the metrics command: a reference statistics cache cut short, or holding NaN, is computed
again with a warning naming it, and a temporary cache file of a killed run is removed; metrics.json records
its settings, a rerun with the same ones recomputes it, and one with other settings or other samples is
refused (naming what differs, the previous result kept) unless `overwrite` is set.

Uses the seeded "fake-test" extractor of tests/conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from metrics.evaluate import EvaluateConfig, evaluate
from metrics.features import build_extractor
from metrics.reference import load_reference


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def test_a_cut_or_nan_cache_is_computed_again_and_stale_temps_removed(tmp_path: Path, fake_extractor):
    np.savez(tmp_path / "ref.npz", arr_0=_images(20, 1))
    fx = build_extractor("fake-test")
    first = load_reference(tmp_path / "ref.npz", fx, cache_dir=tmp_path / "cache")
    cache = first.cache_path
    whole = cache.read_bytes()
    stale = cache.parent / f".{cache.name}.abc123.tmp"  # what atomic_write leaves when killed mid-write
    stale.write_bytes(whole[:50])
    cache.write_bytes(whole[: len(whole) // 2])
    with pytest.warns(UserWarning, match=f"reference statistics cache {cache} is unusable"):
        again = load_reference(tmp_path / "ref.npz", fx, cache_dir=tmp_path / "cache")
    assert not stale.exists() and cache.read_bytes() == whole
    np.testing.assert_array_equal(again.stats.sigma, first.stats.sigma)
    with np.load(cache) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["features"][0, 0] = np.nan
    np.savez(cache, **arrays)
    with pytest.warns(UserWarning, match="features in .* hold 1 NaN or inf"):
        load_reference(tmp_path / "ref.npz", fx, cache_dir=tmp_path / "cache")
    assert np.isfinite(np.load(cache)["features"]).all()


def _config(tmp_path: Path, **overrides) -> EvaluateConfig:
    return EvaluateConfig(**{"reference": str(tmp_path / "ref.npz"), "samples": str(tmp_path / "samples"),
                             "extractor": "fake-test", "metrics": "fid,is", "accelerator": "cpu",
                             "cache_dir": str(tmp_path / "cache"), "isc_splits": 2, **overrides})


def test_metrics_json_is_never_replaced_silently(tmp_path: Path, fake_extractor, capsys):
    (tmp_path / "samples").mkdir()
    np.savez(tmp_path / "samples" / "samples.npz", arr_0=_images(24, 2))
    np.savez(tmp_path / "ref.npz", arr_0=_images(32, 3))
    out = tmp_path / "samples" / "metrics.json"
    first = evaluate(_config(tmp_path))
    assert first["settings"]["metrics"] == ["fid", "is"] and len(first["settings"]["samples_sha256"]) == 64
    assert json.loads(out.read_text())["settings"] == first["settings"]

    again = evaluate(_config(tmp_path))  # the same settings: recomputed, the same numbers
    assert again["metrics"] == first["metrics"] and "recomputing" in capsys.readouterr().out

    kept = out.read_text()
    with pytest.raises(ValueError) as info:
        evaluate(_config(tmp_path, metrics="fid", isc_splits=3))
    message = str(info.value)
    assert f"{out} was made with other settings or samples" in message and "isc_splits 2 -> 3" in message
    assert "metrics ['fid', 'is'] -> ['fid']" in message and "--out NEW.json" in message
    assert "--overwrite true" in message and out.read_text() == kept

    np.savez(tmp_path / "samples" / "samples.npz", arr_0=_images(24, 9))  # resampled into the same folder
    with pytest.raises(ValueError, match="samples_sha256"):
        evaluate(_config(tmp_path))
    assert out.read_text() == kept
    replaced = evaluate(_config(tmp_path, overwrite=True))
    assert replaced["metrics"]["fid"] != first["metrics"]["fid"]
    assert json.loads(out.read_text())["settings"]["samples_sha256"] == replaced["settings"]["samples_sha256"]

    (tmp_path / "old.json").write_text(json.dumps({"metrics": {"fid": 1.0}}))  # written before settings existed
    with pytest.raises(ValueError, match="records no settings"):
        evaluate(_config(tmp_path, out=str(tmp_path / "old.json")))
