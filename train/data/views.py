"""Deterministic multi-view image datasets for token extraction: item -> (index, views | None, label).

Each dataset lists one split's images under stable global indices (`indices`, ascending) and yields every
image's deterministic views, float32 [V,3,S,S] in [-1,1] (`train.data.transforms.view_crops` / `view_stack`:
centre, centre + flip, or LlamaGen's ten-crop; view 0 is always the centre crop). An unreadable image
yields `views = None`: it is warned about and counted through the owning DataModule's skip counter, and
the extractor lists it. A label outside [0, num_classes), an unreadable tar, or (without `resize`) an
image not stored at image_size x image_size (`ImageSizeError`) raises instead (naming the image):
extraction must not quietly write a wrong data set. So does input that would be read twice or come out
short: a folder symlink loop or a file reached twice (`train.data.folder_files`), a key repeated in or across
shards, and an image shard holding fewer samples than its `.json` summary records (a truncated copy:
`train.data.shard_integrity`).
`ViewsCollate` batches items into a dict and keeps the skipped indices. The DataModules in
`train.data.images` build these (`views_dataset(split, views)`); encoding and writing shards is
`train.prepare.extract_tokens`' job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from train.data import digits
from train.data.folder_files import DuplicateInputError, find_classes_checked, make_dataset_checked
from train.data.shard_integrity import (
    ShardRecord,
    check_shard_files,
    duplicate_key_error,
    scan_tar,
    summary_records,
    truncated_error,
)
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
        _, class_to_idx = find_classes_checked(str(root))
        self.samples = make_dataset_checked(str(root), class_to_idx)  # each real file once
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
        records = summary_records(urls)
        check_shard_files(urls, records, _REQUIRED, "images")  # the same file twice; sizes where recorded
        for url in urls:
            _index_tar(url, entries, num_classes, records.get(url))
        self.items = list(entries.items())
        keys = [key for (_, key), _ in self.items]
        if keys and all(k.isdigit() for k in keys):
            indices = np.asarray([int(k) for k in keys], dtype=np.int64)
            unique, counts = np.unique(indices, return_counts=True)
            if len(unique) != len(indices):
                twice = int(unique[counts > 1][0])
                where = [url for (url, key), _ in self.items if int(key) == twice]
                raise DuplicateInputError(
                    f"image {twice} (key {twice:09d}) is in {len(where)} places ({', '.join(where[:3])}): it "
                    f"would be encoded more than once; remove the shard that does not belong (shards of one "
                    f"split written by one `python -m train.prepare shards` run never share a key)")
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


_REQUIRED = ("jpg", "cls")


def _index_tar(url: str, entries: dict[tuple[str, str], dict], num_classes: int | None,
               record: ShardRecord | None) -> None:
    """Record where each `jpg` of shard `url` lies and read (and check) each `cls`, into `entries`; the
    shard's complete samples must number what its summary records, and no key may repeat."""
    scan = scan_tar(url, _REQUIRED)  # headers only: never touches other members (.pyd/.pth pickles included)
    if scan.duplicates:
        raise duplicate_key_error(url, scan.duplicates[0], "images")
    if record is not None and record.num_samples is not None and scan.num_samples != record.num_samples:
        raise truncated_error(url, record, scan.num_samples, "images")
    with open(url, "rb") as stream:
        for key, members in scan.samples + scan.incomplete:
            entry = entries.setdefault((url, key), {})
            if "jpg" in members:
                entry["jpg"] = members["jpg"]
            if "cls" in members:
                offset, size = members["cls"]
                stream.seek(offset)
                entry["cls"] = parse_label(stream.read(size), num_classes, f"{url}:{key}")


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
