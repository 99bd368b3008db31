"""Tests for `train.data.image_shards`: `ImageShardsDataModule` reads back the image shards of the `tree`
fixture (tests/train/conftest.py) pixel for pixel, skips corrupt members, never decodes pickles, never resizes
unless asked (another size is an error naming the member), parses from the command line and, like
`DigitsDataModule`, runs in a Lightning fit.

CPU only and fast: the shards hold ten 32x32 images.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from jsonargparse import ArgumentError, ArgumentParser
from lightning.pytorch import LightningModule, Trainer
from PIL import Image

from train.data.image_shards import ImageShardsDataModule
from train.data.images import CorruptImageWarning, DigitsDataModule
from train.data.transforms import ImageSizeError

S = 32  # image side of the `tree` fixture's images


def _make_image(label: int, k: int) -> np.ndarray:
    y, x = np.mgrid[0:S, 0:S]  # smooth gradients JPEG keeps within a few levels
    return np.stack([x * 5 + 20 * k, y * 5 + 40 * label, np.full_like(x, 30 + 25 * k)], -1).astype(np.uint8)


def _all(loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_shards_round_trip(tree: dict) -> None:
    dm = ImageShardsDataModule(
        train_shards=str(tree["shards"]), val_shards=str(tree["shards"]), image_size=S, batch_size=4,
        num_workers=0, train_crop="center", flip=False,
    )  # fmt: skip
    assert dm.num_classes == 2 and dm.image_size == S
    images, labels = _all(dm.val_dataloader())
    assert images.shape == (10, 3, S, S) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert labels.tolist() == [g[1] for g in tree["good"]]
    for pixels, (path, _, source) in zip(_to_uint8(images), tree["good"], strict=True):
        error = np.abs(pixels.astype(int) - source.astype(int))
        if path.suffix == ".jpg":
            assert error.max() == 0, path  # original bytes, same decoder
        else:
            assert error.mean() < 2.0 and error.max() <= 12, path  # quality-95 re-encode of a PNG
    train_images, train_labels = _all(dm.train_dataloader())
    assert train_images.shape == (10, 3, S, S) and sorted(train_labels.tolist()) == [0] * 5 + [1] * 5
    assert dm.skipped_images == 0


def test_shards_skip_corrupt_members_and_ignore_pickles(tmp_path: Path) -> None:
    good = io.BytesIO()
    Image.fromarray(_make_image(1, 2)).save(good, format="JPEG")
    with wds.TarWriter(str(tmp_path / "x-000000.tar"), encoder=False) as sink:
        sink.write({"__key__": "000000000", "jpg": b"garbage", "cls": b"0"})
        # A .pyd member that unpickling would choke on: it must never be read, let alone decoded.
        sink.write({"__key__": "000000001", "jpg": good.getvalue(), "cls": b"1", "pyd": b"\x80\x05broken"})
    dm = ImageShardsDataModule(train_shards=str(tmp_path), val_shards=str(tmp_path / "x-{000000..000000}.tar"),
                               image_size=S, batch_size=8, num_workers=0, num_classes=2)  # fmt: skip
    with pytest.warns(CorruptImageWarning, match="000000000"):
        images, labels = _all(dm.val_dataloader())
    assert images.shape == (1, 3, S, S) and labels.tolist() == [1]
    assert dm.skipped_images == 1


class _TinyClassifier(LightningModule):
    def __init__(self, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3 * image_size * image_size, num_classes)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        return torch.nn.functional.cross_entropy(self.head(images.flatten(1)), labels)

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_datamodules_run_in_lightning_and_parse_from_cli(tree: dict) -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ImageShardsDataModule, "data")
    shards = str(tree["shards"])
    args = ["--data.train_shards", shards, "--data.val_shards", shards, "--data.image_size", str(S),
            "--data.num_workers", "0"]  # fmt: skip
    cfg = parser.parse_args([*args, "--data.crop_scale", "[0.5, 1.0]", "--data.train_crop", "center"])
    shards_dm = ImageShardsDataModule(**vars(cfg.data))
    assert shards_dm.transform_cfg.crop_scale == (0.5, 1.0) and shards_dm.num_classes == 2
    with pytest.raises(ArgumentError):
        parser.parse_args([*args, "--data.train_crop", "diagonal"])
    for dm in (DigitsDataModule(batch_size=8), shards_dm):
        trainer = Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                          enable_model_summary=False)  # fmt: skip
        trainer.fit(_TinyClassifier(dm.image_size, dm.num_classes), datamodule=dm)
        assert trainer.state.finished


def test_shards_are_used_as_stored_and_another_size_needs_resize(tree: dict, tmp_path: Path) -> None:
    shards = str(tree["shards"])
    as_stored = ImageShardsDataModule(train_shards=shards, val_shards=shards, num_workers=0, train_crop="center",
                                      flip=False)  # fmt: skip
    assert as_stored.image_size == S  # image_size null: the first shard image's side
    as_stored.setup("fit")
    images, _ = _all(as_stored.val_dataloader())
    assert images.shape == (10, 3, S, S)
    small = ImageShardsDataModule(train_shards=shards, val_shards=shards, image_size=16, num_workers=0)
    with pytest.raises(ImageSizeError) as info:
        small.setup("fit")  # before any step, naming the shard member, both sizes and the fix
    message = str(info.value)
    # key 0 is cat/corrupt.jpg, which write_shards skipped: key 1 is the first image
    assert message.startswith(f"{shards}/train-000000.tar:000000001: image is 32x32 pixels, not the 16x16")
    assert "data.init_args.resize: true" in message and "data.init_args.image_size: 32" in message
    with pytest.raises(ImageSizeError, match="000000001: image is 32x32"):
        small.views_dataset("train", "center")
    resized = ImageShardsDataModule(train_shards=shards, val_shards=shards, image_size=16, resize=True,
                                    num_workers=0)  # fmt: skip
    resized.setup("fit")
    images, _ = _all(resized.val_dataloader())
    assert images.shape == (10, 3, 16, 16)
    # A member of another size further on is an error in the loader too, not a skipped image.
    with wds.TarWriter(str(tmp_path / "x-000000.tar"), encoder=False) as sink:
        for key, side in (("000000000", S), ("000000001", 24)):
            jpg = io.BytesIO()
            Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(jpg, format="JPEG")
            sink.write({"__key__": key, "jpg": jpg.getvalue(), "cls": b"0"})
    mixed = ImageShardsDataModule(train_shards=str(tmp_path), val_shards=str(tmp_path), num_workers=0,
                                  num_classes=1)  # fmt: skip
    mixed.setup("validate")
    with pytest.raises(ImageSizeError, match=r"x-000000.tar:000000001: image is 24x24 pixels, not the 32x32"):
        _all(mixed.val_dataloader())
    assert mixed.skipped_images == 0
