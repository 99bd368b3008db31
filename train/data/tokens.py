"""Token shards (from `train.prepare.extract_tokens`) as a LightningDataModule for the AR prior.

Batches are `(tokens int64 [B, h*w], labels int64 [B])`, tokens in raster order. Training streams an
endless sequence of shards per rank and DataLoader worker (resampled with replacement by default), shuffles
samples in a buffer, draws one random view per sample each time it is read, and stops after a FIXED number
of batches per rank per epoch, so DDP ranks always take the same number of steps, even with fewer shards
than ranks x workers. Validation reads every sample once, in order, using view 0 (the centre crop); every
rank reads the whole validation set, so all ranks run the same number of validation steps and agree on
the metrics. Only `tokens.npy` (with `allow_pickle=False`) and `cls` are ever decoded. Vocabulary size,
classes, grid and sample count come from the `meta.json` beside the shards; a sample whose grid, codes or
label (outside [0, num_classes)) disagree with it raises a ValueError naming the shard and key (never
skipped: the shards are our own output, so a mismatch means another tokenizer or data set). Writing shards is
`train.prepare.extract_tokens`' job; the model and its training loop are `train.lit_ar`'s.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from train.data.image_shards import is_local_url, shard_urls
from train.data.transforms import parse_label

__all__ = ["TokenShardsDataModule", "TokenTrainStream", "TokenEvalStream", "read_token_meta", "read_token_set",
           "META_NAME", "FORMAT"]  # fmt: skip

META_NAME = "meta.json"
FORMAT = "engram-vision-tokens"
_REQUIRED = ("codebook_size", "num_classes", "grid", "num_samples", "num_views", "dtype")
Batch = tuple[torch.Tensor, torch.Tensor]


def _meta_path(spec: str) -> Path:
    if is_local_url(spec) and Path(spec).is_dir():
        return Path(spec) / META_NAME
    first = wds.shardlists.expand_urls(spec)[0]
    if not is_local_url(first):
        raise ValueError(f"token shards {spec!r} are remote: meta.json is read from local shard folders only")
    return Path(first).parent / META_NAME


def read_token_meta(spec: str) -> dict[str, Any]:
    """The meta.json beside token shards `spec` (a folder or brace pattern), checked for the needed fields."""
    path = _meta_path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"no {META_NAME} beside token shards {spec!r} (looked for {path}); token "
                                f"shards come from `python -m train.prepare tokens`, which writes it when "
                                f"it finishes")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exn:
        raise ValueError(f"{path} is not valid JSON ({exn}); rerun train.prepare.extract_tokens to rewrite "
                         f"it") from exn
    missing = [key for key in _REQUIRED if not isinstance(meta, dict) or key not in meta]
    if missing or meta.get("format", FORMAT) != FORMAT:
        raise ValueError(f"{path} is not a token-shard meta.json (missing {missing}, format "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    return {**meta, "path": str(path)}


def _token_urls(spec: str, meta: dict[str, Any]) -> list[str]:
    # A folder means the shards meta.json lists (never stray tars); a pattern means exactly those files.
    if is_local_url(spec) and Path(spec).is_dir() and "shards" in meta:
        urls = [str(Path(spec) / shard["name"]) for shard in meta["shards"]]
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) listed in {meta['path']} are missing, "
                                    f"e.g. {missing[0]}")
        return urls
    return shard_urls(spec)


def _wanted_member(fname: str) -> bool:
    # Only the codes and the label are read: .pyd/.pth/pickle members are never even extracted.
    return fname.endswith((".tokens.npy", ".cls"))


def _decode(sample: dict[str, Any], vocab_size: int, grid: tuple[int, int],
            num_classes: int | None = None) -> tuple[np.ndarray, int]:
    """A tar sample -> (codes [V,h,w], label); clear errors for anything that is not a valid token sample
    (labels are checked against [0, num_classes), or only for >= 0 when num_classes is None)."""
    name = f"{sample.get('__url__')}:{sample.get('__key__')}"
    if "tokens.npy" not in sample or "cls" not in sample:
        raise ValueError(f"token sample {name} lacks tokens.npy or cls")
    codes = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
    if codes.ndim != 3 or tuple(codes.shape[1:]) != grid or codes.dtype.kind not in "iu":
        raise ValueError(f"token sample {name}: expected integer codes [V,{grid[0]},{grid[1]}], "
                         f"got {codes.dtype} {codes.shape}")
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token sample {name}: codes in [{low}, {high}] are out of range for the codebook "
                         f"of {vocab_size} in meta.json: were the shards made with another tokenizer?")
    return codes, parse_label(sample["cls"], num_classes, name)


def _collate(rows: list[tuple[np.ndarray, int]]) -> Batch:
    tokens = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))
    return tokens, torch.tensor([r[1] for r in rows], dtype=torch.int64)


def token_histogram(spec: str) -> np.ndarray:
    """Counts of every code over all samples and views of token shards `spec`: int64 [codebook_size]."""
    meta = read_token_meta(spec)
    grid = tuple(meta["grid"])
    counts = np.zeros(meta["codebook_size"], dtype=np.int64)
    samples = wds.WebDataset(_token_urls(spec, meta), shardshuffle=False, select_files=_wanted_member,
                             empty_check=False)
    for sample in samples:
        codes, _ = _decode(sample, meta["codebook_size"], grid, meta["num_classes"])
        counts += np.bincount(codes.reshape(-1), minlength=counts.size)
    return counts


def read_token_set(spec: str, per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out images of token shards `spec` in memory: (tokens int64 [N, h*w] of view 0, labels [N]), in
    shard order; with `per_class`, the first `per_class` images of each class (a class-balanced subset that
    is the same on every call)."""
    meta = read_token_meta(spec)
    grid = tuple(meta["grid"])
    rows: list[tuple[np.ndarray, int]] = []
    taken: dict[int, int] = {}
    for sample in wds.tarfile_to_samples(select_files=_wanted_member)({"url": u} for u in _token_urls(spec, meta)):
        codes, label = _decode(sample, meta["codebook_size"], grid, meta["num_classes"])
        if per_class is not None and taken.get(label, 0) >= per_class:
            continue
        taken[label] = taken.get(label, 0) + 1
        rows.append((codes[0].reshape(-1), label))
    if not rows:
        raise ValueError(f"token shards {spec!r} hold no samples")
    return _collate(rows)


class TokenTrainStream(IterableDataset):
    """One rank's training batches: `num_batches` per epoch, split over its DataLoader workers.

    `rank`, `world_size` and `epoch` are set in the main process before each epoch's workers start, because
    inside a worker the rank is not reliably known (spawned workers see no process group).
    """

    def __init__(self, urls: list[str], batch_size: int, num_batches: int, vocab_size: int,
                 grid: tuple[int, int], shuffle_buffer: int, resampled: bool, seed: int,
                 num_classes: int | None = None) -> None:
        self.urls, self.batch_size, self.num_batches = urls, batch_size, num_batches
        self.vocab_size, self.grid, self.shuffle_buffer = vocab_size, grid, shuffle_buffer
        self.resampled, self.seed, self.num_classes = resampled, seed, num_classes
        self.rank, self.world_size, self.epoch = 0, 1, 0

    def _shard_urls(self, rng: np.random.Generator, stream: int, streams: int) -> Iterator[dict[str, str]]:
        if self.resampled:
            # Follows webdataset (ResampledShards): endless draws with replacement, seeded per stream.
            while True:
                yield {"url": self.urls[int(rng.integers(len(self.urls)))]}
        for repeat in range(1 << 62):
            # Every stream shuffles pass p alike, then takes its own slice (webdataset's split_by_node and
            # split_by_worker); with fewer shards than streams, the split happens per sample instead.
            order = np.random.default_rng([self.seed, self.epoch, repeat]).permutation(len(self.urls))
            mine = order[stream::streams] if len(self.urls) >= streams else order
            yield from ({"url": self.urls[i]} for i in mine)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        count = self.num_batches // workers + (worker < self.num_batches % workers)  # sums to num_batches
        stream, streams = self.rank * workers + worker, self.world_size * workers
        rng = np.random.default_rng([self.seed, self.rank, worker, self.epoch])
        samples = wds.tarfile_to_samples(select_files=_wanted_member)(self._shard_urls(rng, stream, streams))
        if not self.resampled and len(self.urls) < streams:
            samples = islice(samples, stream, None, streams)
        if self.shuffle_buffer > 1:
            shuffle_rng = random.Random(int(rng.integers(1 << 62)))
            initial = min(self.shuffle_buffer, 1000)
            samples = wds.shuffle(self.shuffle_buffer, initial, rng=shuffle_rng)(samples)
        rows: list[tuple[np.ndarray, int]] = []
        if count == 0:  # more workers than batches: this one has nothing to do
            return
        for sample in samples:
            codes, label = _decode(sample, self.vocab_size, self.grid, self.num_classes)
            view = int(rng.integers(codes.shape[0]))  # a fresh random view each time the sample is read
            rows.append((codes[view].reshape(-1), label))
            if len(rows) == self.batch_size:
                yield _collate(rows)
                rows, count = [], count - 1
                if count == 0:
                    return


class TokenEvalStream(IterableDataset):
    """All samples of the shards, in order, view 0 (workers take whole shards in turn)."""

    def __init__(self, urls: list[str], batch_size: int, vocab_size: int, grid: tuple[int, int],
                 num_classes: int | None = None) -> None:
        self.urls, self.batch_size, self.vocab_size, self.grid = urls, batch_size, vocab_size, grid
        self.num_classes = num_classes

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = ({"url": url} for url in self.urls[worker::workers])
        rows: list[tuple[np.ndarray, int]] = []
        for sample in wds.tarfile_to_samples(select_files=_wanted_member)(shards):
            codes, label = _decode(sample, self.vocab_size, self.grid, self.num_classes)
            rows.append((codes[0].reshape(-1), label))
            if len(rows) == self.batch_size:
                yield _collate(rows)
                rows = []
        if rows:
            yield _collate(rows)


class _EpochLoader:
    """A fixed-length loader that starts fresh workers each epoch with the stream's epoch, rank and world."""

    def __init__(self, dataset: TokenTrainStream, num_workers: int, rank: int, world_size: int,
                 epoch: int) -> None:
        self.dataset, self.num_workers, self.epoch = dataset, num_workers, epoch
        dataset.rank, dataset.world_size = rank, world_size

    def __len__(self) -> int:
        return self.dataset.num_batches

    def __iter__(self) -> Iterator[Batch]:
        self.dataset.epoch, self.epoch = self.epoch, self.epoch + 1  # pickled into this epoch's workers
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            pin_memory=torch.cuda.is_available())
        return iter(loader)


class TokenShardsDataModule(LightningDataModule):
    """Token shards for AR training: `(tokens int64 [B, h*w], labels int64 [B])` batches."""

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        batch_size: int = 256,
        num_workers: int = 4,
        shuffle_buffer: int = 5000,
        batches_per_epoch: int | None = None,
        resampled: bool = True,
        seed: int = 0,
        val_batch_size: int | None = None,
    ) -> None:
        """
        Args:
            train_shards: Folder written by `train.prepare.extract_tokens` or a brace pattern of its `.tar` files.
            val_shards: The same for validation (view 0, every sample once per rank); None for none.
            batch_size: Sequences per training batch (per device).
            num_workers: DataLoader worker processes.
            shuffle_buffer: Samples in each worker's shuffle buffer (0 or 1: no sample shuffling).
            batches_per_epoch: Training batches per rank per epoch; None = ceil(num_samples / (batch_size x
                world_size)), num_samples from meta.json.
            resampled: Draw shards with replacement (each rank and worker independently); False = shuffled
                passes split over ranks and workers (by shard, or by sample when shards are too few).
            seed: Seed of shard draws, shuffling and view choice (mixed with rank, worker and epoch).
            val_batch_size: Sequences per validation batch; None = batch_size.
        """
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1 or (batches_per_epoch is not None and batches_per_epoch < 1):
            raise ValueError(f"batch_size and batches_per_epoch must be positive, got {batch_size}, "
                             f"{batches_per_epoch}")
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.shuffle_buffer, self.seed = num_workers, shuffle_buffer, seed
        self.batches_per_epoch, self.resampled = batches_per_epoch, resampled
        self._meta: dict[str, Any] | None = None  # read on first use, so configs build without the data
        self._train_loader: _EpochLoader | None = None
        self._start_epoch = 0

    @property
    def meta(self) -> dict[str, Any]:
        """The training shards' meta.json."""
        if self._meta is None:
            self._meta = read_token_meta(self.train_shards)
        return self._meta

    @property
    def vocab_size(self) -> int:
        """Codebook size of the tokenizer that made the shards (token ids are 0..vocab_size-1)."""
        return int(self.meta["codebook_size"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the code grid; sequences have h*w tokens."""
        h, w = self.meta["grid"]
        return int(h), int(w)

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_train_samples(self) -> int:
        return int(self.meta["num_samples"])

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def num_train_batches(self, world_size: int | None = None) -> int:
        """Training batches per rank per epoch."""
        if self.batches_per_epoch is not None:
            return self.batches_per_epoch
        world_size = self._world()[1] if world_size is None else world_size
        return max(1, math.ceil(self.num_train_samples / (self.batch_size * world_size)))

    def train_dataloader(self) -> _EpochLoader:
        if self.num_train_samples < 1:
            raise ValueError(f"{self.meta['path']} lists no samples: nothing to train on")
        rank, world = self._world()
        stream = TokenTrainStream(_token_urls(self.train_shards, self.meta), self.batch_size,
                                  self.num_train_batches(world), self.vocab_size, self.grid,
                                  self.shuffle_buffer, self.resampled, self.seed, self.num_classes)
        self._train_loader = _EpochLoader(stream, self.num_workers, rank, world, self._start_epoch)
        return self._train_loader

    def val_dataloader(self) -> DataLoader | list:
        if self.val_shards is None:
            return []
        val_meta = read_token_meta(self.val_shards)
        for key in ("codebook_size", "grid", "weights_sha256", "num_classes"):
            if val_meta.get(key) != self.meta.get(key):
                raise ValueError(f"validation shards {self.val_shards!r} differ from the training shards in "
                                 f"{key}: {val_meta.get(key)} vs {self.meta.get(key)}")
        urls = _token_urls(self.val_shards, val_meta)
        workers = min(self.num_workers, len(urls))
        stream = TokenEvalStream(urls, self.val_batch_size, self.vocab_size, self.grid, self.num_classes)
        return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=torch.cuda.is_available())

    def state_dict(self) -> dict[str, Any]:
        # The epoch seeds the streams: a resumed run continues with new draws instead of replaying epoch 0.
        return {"train_epoch": self._train_loader.epoch if self._train_loader else self._start_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._start_epoch = int(state_dict.get("train_epoch", 0))
        if self._train_loader is not None:
            self._train_loader.epoch = self._start_epoch
