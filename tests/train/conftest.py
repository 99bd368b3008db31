"""Fixtures shared by the data tests (tests/train/data/) and the data-preparation tests
(tests/train/prepare/): a small ImageFolder tree with its webdataset image shards, Digits val token shards,
and a token-shard reader.

The image tree is a dozen 32x32 files made with PIL; the token shards come from the random vq-tiny tokenizer
(`tok`, tests/conftest.py). Both are module-scoped, so each test module that uses them builds its own.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.data.images import CorruptImageWarning, DigitsDataModule
from train.prepare.extract_tokens import extract_tokens
from train.prepare.write_shards import write_shards

S = 32  # image side of the synthetic tree


def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array.astype(np.uint8))


def _make_image(label: int, k: int) -> np.ndarray:
    y, x = np.mgrid[0:S, 0:S]  # smooth gradients JPEG keeps within a few levels
    return np.stack([x * 5 + 20 * k, y * 5 + 40 * label, np.full_like(x, 30 + 25 * k)], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """root/train/{cat,dog}/img{k}.{jpg,png} (5 each) plus cat/corrupt.jpg and dog/truncated.jpg.

    Returns {"split": the train folder, "good": (path, label, decoded pixels) of the 10 readable files in
    ImageFolder order, "shards": their image shards (shard_size 4), "summary": what `write_shards` returned}.
    """
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
        summary = write_shards(root=str(split), out=str(shards), shard_size=4)
    return {"split": split, "good": good, "shards": shards, "summary": summary}


@pytest.fixture(scope="module")
def val100(tok: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits val (297 images), centre + flip, shards of 100."""
    out = tmp_path_factory.mktemp("val100")
    extract_tokens(str(tok), DigitsDataModule(), str(out), split="val", shard_size=100, batch_size=64,
                   accelerator="cpu", devices=1)  # fmt: skip
    return out


def _read_tars(folder: Path) -> dict[str, tuple[np.ndarray, int]]:
    """key -> (tokens, label) over every .tar in a folder, asserting that no key repeats."""
    samples: dict[str, dict[str, bytes]] = {}
    keys: list[str] = []
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if ext == "cls":
                    keys.append(key)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    assert len(keys) == len(set(keys)), "duplicate keys"
    return {key: (np.load(io.BytesIO(s["tokens.npy"]), allow_pickle=False), int(s["cls"]))
            for key, s in samples.items()}  # fmt: skip


@pytest.fixture(scope="session")
def read_tars() -> Callable[[Path], dict[str, tuple[np.ndarray, int]]]:
    """`read_tars(folder)`: key -> (tokens, label) over every token-shard .tar there; a repeated key fails."""
    return _read_tars


@pytest.fixture(scope="module")
def digit_tokens(tok: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Token shards of the digits val split (297 images in 3 shards, enough for 2 ranks) from `tok`."""
    out = tmp_path_factory.mktemp("digit_tokens")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    extract_tokens(str(tok), DigitsDataModule(), str(out), split="val", views="center", shard_size=100,
                   batch_size=100, accelerator="cpu", devices=1)
    torch.set_num_threads(threads)
    return out
