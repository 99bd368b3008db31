"""Tests for `metrics.reference`: a reference set given as an .npz of images, a PNG folder or webdataset
shards gives the same statistics, and its features are cached and reused.

Never loads the real Inception: the small seeded "fake-test" extractor of tests/metrics/conftest.py.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_png

from metrics.features import build_extractor
from metrics.fid import FeatureStats
from metrics.reference import load_reference


def _images(n: int, seed: int, size: int = 8) -> np.ndarray:
    """uint8 [N,H,W,3] (ADM layout)."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _write_png_folder(images: np.ndarray, folder: Path) -> None:
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        (folder / f"{i:06d}.png").write_bytes(encode_png(torch.from_numpy(img).permute(2, 0, 1)).numpy().tobytes())


def test_npz_folder_and_shards_routes_agree(tmp_path: Path, fake_extractor) -> None:
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


def test_reference_cache_is_reused(tmp_path: Path, fake_extractor) -> None:
    _write_png_folder(_images(20, 3), tmp_path / "ref")
    fx = build_extractor("fake-test")
    fake_extractor.calls = 0
    first = load_reference(tmp_path / "ref", fx, cache_dir=tmp_path / "cache")
    assert fake_extractor.calls > 0 and first.cache_path is not None and first.cache_path.is_file()
    assert first.cache_path.name.startswith("ref-") and "-fake-test-000000000000.npz" in first.cache_path.name
    fake_extractor.calls = 0
    second = load_reference(tmp_path / "ref", fx, cache_dir=tmp_path / "cache")
    assert fake_extractor.calls == 0
    np.testing.assert_array_equal(second.stats.sigma, first.stats.sigma)
    np.testing.assert_array_equal(second.features, first.features)


def test_a_truncated_reference_shard_is_refused_not_read_as_fewer_images(tmp_path: Path, fake_extractor) -> None:
    images = _images(6, 3)
    _write_png_folder(images, tmp_path / "pngs")
    with tarfile.open(tmp_path / "ref-000.tar", "w") as tar:  # as an interrupted copy leaves it: 4 of 6 images
        for i, png in enumerate(sorted((tmp_path / "pngs").iterdir())[:4]):
            info = tarfile.TarInfo(f"{i:06d}.png")
            info.size = png.stat().st_size
            tar.addfile(info, io.BytesIO(png.read_bytes()))
    (tmp_path / "ref-000.json").write_text('{"num_samples": 6}')
    with pytest.raises(ValueError, match=r"ref-000.tar holds 4 images but .*ref-000.json records 6"):
        load_reference(tmp_path / "ref-000.tar", build_extractor("fake-test"), cache_dir=tmp_path / "cache")
    assert not list(tmp_path.glob("cache/*.npz"))  # no statistics cached from the short shard
