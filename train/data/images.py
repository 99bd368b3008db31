"""Image DataModules: embedded digits and an ImageNet-layout folder (webdataset shards: `image_shards.py`).

Every loader yields `(images, labels)`: images float32 [B,3,S,S] in [-1,1], labels int64 [B]. A corrupt or
truncated image never crashes a run: it is skipped, a `CorruptImageWarning` names it with the running
total, the module's `skipped_images` counts it (summed over DataLoader workers through a shared-memory
tensor), and `teardown` logs the total. A label outside [0, num_classes), or a validation folder whose
classes differ from the training folder's, is an error instead (`train.data.transforms.LabelError`): skipping
cannot fix a wrong data set. So is an image not stored at `image_size` when `resize` is off
(`train.data.transforms.ImageSizeError`): images are never resized unless asked, `image_size: null` takes
the size of the first training image, and `setup` (and `views_dataset`) checks the first image of each
split, so a data set stored at another size stops before any step. Decoding (any mode to 8-bit RGB) and
cropping live in `train.data.transforms`, the digits in `train.data.digits`, shard reading in
`train.data.image_shards`, shard writing in `train.prepare.write_shards`. `views_dataset(split, views)` gives
the deterministic views that token extraction encodes (datasets in `train.data.views`); token shards and the
models are other modules' business.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from train.data import digits
from train.data.folder_files import find_classes_checked, make_dataset_checked
from train.data.transforms import (
    UNREADABLE_IMAGE_ERRORS,
    CorruptImageWarning,
    ImageSizeError,
    ImageTransformConfig,
    ViewMode,
    check_image_size,
    eval_transform,
    open_rgb,
    stored_size,
    train_transform,
)
from train.data.views import DigitsViews, FolderViews, ViewsDataset

log = logging.getLogger(__name__)

__all__ = ["CorruptImageWarning", "SkipCounter", "SafeImageLoader", "SkipNoneCollate", "DigitsDataModule",
           "ImageFolderDataModule"]  # fmt: skip


class SkipCounter:
    """Counts skipped images across the main process and DataLoader workers.

    Each process writes only its own slot of a shared-memory tensor (slot 0 = main, 1 + worker id), so
    increments never race; `count` sums the slots. Forked workers inherit the tensor and torch's pickling
    shares it under spawn, so the main process sees the workers' counts.
    """

    def __init__(self, num_workers: int = 0) -> None:
        # device="cpu": shared memory is CPU-only, even when built under a `torch.device("meta")` context.
        self._slots = torch.zeros(num_workers + 1, dtype=torch.int64, device="cpu").share_memory_()

    def add(self, name: str, reason: object) -> None:
        """Count one skipped item and warn with its name and the reason."""
        info = torch.utils.data.get_worker_info()
        slot = 0 if info is None else 1 + info.id
        self._slots[slot % self._slots.numel()] += 1
        warnings.warn(
            f"skipping unreadable image {name}: {reason} ({self.count} skipped so far)",
            CorruptImageWarning,
            stacklevel=2,
        )

    @property
    def count(self) -> int:
        """Total items skipped so far, over all processes."""
        return int(self._slots.sum())

    def reset(self) -> None:
        self._slots.zero_()


class _SkippingDataModule(LightningDataModule):
    """Base of the file-backed DataModules: `skipped_images`, and its total logged at teardown."""

    skip_counter: SkipCounter

    @property
    def skipped_images(self) -> int:
        """Unreadable images skipped so far by this module's loaders (over all their workers)."""
        return self.skip_counter.count

    def teardown(self, stage: str) -> None:
        # Warnings scroll by during a long run; the total at the end of fit/validate/predict does not.
        if self.skipped_images:
            log.warning(
                "%s: %d unreadable image(s) skipped (each named in a CorruptImageWarning)",
                type(self).__name__,
                self.skipped_images,
            )


class _SizedImagesDataModule(_SkippingDataModule):
    """Base of the file-backed DataModules that crop to `image_size`: the stored-size rule.

    `image_size=None` means "as stored": the size of the first readable training image, which must be
    square (every other image must match it). Unless `resize` is on, an image of another size is an
    `ImageSizeError`: `setup` checks the first image of each split it will read, before any step, and the
    transforms check every image as it is read. Subclasses say where a split's first image is.
    """

    def _init_sizes(self, image_size: int | None, resize: bool, train_crop: str, crop_scale: tuple[float, float],
                    flip: bool) -> None:
        if image_size is not None and image_size < 1:
            raise ValueError(f"data.init_args.image_size must be positive or null (as stored), got {image_size}")
        if resize and image_size is None:
            raise ValueError("data.init_args.resize: true needs data.init_args.image_size, the side to resize "
                             "to (null means the images are used as stored)")
        # Validates the crop settings now, not when the first loader is built.
        ImageTransformConfig(image_size or 1, train_crop, tuple(crop_scale), flip, resize)
        self._image_size, self.resize = image_size, resize
        self._crop = (train_crop, tuple(crop_scale), flip)

    def first_image(self, split: Literal["train", "val"]) -> tuple[tuple[int, int], str] | None:
        """((width, height), name) of the first readable image of `split` in reading order; None when the
        split is absent or holds no readable image (the loaders report those themselves)."""
        raise NotImplementedError

    @property
    def image_size(self) -> int:
        """Side S of the square images: `image_size`, or (when None) the first training image's side."""
        if self._image_size is None:
            found = self.first_image("train")
            if found is None:
                raise ValueError(f"{type(self).__name__}: no readable training image to take the size from "
                                 f"(data.init_args.image_size: null); set data.init_args.image_size")
            (width, height), name = found
            if width != height:
                raise ImageSizeError(
                    f"{name}: the first training image is {width}x{height}, not square, so "
                    f"data.init_args.image_size: null (use images as stored) cannot apply: set "
                    f"data.init_args.image_size and data.init_args.resize: true to resize and crop")
            self._image_size = width
        return self._image_size

    @property
    def transform_cfg(self) -> ImageTransformConfig:
        train_crop, crop_scale, flip = self._crop
        return ImageTransformConfig(self.image_size, train_crop, crop_scale, flip, self.resize)

    def check_stored_size(self, split: Literal["train", "val"]) -> None:
        """ImageSizeError naming the first image of `split` when it is not stored at image_size (no resize)."""
        found = None if self.resize else self.first_image(split)
        if found is not None:
            size, name = found
            try:
                check_image_size(size, self.image_size, self.resize)
            except ImageSizeError as exn:
                raise ImageSizeError(f"{name}: {exn}") from None

    def setup(self, stage: str) -> None:
        # Before the first step (and before `validate` reads anything): a data set stored at another size
        # fails here, naming its first image, instead of in a DataLoader worker later.
        for split in {"fit": ("train", "val"), "validate": ("val",)}.get(stage, ()):
            self.check_stored_size(split)


def _first_readable(candidates: Iterable[tuple[str, str | bytes]]) -> tuple[tuple[int, int], str] | None:
    """The size and name of the first of `candidates` ((name, path or bytes) pairs) that PIL can read."""
    for name, source in candidates:
        size = stored_size(source)
        if size is not None:
            return size, name
    return None


class SafeImageLoader:
    """ImageFolder loader: the decoded (and transformed) image, or None, counted and warned, when unreadable.

    The transform runs here rather than as ImageFolder's `transform` so that a None never reaches it; an
    image at the wrong size (`ImageSizeError`) is an error naming the file, not a skip.
    """

    def __init__(self, counter: SkipCounter, transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.counter, self.transform = counter, transform

    def __call__(self, path: str) -> Any:
        try:
            image = open_rgb(path)
        except UNREADABLE_IMAGE_ERRORS as exn:
            self.counter.add(path, exn)
            return None
        if self.transform is None:
            return image
        try:
            return self.transform(image)
        except ImageSizeError as exn:
            raise ImageSizeError(f"{path}: {exn}") from None


class SkipNoneCollate:
    """Collate that drops skipped samples; a batch whose samples were all skipped comes out with B = 0."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, batch: list[tuple[torch.Tensor | None, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        kept = [(image, label) for image, label in batch if image is not None]
        if not kept:
            s = self.image_size
            return torch.empty(0, 3, s, s), torch.empty(0, dtype=torch.int64)
        images, labels = default_collate(kept)
        return images, labels.to(torch.int64)


def _loader(dataset: Dataset, batch_size: int, num_workers: int, shuffle: bool, **kw: Any) -> DataLoader:
    # Iterable (shard) datasets shuffle inside their pipeline and must pass shuffle=False here.
    return DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, shuffle=shuffle,
        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0, **kw,
    )  # fmt: skip


class _DigitsDataset(Dataset):
    """Digits as ready tensors: image float32 [3,16,16] in [-1,1], label int64 []."""

    def __init__(self, split: Literal["train", "val"], flip: bool) -> None:
        images, labels = digits.digits_split(split)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        self.labels, self.flip = torch.from_numpy(labels), flip

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.flip and bool(torch.rand(()) < 0.5):
            image = image.flip(-1)
        return image, self.labels[index]


class DigitsDataModule(LightningDataModule):
    """The embedded scikit-learn digits (RGB 16x16, 10 classes; 1500 train / 297 val); no files needed."""

    def __init__(self, batch_size: int = 64, num_workers: int = 0, flip: bool = False) -> None:
        """
        Args:
            batch_size: Images per batch.
            num_workers: DataLoader worker processes (0 = main process; the set is tiny).
            flip: Random horizontal flip of training images (off by default: digits are not symmetric).
        """
        super().__init__()
        self.save_hyperparameters()
        self.batch_size, self.num_workers, self.flip = batch_size, num_workers, flip
        self.num_classes, self.image_size = digits.NUM_CLASSES, digits.IMAGE_SIZE
        self.skipped_images = 0  # the file-backed modules' interface; nothing here can be corrupt

    def train_dataloader(self) -> DataLoader:
        return _loader(_DigitsDataset("train", self.flip), self.batch_size, self.num_workers, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return _loader(_DigitsDataset("val", False), self.batch_size, self.num_workers, shuffle=False)

    def views_dataset(self, split: Literal["train", "val"], views: ViewMode) -> ViewsDataset:
        """Deterministic views of a split for token extraction (index = position in the split)."""
        return DigitsViews(split, views)


class _CheckedImageFolder(ImageFolder):
    """torchvision's ImageFolder listing each real file once (`train.data.folder_files`): a symlink loop, a
    file or folder reached twice, or class names differing only in case raise `DuplicateInputError`."""

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return find_classes_checked(directory)

    @staticmethod
    def make_dataset(directory: str | Path, class_to_idx: dict[str, int], extensions: Any = None,
                     is_valid_file: Any = None, allow_empty: bool = False) -> list[tuple[str, int]]:
        return make_dataset_checked(directory, class_to_idx, tuple(extensions or IMG_EXTENSIONS))


class ImageFolderDataModule(_SizedImagesDataModule):
    """An ImageNet-layout tree `root/{train_dir,val_dir}/<class>/<image>`, via torchvision's ImageFolder.

    Class indices are the sorted class folder names (torchvision's rule, also used by `train.prepare.write_shards`),
    so the validation folder must hold the same class folders as the training folder (else ValueError).
    Unreadable files are skipped, warned about and counted in `skipped_images`. Images are used as stored
    unless `resize` is on (ImageNet's photos of every size need `image_size: 256, resize: true`).
    """

    def __init__(
        self,
        root: str,
        image_size: int | None = None,
        resize: bool = False,
        batch_size: int = 64,
        num_workers: int = 8,
        train_crop: Literal["center", "random"] = "random",
        crop_scale: tuple[float, float] = (0.8, 1.0),
        flip: bool = True,
        train_dir: str = "train",
        val_dir: str | None = "val",
    ) -> None:
        """
        Args:
            root: Folder holding the split folders.
            image_size: Side S of the square images; None: as stored (the first training image's side;
                every image must be stored at that size, square).
            resize: Resize images stored at another size (short side to image_size, BOX halving then BICUBIC
                as ADM), then crop; False: an image not stored at image_size x image_size is an error.
            batch_size: Images per batch (per device).
            num_workers: DataLoader worker processes.
            train_crop: Training crop: `random` (LlamaGen) or `center` (ADM).
            crop_scale: (min, max) crop fraction of the random crop.
            flip: Random horizontal flip at training time.
            train_dir: Training split folder under `root`.
            val_dir: Validation split folder under `root` (centre crop, no flip); None for none.
        """
        super().__init__()
        self.save_hyperparameters()
        self.root, self.train_dir, self.val_dir = Path(root), train_dir, val_dir
        self.batch_size, self.num_workers = batch_size, num_workers
        self._init_sizes(image_size, resize, train_crop, crop_scale, flip)
        self.skip_counter = SkipCounter(num_workers)
        self._num_classes: int | None = None

    @property
    def num_classes(self) -> int:
        """Number of class folders in `root/train_dir` (read on first use)."""
        if self._num_classes is None:
            self._num_classes = len(find_classes_checked(self.root / self.train_dir)[0])
        return self._num_classes

    def _split_root(self, split_dir: str) -> Path:
        """`root/split_dir`, after checking that its class folders are the training folder's.

        Labels are positions in the sorted folder list, so a split with a class folder more or less would
        label every later class wrongly without any error.
        """
        path = self.root / split_dir
        if split_dir != self.train_dir:
            ours, train = find_classes_checked(path)[0], find_classes_checked(self.root / self.train_dir)[0]
            if ours != train:
                extra, missing = sorted(set(ours) - set(train)), sorted(set(train) - set(ours))
                raise ValueError(
                    f"{path} has other class folders than {self.root / self.train_dir} (extra: "
                    f"{extra[:5]}, missing: {missing[:5]}): labels are positions in the sorted "
                    f"folder list, so both splits must list the same {len(train)} classes"
                )
        return path

    def first_image(self, split: Literal["train", "val"]) -> tuple[tuple[int, int], str] | None:
        """The first readable image of a split in ImageFolder's order (sorted classes, then sorted walk)."""
        split_dir = self.train_dir if split == "train" else self.val_dir
        if split_dir is None or not (self.root / split_dir).is_dir():
            return None
        root = self.root / split_dir

        def candidates() -> Iterator[tuple[str, str]]:
            # ImageFolder's order, each real file once (a symlink loop is an error, not a longer list)
            for path, _ in make_dataset_checked(root, find_classes_checked(root)[1]):
                yield path, path

        return _first_readable(candidates())

    def _dataloader(self, split_dir: str, train: bool) -> DataLoader:
        transform = (train_transform if train else eval_transform)(self.transform_cfg)
        dataset = _CheckedImageFolder(
            str(self._split_root(split_dir)), loader=SafeImageLoader(self.skip_counter, transform)
        )
        collate = SkipNoneCollate(self.image_size)
        return _loader(dataset, self.batch_size, self.num_workers, shuffle=train, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        return self._dataloader(self.train_dir, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_dir is None else self._dataloader(self.val_dir, train=False)

    def views_dataset(self, split: Literal["train", "val"], views: ViewMode) -> ViewsDataset:
        """Deterministic views of a split for token extraction (index = ImageFolder position)."""
        split_dir = self.train_dir if split == "train" else self.val_dir
        if split_dir is None:
            raise ValueError(f"{type(self).__name__} has no {split} split (val_dir is None)")
        self.check_stored_size(split)
        return FolderViews(self._split_root(split_dir), self.image_size, views, self.skip_counter, self.resize)
