"""The embedded default data set: scikit-learn's bundled handwritten digits lifted to RGB 16x16.

`load_digits()` ships inside scikit-learn (1797 grey 8x8 images, values 0..16, 10 classes), so demos, CI
and smoke tests run with no download. Here it is scaled to [0,1], upsampled to 16x16 (bilinear,
antialiased), replicated to 3 channels and stored as uint8 [N,16,16,3] (the layout of ADM sample files).

The train/val split is fixed: every index is ranked by the SHA-256 of a versioned seed string and the index,
and the first `NUM_TRAIN` ranks are train. It depends on no RNG implementation, so it is the same on every
run, machine and NumPy version. Batching and conversion to [-1,1] tensors are left to
`train.data.images.DigitsDataModule`.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "NUM_CLASSES",
    "NUM_IMAGES",
    "NUM_TRAIN",
    "NUM_VAL",
    "IMAGE_SIZE",
    "load_digits_rgb",
    "digits_split",
    "digits_split_indices",
]

NUM_CLASSES = 10
NUM_IMAGES = 1797
NUM_TRAIN = 1500
NUM_VAL = NUM_IMAGES - NUM_TRAIN  # 297
IMAGE_SIZE = 16

# Changing this string changes the split; bump the version suffix only on purpose.
_SPLIT_SEED = "engram-vision/digits-split/v1"


@functools.lru_cache(maxsize=1)
def _digits_rgb_cached() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # local import: only this data set needs sklearn

    bunch = load_digits()
    grey = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0)  # [N,8,8] in [0,1]
    up = F.interpolate(
        grey[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True
    )[:, 0]
    pixels = (up.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()  # [N,16,16]
    images = np.repeat(pixels[..., None], 3, axis=-1)  # [N,16,16,3]
    labels = np.asarray(bunch.target, dtype=np.int64)
    if images.shape[0] != NUM_IMAGES:
        raise RuntimeError(f"scikit-learn's digits changed size: {images.shape[0]} != {NUM_IMAGES}")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_digits_rgb() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as (images uint8 [N,16,16,3] in 0..255, labels int64 [N] in 0..9).

    Returns fresh writable copies, so callers may modify them without touching the cache.
    """
    images, labels = _digits_rgb_cached()
    return images.copy(), labels.copy()


@functools.lru_cache(maxsize=1)
def _split_indices() -> tuple[np.ndarray, np.ndarray]:
    def rank_key(index: int) -> bytes:
        return hashlib.sha256(f"{_SPLIT_SEED}:{index}".encode()).digest()

    order = sorted(range(NUM_IMAGES), key=rank_key)
    # Each split keeps scikit-learn's original order, which makes batches easy to inspect.
    train = np.sort(np.asarray(order[:NUM_TRAIN], dtype=np.int64))
    val = np.sort(np.asarray(order[NUM_TRAIN:], dtype=np.int64))
    return train, val


def digits_split_indices(split: Literal["train", "val"]) -> np.ndarray:
    """Indices into `load_digits_rgb()` of a split: int64 [1500] for train, [297] for val, ascending."""
    train, val = _split_indices()
    if split == "train":
        return train.copy()
    if split == "val":
        return val.copy()
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def digits_split(split: Literal["train", "val"]) -> tuple[np.ndarray, np.ndarray]:
    """One split as (images uint8 [n,16,16,3], labels int64 [n]); n = 1500 (train) or 297 (val)."""
    index = digits_split_indices(split)
    images, labels = _digits_rgb_cached()
    return images[index], labels[index]  # fancy indexing copies
