"""Deterministic multi-view image datasets for token extraction: item -> (index, views | None, label).

Each dataset lists one split's images under stable global indices (`indices`, ascending) and yields every
image's deterministic views, float32 [V,3,S,S] in [-1,1] (`train.data.transforms.view_crops` / `view_stack`:
centre, centre + flip, or LlamaGen's ten-crop; view 0 is always the centre crop). An unreadable image
yields `views = None`: it is warned about and counted through the owning DataModule's skip counter, and
the extractor lists it. A label outside [0, num_classes), an unreadable tar, or (without `resize`) an
image not stored at image_size x image_size (`ImageSizeError`) raises instead (naming the image):
extraction must not quietly write a wrong data set.
`ViewsCollate` batches items into a dict and keeps the skipped indices. The DataModules in
`train.data.images` build these (`views_dataset(split, views)`); encoding and writing shards is
`train.prepare.extract_tokens`' job.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from train.data import digits
from train.data.transforms import (
    UNREADABLE_IMAGE_ERRORS,
    ImageSizeError,
    ViewMode,
    image_views,
    open_rgb,
    parse_label,
    view_crops,
    view_stack,
)

__all__ = ["ViewsDataset", "DigitsViews", "FolderViews", "TarViews", "ViewsCollate", "ViewItem"]

ViewItem = tuple[int, "torch.Tensor | None", int]
"""(global index, views float32 [V,3,S,S] in [-1,1] or None when unreadable, label)."""


class _SkipCounter(Protocol):
    def add(self, name: str, reason: object) -> None: ...


class ViewsDataset(Dataset):
    """Map-style base: item i is the image with global index `indices[i]` (int64 [N], ascending)."""

    indices: np.ndarray
    image_size: int
    views: ViewMode
    resize: bool = False  # resize images stored at another size (else ImageSizeError)

    def __len__(self) -> int:
        return len(self.indices)

    def describe(self, position: int) -> str:
        """A human-readable name of item `position` (file path, shard and key, ...)."""
        return f"image {int(self.indices[position])}"

    def _views(self, image: Image.Image, position: int) -> torch.Tensor:
        """`image_views` of the decoded image, an ImageSizeError naming the image when it has another size."""
        try:
            return image_views(image, self.image_size, self.views, self.resize)
        except ImageSizeError as exn:
            raise ImageSizeError(f"{self.describe(position)}: {exn}") from None

    def __getitem__(self, position: int) -> ViewItem:  # pragma: no cover - abstract
        raise NotImplementedError


class DigitsViews(ViewsDataset):
    """The embedded digits of a split; index = position in `train.data.digits.digits_split(split)`.

    Converted exactly as `DigitsDataModule` converts (uint8 / 127.5 - 1), so the centre view is the
    DataModule's image bit for bit (a 16 px centre crop of a 16 px image is the image itself).
    """

    def __init__(self, split: str, views: ViewMode) -> None:
        self.images, self.labels = digits.digits_split(split)  # type: ignore[arg-type]
        self.indices = np.arange(len(self.labels), dtype=np.int64)
        self.image_size, self.views = digits.IMAGE_SIZE, views

    def __getitem__(self, position: int) -> ViewItem:
        crops = view_crops(Image.fromarray(self.images[position]), self.image_size, self.views)
        tensors = [torch.from_numpy(np.asarray(c).copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)
                   for c in crops]  # fmt: skip
        return position, view_stack(tensors, self.views), int(self.labels[position])


class FolderViews(ViewsDataset):
    """An ImageFolder split; index = position in torchvision's sorted (class, file) order.

    The same order as `ImageFolder` and `train.prepare.write_shards`, so indices match the image shards' keys.
    """

    def __init__(self, root: str | Path, image_size: int, views: ViewMode, counter: _SkipCounter,
                 resize: bool = False) -> None:
        _, class_to_idx = find_classes(str(root))
        self.samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
        self.indices = np.arange(len(self.samples), dtype=np.int64)
        self.image_size, self.views, self.counter, self.resize = image_size, views, counter, resize

    def describe(self, position: int) -> str:
        return str(self.samples[position][0])

    def __getitem__(self, position: int) -> ViewItem:
        path, label = self.samples[position]
        try:
            image = open_rgb(path)
        except UNREADABLE_IMAGE_ERRORS as exn:
            self.counter.add(path, exn)
            return position, None, label
        return position, self._views(image, position), label


# webdataset's key rule: the key is the member path up to the first dot of its base name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class TarViews(ViewsDataset):
    """Local webdataset shards with `jpg` + `cls`, read by random access into the tar files.

    Building it reads only the tar headers (and the tiny `cls` members) and records where each `jpg` lies,
    so workers can fetch any image by seek. Index = the integer `__key__` (as `train.prepare.write_shards` writes
    it); when some key is not an integer, the position in (shard, member) order is used instead. Samples
    lacking a `jpg` or `cls` member are kept with views None, so the extractor lists them as skipped.
    Labels are checked here, before any encoding, against [0, num_classes) (`>= 0` when it is None).
    """

    def __init__(
        self,
        urls: list[str],
        image_size: int,
        views: ViewMode,
        counter: _SkipCounter,
        num_classes: int | None = None,
        resize: bool = False,
    ) -> None:
        remote = [u for u in urls if "://" in u or u.startswith("pipe:")]
        if remote:
            raise ValueError(f"token extraction reads local shards only (random access), got {remote[0]}")
        entries: dict[tuple[str, str], dict] = {}  # (url, key) -> {"jpg": (offset, size), "cls": int}
        for url in urls:
            try:
                _index_tar(url, entries, num_classes)
            except tarfile.TarError as exn:  # tarfile's messages do not name the file
                raise ValueError(
                    f"image shard {url} is not a readable (uncompressed) tar file: {exn}"
                ) from exn
        self.items = list(entries.items())
        keys = [key for (_, key), _ in self.items]
        if keys and all(k.isdigit() for k in keys):
            indices = np.asarray([int(k) for k in keys], dtype=np.int64)
            if len(np.unique(indices)) != len(indices):
                raise ValueError("duplicate integer keys across the image shards")
            order = np.argsort(indices, kind="stable")
            self.items = [self.items[i] for i in order]
            self.indices = indices[order]
        else:
            self.indices = np.arange(len(self.items), dtype=np.int64)
        self.image_size, self.views, self.counter, self.resize = image_size, views, counter, resize

    def describe(self, position: int) -> str:
        (url, key), _ = self.items[position]
        return f"{url}:{key}"

    def __getitem__(self, position: int) -> ViewItem:
        (url, _), entry = self.items[position]
        index, label = int(self.indices[position]), int(entry.get("cls", -1))
        if "jpg" not in entry or "cls" not in entry:
            self.counter.add(self.describe(position), "sample lacks a jpg or cls member")
            return index, None, label
        offset, size = entry["jpg"]
        try:
            with open(url, "rb") as stream:
                stream.seek(offset)
                image = open_rgb(stream.read(size))
        except UNREADABLE_IMAGE_ERRORS as exn:
            self.counter.add(self.describe(position), exn)
            return index, None, label
        return index, self._views(image, position), label


def _index_tar(url: str, entries: dict[tuple[str, str], dict], num_classes: int | None) -> None:
    """Record where each `jpg` of shard `url` lies and read (and check) each `cls`, into `entries`."""
    with tarfile.open(url, "r:") as tar:  # "r:": uncompressed, so member offsets are file offsets
        for member in tar:
            match = _KEY_EXT.match(member.name)
            if not member.isfile() or match is None or match.group(2) not in ("jpg", "cls"):
                continue  # never touch other members (.pyd/.pth pickles included)
            entry = entries.setdefault((url, match.group(1)), {})
            if match.group(2) == "jpg":
                entry["jpg"] = (member.offset_data, member.size)
            else:
                raw = tar.extractfile(member).read()
                entry["cls"] = parse_label(raw, num_classes, f"{url}:{match.group(1)}")


class ViewsCollate:
    """Items -> {"indices" int64 [b], "views" float32 [b,V,3,S,S], "labels" int64 [b], "skipped" int64 [k]}.

    Unreadable items go to `skipped` (b + k = batch size); b may be 0.
    """

    def __init__(self, num_views: int, image_size: int) -> None:
        self.num_views, self.image_size = num_views, image_size

    def __call__(self, items: list[ViewItem]) -> dict[str, torch.Tensor]:
        kept = [item for item in items if item[1] is not None]
        s = self.image_size
        views = torch.stack([v for _, v, _ in kept]) if kept else torch.empty(0, self.num_views, 3, s, s)
        return {
            "indices": torch.tensor([i for i, _, _ in kept], dtype=torch.int64),
            "views": views,
            "labels": torch.tensor([label for _, _, label in kept], dtype=torch.int64),
            "skipped": torch.tensor([i for i, v, _ in items if v is None], dtype=torch.int64),
        }
