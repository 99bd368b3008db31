"""Tests for `train.data.images`: the embedded-digits DataModule and the ImageFolder DataModule, which skips
and counts corrupt files (also across DataLoader workers).

CPU only and fast: the image tree is the `tree` fixture of tests/train/conftest.py, a dozen 32x32 files.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.data.digits import digits_split
from train.data.images import CorruptImageWarning, DigitsDataModule, ImageFolderDataModule

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
