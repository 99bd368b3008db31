"""Tests for the image-data stage: embedded digits, crops, DataModules, shard writing and corrupt-file handling.

CPU only and fast: the image trees are a dozen 32x32 files made with PIL in a temporary folder.
"""

from __future__ import annotations

import importlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from jsonargparse import ArgumentError, ArgumentParser
from lightning.pytorch import LightningModule, Trainer
from PIL import Image

from train.data.digits import NUM_CLASSES, digits_split, digits_split_indices, load_digits_rgb
from train.data.image_shards import ImageShardsDataModule
from train.data.images import CorruptImageWarning, DigitsDataModule, ImageFolderDataModule
from train.data.transforms import (
    ImageTransformConfig,
    center_crop_arr,
    eval_transform,
    random_crop_arr,
    train_transform,
)

ws = importlib.import_module("train.prepare.write_shards")  # the module, to patch what its functions call
prepare_main = importlib.import_module("train.prepare.__main__").main
S = 32  # image side of the synthetic trees


# ----------------------------------------------------------------------------------------------- digits
def test_digits_rgb_shapes_range_and_counts() -> None:
    from sklearn.datasets import load_digits

    images, labels = load_digits_rgb()
    assert images.shape == (1797, 16, 16, 3) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert images.min() == 0 and images.max() == 255
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert NUM_CLASSES == 10
    # 2x bilinear upsampling (half-pixel centres) copies the corner pixels: 255 * v / 16, rounded.
    raw = load_digits().images
    np.testing.assert_array_equal(images[:, 0, 0, 0], np.round(raw[:, 0, 0] * 255 / 16))
    np.testing.assert_array_equal(images[:, 15, 15, 0], np.round(raw[:, 7, 7] * 255 / 16))
    images[0] = 7  # callers get copies: the cache is untouched
    assert not (load_digits_rgb()[0][0] == 7).all()


def test_digits_split_deterministic_disjoint_covering() -> None:
    from train.data import digits

    train_a, val_a = digits_split_indices("train"), digits_split_indices("val")
    digits._split_indices.cache_clear()  # recompute from scratch, not from the cache
    train_b, val_b = digits_split_indices("train"), digits_split_indices("val")
    np.testing.assert_array_equal(train_a, train_b)
    np.testing.assert_array_equal(val_a, val_b)
    assert len(train_a) == 1500 and len(val_a) == 297
    assert not set(train_a.tolist()) & set(val_a.tolist())
    assert sorted(train_a.tolist() + val_a.tolist()) == list(range(1797))
    all_images, all_labels = load_digits_rgb()
    for split, index in (("train", train_a), ("val", val_a)):
        images, labels = digits_split(split)
        np.testing.assert_array_equal(images, all_images[index])
        np.testing.assert_array_equal(labels, all_labels[index])
    assert set(np.unique(digits_split("val")[1]).tolist()) == set(range(10))  # every class validated


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


# ------------------------------------------------------------------------------------------- transforms
def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array.astype(np.uint8))


def test_center_crop_hand_computed() -> None:
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (16, 40, 3))  # H=16, W=40: no resize, crop columns (40-16)//2 = 12..27
    np.testing.assert_array_equal(np.asarray(center_crop_arr(_pil(wide), 16)), wide[:, 12:28])
    small = rng.integers(0, 256, (16, 16, 3))
    blocks = np.kron(small, np.ones((4, 4, 1), dtype=np.int64))  # 64x64, constant 4x4 blocks
    # Two BOX halvings (64 -> 32 -> 16) average equal pixels, so the 16x16 original comes back exactly.
    np.testing.assert_array_equal(np.asarray(center_crop_arr(_pil(blocks), 16)), small)
    for w, h in ((500, 375), (375, 500), (100, 60), (33, 33), (20, 90)):
        assert center_crop_arr(_pil(np.zeros((h, w, 3))), 32).size == (32, 32)
    tensor = eval_transform(ImageTransformConfig(16, train_crop="random"))(_pil(small))
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor, torch.from_numpy(small).permute(2, 0, 1).float() / 127.5 - 1)


def test_random_crop_sizes_and_windows() -> None:
    rng = np.random.default_rng(1)
    gen = torch.Generator().manual_seed(0)
    for w, h in ((500, 375), (64, 64), (20, 90), (33, 40)):
        out = random_crop_arr(_pil(np.zeros((h, w, 3))), 32, (0.5, 1.0), generator=gen)
        assert out.size == (32, 32)
    wide = rng.integers(0, 256, (16, 40, 3))
    windows = [wide[:, x : x + 16] for x in range(25)]
    offsets = set()
    for _ in range(30):  # scale fixed at 1: short side stays 16, only the offset is random
        crop = np.asarray(random_crop_arr(_pil(wide), 16, (1.0, 1.0), generator=gen))
        offsets.add(next(x for x, win in enumerate(windows) if np.array_equal(win, crop)))
    assert len(offsets) > 5
    with pytest.raises(ValueError):
        ImageTransformConfig(16, crop_scale=(0.9, 0.8))


def test_flip_changes_pixels_only_in_training() -> None:
    rng = np.random.default_rng(2)
    image = _pil(rng.integers(0, 256, (16, 16, 3)))
    cfg = ImageTransformConfig(16, train_crop="center", flip=True)
    plain = eval_transform(cfg)(image)
    torch.manual_seed(0)
    outs = [train_transform(cfg)(image) for _ in range(32)]
    flipped = [torch.equal(o, plain.flip(-1)) for o in outs]
    assert all(f or torch.equal(o, plain) for f, o in zip(flipped, outs, strict=True))
    assert 0 < sum(flipped) < 32
    assert (plain.flip(-1) - plain).abs().max() > 0.5
    random_cfg = ImageTransformConfig(16, train_crop="random", crop_scale=(0.6, 1.0))
    assert train_transform(random_cfg)(image).shape == (3, 16, 16)


# ---------------------------------------------------------------------------------- image tree + shards
def _make_image(label: int, k: int) -> np.ndarray:
    y, x = np.mgrid[0:S, 0:S]  # smooth gradients JPEG keeps within a few levels
    return np.stack([x * 5 + 20 * k, y * 5 + 40 * label, np.full_like(x, 30 + 25 * k)], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """root/train/{cat,dog}/img{k}.{jpg,png} (5 each) plus cat/corrupt.jpg and dog/truncated.jpg."""
    split = tmp_path_factory.mktemp("tree") / "train"
    good = []  # (path, label, pixels as any decoder of the source file sees them)
    for label, name in enumerate(("cat", "dog")):
        (split / name).mkdir(parents=True)
        for k in range(5):
            path = split / name / f"img{k}.{'jpg' if k % 2 == 0 else 'png'}"
            _pil(_make_image(label, k)).save(path, quality=90)
            good.append((path, label, np.asarray(Image.open(path).convert("RGB"))))
    (split / "cat" / "corrupt.jpg").write_bytes(b"this is not an image at all")
    noise = np.random.default_rng(3).integers(0, 256, (48, 48, 3))
    buffer = io.BytesIO()
    _pil(noise).save(buffer, format="JPEG")
    (split / "dog" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    good.sort(key=lambda g: (g[1], g[0].name))  # ImageFolder / make_dataset order
    shards = split.parent / "shards"
    with pytest.warns(CorruptImageWarning):
        summary = ws.write_shards(root=str(split), out=str(shards), shard_size=4)
    return {"split": split, "good": good, "shards": shards, "summary": summary}


def _all(loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_write_shards_layout(tree: dict) -> None:
    summary, shards = tree["summary"], tree["shards"]
    assert summary["num_shards"] == 3 and summary["shards_written"] == 3  # 12 files / 4
    assert summary["num_samples"] == 10 and summary["num_skipped"] == 2
    assert sorted(Path(p).name for p in summary["skipped"]) == ["corrupt.jpg", "truncated.jpg"]
    assert json.loads((shards / "classes.json").read_text()) == {"0": "cat", "1": "dog"}
    assert sorted(p.name for p in shards.glob("*.tar")) == [f"train-00000{k}.tar" for k in range(3)]
    assert not list(shards.glob("*.tmp"))
    names = [m for k in range(3) for m in tarfile.open(shards / f"train-00000{k}.tar").getnames()]
    keys = sorted({n.split(".")[0] for n in names})
    # In sorted order global index 0 is cat/corrupt.jpg and 11 is dog/truncated.jpg: both absent.
    assert keys == [f"{i:09d}" for i in range(1, 11)]
    with tarfile.open(shards / "train-000000.tar") as tar:  # JPEG originals are stored byte for byte
        assert tar.extractfile("000000001.jpg").read() == (tree["split"] / "cat" / "img0.jpg").read_bytes()


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
    _pil(_make_image(1, 2)).save(good, format="JPEG")
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


def test_write_shards_rerun_and_crash_recovery(tree: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    shards = tree["shards"]
    before = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
    # Rerun through the command-line parser: nothing is rewritten or duplicated.
    summary = prepare_main(["shards", "--root", str(tree["split"]), "--out", str(shards), "--shard_size", "4"])
    assert "0 written, 3 already complete" in capsys.readouterr().out
    assert (summary["shards_written"], summary["shards_reused"], summary["num_samples"]) == (0, 3, 10)
    assert summary["num_skipped"] == 2  # from the per-shard summaries, without re-reading the images
    assert {p.name: p.stat().st_mtime_ns for p in shards.iterdir()} == before

    # A crash in the middle of shard 1 leaves shard 0 complete and no partial file behind.
    calls = {"n": 0}
    real = ws.encode_jpeg

    def crashing(path, quality=95):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(path, quality)

    monkeypatch.setattr(ws, "encode_jpeg", crashing)
    out = tmp_path / "again"
    with pytest.raises(KeyboardInterrupt), pytest.warns(CorruptImageWarning):
        ws.write_shards(root=str(tree["split"]), out=str(out), shard_size=4)
    assert sorted(p.name for p in out.glob("*.tar*")) == ["train-000000.tar"]
    monkeypatch.setattr(ws, "encode_jpeg", real)
    with pytest.warns(CorruptImageWarning):
        summary = ws.write_shards(root=str(tree["split"]), out=str(out), shard_size=4)
    assert (summary["shards_written"], summary["shards_reused"], summary["num_samples"]) == (2, 1, 10)
    for k in range(3):  # fixed member mtimes: the resumed shards equal the uninterrupted ones byte for byte
        assert (out / f"train-00000{k}.tar").read_bytes() == (shards / f"train-00000{k}.tar").read_bytes()
    with pytest.raises(ValueError, match="shard_size"):
        ws.write_shards(root=str(tree["split"]), out=str(out), shard_size=5)


# ------------------------------------------------------------------------------------------ Lightning glue
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
