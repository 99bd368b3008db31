"""Tests for `study.domain_classifier`: training the domain classifier on an ImageFolder tree, on image
shards and on the embedded digits is deterministic for a seed (weights and held-out split), records its data,
and refuses bad input before training; the `python -m study classifier` entry point (`train_classifier`,
through the real command line) writes the weights and reports the validation accuracy.

CPU only: one- or two-epoch trainings of tiny trees (bars of random colours, written here) in about a second
each. What the trained classifier measures is tested with `metrics.domain` (tests/metrics/test_domain.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from study.__main__ import main
from study.domain_classifier import (
    ClassifierData,
    ClassifierTraining,
    load_classifier_data,
    train_classifier,
    train_domain_classifier,
)
from train.data.transforms import ImageSizeError

CLASSES = ("horizontal", "vertical")


def _write_bars(folder: Path, per_class: int, seed: int, size: int = 16,
                classes: tuple[str, ...] = CLASSES) -> Path:
    """An ImageFolder tree of one bright bar per image (horizontal or vertical, random colours, position)."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            image = np.empty((size, size, 3), np.uint8)
            image[:] = rng.integers(0, 60, 3)
            at = int(rng.integers(2, size - 4))
            if label % 2 == 0:
                image[at:at + 3, 2:-2] = rng.integers(160, 256, 3)
            else:
                image[2:-2, at:at + 3] = rng.integers(160, 256, 3)
            Image.fromarray(image).save(folder / name / f"{index:03d}.png")
    return folder


@pytest.fixture(scope="module")
def bars(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_bars(tmp_path_factory.mktemp("bars") / "train", per_class=20, seed=0)


FAST = ClassifierTraining(epochs=2, batch_size=16, lr=1e-2)


def _train(out: Path, data: str | None, seed: int, **kw) -> tuple[dict, dict]:
    training = ClassifierTraining(**{**FAST.__dict__, "seed": seed})
    weights = train_domain_classifier(out, ClassifierData(data, **kw), training)
    return load_file(weights), json.loads((weights.parent / "config.json").read_text())


def test_training_is_deterministic_for_a_seed(bars: Path, tmp_path: Path) -> None:
    (a, meta_a), (b, meta_b), (c, _) = (_train(tmp_path / name, str(bars), seed)
                                        for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert meta_a["weights_sha256"] == meta_b["weights_sha256"]
    assert meta_a["val_accuracy"] == meta_b["val_accuracy"]


def test_held_out_split_is_seeded_and_recorded(bars: Path) -> None:
    data = ClassifierData(str(bars), val_fraction=0.25)
    first = load_classifier_data(data, seed=1)
    again, other = load_classifier_data(data, seed=1), load_classifier_data(data, seed=2)
    train, val, classes, size = first
    assert classes == list(CLASSES) and size == 16 and val.labels.numel() == 10 and train.labels.numel() == 30
    assert torch.equal(val.inputs, again[1].inputs) and not torch.equal(val.inputs, other[1].inputs)
    assert val.source["val_fraction"] == 0.25 and val.source["split_seed"] == 1
    assert train.inputs.shape == (30, 3, 16, 16) and -1 <= float(train.inputs.min()) < float(train.inputs.max()) <= 1


def test_folder_and_shards_record_their_data(bars: Path, tmp_path: Path) -> None:
    from train.prepare.write_shards import write_shards

    _, folder = _train(tmp_path / "folder", str(bars), seed=0)
    assert folder["classes"] == list(CLASSES) and folder["data"]["kind"] == "folder"
    assert folder["data"]["path"] == str(bars.resolve()) and len(folder["data"]["sha256"]) == 64
    assert folder["data"]["num_train"] + folder["val"]["num_images"] == 40
    assert folder["train"]["epochs"] == 2 and folder["config"]["num_classes"] == 2
    assert 0.0 <= folder["val_accuracy"] <= 1.0

    write_shards(str(bars), str(tmp_path / "shards"), shard_size=16)
    _, shards = _train(tmp_path / "from-shards", str(tmp_path / "shards"), seed=0)
    assert shards["data"]["kind"] == "shards" and shards["classes"] == list(CLASSES)
    assert shards["data"]["num_images"] == 40 and shards["data"]["sha256"] != folder["data"]["sha256"]


def test_separate_val_tree_and_another_input_size(bars: Path, tmp_path: Path) -> None:
    val = _write_bars(tmp_path / "val", per_class=6, seed=1)
    weights = train_domain_classifier(tmp_path / "out", ClassifierData(str(bars), val=str(val)),
                                      ClassifierTraining(epochs=1, batch_size=16), image_size=24)
    meta = json.loads((weights.parent / "config.json").read_text())
    assert meta["val"]["path"] == str(val.resolve()) and meta["val"]["num_images"] == 12
    assert meta["config"]["image_size"] == 24 and meta["data"]["loaded_size"] == 16


def test_bad_input_is_refused_before_training(bars: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="val needs data"):
        ClassifierData(None, val=str(bars))
    with pytest.raises(ValueError, match="glob"):
        ClassifierData(str(tmp_path / "train-*.tar"))
    with pytest.raises(ValueError, match="epochs"):
        ClassifierTraining(epochs=0)
    with pytest.raises(ValueError, match="timm model name"):
        train_domain_classifier(tmp_path / "x", ClassifierData(str(bars)), FAST, arch="no-such-net")
    single = _write_bars(tmp_path / "single", per_class=4, seed=0, classes=("only",))
    with pytest.raises(ValueError, match="one class"):
        load_classifier_data(ClassifierData(str(single)))
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="without labels"):
        load_classifier_data(ClassifierData(str(tmp_path / "images.npz")))
    other = _write_bars(tmp_path / "other", per_class=3, seed=2, classes=("diagonal", "vertical"))
    with pytest.raises(ValueError, match="other classes"):
        load_classifier_data(ClassifierData(str(bars), val=str(other)))
    bigger = _write_bars(tmp_path / "bigger", per_class=3, seed=3, size=20)
    with pytest.raises(ImageSizeError, match=r"--image_size S --resize true"):
        load_classifier_data(ClassifierData(str(bars), val=str(bigger)))
    with pytest.raises(ValueError, match="resize needs image_size"):
        load_classifier_data(ClassifierData(str(bars), resize=True))
    resized = load_classifier_data(ClassifierData(str(bars), val=str(bigger), resize=True), image_size=16)
    assert resized[1].inputs.shape == (6, 3, 16, 16)


def test_command_trains_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    accuracy = train_classifier(out=str(tmp_path / "cli"), epochs=1, seed=0)
    assert (tmp_path / "cli" / "model.safetensors").is_file() and 0.0 <= accuracy <= 1.0
    printed = capsys.readouterr().out
    assert "val accuracy" in printed and "297 images" in printed


def test_command_line_takes_a_folder(bars: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    accuracy = main(["classifier", "--out", str(tmp_path / "cli"), "--data", str(bars), "--epochs", "2",
                     "--batch_size", "16", "--lr", "0.01", "--val_fraction", "0.25"])
    meta = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert accuracy == meta["val_accuracy"] and meta["val"]["num_images"] == 10
    assert "2 classes, 16 px" in capsys.readouterr().out
