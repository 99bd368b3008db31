"""Image decoding and transforms: file or bytes -> RGB PIL image -> `images` float32 [3,S,S] in [-1,1].

`open_rgb` decodes strictly (truncated files raise, listed in `UNREADABLE_IMAGE_ERRORS`) and converts every
mode to 8-bit RGB (`to_rgb`: 16-bit scaled, not clipped; CMYK, grayscale and palettes expanded);
`parse_label` is the label check every reader of labelled samples shares. Two crops are offered: ADM's
deterministic centre crop (the reference for FID and token extraction) and LlamaGen's random crop (scale
augmentation for tokenizer / AR training), each optionally followed by a horizontal flip; and the
deterministic views of token extraction (centre, centre + flip, LlamaGen's ten-crop).
An image is never resized to fit `image_size` unless `resize` asks for it: without it, an image not stored
at image_size x image_size raises `ImageSizeError` (`check_image_size`), so 32 px photos are never quietly
upsampled to 256 px. The random crop and the ten-crop still rescale by their own factors (augmentation).
Skipping and counting bad files is left to `train.data.images` and `train.prepare.write_shards`; batching to the
DataLoader. Kept free of Lightning so the shard writer starts quickly.
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

__all__ = [
    "UNREADABLE_IMAGE_ERRORS",
    "CorruptImageWarning",
    "LabelError",
    "ImageSizeError",
    "parse_label",
    "check_image_size",
    "stored_size",
    "open_rgb",
    "to_rgb",
    "ImageTransformConfig",
    "CenterCropArr",
    "RandomCropArr",
    "center_crop_arr",
    "random_crop_arr",
    "train_transform",
    "eval_transform",
    "ViewMode",
    "NUM_VIEWS",
    "view_crops",
    "view_stack",
    "pil_to_signed",
    "image_views",
]


# What PIL raises on bad files: OSError (incl. UnidentifiedImageError and "image file is truncated"),
# SyntaxError / struct.error / ValueError / EOFError from broken headers, and decompression bombs.
UNREADABLE_IMAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError,
)  # fmt: skip


class CorruptImageWarning(UserWarning):
    """An image (or shard member) could not be decoded and was skipped."""


class LabelError(ValueError):
    """A sample's label is not an integer in [0, num_classes): the data set or its class list is wrong.

    Never skipped: the DataModules' skip-and-count handlers re-raise it.
    """


def parse_label(raw: bytes | str | int, num_classes: int | None, name: str) -> int:
    """The integer label of sample `name` (a `cls` member's bytes, or an int), checked against the range.

    Raises `LabelError` naming the sample, the label and [0, num_classes) when it is not an integer in range
    (only `>= 0` is checked when `num_classes` is None, i.e. unknown). An error, not a skip: a label out of
    range means another data set or class list, and label == num_classes would silently train the
    classifier-free-guidance null class.
    """
    try:
        label = raw if isinstance(raw, int) else int(raw.decode() if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError) as exn:
        raise LabelError(f"sample {name}: label {raw!r} is not an integer") from exn
    if label < 0 or (num_classes is not None and label >= num_classes):
        bound = "" if num_classes is None else f", {num_classes}"
        raise LabelError(
            f"sample {name}: label {label} is outside [0{bound}) (num_classes={num_classes}): "
            f"do the shards and the class list belong to the same data set?"
        )
    return label


class ImageSizeError(ValueError):
    """An image is not stored at the configured `image_size` and resizing was not asked for.

    Never skipped: the DataModules' skip-and-count handlers re-raise it, since every later image of a data
    set at another size would fail the same way.
    """


def check_image_size(size: tuple[int, int], image_size: int, resize: bool) -> None:
    """Raise `ImageSizeError` unless `size` (width, height) is image_size x image_size or `resize` is on.

    The message names both sizes and the settings that fix it (`data.init_args.resize`,
    `data.init_args.image_size`: the YAML keys of the image DataModules).
    """
    if resize or tuple(size) == (image_size, image_size):
        return
    width, height = size
    stored = f", or data.init_args.image_size: {width} to use the images as stored" if width == height else ""
    raise ImageSizeError(
        f"image is {width}x{height} pixels, not the {image_size}x{image_size} of data.init_args.image_size "
        f"(with image_size: null, the first training image's size), and images are only resized when asked: "
        f"set data.init_args.resize: true to resize the short side to {image_size} and crop{stored}"
    )


def stored_size(source: str | Path | bytes) -> tuple[int, int] | None:
    """(width, height) of an image file or encoded bytes from its header; None when PIL cannot read it.

    Only the header is parsed (no pixel decode), so checking a data set's first image is cheap.
    """
    try:
        stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else open(source, "rb")
        with stream, Image.open(stream) as image:
            return image.size
    except UNREADABLE_IMAGE_ERRORS:
        return None


# PIL's 16-bit grayscale modes; `I` (int32) is how it reads 16-bit PGM and some TIFFs.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any loaded PIL image -> a new 8-bit RGB image.

    16-bit grayscale is scaled by 255/65535 (rounded; `I` values are clipped to [0, 65535] first): PIL's
    own `convert` clips them at 255, which turns almost every 16-bit image white. PIL already reads 16-bit
    RGB(A) PNGs as 8-bit. Everything else goes through `convert("RGB")`: grayscale and palettes are
    expanded, CMYK inverted (white stays white), alpha dropped; a mode PIL cannot convert raises ValueError.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def open_rgb(source: str | Path | bytes) -> Image.Image:
    """Decode a file path or encoded bytes to a fully loaded 8-bit RGB PIL image (see `to_rgb`).

    `load()` forces the whole decode here, so a truncated JPEG raises now (PIL is lazy otherwise); we do
    not set `ImageFile.LOAD_TRUNCATED_IMAGES`, a process-wide switch that would hide truncation from every
    other PIL user. Raises one of `UNREADABLE_IMAGE_ERRORS` on a bad file.
    """
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else open(source, "rb")
    with stream, Image.open(stream) as image:
        image.load()
        return to_rgb(image)


@dataclass(frozen=True)
class ImageTransformConfig:
    """How images are cropped and augmented before they reach a model."""

    image_size: int
    """Side S of the square output, in pixels."""
    train_crop: Literal["center", "random"] = "random"
    """Training crop: ADM centre crop (`center`) or LlamaGen random crop (`random`)."""
    crop_scale: tuple[float, float] = (0.8, 1.0)
    """(min, max) fraction of the resized short side that the random crop keeps; max <= 1."""
    flip: bool = True
    """Random horizontal flip (p = 0.5) at training time; evaluation never flips."""
    resize: bool = False
    """Resize images of another size (short side to S, then the crop); False: such an image raises
    `ImageSizeError` (images stored at S x S pass through the centre crop untouched)."""

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.train_crop not in ("center", "random"):
            raise ValueError(f"train_crop must be 'center' or 'random', got {self.train_crop!r}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")


def _resize_short_side(image: Image.Image, short_side: int) -> Image.Image:
    """Resize so that min(W, H) == short_side: BOX-halve while still >= 2x too big, then one BICUBIC step.

    The halving is a cheap anti-aliased downscale that keeps large photos from aliasing in the final
    bicubic resample (guided-diffusion predates PIL's `reducing_gap`). PIL returns an exact copy when the
    target size equals the current one, so images already at size pass through untouched.
    """
    # Follows openai/guided-diffusion (image_datasets.center_crop_arr)
    while min(image.size) >= 2 * short_side:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = short_side / min(image.size)
    return image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)


def center_crop_arr(image: Image.Image, image_size: int) -> Image.Image:
    """ADM centre crop: short side -> image_size (BOX halving, then BICUBIC), then the central square."""
    image = _resize_short_side(image, image_size)
    left = (image.width - image_size) // 2
    top = (image.height - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def random_crop_arr(
    image: Image.Image,
    image_size: int,
    crop_scale: tuple[float, float] = (0.8, 1.0),
    generator: torch.Generator | None = None,
) -> Image.Image:
    """LlamaGen random crop: short side -> a random size in [S/max_scale, S/min_scale], then a random square.

    Randomness comes from torch (optionally an explicit `generator`) so DataLoader workers, which torch
    seeds individually, draw different crops.
    """
    # Follows FoundationVision/LlamaGen (dataset/augmentation.random_crop_arr)
    lo, hi = crop_scale
    min_side = math.ceil(image_size / hi)
    max_side = math.ceil(image_size / lo)
    side = int(torch.randint(min_side, max_side + 1, (), generator=generator))
    image = _resize_short_side(image, side)
    top = int(torch.randint(0, image.height - image_size + 1, (), generator=generator))
    left = int(torch.randint(0, image.width - image_size + 1, (), generator=generator))
    return image.crop((left, top, left + image_size, top + image_size))


class CenterCropArr:
    """Picklable transform wrapper around `center_crop_arr` (DataLoader workers may pickle it).

    Without `resize`, an image not stored at image_size x image_size raises `ImageSizeError`.
    """

    def __init__(self, image_size: int, resize: bool = False) -> None:
        self.image_size, self.resize = image_size, resize

    def __call__(self, image: Image.Image) -> Image.Image:
        check_image_size(image.size, self.image_size, self.resize)
        return center_crop_arr(image, self.image_size)

    def __repr__(self) -> str:
        return f"CenterCropArr(image_size={self.image_size}, resize={self.resize})"


class RandomCropArr:
    """Picklable transform wrapper around `random_crop_arr`.

    Without `resize`, an image not stored at image_size x image_size raises `ImageSizeError`; one stored at
    that size is still rescaled by up to 1 / crop_scale[0] (the crop's scale augmentation).
    """

    def __init__(self, image_size: int, crop_scale: tuple[float, float] = (0.8, 1.0), resize: bool = False) -> None:
        self.image_size, self.resize = image_size, resize
        self.crop_scale = tuple(crop_scale)

    def __call__(self, image: Image.Image) -> Image.Image:
        check_image_size(image.size, self.image_size, self.resize)
        return random_crop_arr(image, self.image_size, self.crop_scale)

    def __repr__(self) -> str:
        return f"RandomCropArr(image_size={self.image_size}, crop_scale={self.crop_scale}, resize={self.resize})"


def _to_signed_tensor() -> list[v2.Transform]:
    """PIL RGB -> float32 [3,H,W] in [-1,1] (uint8 / 127.5 - 1, the convention of all stages)."""
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
    ]


def train_transform(cfg: ImageTransformConfig) -> v2.Compose:
    """Training pipeline: the configured crop, an optional flip, then to [-1,1]."""
    crop = (
        RandomCropArr(cfg.image_size, cfg.crop_scale, cfg.resize)
        if cfg.train_crop == "random"
        else CenterCropArr(cfg.image_size, cfg.resize)
    )
    steps: list = [crop]
    if cfg.flip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    return v2.Compose(steps + _to_signed_tensor())


def eval_transform(cfg: ImageTransformConfig) -> v2.Compose:
    """Evaluation pipeline: ADM centre crop, never flipped, then to [-1,1]."""
    return v2.Compose([CenterCropArr(cfg.image_size, cfg.resize), *_to_signed_tensor()])


# ---------------------------------------------------------------------------------- deterministic views
ViewMode = Literal["center", "center_flip", "ten_crop"]
NUM_VIEWS: dict[str, int] = {"center": 1, "center_flip": 2, "ten_crop": 10}
TEN_CROP_RANGE = 1.1  # ten-crop: the short side is resized to 1.1 x S before the five S x S crops


def view_crops(image: Image.Image, image_size: int, views: ViewMode, resize: bool = False) -> list[Image.Image]:
    """The unflipped crops of a token-extraction view mode, centre crop first.

    `center` and `center_flip`: [ADM centre crop]. `ten_crop`: ADM centre crop to int(1.1 S), then
    [centre, top-left, top-right, bottom-left, bottom-right] S x S crops. Flips are added by `view_stack`.
    Without `resize`, an image not stored at S x S raises `ImageSizeError` (ten-crop still rescales by 1.1).
    """
    if views not in NUM_VIEWS:
        raise ValueError(f"views must be one of {sorted(NUM_VIEWS)}, got {views!r}")
    check_image_size(image.size, image_size, resize)
    if views != "ten_crop":
        return [center_crop_arr(image, image_size)]
    # Follows FoundationVision/LlamaGen (autoregressive/train/extract_codes_c2i.py, --ten-crop)
    big = center_crop_arr(image, int(image_size * TEN_CROP_RANGE))
    w, h, s = big.width, big.height, image_size
    # torchvision's centre offset rule; the centre leads so that view 0 is the centre view in every mode.
    cx, cy = int(round((w - s) / 2.0)), int(round((h - s) / 2.0))
    corners = [(cx, cy), (0, 0), (w - s, 0), (0, h - s), (w - s, h - s)]
    return [big.crop((x, y, x + s, y + s)) for x, y in corners]


def view_stack(crops: list[torch.Tensor], views: ViewMode) -> torch.Tensor:
    """Crops (each [3,S,S]) -> views [V,3,S,S]: the crops, then (flip modes) their horizontal flips.

    So in `center_flip` and `ten_crop`, view V/2 + k is view k flipped, and view 0 is always the centre.
    """
    stacked = torch.stack(crops)
    if views == "center":
        return stacked
    return torch.cat([stacked, stacked.flip(-1)])


def pil_to_signed(image: Image.Image) -> torch.Tensor:
    """RGB PIL -> float32 [3,H,W] in [-1,1], exactly as `eval_transform` converts."""
    return v2.Compose(_to_signed_tensor())(image)


def image_views(image: Image.Image, image_size: int, views: ViewMode, resize: bool = False) -> torch.Tensor:
    """Deterministic views of one image for token extraction: float32 [V,3,S,S] in [-1,1] (`view_crops`)."""
    return view_stack([pil_to_signed(crop) for crop in view_crops(image, image_size, views, resize)], views)
