"""Inputs that would be read twice are refused, naming the file or class and the fix: a folder symlink loop
and a file reached twice (ImageFolder DataModule, token extraction's folder reader, `write_shards`), class
folders differing only in case, a `classes.json` naming a class twice, a key repeated inside a token or
image shard, and a shard listed twice. A symlink to a file elsewhere stays allowed and counts once.

CPU only; `tree` (10 readable images in cat/dog plus 2 unreadable) comes from tests/train/conftest.py.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from train.data.folder_files import DuplicateInputError
from train.data.image_shards import ImageShardsDataModule
from train.data.images import ImageFolderDataModule
from train.data.tokens import TokenShardsDataModule, read_token_set
from train.prepare.write_shards import write_shards

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


def _split(tree: dict, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tree["split"], root / "train")
    return root


def _readers(root: Path):
    """Each reader of an image folder, as a call that lists it."""
    data = ImageFolderDataModule(str(root), image_size=32, num_workers=0, val_dir=None)
    return {"datamodule": lambda: data.train_dataloader(),
            "extraction": lambda: data.views_dataset("train", "center"),
            "write_shards": lambda: write_shards(root=str(root / "train"), out=str(root / "shards"))}


@pytest.mark.parametrize("reader", ["datamodule", "extraction", "write_shards"])
def test_symlink_loop_is_refused_by_every_folder_reader(tree: dict, tmp_path: Path, reader: str) -> None:
    root = _split(tree, tmp_path)
    os.symlink("..", root / "train" / "cat" / "again")  # cat/again -> train: a loop
    with pytest.raises(DuplicateInputError, match=r"cat/again links back to .*remove the link"):
        _readers(root)[reader]()
    assert not list((root / "shards").glob("*.tar")) if (root / "shards").exists() else True


@pytest.mark.parametrize("reader", ["datamodule", "extraction", "write_shards"])
def test_a_file_reached_twice_is_refused(tree: dict, tmp_path: Path, reader: str) -> None:
    root = _split(tree, tmp_path)
    os.symlink(root / "train" / "cat" / "img0.jpg", root / "train" / "dog" / "also.jpg")
    with pytest.raises(DuplicateInputError, match=r"dog/also.jpg and .*cat/img0.jpg are the same file"):
        _readers(root)[reader]()


def test_symlinks_to_files_elsewhere_count_once(tree: dict, tmp_path: Path) -> None:
    root = _split(tree, tmp_path)
    outside = tmp_path / "pool"
    outside.mkdir()
    shutil.copy(root / "train" / "cat" / "img0.jpg", outside / "x.jpg")
    os.symlink(outside / "x.jpg", root / "train" / "cat" / "linked.jpg")
    data = ImageFolderDataModule(str(root), image_size=32, num_workers=0, val_dir=None)
    assert len(data.views_dataset("train", "center")) == 13  # the 12 files and linked.jpg
    assert len(data.train_dataloader().dataset) == 13
    os.symlink(outside, root / "train" / "dog" / "pool_dir")  # a folder link outside the tree is followed...
    with pytest.raises(DuplicateInputError, match="same file"):  # ...but x.jpg is now reached twice
        data.train_dataloader()


def test_class_folders_differing_only_in_case_are_refused(tree: dict, tmp_path: Path) -> None:
    root = _split(tree, tmp_path)
    shutil.copytree(root / "train" / "cat", root / "train" / "Cat")
    with pytest.raises(DuplicateInputError, match=r"'Cat' and 'cat'.*differ only in case"):
        _ = ImageFolderDataModule(str(root), image_size=32, num_workers=0, val_dir=None).num_classes
    with pytest.raises(DuplicateInputError, match="differ only in case"):
        write_shards(root=str(root / "train"), out=str(tmp_path / "shards"))


def test_classes_json_naming_a_class_twice_is_refused(tree: dict, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(tree["shards"], shards)
    (shards / "classes.json").write_text(json.dumps({"0": "cat", "1": "CAT"}))
    with pytest.raises(DuplicateInputError, match=r"classes.json names class 'CAT' twice \(labels 0 and 1"):
        _ = ImageShardsDataModule(str(shards)).num_classes


def _token_tar(path: Path, keys: list[str]) -> None:
    with wds.TarWriter(str(path), encoder=False) as sink:
        for key in keys:
            buffer = io.BytesIO()
            np.save(buffer, np.zeros((1, 4, 4), np.int16), allow_pickle=False)
            sink.write({"__key__": key, "tokens.npy": buffer.getvalue(), "cls": b"1"})


def test_repeated_key_in_a_token_shard_is_refused(token_shards, constant_codes, tmp_path: Path) -> None:
    folder = token_shards(tmp_path / "tok", constant_codes(4), [0, 1, 2, 3])
    _token_tar(folder / "tok-000000.tar", ["000000000", "000000001", "000000001", "000000002"])
    message = r"tok-000000.tar holds key '000000001' more than once"
    with pytest.raises(DuplicateInputError, match=message):
        TokenShardsDataModule(str(folder)).setup("fit")
    with pytest.raises(DuplicateInputError, match=message):
        read_token_set(str(folder))
    with pytest.raises(DuplicateInputError, match=message):
        list(TokenShardsDataModule(str(folder), batch_size=2, num_workers=0).train_dataloader())


def test_repeated_key_in_an_image_shard_and_a_shard_listed_twice(tree: dict, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(tree["shards"], shards)
    tar = shards / "train-000001.tar"
    samples = list(wds.WebDataset(str(tar), shardshuffle=False))
    with wds.TarWriter(str(tar), encoder=False) as sink:
        for sample in samples + samples[:1]:  # the first sample again, at the end
            sink.write({k: v for k, v in sample.items() if k in ("__key__", "jpg", "cls")})
    (shards / "train-000001.json").unlink()  # no record: only the key check can see it
    data = ImageShardsDataModule(str(shards), str(shards), batch_size=4, num_workers=0)
    with pytest.raises(DuplicateInputError, match=f"train-000001.tar holds key '{samples[0]['__key__']}'"):
        data.views_dataset("train", "center")
    with pytest.raises(DuplicateInputError, match="more than once"):
        list(data.val_dataloader())
    shutil.copytree(tree["shards"], tmp_path / "again")
    os.symlink(tmp_path / "again" / "train-000000.tar", tmp_path / "again" / "train-000000b.tar")
    with pytest.raises(DuplicateInputError, match=r"train-00000\d+b?.tar is listed twice"):
        ImageShardsDataModule(str(tmp_path / "again"), num_workers=0).train_dataloader()
