"""Tests for metrics.domain: the digits classifier that stands in for Inception on the embedded data set.

Uses the classifier trained once per session (`digits_classifier`, tests/metrics/conftest.py) and checks that
it recognises real digits, that features are deterministic and survive a save/load round trip, that missing
weights name the file, and that torch-fidelity and `metrics.features` can both use it. Training it is tested
with `study.domain_classifier`, FID formulas with `metrics.fid`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch_fidelity
from torch.utils.data import Dataset

from metrics.domain import (
    FIDELITY_NAME,
    DigitsFeatureExtractor,
    class_accuracy,
    load_domain_classifier,
    save_domain_classifier,
)
from metrics.features import build_extractor
from tokenizers_vq.files import file_sha256
from train.data.digits import NUM_CLASSES, digits_split


class _UInt8Images(Dataset):
    """In-memory uint8 [N,3,H,W] images, one [3,H,W] tensor per item, as torch-fidelity expects."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


@pytest.fixture(scope="module")
def val() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = digits_split("val")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def test_recognises_real_val_digits(digits_classifier: Path, val: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = val
    accuracy = class_accuracy(load_domain_classifier(digits_classifier), images, labels)
    assert accuracy >= 0.95
    meta = json.loads((digits_classifier.parent / "config.json").read_text())
    assert meta["val_accuracy"] == pytest.approx(accuracy)
    assert meta["train"]["seed"] == 0 and meta["config"]["feature_dim"] == 128


def test_shuffled_labels_give_chance_accuracy(
    digits_classifier: Path, val: tuple[torch.Tensor, torch.Tensor],
) -> None:
    images, labels = val
    shuffled = labels[torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(1))]
    assert class_accuracy(load_domain_classifier(digits_classifier), images, shuffled) < 0.30


def test_features_shapes_and_determinism(
    digits_classifier: Path, val: tuple[torch.Tensor, torch.Tensor],
) -> None:
    classifier = load_domain_classifier(digits_classifier)
    images = val[0][:40]
    with torch.no_grad():
        feats, logits = classifier(images)
        assert feats.shape == (40, 128) and logits.shape == (40, NUM_CLASSES)
        assert torch.equal(classifier.features(images), feats)
        assert torch.equal(classifier.logits(images), logits)
        # float input in [-1,1] (the project convention) means the same as uint8
        as_float = images.float() / 127.5 - 1.0
        torch.testing.assert_close(classifier.features(as_float), feats)
        # larger images are resized to 16x16 first
        big = torch.nn.functional.interpolate(images.float(), scale_factor=2, mode="nearest").to(torch.uint8)
        assert classifier.features(big).shape == (40, 128)
    with pytest.raises(ValueError, match=r"\[N,3,H,W\]"):
        classifier.features(images[:, :1])


def test_save_load_round_trip(
    digits_classifier: Path, val: tuple[torch.Tensor, torch.Tensor], tmp_path: Path,
) -> None:
    first = load_domain_classifier(digits_classifier)
    second = load_domain_classifier(save_domain_classifier(first, tmp_path / "copy").parent)
    also = load_domain_classifier(tmp_path / "copy" / "model.safetensors")  # the file path works too
    with torch.no_grad():
        reference = first.logits(val[0])
        assert torch.equal(second.logits(val[0]), reference)
        assert torch.equal(also.logits(val[0]), reference)


def test_missing_weights_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"nowhere.*config\.json.*python -m study classifier"):
        load_domain_classifier(missing)
    (missing).mkdir()
    (missing / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_domain_classifier(missing / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="feature_extractor_weights_path"):
        DigitsFeatureExtractor(FIDELITY_NAME, ["features"])
    with pytest.raises(FileNotFoundError, match="python -m study classifier"):
        build_extractor(FIDELITY_NAME)


def test_torch_fidelity_wrapper_shapes(
    digits_classifier: Path, val: tuple[torch.Tensor, torch.Tensor],
) -> None:
    extractor = DigitsFeatureExtractor(FIDELITY_NAME, ["logits", "features"],
                                       feature_extractor_weights_path=str(digits_classifier))
    logits, feats = extractor(val[0][:8])  # in the requested order
    assert logits.shape == (8, NUM_CLASSES) and feats.shape == (8, 128)
    assert extractor.get_default_feature_layer_for_metric("isc") == "logits"
    assert extractor.get_default_feature_layer_for_metric("fid") == "features"
    with pytest.raises(ValueError, match="uint8"):
        extractor(val[0][:8].float())


def test_metrics_features_registry(digits_classifier: Path, val: tuple[torch.Tensor, torch.Tensor]) -> None:
    extractor = build_extractor(FIDELITY_NAME, weights=digits_classifier.parent, batch_size=50)
    assert extractor.weights_sha256 == file_sha256(digits_classifier)
    feats, logits = extractor.features_and_logits(val[0])
    with torch.no_grad():
        expected_feats, expected_logits = load_domain_classifier(digits_classifier)(val[0])
    torch.testing.assert_close(feats, expected_feats)
    torch.testing.assert_close(logits, expected_logits)


def test_torch_fidelity_fid_and_is(digits_classifier: Path, val: tuple[torch.Tensor, torch.Tensor]) -> None:
    images = val[0]
    half = images.shape[0] // 2
    noise = torch.randint(0, 256, images[:half].shape, dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    common = dict(cuda=False, isc=True, fid=True, feature_extractor=FIDELITY_NAME,
                  feature_extractor_weights_path=str(digits_classifier), cache=False, save_cpu_ram=True,
                  verbose=False, isc_splits=2)
    real = torch_fidelity.calculate_metrics(input1=_UInt8Images(images[:half]),
                                            input2=_UInt8Images(images[half:2 * half]), **common)
    fake = torch_fidelity.calculate_metrics(input1=_UInt8Images(noise),
                                            input2=_UInt8Images(images[half:2 * half]), **common)
    fid_key, isc_key = "frechet_inception_distance", "inception_score_mean"
    assert real[fid_key] >= 0 and real[fid_key] * 10 < fake[fid_key]
    # real digits are confidently spread over 10 classes; noise collapses onto few
    assert real[isc_key] > 5.0 and real[isc_key] > 2 * fake[isc_key]
