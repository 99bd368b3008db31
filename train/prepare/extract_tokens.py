"""Encode an image split into token shards: `python -m train.prepare tokens --tokenizer T --data D --out DIR`.

Every image of a split gets V deterministic views (`center` V=1, `center_flip` V=2, `ten_crop` V=10; see
`train.data.transforms.view_crops`), the tokenizer encodes them, and webdataset tars hold one sample per image:
`__key__` = its zero-padded global index, `tokens.npy` = codes [V,h,w] (int16; int32 when the codebook
exceeds 32767) and `cls` = its label. `meta.json` beside the shards names the tokenizer (path, config,
weights SHA-256), codebook size, image size, grid, views, classes, sample count, dtype and the skipped
(unreadable: corrupt or truncated) images, which are also warned about as they happen and totalled in the
closing line. Any image mode (grayscale, CMYK, 16-bit) is read as 8-bit RGB (`train.data.transforms.to_rgb`).
A label outside [0, num_classes) stops the run with a ValueError naming the image.

Runs through Lightning's predict loop on every rank. Resumable: the index space is cut into fixed shards of
`shard_size` consecutive indices, dealt to ranks in turn; shards already on disk are skipped (refused when
their size disagrees with their summary: a truncated copy); each shard is
written to a temporary file beside it and renamed once complete (its `<name>.json` summary first), so an
interruption or a full disk loses at most the shards in flight, which the next run redoes (removing their
temporary files). Rank 0 writes meta.json atomically after
every rank has finished. Decoding and views are `train.data.views`' job; reading shards for training is
`train.data.tokens`'s.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
import yaml
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Subset

from tokenizers_vq.checkpoint import load_tokenizer
from tokenizers_vq.files import atomic_write, atomic_write_text, file_sha256, remove_stale_temps
from tokenizers_vq.model_dir import WEIGHTS_NAME
from train.data.tokens import FORMAT, META_NAME
from train.data.transforms import NUM_VIEWS, ViewMode
from train.data.views import ViewsCollate, ViewsDataset
from train.prepare.write_shards import KEY_DIGITS

__all__ = ["extract_tokens", "ShardPlan", "TokenShardWriter", "META_NAME", "FORMAT", "codes_dtype"]

_TAR_MTIME = 0.0  # fixed member mtime: the same codes give byte-identical shards, however often resumed
_WEIGHT_FILES = (WEIGHTS_NAME, "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def codes_dtype(codebook_size: int) -> np.dtype:
    """int16 while every code fits (codebook <= 32767), else int32."""
    return np.dtype(np.int16) if codebook_size <= np.iinfo(np.int16).max else np.dtype(np.int32)


@dataclass
class ShardPlan:
    """Fixed shards of the global index space and which of them are already on disk."""

    out: Path
    split: str
    shard_size: int
    counts: dict[int, int]
    """shard number -> images whose index falls in it (readable or not)."""
    signature: dict[str, Any]
    """What a shard on disk must have been written with to count as part of this extraction."""

    def name(self, k: int) -> str:
        return f"{self.split}-{k:06d}"

    def tar(self, k: int) -> Path:
        return self.out / f"{self.name(k)}.tar"

    def summary(self, k: int) -> Path:
        return self.out / f"{self.name(k)}.json"

    def rank_shards(self, rank: int, world_size: int) -> list[int]:
        """Shards dealt to `rank`: every world_size-th of the sorted shard numbers (the same on all ranks)."""
        return sorted(self.counts)[rank::world_size]

    def is_complete(self, k: int) -> bool:
        """True when shard k and its summary are on disk; raises when they come from another extraction."""
        if not (self.tar(k).is_file() and self.summary(k).is_file()):
            return False  # a summary without its tar: the rename never happened, so redo the shard
        summary = json.loads(self.summary(k).read_text())
        size = self.tar(k).stat().st_size
        if summary.get("num_bytes") not in (None, size):
            raise ValueError(f"{self.tar(k)} has {size} bytes but {self.summary(k)} records "
                             f"{summary['num_bytes']}: the shard is truncated or was replaced; delete both "
                             f"files and rerun to re-write it")
        written_with = summary.get("signature", {})
        differ = sorted(key for key in self.signature if written_with.get(key) != self.signature[key])
        if differ or summary.get("num_items") != self.counts[k]:
            raise ValueError(f"{self.tar(k)} was written by another extraction (differs in "
                             f"{differ or 'num_items'}); use an empty --out folder")
        return True

    def stray_tars(self) -> list[str]:
        """`.tar` files in `out` that this extraction would never write (another split, size or data set)."""
        wanted = {self.tar(k).name for k in self.counts}
        return sorted(p.name for p in self.out.glob("*.tar") if p.name not in wanted)


class _Encoder(LightningModule):
    """Wraps a frozen tokenizer: a batch of views -> codes [b,V,h,w] (on the CPU, for the writer)."""

    def __init__(self, tokenizer: torch.nn.Module) -> None:
        super().__init__()
        self.tokenizer = tokenizer.eval().requires_grad_(False)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        views = batch["views"]
        b, v = views.shape[:2]
        codes = self.tokenizer.encode(views.flatten(0, 1)) if b else torch.empty(0, 1, 1, dtype=torch.int64)
        out = {key: batch[key].cpu() for key in ("indices", "labels", "skipped")}
        return {**out, "codes": codes.reshape(b, v, *codes.shape[-2:]).cpu()}


class _ExtractionData(LightningDataModule):
    """Serves each rank the images of its shards that are not on disk yet, in index order."""

    def __init__(self, dataset: ViewsDataset, plan: ShardPlan, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.dataset, self.plan, self.batch_size, self.num_workers = dataset, plan, batch_size, num_workers

    def predict_dataloader(self) -> DataLoader:
        # The rank is only known here (DDP processes exist once the predict loop has started).
        rank, world = self.trainer.global_rank, self.trainer.world_size
        mine = self.plan.rank_shards(rank, world)
        todo = [k for k in mine if not self.plan.is_complete(k)]
        for k in todo:  # temporary files of a killed run (this rank alone writes these shards)
            remove_stale_temps(self.plan.tar(k))
            remove_stale_temps(self.plan.summary(k))
        positions = np.flatnonzero(np.isin(self.dataset.indices // self.plan.shard_size, todo))
        print(f"[rank {rank}/{world}] {len(todo)} of {len(mine)} shards to write ({len(positions)} images); "
              f"{len(mine) - len(todo)} already complete", flush=True)
        collate = ViewsCollate(NUM_VIEWS[self.dataset.views], self.dataset.image_size)
        return DataLoader(Subset(self.dataset, positions.tolist()), batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=collate,
                          pin_memory=torch.cuda.is_available())


class TokenShardWriter(BasePredictionWriter):
    """Collects codes per shard and writes a shard as soon as all its images have been seen."""

    def __init__(self, plan: ShardPlan, dataset: ViewsDataset, codebook_size: int, grid: int,
                 num_classes: int | None = None) -> None:
        super().__init__(write_interval="batch")
        self.plan, self.dataset, self.codebook_size = plan, dataset, codebook_size
        self.num_classes = num_classes
        self.shape = (NUM_VIEWS[dataset.views], grid, grid)  # codes of one image: [V,h,w]
        self.dtype = codes_dtype(codebook_size)
        self.pending: dict[int, dict[str, Any]] = {}

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        codes, size = prediction["codes"], self.plan.shard_size
        if len(codes) and tuple(codes.shape[1:]) != self.shape:
            raise ValueError(f"tokenizer produced codes {tuple(codes.shape[1:])} per image, "
                             f"expected {self.shape}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"tokenizer produced codes outside [0, {self.codebook_size})")
        self._check_labels(prediction["indices"], prediction["labels"])
        touched = set()
        for i, index in enumerate(prediction["indices"].tolist()):
            entry = self.pending.setdefault(index // size, {"samples": {}, "skipped": []})
            entry["samples"][index] = (codes[i].numpy().astype(self.dtype), int(prediction["labels"][i]))
            touched.add(index // size)
        for index in prediction["skipped"].tolist():
            self.pending.setdefault(index // size, {"samples": {}, "skipped": []})["skipped"].append(index)
            touched.add(index // size)
        for k in sorted(touched):
            entry = self.pending[k]
            if len(entry["samples"]) + len(entry["skipped"]) == self.plan.counts[k]:
                self._write(k, self.pending.pop(k))

    def _check_labels(self, indices: torch.Tensor, labels: torch.Tensor) -> None:
        """Labels must lie in [0, num_classes): meta.json promises it, and the AR prior's class table
        would read label == num_classes as the unconditional (null) class."""
        bad = (labels < 0) | (labels >= self.num_classes) if self.num_classes is not None else labels < 0
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            position = int(np.searchsorted(self.dataset.indices, int(indices[i])))
            raise ValueError(f"image {int(indices[i])} ({self.dataset.describe(position)}): label "
                             f"{int(labels[i])} is outside [0, {self.num_classes}) (num_classes of the data)")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.pending:
            raise RuntimeError(f"shards {sorted(self.pending)} did not receive all their images")

    def _write(self, k: int, entry: dict[str, Any]) -> None:
        final = self.plan.tar(k)
        position = np.searchsorted(self.dataset.indices, sorted(entry["skipped"]))
        skipped = [{"index": int(self.dataset.indices[p]), "name": self.dataset.describe(int(p))}
                   for p in position]  # fmt: skip
        summary = {"shard": final.name, "first_index": k * self.plan.shard_size,
                   "num_items": self.plan.counts[k], "num_samples": len(entry["samples"]), "skipped": skipped,
                   "signature": self.plan.signature}  # fmt: skip

        def write_tar(tmp: str) -> None:
            with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=_TAR_MTIME) as sink:
                for index in sorted(entry["samples"]):
                    codes, label = entry["samples"][index]
                    buffer = io.BytesIO()
                    np.save(buffer, codes, allow_pickle=False)
                    sink.write({"__key__": f"{index:0{KEY_DIGITS}d}", "tokens.npy": buffer.getvalue(),
                                "cls": str(label).encode()})
            # The summary once the tar is whole and before it is renamed into place: a shard counts as done
            # only when both exist (`ShardPlan.is_complete`). Its byte size lets readers tell a truncated
            # copy from the shard (`train.data.shard_integrity`).
            atomic_write_text(self.plan.summary(k), json.dumps({**summary, "num_bytes": os.path.getsize(tmp)},
                                                               indent=1))

        # fsynced before the rename, so the rename never exposes a shard the disk has not got.
        atomic_write(final, write_tar, sync=True)


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"no weights file ({', '.join(_WEIGHT_FILES)}) in tokenizer directory {path}")


def _tokenizer_config(tokenizer: torch.nn.Module) -> dict[str, Any] | None:
    config = getattr(tokenizer, "config", None) or getattr(getattr(tokenizer, "model", None), "config", None)
    if config is None:
        return None
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(config, default=str))


def _write_meta(plan: ShardPlan, info: dict[str, Any]) -> dict[str, Any]:
    """Sum the shard summaries into meta.json (rank 0, after every rank has finished)."""
    shards, skipped, total = [], [], 0
    for k in sorted(plan.counts):
        if not plan.is_complete(k):
            raise RuntimeError(f"shard {plan.tar(k)} is missing after extraction: did a rank fail?")
        summary = json.loads(plan.summary(k).read_text())
        entry = {"name": summary["shard"], "first_index": summary["first_index"],
                 "num_samples": summary["num_samples"]}
        if "num_bytes" in summary:  # absent from shards an older version wrote (then counted by headers)
            entry["num_bytes"] = summary["num_bytes"]
        shards.append(entry)
        skipped += summary["skipped"]
        total += summary["num_samples"]
    meta = {**info, "num_samples": total, "num_shards": len(shards), "num_skipped": len(skipped),
            "skipped": skipped, "shards": shards}
    atomic_write_text(plan.out / META_NAME, json.dumps(meta, indent=1))
    return meta


def extract_tokens(
    tokenizer: str,
    data: LightningDataModule,
    out: str,
    split: Literal["train", "val"] = "train",
    views: ViewMode = "center_flip",
    shard_size: int = 1000,
    batch_size: int = 64,
    num_workers: int | None = None,
    tokenizer_size: str | None = None,
    devices: int | str = "auto",
    accelerator: str = "auto",
    strategy: str = "auto",
    precision: str = "32-true",
    callbacks: list[Callback] | None = None,
) -> dict[str, Any]:
    """Encode split `split` of `data` with `tokenizer` into token shards in `out` (resumable).

    Args:
        tokenizer: Our tokenizer directory (config.json + model.safetensors), a diffusers VQModel directory,
            or a LlamaGen `.pt` file.
        data: An image DataModule with `views_dataset(split, views)` and `image_size`, `num_classes`
            (DigitsDataModule, ImageFolderDataModule, ImageShardsDataModule).
        out: Output folder for this split's shards and meta.json (one folder per split).
        split: Which split to encode.
        views: `center` (V=1), `center_flip` (V=2) or `ten_crop` (V=10, LlamaGen's); view 0 is the centre.
        shard_size: Consecutive global indices per shard (fixed, so a resumed run finds the same shards).
        batch_size: Images per batch (the tokenizer sees batch_size x V views).
        num_workers: DataLoader workers; None takes the DataModule's `num_workers`.
        tokenizer_size: Config name of a LlamaGen `.pt` (`vq-16` when None).
        devices: Lightning devices (several: DDP, each rank encodes its own shards).
        accelerator: Lightning accelerator (cpu, gpu, auto, ...).
        strategy: Lightning strategy (auto, ddp, ...).
        precision: Lightning precision (e.g. 32-true, bf16-mixed).
        callbacks: Extra Lightning callbacks (e.g. to monitor the run).

    Returns:
        The contents of meta.json on rank 0; an empty dict on other ranks.
    """
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be positive, got {shard_size}, {batch_size}")
    if views not in NUM_VIEWS:
        raise ValueError(f"views must be one of {sorted(NUM_VIEWS)}, got {views!r}")
    if not hasattr(data, "views_dataset"):
        raise TypeError(f"{type(data).__name__} has no views_dataset(split, views): use an image DataModule "
                        f"from train.data.images or train.data.image_shards")
    model = load_tokenizer(tokenizer, tokenizer_size)
    codebook, factor = int(model.codebook_size), int(model.downsample_factor)
    image_size = int(data.image_size)
    if image_size % factor:
        raise ValueError(f"image size {image_size} is not divisible by the tokenizer's downsample factor "
                         f"{factor}")
    weights = _weights_file(Path(tokenizer))
    dataset = data.views_dataset(split, views)
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    signature = {"format": FORMAT, "split": split, "views": views, "image_size": image_size,
                 "shard_size": shard_size, "weights_sha256": file_sha256(weights), "num_images": len(dataset),
                 "data": f"{type(data).__module__}.{type(data).__qualname__}"}
    counts = Counter((dataset.indices // shard_size).tolist())
    plan = ShardPlan(out_path, split, shard_size, dict(counts), signature)
    if stray := plan.stray_tars():
        raise ValueError(f"{out} holds shards this extraction would not write ({stray[:3]}...): "
                         f"use an empty folder")
    grid, num_classes = image_size // factor, int(data.num_classes)
    writer = TokenShardWriter(plan, dataset, codebook, grid, num_classes)
    trainer = Trainer(accelerator=accelerator, devices=devices, strategy=strategy, precision=precision,
                      logger=False, enable_checkpointing=False, enable_model_summary=False,
                      use_distributed_sampler=False, callbacks=[writer, *(callbacks or [])])
    workers = getattr(data, "num_workers", 0) if num_workers is None else num_workers
    trainer.predict(_Encoder(model), datamodule=_ExtractionData(dataset, plan, batch_size, workers),
                    return_predictions=False)
    if dist.is_available() and dist.is_initialized():
        trainer.strategy.barrier("extract_tokens")  # every rank's shards are on disk past this point
    if not trainer.is_global_zero:
        return {}
    info = {**signature, "tokenizer": str(tokenizer), "tokenizer_size": tokenizer_size,
            "tokenizer_config": _tokenizer_config(model), "weights_file": weights.name,
            "codebook_size": codebook, "downsample_factor": factor, "grid": [grid, grid],
            "num_views": NUM_VIEWS[views], "num_classes": num_classes,
            "dtype": codes_dtype(codebook).name, "data_init_args": dict(getattr(data, "hparams", {}))}
    meta = _write_meta(plan, json.loads(json.dumps(info, default=str)))
    # The arguments as a config `python -m train.prepare tokens --config` takes, to rerun or audit the run.
    arguments = {"tokenizer": str(tokenizer), "data": {"class_path": info["data"],
                                                       "init_args": info["data_init_args"]},
                 "out": str(out), "split": split, "views": views, "shard_size": shard_size,
                 "batch_size": batch_size, "num_workers": num_workers, "tokenizer_size": tokenizer_size,
                 "devices": devices, "accelerator": accelerator, "strategy": strategy, "precision": precision}
    atomic_write_text(out_path / "extract_config.yaml",
                      yaml.safe_dump(json.loads(json.dumps(arguments, default=str)), sort_keys=False))
    print(f"{out}: {meta['num_samples']} images in {meta['num_shards']} shards, {views} "
          f"(V={meta['num_views']}), grid {grid}x{grid}, {meta['num_skipped']} unreadable images skipped",
          flush=True)
    return meta
