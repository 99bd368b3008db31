"""The coloured-shapes example data set (`train.prepare.shapes`, `python -m train.prepare shapes`): the same
seed gives the same files, every class and split gets its count, images have the asked size, each shape has
its own geometry, and the tree is what ImageFolderDataModule reads. Training on it is tested by the own-data
guide's test (tests/test_own_data_guide.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train.prepare.__main__ import main
from train.prepare.shapes import CLASSES, _inside, draw_shape, write_shapes


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_counts_sizes_and_layout(tmp_path: Path) -> None:
    summary = write_shapes(str(tmp_path / "s"), train_per_class=5, val_per_class=2, image_size=16, seed=0)
    assert summary["classes"] == list(CLASSES) == sorted(CLASSES)  # ImageFolder's label order
    for split, count in (("train", 5), ("val", 2)):
        assert sorted(p.name for p in (tmp_path / "s" / split).iterdir()) == sorted(CLASSES)
        for kind in CLASSES:
            files = sorted((tmp_path / "s" / split / kind).glob("*.png"))
            assert [f.name for f in files] == [f"{kind}_{i:05d}.png" for i in range(count)]
            assert {_pixels(f).shape for f in files} == {(16, 16, 3)}
    assert not list((tmp_path / "s").rglob("*.tmp"))  # atomic writes leave no temporary files
    write_shapes(str(tmp_path / "big"), train_per_class=1, val_per_class=1, image_size=24)
    assert _pixels(tmp_path / "big" / "val" / "disc" / "disc_00000.png").shape == (24, 24, 3)


def test_deterministic_for_a_seed_and_stable_under_more_images(tmp_path: Path) -> None:
    write_shapes(str(tmp_path / "a"), train_per_class=3, val_per_class=2, seed=7)
    write_shapes(str(tmp_path / "b"), train_per_class=3, val_per_class=2, seed=7)
    first = _tree(tmp_path / "a")
    assert len(first) == 4 * (3 + 2) and first == _tree(tmp_path / "b")  # byte for byte
    write_shapes(str(tmp_path / "c"), train_per_class=3, val_per_class=2, seed=8)
    other = _tree(tmp_path / "c")
    assert sum(first[name] != other[name] for name in first) == len(first)  # another seed: every image differs
    # more training images keep the first ones and leave val alone
    write_shapes(str(tmp_path / "d"), train_per_class=6, val_per_class=2, seed=7)
    more = _tree(tmp_path / "d")
    assert len(more) == 4 * (6 + 2) and all(more[name] == data for name, data in first.items())
    # within a split and class the images differ (position, size and colour are drawn per image)
    square = [_pixels(tmp_path / "d" / "train" / "square" / f"square_{i:05d}.png") for i in range(6)]
    assert len({image.tobytes() for image in square}) == 6


def test_each_shape_has_its_own_area() -> None:
    # analytic areas in units of r^2: square 4, disc pi, triangle 2, cross 20/9 (two 2r x 2r/3 bars)
    expected = {"square": 4.0, "disc": math.pi, "triangle": 2.0, "cross": 20 / 9}
    r, step = 6.0, 0.01
    coords = np.arange(-8, 8, step) + step / 2
    x, y = np.meshgrid(coords, coords)
    for kind, area in expected.items():
        measured = _inside(kind, x, y, r).sum() * step * step / (r * r)
        assert measured == pytest.approx(area, rel=0.01), kind
    with pytest.raises(ValueError, match="unknown shape"):
        _inside("star", x, y, r)


def test_a_shape_is_brighter_than_its_background() -> None:
    rng = np.random.default_rng(0)
    for _ in range(25):
        for kind in CLASSES:
            image = draw_shape(kind, rng, 16)
            # background channels are drawn in [0, 60], shape channels in [130, 255]
            assert (image.min(axis=2) >= 130).sum() >= 16, kind   # fully covered pixels of the shape
            if kind != "square":  # the top-left corner lies outside a disc, a triangle (apex up) and a cross
                assert image[0, 0].max() <= 60, kind
    with pytest.raises(ValueError, match="at least 8"):
        draw_shape("disc", rng, 4)


def test_refuses_stray_images_and_bad_counts(tmp_path: Path) -> None:
    write_shapes(str(tmp_path / "s"), train_per_class=4, val_per_class=1)
    write_shapes(str(tmp_path / "s"), train_per_class=4, val_per_class=1)  # the same call again: same files
    with pytest.raises(ValueError, match="would not write"):
        write_shapes(str(tmp_path / "s"), train_per_class=2, val_per_class=1)  # would leave 2 per class extra
    with pytest.raises(ValueError, match="must be positive"):
        write_shapes(str(tmp_path / "t"), train_per_class=0)


def test_command_line_and_image_folder_reading(tmp_path: Path) -> None:
    from train.data.images import ImageFolderDataModule

    root = tmp_path / "cli"
    summary = main(["shapes", "--out", str(root), "--train_per_class", "3", "--val_per_class", "2",
                    "--image_size", "12", "--seed", "1"])
    assert summary["root"] == str(root) and summary["image_size"] == 12 and summary["seed"] == 1
    data = ImageFolderDataModule(str(root), batch_size=8, num_workers=0, train_crop="center", flip=False)
    assert data.num_classes == 4 and data.image_size == 12
    images, labels = next(iter(data.val_dataloader()))
    assert tuple(images.shape) == (8, 3, 12, 12)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # sorted class folders: cross, disc, square, triangle
