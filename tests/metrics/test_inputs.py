"""`python -m metrics evaluate` checks every input before any sample's features are extracted: a missing
reference or samples folder, an unknown extractor, a reference of another feature size or with NaN
statistics, a cut samples.npz, labels of another length or outside the classifier's classes, an unfinished
sample folder and an empty PNG; an image that cannot be decoded is named with the fix.

Uses the seeded "fake-test" extractor (8 features, 5 logits; tests/conftest.py), whose `calls` counts
forward passes: at most one (the one-image probe of its sizes) may run before an input error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_png

from metrics.evaluate import EvaluateConfig, evaluate
from metrics.fid import FeatureStats


def _images(n: int, seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    samples = tmp_path / "samples"
    samples.mkdir()
    np.savez(samples / "samples.npz", arr_0=_images(24, 4), labels=np.arange(24, dtype=np.int64) % 5)
    np.savez(tmp_path / "ref.npz", arr_0=_images(32, 5))
    return {"samples": samples, "reference": tmp_path / "ref.npz", "root": tmp_path}


def _evaluate(files: dict[str, Path], fake_extractor, **overrides) -> dict:
    args = dict(reference=str(files["reference"]), samples=str(files["samples"]), extractor="fake-test",
                accelerator="cpu", cache_dir=str(files["root"] / "cache"), isc_splits=2, metrics="fid,is,acc")
    fake_extractor.calls = 0
    return evaluate(EvaluateConfig(**(args | overrides)))


def _refused(files, fake_extractor, error, words, **overrides) -> str:
    with pytest.raises(error) as info:
        _evaluate(files, fake_extractor, **overrides)
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert fake_extractor.calls <= 1  # the one-image probe at most: no sample's features were extracted
    assert not (files["samples"] / "metrics.json").exists()
    return message


def test_a_missing_reference_is_named_before_any_extraction(files, fake_extractor):
    for missing in ("missing.npz", "missing_folder"):
        path = files["root"] / missing
        _refused(files, fake_extractor, FileNotFoundError, [f"--reference {path} does not exist", "image folder"],
                 reference=str(path))
        assert fake_extractor.calls == 0


def test_a_reference_of_another_feature_size_is_refused(files, fake_extractor):
    stats = FeatureStats.from_features(np.random.default_rng(0).normal(size=(40, 6)))
    stats.save_npz(files["root"] / "stats6.npz")
    _refused(files, fake_extractor, ValueError, ["6-dimensional features", "fake-test gives 8-dimensional"],
             reference=str(files["root"] / "stats6.npz"))


def test_a_reference_with_nan_statistics_is_refused(files, fake_extractor):
    mu, sigma = np.zeros(8), np.eye(8)
    mu[3] = np.nan
    np.savez(files["root"] / "nan.npz", mu=mu, sigma=sigma)
    _refused(files, fake_extractor, ValueError, [str(files["root"] / "nan.npz"), "(mu) hold 1 NaN or inf"],
             reference=str(files["root"] / "nan.npz"))


def test_a_missing_samples_folder_is_named(files, fake_extractor):
    path = files["root"] / "no_such_run"
    _refused(files, fake_extractor, FileNotFoundError, [f"--samples {path} does not exist", "python -m sample"],
             samples=str(path))
    assert fake_extractor.calls == 0


def test_an_unknown_extractor_is_named_with_the_known_ones(files, fake_extractor):
    _refused(files, fake_extractor, ValueError, ["--extractor 'inceptoin' is not a known feature extractor",
                                                 "inception-v3-compat", "fake-test"], extractor="inceptoin")


def test_a_cut_samples_npz_is_named(files, fake_extractor):
    npz = files["samples"] / "samples.npz"
    npz.write_bytes(npz.read_bytes()[:200])
    _refused(files, fake_extractor, ValueError, [f"--samples {npz} is not a readable .npz"])


@pytest.mark.parametrize(("labels", "words"), [
    (np.arange(23) % 5, ["need one label per image (24)", "shape (23,)"]),
    (np.arange(24) % 7, ["labels lie in [0, 6]", "knows 5 classes [0, 5)"]),
    (np.full(24, -1), ["labels lie in [-1, -1]"]),
])
def test_labels_of_another_length_or_outside_the_classes_are_refused(files, fake_extractor, labels, words):
    np.savez(files["samples"] / "samples.npz", arr_0=_images(24, 4), labels=labels.astype(np.int64))
    _refused(files, fake_extractor, ValueError, ["(labels)", *words])


def test_an_unfinished_sample_folder_is_refused(files, fake_extractor):
    run = files["root"] / "run"
    (run / "images").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"complete": False}))
    _refused(files, fake_extractor, ValueError, ["sampling has not finished", "rerun the same `python -m sample`"],
             samples=str(run))


def test_an_empty_png_in_the_samples_is_named_up_front(files, fake_extractor):
    images = files["root"] / "pngs"
    images.mkdir()
    for i, image in enumerate(_images(4, 1)):
        (images / f"{i:06d}.png").write_bytes(encode_png(torch.from_numpy(image).permute(2, 0, 1)).numpy().tobytes())
    (images / "000004.png").write_bytes(b"")
    _refused(files, fake_extractor, ValueError, [str(images / "000004.png"), "1 empty image file(s)",
                                                 "rerun the same `python -m sample` command"], samples=str(images))


def test_an_unreadable_reference_image_is_named_with_the_fix(files, fake_extractor):
    folder = files["root"] / "ref_folder"
    folder.mkdir()
    for i, image in enumerate(_images(4, 2)):
        (folder / f"{i:06d}.png").write_bytes(encode_png(torch.from_numpy(image).permute(2, 0, 1)).numpy().tobytes())
    (folder / "000002.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(ValueError) as info:
        _evaluate(files, fake_extractor, reference=str(folder))
    message = str(info.value)
    assert f"{folder / '000002.png'} is not a readable image" in message and "delete it" in message, message
