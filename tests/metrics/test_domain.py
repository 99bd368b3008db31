"""Tests for metrics.domain: the domain classifier that stands in for Inception on small or non-natural data.

Uses the classifiers trained once per session (tests/metrics/conftest.py): `digits_classifier` on the
embedded digits and `shapes_classifier` on a tiny ImageFolder tree of coloured shapes. Checks that they
recognise real images, that features are deterministic and survive a save/load round trip, that missing,
old-format or swapped weights are refused with the fix, that torch-fidelity and `metrics.features` can both
use them (under `domain-classifier`, and the deprecated `digits-classifier`), and that `metrics.evaluate`
scores real images far better than noise in their feature space. Training is tested with
`study.domain_classifier` (tests/study), FID formulas with `metrics.fid`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
from torch.utils.data import Dataset

from metrics.domain import (
    DEPRECATED_NAME,
    FIDELITY_NAME,
    DomainClassifier,
    DomainClassifierConfig,
    DomainFeatureExtractor,
    class_accuracy,
    load_domain_classifier,
    save_domain_classifier,
    sized_config,
)
from metrics.evaluate import EvaluateConfig, evaluate
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


def _nchw(images_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def val() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = digits_split("val")
    return _nchw(images), torch.from_numpy(labels)


def test_sized_config_keeps_small_images_resolved() -> None:
    """16 and 32 px keep full resolution into the first stage and end on 4x4; 64 px starts with stride 2."""
    for size, stem, stages in ((16, 1, 4), (32, 1, 8), (64, 2, 8), (8, 1, 2)):
        config = sized_config(size, 5)
        assert (config.stem_stride, config.stage_stride) == (stem, stages)
        assert size // (stem * stages) >= 4
        classifier = DomainClassifier(config).eval()
        with torch.no_grad():
            maps = classifier.net.forward_features(torch.zeros(1, 3, size, size))
            feats, logits = classifier(torch.zeros(2, 3, size, size, dtype=torch.uint8))
        assert maps.shape[-1] == size // (stem * stages)
        assert feats.shape == (2, config.channels[-1]) and logits.shape == (2, 5)
    with pytest.raises(ValueError, match="four stages"):
        DomainClassifierConfig(channels=(16, 32))
    with pytest.raises(ValueError, match="timm model name"):
        DomainClassifierConfig(arch="no-such-net")


def test_recognises_real_val_digits(digits_classifier: Path, val: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = val
    accuracy = class_accuracy(load_domain_classifier(digits_classifier), images, labels)
    assert accuracy >= 0.95
    meta = json.loads((digits_classifier.parent / "config.json").read_text())
    assert meta["val_accuracy"] == pytest.approx(accuracy)
    assert meta["train"]["seed"] == 0 and meta["feature_dim"] == 128 and meta["config"]["arch"] == "resnet"
    assert meta["classes"] == [str(i) for i in range(10)] and meta["data"]["kind"] == "digits"
    assert meta["weights_sha256"] == file_sha256(digits_classifier) and len(meta["data"]["sha256"]) == 64


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
        # eval mode: an image's features do not depend on the rest of its batch (batch norm statistics)
        torch.testing.assert_close(classifier.features(images[:3]), feats[:3])
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
        DomainFeatureExtractor(FIDELITY_NAME, ["features"])
    with pytest.raises(FileNotFoundError, match="python -m study classifier"):
        build_extractor(FIDELITY_NAME)


def test_old_format_and_swapped_weights_are_refused(digits_classifier: Path, shapes_classifier: Path,
                                                    tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(digits_classifier, old / "model.safetensors")
    # what the two-block CNN of earlier versions wrote
    (old / "config.json").write_text(json.dumps({"kind": "engram-vision-domain-classifier", "config": {
        "image_size": 16, "width": 32, "feature_dim": 128, "num_classes": 10}}))
    with pytest.raises(ValueError, match=r"format 1.*python -m study classifier --out .*old"):
        load_domain_classifier(old)
    with pytest.raises(ValueError, match="format 1"):
        build_extractor(FIDELITY_NAME, weights=old)
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    shutil.copy(digits_classifier.parent / "config.json", swapped / "config.json")
    shutil.copy(shapes_classifier, swapped / "model.safetensors")
    with pytest.raises(ValueError, match="sha256 differs"):
        load_domain_classifier(swapped)


def test_torch_fidelity_wrapper_shapes(
    digits_classifier: Path, val: tuple[torch.Tensor, torch.Tensor],
) -> None:
    extractor = DomainFeatureExtractor(FIDELITY_NAME, ["logits", "features"],
                                       feature_extractor_weights_path=str(digits_classifier))
    logits, feats = extractor(val[0][:8])  # in the requested order
    assert logits.shape == (8, NUM_CLASSES) and feats.shape == (8, 128)
    assert extractor.get_default_feature_layer_for_metric("isc") == "logits"
    assert extractor.get_default_feature_layer_for_metric("fid") == "features"
    with pytest.raises(ValueError, match="uint8"):
        extractor(val[0][:8].float())


def test_metrics_features_registry_and_description(
    digits_classifier: Path, val: tuple[torch.Tensor, torch.Tensor],
) -> None:
    extractor = build_extractor(FIDELITY_NAME, weights=digits_classifier.parent, batch_size=50)
    assert extractor.name == "domain-classifier" and extractor.weights_sha256 == file_sha256(digits_classifier)
    feats, logits = extractor.features_and_logits(val[0])
    with torch.no_grad():
        expected_feats, expected_logits = load_domain_classifier(digits_classifier)(val[0])
    torch.testing.assert_close(feats, expected_feats)
    torch.testing.assert_close(logits, expected_logits)
    meta = json.loads((digits_classifier.parent / "config.json").read_text())
    description = extractor.description
    assert description["classes"] == meta["classes"] and description["val_accuracy"] == meta["val_accuracy"]
    assert description["trained_on"]["kind"] == "digits" and description["trained_on"]["sha256"] == meta["data"]["sha256"]
    assert description["architecture"]["arch"] == "resnet" and description["architecture"]["feature_dim"] == 128
    with pytest.warns(FutureWarning, match="domain-classifier"):
        alias = build_extractor(DEPRECATED_NAME, weights=digits_classifier.parent, batch_size=50)
    assert alias.name == FIDELITY_NAME and torch.equal(alias.features(val[0][:5]), feats[:5])


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


def test_shapes_classifier_learns_its_tree(shapes: dict, shapes_classifier: Path) -> None:
    """Trained on 144 shapes, it names the 48 held-out ones far above chance (1/3) and records its data."""
    meta = json.loads((shapes_classifier.parent / "config.json").read_text())
    assert meta["val_accuracy"] >= 0.8 and meta["classes"] == ["cross", "disk", "square"]
    assert meta["data"]["kind"] == "folder" and meta["data"]["path"] == str(Path(shapes["train"]).resolve())
    assert meta["data"]["num_images"] == 144 and meta["val"]["num_images"] == 48
    assert meta["config"]["image_size"] == 16 and meta["config"]["num_classes"] == 3
    images, labels = _nchw(shapes["val_images"]), torch.from_numpy(shapes["val_labels"])
    assert class_accuracy(load_domain_classifier(shapes_classifier), images, labels) == pytest.approx(
        meta["val_accuracy"])


def test_evaluate_real_shapes_beat_noise(shapes: dict, shapes_classifier: Path, tmp_path: Path) -> None:
    """`python -m metrics evaluate --extractor domain-classifier --metrics fid,is,kid,prc,acc` through
    `evaluate`: real held-out shapes against the training tree score a much smaller FID and KID, a higher
    precision and class accuracy than uniform noise."""
    images, labels = shapes["val_images"], shapes["val_labels"]
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    reports = {}
    for name, arr in (("real", images), ("noise", noise)):
        (tmp_path / name).mkdir()
        np.savez(tmp_path / name / "samples.npz", arr_0=arr, labels=labels)
        reports[name] = evaluate(EvaluateConfig(
            str(shapes["train"]), str(tmp_path / name), extractor=FIDELITY_NAME,
            weights=str(shapes_classifier.parent), metrics="fid,is,kid,prc,acc", accelerator="cpu",
            cache_dir=str(tmp_path / "cache"), kid_subset_size=40, isc_splits=2))["metrics"]
    real, fake = reports["real"], reports["noise"]
    assert 0 <= real["fid"] and real["fid"] * 20 < fake["fid"]
    assert real["kid_mean"] < fake["kid_mean"] and real["precision"] > fake["precision"]
    assert real["class_accuracy"] >= 0.8 and real["is_mean"] > fake["is_mean"]
    assert (tmp_path / "real" / "metrics.json").is_file()
