"""Tests for `metrics.evaluate` and the `python -m metrics evaluate` command: metrics.json provenance,
torch-fidelity IS/KID/PR, a stats-only reference that allows FID alone, and class accuracy plus a domain FID
measured with the digits classifier.

The generic tests use the small seeded "fake-test" extractor and the domain one the trained
`digits_classifier` (both tests/metrics/conftest.py); the real Inception is never loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_png

from metrics.evaluate import EvaluateConfig, evaluate
from metrics.features import build_extractor
from metrics.fid import FeatureStats
from train.data.digits import digits_split


def _images(n: int, seed: int, size: int = 8) -> np.ndarray:
    """uint8 [N,H,W,3] (ADM layout)."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _write_png_folder(images: np.ndarray, folder: Path) -> None:
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        (folder / f"{i:06d}.png").write_bytes(encode_png(torch.from_numpy(img).permute(2, 0, 1)).numpy().tobytes())


def _sample_dir(tmp_path: Path) -> Path:
    out = tmp_path / "samples"
    out.mkdir()
    np.savez(out / "samples.npz", arr_0=_images(24, 4), labels=np.zeros(24, np.int64))
    (out / "manifest.json").write_text(json.dumps({"cfg_scale": 2.0, "seed": 7}))
    return out


def test_evaluate_writes_provenance_and_runs_torch_fidelity_metrics(tmp_path: Path, fake_extractor) -> None:
    samples = _sample_dir(tmp_path)
    np.savez(tmp_path / "ref.npz", arr_0=_images(32, 5))
    report = evaluate(EvaluateConfig(str(tmp_path / "ref.npz"), str(samples), extractor="fake-test",
                                     accelerator="cpu", cache_dir=str(tmp_path / "cache"), isc_splits=2))
    on_disk = json.loads((samples / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    m = on_disk["metrics"]
    for key in ("fid", "is_mean", "is_std", "kid_mean",
                "kid_std", "precision", "recall"):
        assert key in m and m[key] is not None, key
    assert m["fid"] > 0 and m["is_mean"] >= 1.0 and 0 <= m["precision"] <= 1
    assert on_disk["extractor"] == {"name": "fake-test", "weights_sha256": "0" * 64, "weights_path": "",
                                    "description": None}
    assert on_disk["intervals"] == {}  # no bootstrap asked for
    assert on_disk["reference"]["kind"] == "npz-images" and len(on_disk["reference"]["sha256"]) == 64
    assert on_disk["reference"]["num_samples"] == 32
    assert on_disk["samples"]["num_samples"] == 24
    assert on_disk["samples"]["manifest"] == {"cfg_scale": 2.0, "seed": 7}


def test_evaluate_with_stats_only_reference_is_fid_only(tmp_path: Path, fake_extractor) -> None:
    samples = _sample_dir(tmp_path)
    fx = build_extractor("fake-test")
    feats = fx.features(torch.from_numpy(_images(32, 5)).permute(0, 3, 1, 2)).numpy()
    FeatureStats.from_features(feats).save_npz(tmp_path / "adm_ref.npz")
    out = tmp_path / "m.json"
    report = evaluate(EvaluateConfig(str(tmp_path / "adm_ref.npz"), str(samples), extractor="fake-test",
                                     metrics="fid,kid,prc", out=str(out), accelerator="cpu"))
    assert set(report["metrics"]) == {"fid"} and set(report["skipped"]) == {"kid", "prc"}
    assert report["reference"]["kind"] == "npz-stats" and "note" in report["reference"]
    assert json.loads(out.read_text())["metrics"]["fid"] == pytest.approx(report["metrics"]["fid"])


def test_cli_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                  fake_extractor) -> None:
    from metrics.__main__ import main

    samples = _sample_dir(tmp_path)
    _write_png_folder(_images(30, 8), tmp_path / "ref")
    monkeypatch.setattr("sys.argv", ["metrics", "evaluate", "--samples", str(samples), "--reference", str(tmp_path / "ref"),
                                     "--extractor", "fake-test", "--metrics", "fid,kid", "--accelerator", "cpu",
                                     "--cache_dir", str(tmp_path / "cache")])
    main()
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["metrics"]) == {"fid", "kid_mean", "kid_std"}
    assert json.loads((samples / "metrics.json").read_text())["reference"]["kind"] == "folder"


def test_evaluate_reports_class_accuracy_and_domain_fid(digits_classifier: Path, tmp_path: Path) -> None:
    """Real digits in the ADM samples layout: the domain classifier recognises the requested classes, and
    shuffled labels (samples that ignore their class) score near chance."""
    images, labels = digits_split("val")
    train_images, _ = digits_split("train")
    np.savez(tmp_path / "reference.npz", arr_0=train_images)
    (tmp_path / "real").mkdir()
    np.savez(tmp_path / "real" / "samples.npz", arr_0=images, labels=labels)
    report = evaluate(EvaluateConfig(str(tmp_path / "reference.npz"), str(tmp_path / "real"),
                                     extractor="domain-classifier", weights=str(digits_classifier.parent),
                                     metrics="fid,is,acc", accelerator="cpu", cache_dir=str(tmp_path)))
    assert report["metrics"]["class_accuracy"] >= 0.95
    assert 0 <= report["metrics"]["fid"] < 20 and report["extractor"]["name"] == "domain-classifier"
    (tmp_path / "shuffled").mkdir()
    np.savez(tmp_path / "shuffled" / "samples.npz", arr_0=images, labels=np.random.default_rng(0).permutation(labels))
    shuffled = evaluate(EvaluateConfig(str(tmp_path / "reference.npz"), str(tmp_path / "shuffled"),
                                       extractor="domain-classifier", weights=str(digits_classifier.parent),
                                       metrics="acc", accelerator="cpu", cache_dir=str(tmp_path)))
    assert shuffled["metrics"]["class_accuracy"] < 0.3
