"""Tests for `train.data.digits`: the embedded scikit-learn digits as 16x16 RGB, and their fixed train/val
split.

CPU only and fast: the data set ships with scikit-learn.
"""

from __future__ import annotations

import numpy as np

from train.data.digits import NUM_CLASSES, digits_split, digits_split_indices, load_digits_rgb


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
