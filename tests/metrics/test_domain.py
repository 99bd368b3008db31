"""Tests for metrics.domain: the digits classifier that stands in for Inception on the embedded data set.

Trains it once per module on CPU (about 10 s), then checks that it recognises real digits, that features are
deterministic and survive a save/load round trip, that missing weights name the file, and that torch-fidelity
and `metrics.features` can both use it. FID formulas themselves are tested with `metrics.fid`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch_fidelity
from safetensors.torch import load_file
from torch.utils.data import Dataset

from metrics.domain import (
    FIDELITY_NAME,
    DigitsFeatureExtractor,
    class_accuracy,
    load_domain_classifier,
    save_domain_classifier,
)
from metrics.features import build_extractor
from study.domain_classifier import train_classifier, train_domain_classifier
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
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_domain_classifier(tmp_path_factory.mktemp("domain") / "classifier", seed=0)


@pytest.fixture(scope="module")
def val() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = digits_split("val")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def test_recognises_real_val_digits(weights: Path, val: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = val
    accuracy = class_accuracy(load_domain_classifier(weights), images, labels)
    assert accuracy >= 0.95
    meta = json.loads((weights.parent / "config.json").read_text())
    assert meta["val_accuracy"] == pytest.approx(accuracy)
    assert meta["train"]["seed"] == 0 and meta["config"]["feature_dim"] == 128


def test_shuffled_labels_give_chance_accuracy(weights: Path, val: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = val
    shuffled = labels[torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(1))]
    assert class_accuracy(load_domain_classifier(weights), images, shuffled) < 0.30


def test_features_shapes_and_determinism(weights: Path, val: tuple[torch.Tensor, torch.Tensor]) -> None:
    classifier = load_domain_classifier(weights)
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


def test_training_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    state = [load_file(train_domain_classifier(tmp_path / name, epochs=1, seed=seed))
             for name, seed in (("a", 3), ("b", 3), ("c", 4))]
    assert all(torch.equal(state[0][k], state[1][k]) for k in state[0])
    assert not all(torch.equal(state[0][k], state[2][k]) for k in state[0])


def test_save_load_round_trip(weights: Path, val: tuple[torch.Tensor, torch.Tensor], tmp_path: Path) -> None:
    first = load_domain_classifier(weights)
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


def test_torch_fidelity_wrapper_shapes(weights: Path, val: tuple[torch.Tensor, torch.Tensor]) -> None:
    extractor = DigitsFeatureExtractor(FIDELITY_NAME, ["logits", "features"],
                                       feature_extractor_weights_path=str(weights))
    logits, feats = extractor(val[0][:8])  # in the requested order
    assert logits.shape == (8, NUM_CLASSES) and feats.shape == (8, 128)
    assert extractor.get_default_feature_layer_for_metric("isc") == "logits"
    assert extractor.get_default_feature_layer_for_metric("fid") == "features"
    with pytest.raises(ValueError, match="uint8"):
        extractor(val[0][:8].float())


def test_metrics_features_registry(weights: Path, val: tuple[torch.Tensor, torch.Tensor]) -> None:
    extractor = build_extractor(FIDELITY_NAME, weights=weights.parent, batch_size=50)
    assert extractor.weights_sha256 == file_sha256(weights)
    feats, logits = extractor.features_and_logits(val[0])
    with torch.no_grad():
        expected_feats, expected_logits = load_domain_classifier(weights)(val[0])
    torch.testing.assert_close(feats, expected_feats)
    torch.testing.assert_close(logits, expected_logits)


def test_torch_fidelity_fid_and_is(weights: Path, val: tuple[torch.Tensor, torch.Tensor]) -> None:
    images = val[0]
    half = images.shape[0] // 2
    noise = torch.randint(0, 256, images[:half].shape, dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    common = dict(cuda=False, isc=True, fid=True, feature_extractor=FIDELITY_NAME,
                  feature_extractor_weights_path=str(weights), cache=False, save_cpu_ram=True,
                  verbose=False, isc_splits=2)
    real = torch_fidelity.calculate_metrics(input1=_UInt8Images(images[:half]),
                                            input2=_UInt8Images(images[half:2 * half]), **common)
    fake = torch_fidelity.calculate_metrics(input1=_UInt8Images(noise),
                                            input2=_UInt8Images(images[half:2 * half]), **common)
    fid_key, isc_key = "frechet_inception_distance", "inception_score_mean"
    assert real[fid_key] >= 0 and real[fid_key] * 10 < fake[fid_key]
    # real digits are confidently spread over 10 classes; noise collapses onto few
    assert real[isc_key] > 5.0 and real[isc_key] > 2 * fake[isc_key]


def test_command_trains_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    accuracy = train_classifier(out=str(tmp_path / "cli"), epochs=1, seed=0)
    assert (tmp_path / "cli" / "model.safetensors").is_file() and 0.0 <= accuracy <= 1.0
    assert "val accuracy" in capsys.readouterr().out


def test_evaluate_reports_class_accuracy_and_domain_fid(weights: Path, tmp_path: Path) -> None:
    """Real digits in the ADM samples layout: the domain classifier recognises the requested classes, and
    shuffled labels (samples that ignore their class) score near chance."""
    import numpy as np

    from metrics.evaluate import EvaluateConfig, evaluate

    images, labels = digits_split("val")
    train_images, _ = digits_split("train")
    np.savez(tmp_path / "reference.npz", arr_0=train_images)
    (tmp_path / "real").mkdir()
    np.savez(tmp_path / "real" / "samples.npz", arr_0=images, labels=labels)
    report = evaluate(EvaluateConfig(str(tmp_path / "reference.npz"), str(tmp_path / "real"),
                                     extractor="digits-classifier", weights=str(weights.parent), metrics="fid,is,acc",
                                     accelerator="cpu", cache_dir=str(tmp_path)))
    assert report["metrics"]["class_accuracy"] >= 0.95
    assert 0 <= report["metrics"]["fid"] < 20 and report["extractor"]["name"] == "digits-classifier"
    (tmp_path / "shuffled").mkdir()
    np.savez(tmp_path / "shuffled" / "samples.npz", arr_0=images, labels=np.random.default_rng(0).permutation(labels))
    shuffled = evaluate(EvaluateConfig(str(tmp_path / "reference.npz"), str(tmp_path / "shuffled"),
                                       extractor="digits-classifier", weights=str(weights.parent), metrics="acc",
                                       accelerator="cpu", cache_dir=str(tmp_path)))
    assert shuffled["metrics"]["class_accuracy"] < 0.3


def test_tokenizer_eval_psnr_ssim_rfid(weights: Path, tmp_path: Path) -> None:
    """A tokenizer that reconstructs perfectly scores PSNR 100 (capped), SSIM 1, rFID 0; a random one does not."""
    import numpy as np

    from metrics import tokenizer_eval
    from tokenizers_vq import VQModel, vq_config
    from tokenizers_vq.checkpoint import save_vq

    images, _ = digits_split("val")
    np.savez(tmp_path / "val.npz", arr_0=images)
    torch.manual_seed(0)
    save_vq(VQModel(vq_config("vq-tiny")), tmp_path / "vq")
    random_tok = tokenizer_eval.evaluate_tokenizer(str(tmp_path / "vq"), str(tmp_path / "val.npz"),
                                                   extractor="digits-classifier", weights=str(weights.parent))
    m = random_tok["metrics"]
    assert m["psnr"] < 20 and m["ssim"] < 0.9 and m["rfid"] > 1 and random_tok["num_images"] == 297
    assert (tmp_path / "vq" / "eval_metrics.json").is_file()

    identity = lambda tokenizer, batch, device: batch  # noqa: E731 - a perfect tokenizer
    original = tokenizer_eval.reconstruct
    tokenizer_eval.reconstruct = identity
    try:
        perfect = tokenizer_eval.evaluate_tokenizer(str(tmp_path / "vq"), str(tmp_path / "val.npz"),
                                                    extractor="digits-classifier", weights=str(weights.parent),
                                                    out=str(tmp_path / "perfect.json"))["metrics"]
    finally:
        tokenizer_eval.reconstruct = original
    assert perfect["ssim"] == pytest.approx(1.0, abs=1e-6) and abs(perfect["rfid"]) < 1e-6 and perfect["psnr"] > 60
