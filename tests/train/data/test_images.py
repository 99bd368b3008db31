"""Tests for `train.data.images`: the embedded-digits DataModule and the ImageFolder DataModule, which skips
and counts corrupt files (also across DataLoader workers) and never resizes an image unless asked
(`image_size: null` = as stored; another size is an error at setup naming the file and the fix).

CPU only and fast: the image tree is the `tree` fixture of tests/train/conftest.py, a dozen 32x32 files.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from train.data.digits import digits_split
from train.data.images import CorruptImageWarning, DigitsDataModule, ImageFolderDataModule
from train.data.transforms import ImageSizeError

S = 32  # image side of the `tree` fixture's images


def _all(loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_digits_datamodule_batches() -> None:
    dm = DigitsDataModule(batch_size=64)
    assert dm.num_classes == 10 and dm.image_size == 16
    batches = list(dm.train_dataloader())
    images, labels = batches[0]
    assert images.shape == (64, 3, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (64,) and labels.dtype == torch.int64
    everything = torch.cat([b[0] for b in batches])
    assert everything.shape[0] == 1500
    assert everything.min().item() == -1.0 and everything.max().item() == 1.0
    val_images, val_labels = next(iter(dm.val_dataloader()))
    ref_images, ref_labels = digits_split("val")
    expected = torch.from_numpy(ref_images[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(val_images, expected)
    assert val_labels.tolist() == ref_labels[:64].tolist()


def test_image_folder_skips_and_counts(tree: dict) -> None:
    dm = ImageFolderDataModule(root=str(tree["split"].parent), image_size=S, batch_size=4, num_workers=0,
                               train_crop="center", flip=False, val_dir="train")  # fmt: skip
    assert dm.num_classes == 2
    with pytest.warns(CorruptImageWarning) as record:
        images, labels = _all(dm.val_dataloader())
    messages = " ".join(str(w.message) for w in record if w.category is CorruptImageWarning)
    assert "corrupt.jpg" in messages and "truncated.jpg" in messages
    assert dm.skipped_images == 2
    assert images.shape == (10, 3, S, S) and labels.tolist() == [g[1] for g in tree["good"]]
    np.testing.assert_array_equal(_to_uint8(images), np.stack([g[2] for g in tree["good"]]))


def test_image_folder_counts_across_workers(tree: dict) -> None:
    dm = ImageFolderDataModule(root=str(tree["split"].parent), image_size=S, batch_size=3, num_workers=2,
                               train_crop="random", flip=True, val_dir=None)  # fmt: skip
    images, labels = _all(dm.train_dataloader())
    assert images.shape == (10, 3, S, S) and sorted(labels.tolist()) == [0] * 5 + [1] * 5
    assert dm.skipped_images == 2  # counted in worker processes, seen here
    assert dm.val_dataloader() == []


# ------------------------------------------------------------------------------ stored size, no silent resize
def test_image_size_null_uses_the_images_as_stored(tree: dict) -> None:
    dm = ImageFolderDataModule(root=str(tree["split"].parent), batch_size=4, num_workers=0, train_crop="center",
                               flip=False, val_dir="train")  # fmt: skip
    assert dm.image_size == S  # read from the first training image (cat/corrupt.jpg is skipped)
    dm.setup("fit")
    with pytest.warns(CorruptImageWarning):
        images, _ = _all(dm.val_dataloader())
    np.testing.assert_array_equal(_to_uint8(images), np.stack([g[2] for g in tree["good"]]))  # untouched


def test_another_image_size_is_an_error_at_setup_unless_resize_is_asked(tree: dict) -> None:
    root = str(tree["split"].parent)
    dm = ImageFolderDataModule(root=root, image_size=16, batch_size=4, num_workers=0, val_dir="train")
    for check in (lambda: dm.setup("fit"), lambda: dm.setup("validate"), lambda: dm.views_dataset("train", "center")):
        with pytest.raises(ImageSizeError) as info:
            check()
        message = str(info.value)
        first = str(tree["good"][0][0])  # the first readable image, named with both sizes and the fixes
        assert message.startswith(f"{first}: image is 32x32 pixels, not the 16x16"), message
        assert "data.init_args.resize: true" in message and "data.init_args.image_size: 32" in message
    resized = ImageFolderDataModule(root=root, image_size=16, resize=True, batch_size=4, num_workers=0,
                                    train_crop="center", val_dir="train")  # fmt: skip
    resized.setup("fit")
    with pytest.warns(CorruptImageWarning):
        images, _ = _all(resized.val_dataloader())
    assert images.shape == (10, 3, 16, 16)
    with pytest.raises(ValueError, match="resize: true needs data.init_args.image_size"):
        ImageFolderDataModule(root=root, resize=True)


def test_a_later_image_of_another_size_stops_the_loader_naming_it(tmp_path) -> None:
    for name, side in (("a/0.png", 8), ("a/1.png", 8), ("b/0.png", 12)):
        (tmp_path / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(tmp_path / "train" / name)
    dm = ImageFolderDataModule(root=str(tmp_path), batch_size=4, num_workers=0, val_dir="train")
    dm.setup("fit")  # the first image is 8x8, so image_size is 8
    assert dm.image_size == 8
    with pytest.raises(ImageSizeError, match=r"b/0.png: image is 12x12 pixels, not the 8x8"):
        _all(dm.val_dataloader())  # an error, not a skip
    assert dm.skipped_images == 0
    with pytest.raises(ImageSizeError, match=r"b/0.png: image is 12x12"):
        dm.views_dataset("train", "center")[2]
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(tmp_path / "train" / "a" / "0.png")
    with pytest.raises(ImageSizeError, match=r"a/0.png: the first training image is 10x8, not square"):
        ImageFolderDataModule(root=str(tmp_path), num_workers=0).setup("fit")
