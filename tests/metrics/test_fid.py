"""Tests for metrics/: Frechet distance vs an independent scipy formula, reference routes and cache,
missing-weights error, metrics.json provenance, and torch-fidelity IS/KID/PR on a tiny fake extractor.

Never loads the real Inception: a small seeded extractor is registered under "fake-test".
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torchvision.io import encode_png

from metrics.evaluate import EvaluateConfig, evaluate
from metrics.features import INCEPTION_WEIGHTS_FILE, FeatureExtractor, build_extractor, register_extractor
from metrics.fid import FeatureStats, feature_stats, frechet_distance
from metrics.reference import load_reference


class FakeExtractor(FeatureExtractor):
    """4x4 average pool -> fixed random projections: features [N,8], logits [N,5]. Counts forward calls."""

    name = "fake-test"
    weights_sha256 = "0" * 64
    calls = 0

    def __init__(self, weights: str | None = None, device: str = "cpu", batch_size: int = 16) -> None:
        super().__init__(device, batch_size)
        g = torch.Generator().manual_seed(1)
        self.w_feat = torch.randn(48, 8, generator=g)
        self.w_logit = torch.randn(8, 5, generator=g)

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        type(self).calls += 1
        x = F.adaptive_avg_pool2d(images.float() / 255.0, 4).flatten(1)
        feats = torch.tanh(x @ self.w_feat)
        return feats, feats @ self.w_logit


register_extractor("fake-test", FakeExtractor, overwrite=True)


def _images(n: int, seed: int, size: int = 8) -> np.ndarray:
    """uint8 [N,H,W,3] (ADM layout)."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _write_png_folder(images: np.ndarray, folder: Path) -> None:
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        (folder / f"{i:06d}.png").write_bytes(encode_png(torch.from_numpy(img).permute(2, 0, 1)).numpy().tobytes())


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


def test_npz_folder_and_shards_routes_agree(tmp_path: Path) -> None:
    ref_imgs, sample_imgs = _images(40, 1), _images(30, 2)
    np.savez(tmp_path / "ref.npz", arr_0=ref_imgs)
    _write_png_folder(ref_imgs, tmp_path / "ref_folder")
    with tarfile.open(tmp_path / "ref-000.tar", "w") as tar:  # webdataset layout: <key>.png + <key>.cls
        for i, png in enumerate(sorted((tmp_path / "ref_folder").iterdir())):
            for name, data in ((f"{i:06d}.png", png.read_bytes()), (f"{i:06d}.cls", b"3")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    fx = build_extractor("fake-test")
    samples = FeatureStats.from_features(fx.features(torch.from_numpy(sample_imgs).permute(0, 3, 1, 2)).numpy())
    fids = [
        samples.fid(load_reference(tmp_path / src, fx, cache_dir=tmp_path / "cache").stats)
        for src in ("ref.npz", "ref_folder", "ref-000.tar")
    ]
    assert fids[0] > 0
    assert fids[1] == pytest.approx(fids[0], abs=1e-9)
    assert fids[2] == pytest.approx(fids[0], abs=1e-9)


def test_reference_cache_is_reused(tmp_path: Path) -> None:
    _write_png_folder(_images(20, 3), tmp_path / "ref")
    fx = build_extractor("fake-test")
    FakeExtractor.calls = 0
    first = load_reference(tmp_path / "ref", fx, cache_dir=tmp_path / "cache")
    assert FakeExtractor.calls > 0 and first.cache_path is not None and first.cache_path.is_file()
    assert first.cache_path.name.startswith("ref-") and "-fake-test-000000000000.npz" in first.cache_path.name
    FakeExtractor.calls = 0
    second = load_reference(tmp_path / "ref", fx, cache_dir=tmp_path / "cache")
    assert FakeExtractor.calls == 0
    np.testing.assert_array_equal(second.stats.sigma, first.stats.sigma)
    np.testing.assert_array_equal(second.features, first.features)


def test_missing_inception_weights_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE) as err:
        build_extractor("inception-v3-compat")
    assert "hub" in str(err.value) and "https://github.com/toshas/torch-fidelity/releases" in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_extractor("inception-v3-compat", weights=str(tmp_path / "nowhere.pth"))


def _sample_dir(tmp_path: Path) -> Path:
    out = tmp_path / "samples"
    out.mkdir()
    np.savez(out / "samples.npz", arr_0=_images(24, 4), labels=np.zeros(24, np.int64))
    (out / "manifest.json").write_text(json.dumps({"cfg_scale": 2.0, "seed": 7}))
    return out


def test_evaluate_writes_provenance_and_runs_torch_fidelity_metrics(tmp_path: Path) -> None:
    samples = _sample_dir(tmp_path)
    np.savez(tmp_path / "ref.npz", arr_0=_images(32, 5))
    report = evaluate(EvaluateConfig(str(tmp_path / "ref.npz"), str(samples), extractor="fake-test",
                                     accelerator="cpu", cache_dir=str(tmp_path / "cache"), isc_splits=2))
    on_disk = json.loads((samples / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    m = on_disk["metrics"]
    for key in ("fid", "inception_score_mean", "inception_score_std", "kernel_inception_distance_mean",
                "kernel_inception_distance_std", "precision", "recall"):
        assert key in m and m[key] is not None, key
    assert m["fid"] > 0 and m["inception_score_mean"] >= 1.0 and 0 <= m["precision"] <= 1
    assert on_disk["extractor"] == {"name": "fake-test", "weights_sha256": "0" * 64, "weights_path": ""}
    assert on_disk["reference"]["kind"] == "npz-images" and len(on_disk["reference"]["sha256"]) == 64
    assert on_disk["reference"]["num_samples"] == 32
    assert on_disk["samples"]["num_samples"] == 24
    assert on_disk["samples"]["manifest"] == {"cfg_scale": 2.0, "seed": 7}


def test_evaluate_with_stats_only_reference_is_fid_only(tmp_path: Path) -> None:
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


def test_inception_wrapper_uses_explicit_weights_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random-weight Inception saved to a file: the wrapper loads it (no download) and gives 2048-d features."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_incv3

    with monkeypatch.context() as patch:  # build the architecture once without any weights to make a file
        patch.setattr(tf_incv3.torch, "load", lambda *a, **k: None)
        patch.setattr(tf_incv3.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = tf_incv3.FeatureExtractorInceptionV3("x", ["2048"], feature_extractor_weights_path="unused")
    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save(net.state_dict(), weights)
    fx = build_extractor("inception-v3-compat", weights=str(weights), batch_size=2)
    feats, logits = fx.features_and_logits(torch.from_numpy(_images(3, 6, size=32)).permute(0, 3, 1, 2))
    assert feats.shape == (3, 2048) and logits.shape == (3, 1008)
    assert len(fx.weights_sha256) == 64


def test_cli_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from metrics.__main__ import main

    samples = _sample_dir(tmp_path)
    _write_png_folder(_images(30, 8), tmp_path / "ref")
    monkeypatch.setattr("sys.argv", ["metrics", "evaluate", "--samples", str(samples), "--reference", str(tmp_path / "ref"),
                                     "--extractor", "fake-test", "--metrics", "fid,kid", "--accelerator", "cpu",
                                     "--cache_dir", str(tmp_path / "cache")])
    main()
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["metrics"]) == {"fid", "kernel_inception_distance_mean", "kernel_inception_distance_std"}
    assert json.loads((samples / "metrics.json").read_text())["reference"]["kind"] == "folder"


def test_domain_extractor_is_found_by_name_in_a_fresh_process():
    import subprocess
    import sys

    code = ("from metrics.features import build_extractor\n"
            "try:\n    build_extractor('digits-classifier', weights=None)\n"
            "except FileNotFoundError as e:\n    print('missing-weights:', e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # Reaching the missing-weights error (not 'unknown feature extractor') means the plugin was imported.
    assert "missing-weights:" in result.stdout and "python -m study classifier" in result.stdout, result.stderr
