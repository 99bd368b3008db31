"""Tests for `train.data.transforms`: ADM's centre crop, LlamaGen's random crop, the train/eval transforms
with their horizontal flip, and the stored-size rule (no resize unless asked).

CPU only and fast: the images are small random arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from train.data.transforms import (
    ImageSizeError,
    ImageTransformConfig,
    center_crop_arr,
    check_image_size,
    eval_transform,
    image_views,
    random_crop_arr,
    train_transform,
)


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


def test_transforms_never_resize_unless_asked() -> None:
    rng = np.random.default_rng(3)
    small, wide = _pil(rng.integers(0, 256, (16, 16, 3))), _pil(rng.integers(0, 256, (16, 40, 3)))
    for make in (eval_transform, train_transform):
        with pytest.raises(ImageSizeError, match=r"image is 16x16 pixels, not the 32x32 .* data.init_args.resize: "
                                                 r"true .* data.init_args.image_size: 16 to use the images as stored"):
            make(ImageTransformConfig(32))(small)  # 16 px would have been upsampled to 32 px
        with pytest.raises(ImageSizeError, match="image is 40x16 pixels"):
            make(ImageTransformConfig(16))(wide)  # not square: cropping it away is a resize too
        assert make(ImageTransformConfig(32, resize=True))(small).shape == (3, 32, 32)
    with pytest.raises(ImageSizeError):
        image_views(small, 8, "ten_crop")
    assert image_views(small, 8, "ten_crop", resize=True).shape == (10, 3, 8, 8)
    assert image_views(small, 16, "ten_crop").shape == (10, 3, 16, 16)  # stored at size: ten-crop's own 1.1x
    check_image_size((16, 16), 16, resize=False)  # at size: no error
