"""A small labelled example data set: coloured shapes as an ImageFolder tree, `python -m train.prepare shapes`.

`write_shapes` draws one shape per image (classes `cross`, `disc`, `square`, `triangle`) in a random colour,
at a random position and size, on a random dark background, and writes `out/{train,val}/<class>/<class>_NNNNN.png`
(RGB PNG, `image_size` x `image_size`): the layout `train.data.images.ImageFolderDataModule`, the domain
classifier and the reference statistics read. It exists so the own-data guide (docs/own_data.md) can run the
whole pipeline on known data in minutes before a user puts their own images in the same layout.

Every image is a function of (seed, split, class, index) alone: the same seed gives the same files byte for
byte, and raising `train_per_class` adds images without changing the first ones. Edges are anti-aliased
(drawn at 4x and box-averaged), so the tokenizer sees soft edges like a photograph's rather than a pure
two-colour mask. Reading and training on the tree are other modules' jobs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tokenizers_vq.files import atomic_write

__all__ = ["CLASSES", "SPLITS", "draw_shape", "write_shapes"]

CLASSES = ("cross", "disc", "square", "triangle")
"""Class folder names, in the sorted order ImageFolder gives them (so label i is CLASSES[i])."""
SPLITS = ("train", "val")
_SUPERSAMPLE = 4  # drawn at 4x the size, then box-averaged: anti-aliased edges


def _inside(kind: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of the points (x, y), relative to the shape's centre, inside a shape of half-extent r."""
    if kind == "square":
        return (np.abs(x) <= r) & (np.abs(y) <= r)
    if kind == "disc":
        return x * x + y * y <= r * r
    if kind == "triangle":  # apex up, base down: half width grows from 0 at the top to r at the bottom
        return (np.abs(y) <= r) & (np.abs(x) <= (y + r) / 2)
    if kind == "cross":  # a plus sign whose bars are a third of its extent wide
        bar = max(r / 3, 0.75)
        return ((np.abs(x) <= bar) & (np.abs(y) <= r)) | ((np.abs(y) <= bar) & (np.abs(x) <= r))
    raise ValueError(f"unknown shape {kind!r}; shapes are {list(CLASSES)}")


def draw_shape(kind: str, rng: np.random.Generator, image_size: int = 16) -> np.ndarray:
    """One image, uint8 [image_size, image_size, 3]: a `kind` shape in a random bright colour, at a random
    position and size (half-extent 35% to 48% of the side, always wholly inside), on a random dark background.
    Shapes this large keep their class through a 4x4-token tokenizer trained for a few epochs; smaller ones
    blur into one another.

    Args:
        kind: One of CLASSES.
        rng: The random source of colour, size and position (consumed in a fixed order).
        image_size: Side of the square image in pixels.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels to draw a recognisable shape, got {image_size}")
    background = rng.uniform(0, 60, size=3)
    colour = rng.uniform(130, 255, size=3)  # brighter than any background in every channel: always visible
    r = rng.uniform(0.35, 0.48) * image_size
    cx, cy = rng.uniform(r, image_size - r, size=2)
    side = image_size * _SUPERSAMPLE
    coords = (np.arange(side) + 0.5) / _SUPERSAMPLE  # sub-pixel centres, in pixels
    x, y = np.meshgrid(coords - cx, coords - cy)
    mask = _inside(kind, x, y, r).astype(np.float64)
    coverage = mask.reshape(image_size, _SUPERSAMPLE, image_size, _SUPERSAMPLE).mean(axis=(1, 3))[..., None]
    image = background * (1 - coverage) + colour * coverage
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _png_writer(pixels: np.ndarray) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        Image.fromarray(pixels, mode="RGB").save(tmp, format="PNG")  # the temp name has no .png suffix

    return write


def write_shapes(
    out: str = "data/shapes",
    train_per_class: int = 64,
    val_per_class: int = 16,
    image_size: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the coloured-shapes ImageFolder tree `out/{train,val}/<class>/*.png` and return its summary.

    Args:
        out: Root of the tree (the `root` of train.data.images.ImageFolderDataModule).
        train_per_class: Training images per class.
        val_per_class: Validation images per class.
        image_size: Side of the square RGB images in pixels (at least 8).
        seed: Seeds every image; image i of a class and split is the same whatever the counts.
    """
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError(f"train_per_class and val_per_class must be positive, got {train_per_class} and "
                         f"{val_per_class}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    root = Path(out)
    counts = {"train": train_per_class, "val": val_per_class}
    wanted = {root / split / kind / f"{kind}_{i:05d}.png"
              for split in SPLITS for kind in CLASSES for i in range(counts[split])}
    # Images left by an earlier call with larger counts would silently unbalance the classes.
    stray = sorted(p for split in SPLITS if (root / split).is_dir()
                   for p in (root / split).rglob("*.png") if p not in wanted)
    if stray:
        raise ValueError(f"{root} holds {len(stray)} image(s) this call would not write (first: {stray[0]}): "
                         f"use an empty folder, or the counts that wrote it")
    for split_index, split in enumerate(SPLITS):
        for class_index, kind in enumerate(CLASSES):
            # One stream per (seed, split, class): more images of one never change those of another.
            rng = np.random.default_rng([seed, split_index, class_index])
            for i in range(counts[split]):
                atomic_write(root / split / kind / f"{kind}_{i:05d}.png",
                             _png_writer(draw_shape(kind, rng, image_size)))
    summary = {"root": str(root), "classes": list(CLASSES), "train_per_class": train_per_class,
               "val_per_class": val_per_class, "image_size": image_size, "seed": seed}
    print(f"{root}: {len(CLASSES)} classes ({', '.join(CLASSES)}), {train_per_class} train and {val_per_class} "
          f"val images per class, {image_size}x{image_size} RGB PNG (seed {seed})")
    return summary
