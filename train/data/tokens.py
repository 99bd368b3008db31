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
skipped: the shards are our own output, so a mismatch means another tokenizer or data set). At setup, before
any step, meta.json is checked against itself and, when the tokenizer folder it names still exists, against
that tokenizer (`train.data.token_meta`), and every shard against the sample count and size recorded for it
(`train.data.shard_integrity`): a truncated copy, a repeated key or a shard listed twice is an error naming
the shard and the fix, never less (or doubled) data; streams check each shard's count again as they end.

Training plans its order on sample positions (shard, index) from the recorded counts and reads the planned
samples by seek, so the order is a function of (seed, epoch, rank) and a run resumed from a checkpoint saved
mid-epoch (`state_dict` records the epoch and the batches done) skips exactly those batches without reading
them, and sees the batches an uninterrupted run would. Writing shards is `train.prepare.extract_tokens`' job;
the model and its training loop are `train.lit_ar`'s.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from train.data.image_shards import is_local_url, shard_urls
from train.data.shard_integrity import (
    ShardRecord,
    check_shard_files,
    counted_samples,
    duplicate_key_error,
    scan_tar,
    summary_records,
    truncated_error,
)
from train.data.token_meta import check_meta_against_tokenizer, check_meta_consistency
from train.data.transforms import parse_label

__all__ = ["TokenShardsDataModule", "TokenTrainStream", "TokenEvalStream", "read_token_meta", "read_token_set",
           "META_NAME", "FORMAT"]  # fmt: skip

META_NAME = "meta.json"
FORMAT = "engram-vision-tokens"
_REQUIRED_META = ("codebook_size", "num_classes", "grid", "num_samples", "num_views", "dtype")
_REQUIRED = ("tokens.npy", "cls")  # the members every token sample has
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
    missing = [key for key in _REQUIRED_META if not isinstance(meta, dict) or key not in meta]
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


def token_records(urls: list[str], meta: dict[str, Any]) -> dict[str, ShardRecord]:
    """What was recorded about each shard: its entry in meta.json's shard list (sample count and, from
    this version on, byte size), else the `<name>.json` summary beside it; shards with neither are left out."""
    listed = {shard["name"]: shard for shard in meta.get("shards", []) if isinstance(shard, dict)}
    records = summary_records([u for u in urls if Path(u).name not in listed])
    for url in urls:
        shard = listed.get(Path(url).name)
        if shard is not None and isinstance(shard.get("num_samples"), int):
            records[url] = ShardRecord(shard["num_samples"], shard.get("num_bytes"), meta["path"])
    return records


def _wanted_member(fname: str) -> bool:
    # Only the codes and the label are read: .pyd/.pth/pickle members are never even extracted.
    return fname.endswith((".tokens.npy", ".cls"))


def _decode(sample: dict[str, Any], vocab_size: int, grid: tuple[int, int],
            num_classes: int | None = None, num_views: int | None = None) -> tuple[np.ndarray, int]:
    """A tar sample -> (codes [V,h,w], label); clear errors for anything that is not a valid token sample
    (labels are checked against [0, num_classes), or only for >= 0 when num_classes is None; V against
    num_views when given)."""
    name = f"{sample.get('__url__')}:{sample.get('__key__')}"
    if "tokens.npy" not in sample or "cls" not in sample:
        raise ValueError(f"token sample {name} lacks tokens.npy or cls")
    codes = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
    if codes.ndim != 3 or tuple(codes.shape[1:]) != grid or codes.dtype.kind not in "iu":
        raise ValueError(f"token sample {name}: expected integer codes [V,{grid[0]},{grid[1]}], "
                         f"got {codes.dtype} {codes.shape}")
    if num_views is not None and codes.shape[0] != num_views:
        raise ValueError(f"token sample {name}: {codes.shape[0]} views, but meta.json says num_views = "
                         f"{num_views}: were the shards made by another extraction?")
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token sample {name}: codes in [{low}, {high}] are out of range for the codebook "
                         f"of {vocab_size} in meta.json: were the shards made with another tokenizer?")
    return codes, parse_label(sample["cls"], num_classes, name)


def _collate(rows: list[tuple[np.ndarray, int]]) -> Batch:
    tokens = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))
    return tokens, torch.tensor([r[1] for r in rows], dtype=torch.int64)


def _checked_stream(urls: list[str], meta: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every sample of `urls` in order, after the shard files were checked against their records (and
    each shard's count again as its stream ends)."""
    records = token_records(urls, meta)
    check_shard_files(urls, records, _REQUIRED, "tokens")
    return counted_samples(({"url": u} for u in urls), records, _REQUIRED, "tokens", _wanted_member)


def token_histogram(spec: str) -> np.ndarray:
    """Counts of every code over all samples and views of token shards `spec`: int64 [codebook_size]."""
    meta = read_token_meta(spec)
    grid = tuple(meta["grid"])
    counts = np.zeros(meta["codebook_size"], dtype=np.int64)
    for sample in _checked_stream(_token_urls(spec, meta), meta):
        codes, _ = _decode(sample, meta["codebook_size"], grid, meta["num_classes"], meta["num_views"])
        counts += np.bincount(codes.reshape(-1), minlength=counts.size)
    return counts


def read_token_set(spec: str, per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out images of token shards `spec` in memory: (tokens int64 [N, h*w] of view 0, labels [N]), in
    shard order; with `per_class`, the first `per_class` images of each class (a class-balanced subset that
    is the same on every call). Every shard is read to its end, so a truncated one is an error even when
    the subset is complete earlier."""
    meta = read_token_meta(spec)
    grid = tuple(meta["grid"])
    rows: list[tuple[np.ndarray, int]] = []
    taken: dict[int, int] = {}
    for sample in _checked_stream(_token_urls(spec, meta), meta):
        codes, label = _decode(sample, meta["codebook_size"], grid, meta["num_classes"], meta["num_views"])
        if per_class is not None and taken.get(label, 0) >= per_class:
            continue
        taken[label] = taken.get(label, 0) + 1
        rows.append((codes[0].reshape(-1), label))
    if not rows:
        raise ValueError(f"token shards {spec!r} hold no samples")
    return _collate(rows)


def _buffer_shuffle(items: Iterator[Any], size: int, initial: int, rng: random.Random) -> Iterator[Any]:
    """webdataset's shuffle buffer (fill to `initial`, then emit a random element per element read, keeping
    up to `size`), on sample positions instead of decoded samples, so that it costs nothing to replay."""
    buffer: list[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) < size:
            nxt = next(items, None)
            if nxt is not None:
                buffer.append(nxt)
        if len(buffer) >= initial:
            k = rng.randint(0, len(buffer) - 1)
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            yield buffer.pop()
    while buffer:
        k = rng.randint(0, len(buffer) - 1)
        buffer[k], buffer[-1] = buffer[-1], buffer[k]
        yield buffer.pop()


class _ShardReader:
    """Random access to the samples of token shards: shard i is indexed by its tar headers on first use
    (count and keys checked against its record there), then sample p is one seek and two small reads."""

    _OPEN_FILES = 8  # a few open shards at a time: the shuffle buffer spans only a few

    def __init__(self, urls: list[str], records: dict[str, ShardRecord]) -> None:
        self.urls, self.records = urls, records
        self.index: dict[int, list[tuple[str, dict[str, tuple[int, int]]]]] = {}
        self.files: OrderedDict[int, Any] = OrderedDict()

    def count(self, i: int) -> int:
        """Samples of shard i: its record (so planning reads no file), else its header count."""
        record = self.records.get(self.urls[i])
        if record is not None and record.num_samples is not None:
            return record.num_samples
        return len(self._samples(i))

    def _samples(self, i: int) -> list[tuple[str, dict[str, tuple[int, int]]]]:
        if i not in self.index:
            url = self.urls[i]
            scan = scan_tar(url, _REQUIRED)
            if scan.duplicates:
                raise duplicate_key_error(url, scan.duplicates[0], "tokens")
            record = self.records.get(url)
            if record is not None and record.num_samples is not None and scan.num_samples != record.num_samples:
                raise truncated_error(url, record, scan.num_samples, "tokens")
            self.index[i] = scan.samples
        return self.index[i]

    def sample(self, i: int, p: int) -> dict[str, Any]:
        key, members = self._samples(i)[p]
        if i not in self.files:
            if len(self.files) >= self._OPEN_FILES:
                self.files.popitem(last=False)[1].close()
            self.files[i] = open(self.urls[i], "rb")  # noqa: SIM115 - kept open across samples, closed above
        self.files.move_to_end(i)
        stream = self.files[i]
        sample: dict[str, Any] = {"__url__": self.urls[i], "__key__": key}
        for ext in _REQUIRED:
            offset, size = members[ext]
            stream.seek(offset)
            sample[ext] = stream.read(size)
        return sample

    def close(self) -> None:
        while self.files:
            self.files.popitem()[1].close()


class TokenTrainStream(IterableDataset):
    """One rank's training batches: `num_batches` per epoch, split over its DataLoader workers.

    `rank`, `world_size`, `epoch` and `skip_batches` are set in the main process before each epoch's workers
    start, because inside a worker the rank is not reliably known (spawned workers see no process group).

    The order is a function of (seed, epoch, rank) alone: which shard passes each stream reads, the shuffle
    buffer and the view drawn for each sample are planned on sample positions (shard, index in shard) from
    the recorded per-shard counts, and only the planned samples are read (by seek). DataLoader workers
    deliver batches in turn (batch b of the epoch comes from worker b % workers), so `skip_batches` (the
    batches of this epoch a resumed run already trained on) is skipped by replaying the plan, without
    reading or decoding a sample, and the workers are rotated so that the next batch comes first.
    """

    def __init__(self, urls: list[str], batch_size: int, num_batches: int, vocab_size: int,
                 grid: tuple[int, int], shuffle_buffer: int, resampled: bool, seed: int,
                 num_classes: int | None = None, records: dict[str, ShardRecord] | None = None,
                 num_views: int | None = None) -> None:
        self.urls, self.batch_size, self.num_batches = urls, batch_size, num_batches
        self.vocab_size, self.grid, self.shuffle_buffer = vocab_size, grid, shuffle_buffer
        self.resampled, self.seed, self.num_classes = resampled, seed, num_classes
        self.records, self.num_views = records or {}, num_views
        self.rank, self.world_size, self.epoch, self.skip_batches = 0, 1, 0, 0

    def _shard_order(self, rng: np.random.Generator, stream: int, streams: int) -> Iterator[int]:
        if self.resampled:
            # Follows webdataset (ResampledShards): endless draws with replacement, seeded per stream.
            while True:
                yield int(rng.integers(len(self.urls)))
        for repeat in range(1 << 62):
            # Every stream shuffles pass p alike, then takes its own slice (webdataset's split_by_node and
            # split_by_worker); with fewer shards than streams, the split happens per sample instead.
            order = np.random.default_rng([self.seed, self.epoch, repeat]).permutation(len(self.urls))
            yield from (int(i) for i in (order[stream::streams] if len(self.urls) >= streams else order))

    def _plan(self, reader: _ShardReader, worker: int, workers: int) -> Iterator[tuple[int, int]]:
        """The (shard, position) sequence that virtual worker `worker` reads this epoch (no file is read
        where the shards' counts are recorded)."""
        stream, streams = self.rank * workers + worker, self.world_size * workers
        rng = np.random.default_rng([self.seed, self.rank, worker, self.epoch])
        shuffle_seed = int(rng.integers(1 << 62))
        positions = ((i, p) for i in self._shard_order(rng, stream, streams) for p in range(reader.count(i)))
        if not self.resampled and len(self.urls) < streams:
            positions = islice(positions, stream, None, streams)
        if self.shuffle_buffer > 1:
            positions = _buffer_shuffle(positions, self.shuffle_buffer, min(self.shuffle_buffer, 1000),
                                        random.Random(shuffle_seed))
        return positions

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skip = self.skip_batches
        # Loader worker j plays worker (j + skip) % workers, whose next batch is batch `skip` of the epoch.
        worker = (loader_worker + skip) % workers
        total = self.num_batches // workers + (worker < self.num_batches % workers)  # sums to num_batches
        done = skip // workers + (worker < skip % workers)  # this worker's share of the skipped batches
        if total - done <= 0:  # more workers than batches: this one has nothing (left) to do
            return
        reader = _ShardReader(self.urls, self.records)
        positions = self._plan(reader, worker, workers)
        try:
            for b in range(total):
                chosen = list(islice(positions, self.batch_size))
                if b < done:
                    continue  # already trained on: its positions are consumed, nothing is read
                # The views of batch b come from their own seed, so skipping needs no draws.
                views = np.random.default_rng([self.seed, self.rank, worker, self.epoch, b, 1])
                rows = []
                for i, p in chosen:
                    codes, label = _decode(reader.sample(i, p), self.vocab_size, self.grid, self.num_classes,
                                           self.num_views)
                    rows.append((codes[int(views.integers(codes.shape[0]))].reshape(-1), label))
                yield _collate(rows)
        finally:
            reader.close()


class TokenEvalStream(IterableDataset):
    """All samples of the shards, in order, view 0 (workers take whole shards in turn); each shard's
    sample count is checked against its record as its stream ends."""

    def __init__(self, urls: list[str], batch_size: int, vocab_size: int, grid: tuple[int, int],
                 num_classes: int | None = None, records: dict[str, ShardRecord] | None = None,
                 num_views: int | None = None) -> None:
        self.urls, self.batch_size, self.vocab_size, self.grid = urls, batch_size, vocab_size, grid
        self.num_classes, self.records, self.num_views = num_classes, records or {}, num_views

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = ({"url": url} for url in self.urls[worker::workers])
        rows: list[tuple[np.ndarray, int]] = []
        for sample in counted_samples(shards, self.records, _REQUIRED, "tokens", _wanted_member):
            codes, label = _decode(sample, self.vocab_size, self.grid, self.num_classes, self.num_views)
            rows.append((codes[0].reshape(-1), label))
            if len(rows) == self.batch_size:
                yield _collate(rows)
                rows = []
        if rows:
            yield _collate(rows)


class _EpochLoader:
    """A fixed-length loader that starts fresh workers each epoch with the stream's epoch, rank and world.

    The epoch is the trainer's (`epoch_of`, when given and known), else counted here. `resume` = (epoch,
    batches) from a checkpoint: iterations of that epoch skip those batches (until another epoch starts)."""

    def __init__(self, dataset: TokenTrainStream, num_workers: int, rank: int, world_size: int,
                 epoch: int, epoch_of: Callable[[], int | None] | None = None,
                 resume: tuple[int, int] | None = None) -> None:
        self.dataset, self.num_workers, self.epoch = dataset, num_workers, epoch
        self.epoch_of, self.resume = epoch_of, resume
        dataset.rank, dataset.world_size = rank, world_size

    def __len__(self) -> int:
        return self.dataset.num_batches

    # Lightning treats a loader with these as resumable (no "not resumable" warning on a mid-epoch resume);
    # the resume state itself is the DataModule's (`TokenShardsDataModule.state_dict`).
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass

    def __iter__(self) -> Iterator[Batch]:
        known = self.epoch_of() if self.epoch_of is not None else None
        epoch = self.epoch if known is None else known
        skip = 0
        if self.resume is not None:
            resume_epoch, batches = self.resume
            if resume_epoch != epoch:
                self.resume = None  # only the interrupted epoch is shortened
            elif 0 < batches < self.dataset.num_batches:
                # kept for the epoch: Lightning may start this epoch's iterator more than once on resume
                skip = batches
        # pickled into this epoch's workers
        self.dataset.epoch, self.dataset.skip_batches, self.epoch = epoch, skip, epoch + 1
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
        self._resume: tuple[int, int] | None = None  # (epoch, batches done) from a checkpoint

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

    def setup(self, stage: str) -> None:
        # Before any step: a meta.json that contradicts itself or its tokenizer, and shards that are
        # truncated or listed twice, stop the run here instead of training on less (or other) data.
        self.check_data(train=stage == "fit", val=stage in ("fit", "validate"))

    def check_data(self, train: bool = True, val: bool = True) -> None:
        """The checks `setup` runs: meta.json against itself and (when the tokenizer folder it names still
        exists) its tokenizer (`train.data.token_meta`), the validation meta.json against the training one,
        and every shard file against its recorded sample count and size (`train.data.shard_integrity`)."""
        metas = ([self.meta] if train else []) + ([self._val_meta()] if val and self.val_shards else [])
        for meta in metas:
            check_meta_consistency(meta)
            tokenizer = meta.get("tokenizer")
            if tokenizer and Path(tokenizer).exists():
                check_meta_against_tokenizer(meta, tokenizer)
        if train:
            urls = _token_urls(self.train_shards, self.meta)
            check_shard_files(urls, token_records(urls, self.meta), _REQUIRED, "tokens")
        if val and self.val_shards is not None:
            meta = self._val_meta()
            urls = _token_urls(self.val_shards, meta)
            check_shard_files(urls, token_records(urls, meta), _REQUIRED, "tokens")

    def _val_meta(self) -> dict[str, Any]:
        val_meta = read_token_meta(self.val_shards)
        for key in ("codebook_size", "grid", "weights_sha256", "num_classes"):
            if val_meta.get(key) != self.meta.get(key):
                raise ValueError(f"validation shards {self.val_shards!r} differ from the training shards in "
                                 f"{key}: {val_meta.get(key)} vs {self.meta.get(key)}")
        return val_meta

    def _trainer_epoch(self) -> int | None:
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else None

    def train_dataloader(self) -> _EpochLoader:
        if self.num_train_samples < 1:
            raise ValueError(f"{self.meta['path']} lists no samples: nothing to train on")
        rank, world = self._world()
        urls = _token_urls(self.train_shards, self.meta)
        stream = TokenTrainStream(urls, self.batch_size, self.num_train_batches(world), self.vocab_size,
                                  self.grid, self.shuffle_buffer, self.resampled, self.seed, self.num_classes,
                                  token_records(urls, self.meta), self.meta.get("num_views"))
        self._train_loader = _EpochLoader(stream, self.num_workers, rank, world, self._start_epoch,
                                          self._trainer_epoch, self._resume)
        self._resume = None
        return self._train_loader

    def val_dataloader(self) -> DataLoader | list:
        if self.val_shards is None:
            return []
        val_meta = self._val_meta()
        urls = _token_urls(self.val_shards, val_meta)
        workers = min(self.num_workers, len(urls))
        stream = TokenEvalStream(urls, self.val_batch_size, self.vocab_size, self.grid, self.num_classes,
                                 token_records(urls, val_meta), val_meta.get("num_views"))
        return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=torch.cuda.is_available())

    def state_dict(self) -> dict[str, Any]:
        """{"train_epoch", "train_batches"}: the epoch and how many of its batches were trained on, as
        Lightning will count them when it resumes from this checkpoint (so the resumed run skips exactly
        those); outside `fit`, the next epoch the loader would start and 0."""
        trainer = getattr(self, "trainer", None)
        progress = _batch_progress(trainer)
        if progress is not None:
            # Lightning counts a checkpoint saved in on_train_batch_end (processed = completed + 1) as
            # having finished that batch, and one saved elsewhere (validation, epoch end) by `completed`.
            done = progress.processed if progress.processed == progress.completed + 1 else progress.completed
            return {"train_epoch": int(trainer.current_epoch), "train_batches": int(done)}
        return {"train_epoch": self._train_loader.epoch if self._train_loader else self._start_epoch,
                "train_batches": 0}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._start_epoch = int(state_dict.get("train_epoch", 0))
        self._resume = (self._start_epoch, int(state_dict.get("train_batches", 0)))
        if self._train_loader is not None:
            self._train_loader.epoch, self._train_loader.resume = self._start_epoch, self._resume


def _batch_progress(trainer: Any) -> Any:
    """The training batch progress of a trainer that is fitting (current epoch's counts), else None."""
    if trainer is None or getattr(getattr(trainer, "state", None), "fn", None) != "fit":
        return None
    try:
        return trainer.fit_loop.epoch_loop.batch_progress.current
    except AttributeError:
        return None
