"""Bad input in every reader: odd image modes, truncated files, wrong labels, missing shards.

Covers `train.data.transforms` (8-bit RGB conversion), the ImageFolder and image-shard DataModules and their
token-extraction views (`train.data.images`, `train.data.views`), the shard writer (`train.prepare.write_shards`),
and token extraction (`train.prepare.extract_tokens`); token shards and checkpoints that do not fit the model are
`test_bad_token_data.py`. Grayscale, CMYK and 16-bit images must come out as the right 8-bit RGB pixels;
truncated or corrupt files are skipped and counted where the user sees it; labels out of range, a pattern
matching no shard and too few shards for the ranks are errors naming the values. CPU only;
every image is 16x16 and made here, so a centre crop to 16 is the identity and pixel values are exact.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from lightning.pytorch import LightningDataModule
from PIL import Image

from train.data.image_shards import ImageShardsDataModule, shard_urls
from train.data.images import ImageFolderDataModule
from train.data.tokens import TokenShardsDataModule, read_token_set
from train.data.transforms import (
    UNREADABLE_IMAGE_ERRORS,
    CorruptImageWarning,
    LabelError,
    open_rgb,
    pil_to_signed,
)
from train.data.views import ViewsDataset
from train.prepare.write_shards import write_shards

S = 16  # image side: equal to the crop size, so no resampling touches the pixels


# ------------------------------------------------------------------------------------------ image bytes
def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=95) if fmt == "JPEG" else image.save(buffer, format=fmt)
    return buffer.getvalue()


def _sixteen_bit_png() -> bytes:
    """I;16 PNG: left half 65535, right half 32896 (= 128 x 257), pixel (0, 0) = 1000."""
    values = np.zeros((S, S), np.uint16)
    values[:, : S // 2], values[:, S // 2 :], values[0, 0] = 65535, 32896, 1000
    return _encode(Image.fromarray(values), "PNG")


def _cmyk_jpeg() -> bytes:
    """CMYK JPEG: left half white (0, 0, 0, 0), right half black (K = 255)."""
    cmyk = np.zeros((S, S, 4), np.uint8)
    cmyk[:, S // 2 :, 3] = 255
    return _encode(Image.fromarray(cmyk, mode="CMYK"), "JPEG")


def _gray_png() -> bytes:
    return _encode(Image.fromarray(np.full((S, S), 77, np.uint8)), "PNG")


def _noise(fmt: str) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (S, S, 3), dtype=np.uint8)
    return _encode(Image.fromarray(pixels), fmt)


def _cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _expected_pixels() -> dict[str, np.ndarray]:
    """name -> the 8-bit RGB image [S,S,3] each odd-mode file must decode to."""
    sixteen = np.zeros((S, S, 3), np.uint8)
    sixteen[:, : S // 2], sixteen[:, S // 2 :], sixteen[0, 0] = 255, 128, 4  # round(v * 255 / 65535)
    cmyk = np.zeros((S, S, 3), np.uint8)
    cmyk[:, : S // 2] = 255
    return {"sixteen": sixteen, "cmyk": cmyk, "gray": np.full((S, S, 3), 77, np.uint8)}


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [B,3,H,W] in [-1,1] -> uint8 [B,H,W,3]."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _all(loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def test_open_rgb_converts_modes_and_rejects_truncated_files() -> None:
    expected = _expected_pixels()
    np.testing.assert_array_equal(np.asarray(open_rgb(_sixteen_bit_png())), expected["sixteen"])
    np.testing.assert_array_equal(np.asarray(open_rgb(_cmyk_jpeg())), expected["cmyk"])
    np.testing.assert_array_equal(np.asarray(open_rgb(_gray_png())), expected["gray"])
    # 16-bit PGM: PIL reads it as mode "I"; scaled like I;16, not clipped to 255.
    pgm = b"P5\n3 1\n65535\n" + np.array([1000, 32896, 65535], dtype=">u2").tobytes()
    assert np.asarray(open_rgb(pgm))[0, :, 0].tolist() == [4, 128, 255]
    assert all(open_rgb(data).mode == "RGB" for data in (_sixteen_bit_png(), _cmyk_jpeg(), pgm))
    for data in (_cut(_noise("JPEG")), _cut(_noise("PNG")), _cut(_sixteen_bit_png()), b"not an image"):
        with pytest.raises(UNREADABLE_IMAGE_ERRORS):
            open_rgb(data)


# ------------------------------------------------------------------------------------ an ImageFolder tree
@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/train/a/{cmyk.jpg, gray.png, sixteen.png} and root/train/b/{ok.jpg, bad_*} (3 unreadable)."""
    root = tmp_path_factory.mktemp("odd")
    files = {"a/cmyk.jpg": _cmyk_jpeg(), "a/gray.png": _gray_png(), "a/sixteen.png": _sixteen_bit_png(),
             "b/bad_corrupt.png": b"\x89PNG\r\n\x1a\n garbage", "b/bad_truncated.jpg": _cut(_noise("JPEG")),
             "b/bad_truncated.png": _cut(_noise("PNG")), "b/ok.jpg": _noise("JPEG")}  # fmt: skip
    for name, data in files.items():
        (root / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "train" / name).write_bytes(data)
    return root


BAD = ["bad_corrupt.png", "bad_truncated.jpg", "bad_truncated.png"]


def test_image_folder_converts_modes_skips_and_reports_bad_files(odd_tree: Path, caplog) -> None:
    dm = ImageFolderDataModule(str(odd_tree), image_size=S, batch_size=8, num_workers=0, train_crop="center",
                               flip=False, val_dir="train")  # fmt: skip
    with pytest.warns(CorruptImageWarning) as record:
        images, labels = _all(dm.val_dataloader())
    messages = [str(w.message) for w in record if w.category is CorruptImageWarning]
    assert len(messages) == 3 and all(any(name in m for m in messages) for name in BAD)
    assert messages[-1].endswith("(3 skipped so far)")
    assert dm.skipped_images == 3 and labels.tolist() == [0, 0, 0, 1]
    pixels, expected = _to_uint8(images), _expected_pixels()
    for i, name in enumerate(("cmyk", "gray", "sixteen")):  # sorted file order within class a
        np.testing.assert_array_equal(pixels[i], expected[name], err_msg=name)
    with caplog.at_level(logging.WARNING, logger="train.data.images"):
        dm.teardown("validate")
    assert "ImageFolderDataModule: 3 unreadable image(s) skipped" in caplog.text


def test_write_shards_converts_modes_and_counts_skipped(odd_tree: Path, tmp_path: Path, capsys) -> None:
    with pytest.warns(CorruptImageWarning):
        summary = write_shards(root=str(odd_tree / "train"), out=str(tmp_path), shard_size=4)
    assert "4 images, 2 classes, 3 unreadable images skipped" in capsys.readouterr().out
    assert (summary["num_samples"], summary["num_skipped"]) == (4, 3)
    assert sorted(Path(p).name for p in summary["skipped"]) == BAD
    per_shard = [json.loads((tmp_path / f"train-00000{k}.json").read_text()) for k in range(2)]
    assert [len(s["skipped"]) for s in per_shard] == [1, 2]  # b/bad_* are indices 3 | 4, 5
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        stored = {m.name: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")}
    # CMYK JPEG re-encoded as RGB (not kept byte for byte); 16-bit and gray PNGs re-encoded from 8-bit RGB.
    modes = [Image.open(io.BytesIO(stored[f"00000000{i}.jpg"])).mode for i in range(3)]
    assert modes == ["RGB", "RGB", "RGB"] and stored["000000000.jpg"] != _cmyk_jpeg()
    dm = ImageShardsDataModule(str(tmp_path), val_shards=str(tmp_path), image_size=S, batch_size=8,
                               num_workers=0)  # fmt: skip
    images, labels = _all(dm.val_dataloader())
    assert labels.tolist() == [0, 0, 0, 1] and dm.skipped_images == 0
    pixels, expected = _to_uint8(images).astype(int), _expected_pixels()
    for i, name in enumerate(("cmyk", "gray", "sixteen")):  # quality-95 JPEG: a few levels (clipping: 127)
        assert np.abs(pixels[i] - expected[name]).max() <= 6, name


# ------------------------------------------------------------------------------------------- image shards
def _image_tar(path: Path, samples: list[tuple[str, bytes, bytes]]) -> None:
    """A shard written as another tool might: (key, jpg member bytes, cls bytes), bytes as they are."""
    with wds.TarWriter(str(path), encoder=False) as sink:
        for key, jpg, cls in samples:
            sink.write({"__key__": key, "jpg": jpg, "cls": cls})


@pytest.fixture()
def odd_shard(tmp_path: Path) -> Path:
    """One shard: CMYK JPEG, 16-bit PNG bytes, truncated JPEG, truncated PNG, grayscale PNG (keys 0..4)."""
    _image_tar(tmp_path / "odd-000000.tar", [
        ("000000000", _cmyk_jpeg(), b"0"), ("000000001", _sixteen_bit_png(), b"1"),
        ("000000002", _cut(_noise("JPEG")), b"0"), ("000000003", _cut(_noise("PNG")), b"1"),
        ("000000004", _gray_png(), b"1"),
    ])  # fmt: skip
    return tmp_path


def test_image_shards_convert_modes_and_skip_truncated_members(odd_shard: Path) -> None:
    dm = ImageShardsDataModule(str(odd_shard), val_shards=str(odd_shard), image_size=S, batch_size=8,
                               num_workers=0, num_classes=2)  # fmt: skip
    with pytest.warns(CorruptImageWarning) as record:
        images, labels = _all(dm.val_dataloader())
    messages = " ".join(str(w.message) for w in record)
    assert "odd-000000.tar:000000002" in messages and "odd-000000.tar:000000003" in messages
    assert dm.skipped_images == 2 and labels.tolist() == [0, 1, 1]
    expected = _expected_pixels()
    for pixels, name in zip(_to_uint8(images), ("cmyk", "sixteen", "gray"), strict=True):
        np.testing.assert_array_equal(pixels, expected[name], err_msg=name)


def test_tar_views_convert_modes_and_skip_truncated_members(odd_shard: Path) -> None:
    dm = ImageShardsDataModule(str(odd_shard), image_size=S, num_workers=0, num_classes=2)
    dataset = dm.views_dataset("train", "center")
    with pytest.warns(CorruptImageWarning):
        items = [dataset[i] for i in range(len(dataset))]
    assert [i for i, views, _ in items if views is None] == [2, 3] and dm.skipped_images == 2
    expected = _expected_pixels()
    for position, name in ((0, "cmyk"), (1, "sixteen"), (4, "gray")):
        np.testing.assert_array_equal(_to_uint8(items[position][1])[0], expected[name], err_msg=name)


# ------------------------------------------------------------------------------------------------ labels
@pytest.mark.parametrize(("cls", "match"), [(b"5", r"label 5 is outside \[0, 2\)"),
                                            (b"-1", r"label -1 is outside \[0, 2\)"),
                                            (b"cat", r"label b'cat' is not an integer")])  # fmt: skip
def test_image_shard_label_out_of_range_is_an_error(tmp_path: Path, cls: bytes, match: str) -> None:
    _image_tar(tmp_path / "x-000000.tar", [("000000000", _noise("JPEG"), b"1"), ("000000007", b"junk", cls)])
    (tmp_path / "classes.json").write_text(json.dumps({"0": "cat", "1": "dog"}))
    dm = ImageShardsDataModule(str(tmp_path), val_shards=str(tmp_path), image_size=S, num_workers=0)
    # An error, not a skip, even though this sample's image is unreadable too.
    with pytest.raises(LabelError, match=match) as info:
        list(dm.val_dataloader())
    assert "x-000000.tar:000000007" in str(info.value)
    with pytest.raises(LabelError, match=match):  # token extraction checks every label up front
        dm.views_dataset("train", "center")


def test_class_lists_of_the_splits_must_agree(odd_tree: Path, tmp_path: Path) -> None:
    (tmp_path / "val" / "a").mkdir(parents=True)
    (tmp_path / "val" / "c").mkdir()
    for name in ("a", "c"):
        (tmp_path / "val" / name / "x.jpg").write_bytes(_noise("JPEG"))
    (tmp_path / "train").symlink_to(odd_tree / "train")
    dm = ImageFolderDataModule(str(tmp_path), image_size=S, num_workers=0)
    with pytest.raises(ValueError, match=r"extra: \['c'\], missing: \['b'\]"):
        dm.val_dataloader()
    with pytest.raises(ValueError, match="same 2 classes"):
        dm.views_dataset("val", "center")
    # Shards: a val classes.json that differs from the training one.
    for split, classes in (("s_train", ["cat", "dog"]), ("s_val", ["dog", "cat"])):
        (tmp_path / split).mkdir()
        _image_tar(tmp_path / split / "x-000000.tar", [("000000000", _noise("JPEG"), b"0")])
        (tmp_path / split / "classes.json").write_text(json.dumps(dict(enumerate(classes))))
    shards = ImageShardsDataModule(str(tmp_path / "s_train"), str(tmp_path / "s_val"), image_size=S,
                                   num_workers=0)  # fmt: skip
    with pytest.raises(ValueError, match="lists other classes than"):
        shards.val_dataloader()


# ------------------------------------------------------------------------------------ shard lists, ranks
def test_shard_patterns_matching_nothing_name_the_pattern(constant_codes, token_shards, tmp_path: Path) -> None:
    for k in (1, 0):
        _image_tar(tmp_path / f"x-00000{k}.tar", [(f"00000000{k}", _noise("JPEG"), b"0")])
    assert shard_urls(str(tmp_path / "x-*.tar")) == [str(tmp_path / f"x-00000{k}.tar") for k in (0, 1)]
    (tmp_path / "empty").mkdir()
    cases = [(tmp_path / "y-*.tar", "matches no files"), (tmp_path / "y-{0..2}.tar", "3 shard"),
             (tmp_path / "empty", "no .tar shards in folder"), ("", "empty shard spec")]  # fmt: skip
    for spec, match in cases:
        with pytest.raises(FileNotFoundError, match=match) as info:
            shard_urls(str(spec))
        assert str(spec) in str(info.value)
    dm = ImageShardsDataModule(str(tmp_path / "y-*.tar"), image_size=S, num_workers=0, num_classes=1)
    with pytest.raises(FileNotFoundError, match=r"y-\*.tar' matches no files"):
        dm.train_dataloader()
    (tmp_path / "tokens").mkdir()
    token_shards(tmp_path / "tokens", constant_codes(2), [0, 1])
    tokens = TokenShardsDataModule(str(tmp_path / "tokens" / "nothing-*.tar"), num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"nothing-\*.tar' matches no files"):
        tokens.train_dataloader()


def test_fewer_image_shards_than_ranks_and_workers(odd_shard: Path, caplog) -> None:
    dm = ImageShardsDataModule(str(odd_shard), val_shards=str(odd_shard), image_size=S, batch_size=8,
                               num_workers=3, num_classes=2, flip=False, train_crop="center")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="train.data.image_shards"):
        loader = dm.val_dataloader()
    assert loader.num_workers == 1  # fallback: one worker per shard
    assert "1 shard(s) for 1 rank(s) x 3 workers; starting 1 worker(s)" in caplog.text
    _, labels = _all(loader)  # (the worker process warns; pytest only sees this process's warnings)
    assert labels.tolist() == [0, 1, 1] and dm.skipped_images == 2  # counted in the worker, seen here
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0)  # as under 2-rank DDP
    for make in (dm.train_dataloader, dm.val_dataloader):
        with pytest.raises(ValueError, match=r"1 shard\(s\) for 2 ranks x 3 workers; every rank needs"):
            make()
    resampled = ImageShardsDataModule(str(odd_shard), image_size=S, num_workers=2, num_classes=2,
                                      resampled=True, samples_per_epoch=8)  # fmt: skip
    resampled.trainer = SimpleNamespace(world_size=2, global_rank=0)
    assert resampled.train_dataloader().num_workers == 2  # every worker draws from all shards: no limit


# ------------------------------------------------------------------------------------------- extraction
class _BadLabelViews(ViewsDataset):
    """Three blank images; image 1 has label 10 (num_classes 10)."""

    def __init__(self) -> None:
        self.indices, self.image_size, self.views = np.arange(3, dtype=np.int64), S, "center"

    def describe(self, position: int) -> str:
        return f"blank-{position}.png"

    def __getitem__(self, position: int):
        return position, torch.zeros(1, 3, S, S), 10 if position == 1 else 0


class _BadLabelData(LightningDataModule):
    image_size, num_classes, num_workers = S, 10, 0

    def views_dataset(self, split: str, views: str) -> ViewsDataset:
        return _BadLabelViews()


def test_extract_tokens_converts_modes_counts_skipped_and_checks_labels(
    odd_tree: Path, tok: Path, tmp_path: Path, capsys
) -> None:
    from tokenizers_vq.checkpoint import load_tokenizer
    from train.prepare.extract_tokens import extract_tokens

    cpu = {"accelerator": "cpu", "devices": 1, "batch_size": 4}
    data = ImageFolderDataModule(str(odd_tree), image_size=S, num_workers=0, val_dir=None)
    with pytest.warns(CorruptImageWarning):
        meta = extract_tokens(str(tok), data, str(tmp_path / "tokens"), views="center", **cpu)
    assert (meta["num_samples"], meta["num_skipped"]) == (4, 3)
    assert [(s["index"], Path(s["name"]).name) for s in meta["skipped"]] == list(enumerate(BAD, start=3))
    assert "3 unreadable images skipped" in capsys.readouterr().out
    tokens, labels = read_token_set(str(tmp_path / "tokens"))
    expected = _expected_pixels()
    views = torch.stack([pil_to_signed(Image.fromarray(expected[n])) for n in ("cmyk", "gray", "sixteen")])
    with torch.no_grad():
        codes = load_tokenizer(tok).encode(views).reshape(3, -1)
    assert torch.equal(tokens[:3], codes) and labels.tolist() == [0, 0, 0, 1]
    with pytest.raises(ValueError, match=r"image 1 \(blank-1.png\): label 10 is outside \[0, 10\)"):
        extract_tokens(str(tok), _BadLabelData(), str(tmp_path / "bad"), views="center", **cpu)
