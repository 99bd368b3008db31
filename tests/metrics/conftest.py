"""Fixtures shared by the metrics tests: the domain classifier trained on the embedded digits, and a tiny
labelled data set of coloured shapes (an ImageFolder tree written here) with a domain classifier trained on
it. The fake "fake-test" extractor they also use is tests/conftest.py's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from study.domain_classifier import ClassifierData, ClassifierTraining, train_domain_classifier

SHAPES = ("cross", "disk", "square")  # sorted: ImageFolder's label order
SHAPE_SIZE = 16


@pytest.fixture(scope="session")
def digits_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The domain classifier trained once per session on the embedded digits (CPU, seed 0, 8 epochs, about
    10 s on one core): its model.safetensors."""
    return train_domain_classifier(tmp_path_factory.mktemp("domain") / "classifier",
                                   training=ClassifierTraining(seed=0, epochs=8))


def draw_shapes(count_per_class: int, seed: int, size: int = SHAPE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,size,size,3], labels int64 [N]): one shape of `SHAPES` per image, in a random bright
    colour on a random dark background, jittered in position and size (so colour never tells the class)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, labels = [], []
    for label, shape in enumerate(SHAPES):
        for _ in range(count_per_class):
            cy, cx = rng.integers(size // 2 - 2, size // 2 + 3, 2)
            r = int(rng.integers(size // 4, size // 4 + 3))
            if shape == "square":
                mask = (abs(yy - cy) <= r - 1) & (abs(xx - cx) <= r - 1)
            elif shape == "disk":
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                mask = ((abs(yy - cy) <= 1) & (abs(xx - cx) <= r + 1)) | ((abs(xx - cx) <= 1) & (abs(yy - cy) <= r + 1))
            image = np.empty((size, size, 3), np.uint8)
            image[:] = rng.integers(0, 70, 3)
            image[mask] = rng.integers(150, 256, 3)
            images.append(image)
            labels.append(label)
    return np.stack(images), np.asarray(labels, np.int64)


def write_tree(folder: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write images as an ImageFolder tree `folder/<shape>/<index>.png`; returns `folder`."""
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = folder / SHAPES[label] / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    return folder


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Coloured shapes 16x16, 3 classes: `train` (48 per class) and `val` (16 per class) ImageFolder trees,
    with the val images and labels as arrays (`val_images` uint8 [N,16,16,3], `val_labels`)."""
    root = tmp_path_factory.mktemp("shapes")
    train = write_tree(root / "train", *draw_shapes(48, seed=0))
    val_images, val_labels = draw_shapes(16, seed=1)
    return {"train": train, "val": write_tree(root / "val", val_images, val_labels),
            "val_images": val_images, "val_labels": val_labels}


@pytest.fixture(scope="session")
def shapes_classifier(shapes: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The domain classifier trained on the shapes tree (validated on its own val tree): model.safetensors."""
    data = ClassifierData(str(shapes["train"]), val=str(shapes["val"]))
    return train_domain_classifier(tmp_path_factory.mktemp("shapes-classifier") / "classifier", data,
                                   ClassifierTraining(seed=0, epochs=10, batch_size=32, lr=1e-2))
