"""The metric functions refuse what would give a meaningless number or an internal scipy error: NaN or inf
in features or statistics (`metrics.fid`), statistics files holding them, and labels of another length
or outside the classes (`metrics.domain.class_accuracy`); every error names the input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from metrics.domain import DomainClassifier, DomainClassifierConfig, class_accuracy
from metrics.fid import FeatureStats, feature_stats, frechet_distance


@pytest.fixture(scope="module")
def stats() -> tuple[np.ndarray, np.ndarray]:
    return feature_stats(np.random.default_rng(0).normal(size=(50, 4)))


@pytest.mark.parametrize(("which", "value"), [("mu1", np.nan), ("sigma2", np.inf), ("sigma1", -np.inf)])
def test_frechet_distance_names_the_non_finite_input(stats, which, value):
    mu, sigma = stats
    inputs = {"mu1": mu.copy(), "sigma1": sigma.copy(), "mu2": mu.copy() + 0.1, "sigma2": sigma.copy()}
    inputs[which][(0,) * inputs[which].ndim] = value
    names = ("the samples", "the reference file ref.npz")
    with pytest.raises(ValueError) as info:
        frechet_distance(inputs["mu1"], inputs["sigma1"], inputs["mu2"], inputs["sigma2"], names=names)
    part = "mu" if which.startswith("mu") else "sigma"
    named = names[0] if which.endswith("1") else names[1]
    assert f"{named} ({part}) hold 1 NaN or inf value(s)" in str(info.value), str(info.value)


def test_non_finite_features_are_refused_naming_them():
    features = np.random.default_rng(0).normal(size=(10, 3))
    features[[2, 5], 1] = np.nan
    with pytest.raises(ValueError, match=r"the features of --samples S hold 2 NaN or inf value\(s\) out of 30"):
        FeatureStats.from_features(features, "--samples S")


def test_a_statistics_file_with_inf_or_cut_short_is_named(tmp_path: Path, stats):
    mu, sigma = stats
    sigma = sigma.copy()
    sigma[1, 1] = np.inf
    np.savez(tmp_path / "inf.npz", mu=mu, sigma=sigma)
    with pytest.raises(ValueError, match=r"inf.npz \(sigma\) hold 1 NaN or inf"):
        FeatureStats.load_npz(tmp_path / "inf.npz")
    FeatureStats(*stats).save_npz(tmp_path / "good.npz")
    (tmp_path / "cut.npz").write_bytes((tmp_path / "good.npz").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"statistics file .*cut.npz cannot be read"):
        FeatureStats.load_npz(tmp_path / "cut.npz")
    np.savez(tmp_path / "shape.npz", mu=mu, sigma=np.eye(3))
    with pytest.raises(ValueError, match=r"mu must be \[D\] and sigma \[D,D\], got mu \(4,\) and sigma \(3, 3\)"):
        FeatureStats.load_npz(tmp_path / "shape.npz")


@pytest.fixture(scope="module")
def classifier() -> DomainClassifier:
    torch.manual_seed(0)
    return DomainClassifier(DomainClassifierConfig(num_classes=3)).eval()


@pytest.mark.parametrize(("labels", "match"), [
    (torch.tensor([0, 1, 3, 2]), r"labels lie in \[0, 3\] but the classifier knows 3 classes"),
    (torch.tensor([0, -1, 1, 2]), r"labels lie in \[-1, 2\]"),
    (torch.tensor([[0, 1], [1, 2]]).reshape(4, 1), r"need one label per image \(4\)"),
    (torch.tensor([0.0, 1.0, 1.0, 2.0]), "labels must be integers"),
])
def test_class_accuracy_refuses_labels_it_cannot_score(classifier, labels, match):
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    with pytest.raises(ValueError, match=match):
        class_accuracy(classifier, images, labels)


def test_class_accuracy_refuses_nan_images_and_still_scores_good_input(classifier):
    images = torch.zeros(4, 3, 16, 16)
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="images hold NaN or inf"):
        class_accuracy(classifier, images, torch.tensor([0, 1, 2, 0]))
    good = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    predicted = classifier.logits(good).argmax(1)
    assert class_accuracy(classifier, good, predicted) == 1.0
