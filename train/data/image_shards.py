"""`ImageShardsDataModule`: images from webdataset shards (`jpg` + `cls`), local or remote, and
`shard_urls`, which resolves a shard spec (folder, glob, brace pattern) for this and the token shards.

Shards are split over ranks (`wds.split_by_node`), then DataLoader workers (`wds.split_by_worker`); only
image and label members are ever extracted (never `.pyd`/`.pth` pickles); a corrupt member is skipped and
counted like a corrupt file in `images.py` (which holds the shared skip-and-count machinery and the
stored-size rule), while a label outside [0, num_classes), or an image not stored at `image_size` when
`resize` is off, stops the run. So does a shard that holds fewer samples than its `.json` summary records (a
truncated copy; checked by size before the loader starts and by count as each shard's stream ends,
`train.data.shard_integrity`), a key repeated inside a shard, a shard listed twice, and a `classes.json`
naming a class twice.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, Literal

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from train.data.folder_files import DuplicateInputError
from train.data.images import SkipCounter, _first_readable, _loader, _SizedImagesDataModule
from train.data.shard_integrity import (
    TruncatedShardError,
    check_shard_files,
    counted_samples,
    summary_records,
)
from train.data.transforms import (
    UNREADABLE_IMAGE_ERRORS,
    ImageSizeError,
    LabelError,
    ViewMode,
    eval_transform,
    open_rgb,
    parse_label,
    train_transform,
)
from train.data.views import TarViews, ViewsDataset

log = logging.getLogger(__name__)

__all__ = ["ImageShardsDataModule", "is_local_url", "shard_urls", "read_classes"]


def is_local_url(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def shard_urls(spec: str) -> list[str]:
    """Shards of a spec: a local folder (its `*.tar`, sorted), a local glob (`/data/train-*.tar`, sorted), or
    a brace pattern / URL list (expanded). Raises FileNotFoundError naming `spec` when it yields no shard
    or names a local shard that does not exist."""
    if not spec or not spec.strip():
        raise FileNotFoundError(f"empty shard spec {spec!r}: give a folder, a glob or a brace pattern")
    if is_local_url(spec) and Path(spec).is_dir():
        urls = sorted(str(p) for p in Path(spec).glob("*.tar"))
        if not urls:
            raise FileNotFoundError(f"no .tar shards in folder {spec}")
        return urls
    if is_local_url(spec) and glob.has_magic(spec) and "{" not in spec:
        urls = sorted(glob.glob(spec))
        if not urls:
            raise FileNotFoundError(f"shard pattern {spec!r} matches no files")
        return urls
    urls = wds.shardlists.expand_urls(spec)
    missing = [u for u in urls if is_local_url(u) and not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) of {spec!r} do not exist, e.g. {missing[0]}")
    if not urls:
        raise FileNotFoundError(f"shard spec {spec!r} expands to no shards")
    return urls


def _classes_path(spec: str) -> Path | None:
    """Where `classes.json` of shards `spec` is (beside the first shard) when they are local; else None."""
    first = shard_urls(spec)[0]
    return Path(first).parent / "classes.json" if is_local_url(first) else None


_REQUIRED = ("jpg", "cls")  # the members of a complete image sample


def _wanted_member(fname: str) -> bool:
    # Only image and label bytes are ever read: .pyd/.pth/pickle members are not even extracted.
    return fname.endswith((".jpg", ".cls"))


def read_classes(path: Path) -> list[str]:
    """Class names in label order from a `classes.json` ({"0": name, "1": name, ...}, as
    `train.prepare.write_shards` writes it); a ValueError naming the file for keys that are not 0..n-1 or a
    name listed twice (also when differing only in case): two labels would then name one class."""
    try:
        names = json.loads(path.read_text())
    except json.JSONDecodeError as exn:
        raise ValueError(f"{path} is not valid JSON ({exn}); rewrite it with `python -m train.prepare shards`") from exn
    if not isinstance(names, dict) or sorted(names, key=lambda k: int(k) if str(k).isdigit() else -1) != [
            str(i) for i in range(len(names))]:
        raise ValueError(f"{path} must map the labels 0..n-1 to class names, like `python -m train.prepare "
                         f"shards` writes it")
    ordered = [str(names[str(i)]) for i in range(len(names))]
    first: dict[str, int] = {}
    for label, name in enumerate(ordered):
        other = first.setdefault(name.casefold(), label)
        if other != label:
            raise DuplicateInputError(
                f"{path} names class {name!r} twice (labels {other} and {label}"
                f"{', differing only in case' if ordered[other] != name else ''}): the two labels would be one "
                f"class; fix the class folders and rewrite the shards")
    return ordered


class _ShardErrorHandler:
    """webdataset handler: warn, count, continue (a bad shard or member never stops training).

    A `LabelError` or `ImageSizeError` is re-raised instead: a wrong label or image size means a wrong data
    set (or setting), which skipping cannot fix. webdataset adds the shard's url to the arguments of errors
    it raises while reading a tar.
    """

    def __init__(self, counter: SkipCounter) -> None:
        self.counter = counter

    def __call__(self, exn: BaseException) -> bool:
        if isinstance(exn, (LabelError, ImageSizeError, TruncatedShardError, DuplicateInputError)):
            raise exn
        self.counter.add("in shard stream", repr(exn))
        return True


class _ShardDecoder:
    """Shard sample dict -> (image float32 [3,S,S], label int), or None (counted) when undecodable.

    The label is checked against [0, num_classes) first (only >= 0 when num_classes is None), and a bad one
    raises `LabelError` whatever the image.
    """

    def __init__(
        self,
        transform: Callable[[Image.Image], torch.Tensor],
        counter: SkipCounter,
        num_classes: int | None = None,
    ) -> None:
        self.transform, self.counter, self.num_classes = transform, counter, num_classes

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int] | None:
        name = f"{sample.get('__url__')}:{sample.get('__key__')}"
        if "jpg" not in sample or "cls" not in sample:
            self.counter.add(name, "sample lacks a jpg or cls member")
            return None
        label = parse_label(sample["cls"], self.num_classes, name)
        try:
            image = open_rgb(sample["jpg"])
        except UNREADABLE_IMAGE_ERRORS as exn:
            self.counter.add(name, exn)
            return None
        try:
            return self.transform(image), label
        except ImageSizeError as exn:
            raise ImageSizeError(f"{name}: {exn}") from None


class ImageShardsDataModule(_SizedImagesDataModule):
    """Webdataset shards with `jpg` + `cls` members (as written by `python -m train.prepare shards`).

    Shards are split over ranks (`wds.split_by_node`), then DataLoader workers (`wds.split_by_worker`);
    training shuffles shards and samples. Every rank needs a shard of its own (else ValueError naming the
    shard and rank counts); with fewer shards per rank than `num_workers`, the loader starts only as many
    workers as each rank has shards (logged), since the others would sit idle. Resampled training draws
    shards with replacement in every worker and needs neither. For DDP with uneven shard counts per rank,
    use `resampled=True` with `samples_per_epoch`. Labels are checked against `num_classes` (LabelError).
    Images are used as stored unless `resize` is on (see `image_size` and `resize`).
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        image_size: int | None = None,
        resize: bool = False,
        batch_size: int = 64,
        num_workers: int = 8,
        shuffle_buffer: int = 1000,
        train_crop: Literal["center", "random"] = "random",
        crop_scale: tuple[float, float] = (0.8, 1.0),
        flip: bool = True,
        num_classes: int | None = None,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
    ) -> None:
        """
        Args:
            train_shards: Brace pattern (`/data/train-{000000..000127}.tar`), glob (`/data/train-*.tar`)
                or a folder of `.tar` files.
            val_shards: The same for validation (centre crop, no flip, in order); None for none.
            image_size: Side S of the square images; None: as stored (the first training image's side;
                every image must be stored at that size, square).
            resize: Resize images stored at another size (short side to image_size, BOX halving then BICUBIC
                as ADM), then crop; False: an image not stored at image_size x image_size is an error.
            batch_size: Images per batch (per device).
            num_workers: DataLoader worker processes.
            shuffle_buffer: Samples in the training shuffle buffer (0 = shuffle shards only).
            train_crop: Training crop: `random` (LlamaGen) or `center` (ADM).
            crop_scale: (min, max) crop fraction of the random crop.
            flip: Random horizontal flip at training time.
            num_classes: Number of classes; None reads `classes.json` beside the (local) training shards.
            resampled: Draw training shards with replacement, endlessly (pair with `samples_per_epoch`).
            samples_per_epoch: Training samples per rank per epoch; None = one pass over the rank's shards.
        """
        super().__init__()
        self.save_hyperparameters()
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.num_workers = batch_size, num_workers
        if resampled and samples_per_epoch is None:
            raise ValueError("resampled=True streams forever: set samples_per_epoch too")
        self.shuffle_buffer, self.resampled = shuffle_buffer, resampled
        self.samples_per_epoch = samples_per_epoch
        self._init_sizes(image_size, resize, train_crop, crop_scale, flip)
        self.skip_counter = SkipCounter(num_workers)
        self._num_classes = num_classes

    @property
    def num_classes(self) -> int:
        """`num_classes` if given, else the length of `classes.json` beside the first training shard."""
        if self._num_classes is None:
            path = _classes_path(self.train_shards)
            if path is None or not path.is_file():
                raise FileNotFoundError(
                    f"set num_classes, or put classes.json (see train.prepare.write_shards) at "
                    f"{path or 'the folder of local shards'}"
                )
            self._num_classes = len(read_classes(path))
        return self._num_classes

    def first_image(self, split: Literal["train", "val"]) -> tuple[tuple[int, int], str] | None:
        """The first readable `jpg` of a split's shards, in shard order (only its header is decoded)."""
        spec = self.train_shards if split == "train" else self.val_shards
        if spec is None:
            return None

        def candidates() -> Iterator[tuple[str, bytes]]:
            members = wds.tarfile_to_samples(handler=wds.ignore_and_continue, select_files=_wanted_member)
            with closing(members({"url": url} for url in shard_urls(spec))) as samples:
                for sample in samples:
                    if "jpg" in sample:
                        yield f"{sample.get('__url__')}:{sample.get('__key__')}", sample["jpg"]

        return _first_readable(candidates())

    def _check_val_classes(self, spec: str) -> None:
        """The validation shards' classes.json, when both splits have one, must equal the training one's:
        `cls` is a position in that list, so another list means other labels."""
        train, val = _classes_path(self.train_shards), _classes_path(spec)
        if train is None or val is None or not (train.is_file() and val.is_file()):
            return
        if read_classes(train) != read_classes(val):
            raise ValueError(
                f"{val} lists other classes than {train}: the validation labels would name "
                f"other classes; write both splits from folders with the same class folders"
            )

    def _label_range(self) -> int | None:
        """`num_classes` when it can be known; None (labels checked for >= 0 only) for remote shards
        without `num_classes`, which unconditional training (the VQ tokenizer) need not set."""
        try:
            return self.num_classes
        except FileNotFoundError:
            return None

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.world_size if trainer is not None else 1

    def _num_loader_workers(self, spec: str, num_shards: int, train: bool) -> int:
        """DataLoader workers for `num_shards` shards split over ranks and workers (see the class doc)."""
        if train and self.resampled:
            return self.num_workers  # every worker draws from all shards
        world = self._world_size()
        if num_shards < world:
            fix = "resampled=True with samples_per_epoch, or " if train else ""
            raise ValueError(
                f"shards {spec!r}: {num_shards} shard(s) for {world} ranks x {self.num_workers} "
                f"workers; every rank needs at least one shard, or it sees no data and DDP "
                f"stalls: use {fix}smaller shards (train.prepare.write_shards --shard_size)"
            )
        workers = min(self.num_workers, num_shards // world)
        if workers < self.num_workers:
            log.warning(
                "shards %r: %d shard(s) for %d rank(s) x %d workers; starting %d worker(s) per rank, "
                "the others would get no shard",
                spec,
                num_shards,
                world,
                self.num_workers,
                workers,
            )
        return workers

    def _dataloader(self, spec: str, train: bool) -> DataLoader:
        handler = _ShardErrorHandler(self.skip_counter)
        urls = shard_urls(spec)
        if not train:
            self._check_val_classes(spec)
        records = summary_records(urls)
        check_shard_files(urls, records, _REQUIRED, "images")  # before any worker starts
        workers = self._num_loader_workers(spec, len(urls), train)
        resampled = train and self.resampled
        # webdataset's WebDataset pipeline, with the tar expansion replaced by one that checks each shard's
        # sample count against its summary as the shard ends (and refuses a key repeated inside it).
        stages: list[Any] = [wds.ResampledShards(urls) if resampled else wds.SimpleShardList(urls),
                             wds.split_by_node, wds.split_by_worker]
        if train and not resampled:
            stages.append(wds.shuffle(100))
        stages.append(functools.partial(counted_samples, records=records, required=_REQUIRED, kind="images",
                                        select_files=_wanted_member, handler=handler))
        if train and self.shuffle_buffer > 0:
            stages.append(wds.shuffle(self.shuffle_buffer))
        transform = (train_transform if train else eval_transform)(self.transform_cfg)
        decoder = _ShardDecoder(transform, self.skip_counter, self._label_range())
        stages.append(wds.map(decoder, handler=handler))
        dataset = wds.DataPipeline(*stages)
        if train and self.samples_per_epoch is not None:
            dataset = dataset.with_epoch(math.ceil(self.samples_per_epoch / max(1, workers)))
        return _loader(dataset, self.batch_size, workers, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._dataloader(self.train_shards, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_shards is None else self._dataloader(self.val_shards, train=False)

    def views_dataset(self, split: Literal["train", "val"], views: ViewMode) -> ViewsDataset:
        """Deterministic views of a split for token extraction (index = the integer `__key__`)."""
        spec = self.train_shards if split == "train" else self.val_shards
        if spec is None:
            raise ValueError(f"{type(self).__name__} has no {split} split (val_shards is None)")
        self.check_stored_size(split)
        return TarViews(shard_urls(spec), self.image_size, views, self.skip_counter, self._label_range(),
                        self.resize)
