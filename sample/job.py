"""A sampling job: the plan (which global image indices exist, their labels, batches and seeds, which are
already on disk) and the predict-loop writer that turns an AR checkpoint plus a tokenizer into N images.

Image i belongs to batch i // batch_size; batch k draws from a generator seeded by (seed, k), so the
images depend on (model, seed, batch_size, settings) but not on the number of devices or on restarts.
`sample_images` writes `<out>/images/{index:06d}.png`, then `<out>/samples.npz` (`arr_0` uint8 [N,H,W,3],
`labels` int64 [N], the ADM evaluator layout) and `<out>/manifest.json` (checkpoint and tokenizer hashes,
sampler settings, seed, label scheme). It runs through Lightning's predict loop on every device;
rerunning after an interruption samples only the missing batches; a rerun with other settings is refused.
Every file is written atomically (a temporary file beside it, then a rename; a rerun removes the temporary
files of a killed run), so a kill or a full disk never leaves a half-written PNG under its final name.
Before the manifest or any image is written, `sample.inputs` checks every argument (paths, counts, the
--out folder) and the loaded pair (the tokenizer's codebook against the model's vocabulary, a null label for
guidance), naming the flags to change. A resume also samples again a PNG that is empty or cut short; one
damaged inside is named when samples.npz is assembled, to be deleted and sampled again.
Token generation is `sample/generate.py`; scoring the images is `python -m metrics evaluate`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.io import encode_png

from engram_vision.checkpoint import load_any_gpt
from sample.generate import generate
from sample.inputs import (
    CLI_TOKENIZER_FIX,
    check_arguments,
    check_model_fits,
    check_tokenizer_fits,
    png_is_whole,
    read_sample_pngs,
)
from sample.sampling import SamplingConfig
from tokenizers_vq.checkpoint import load_tokenizer
from tokenizers_vq.diffusers_backend import tokenizer_weights_file
from tokenizers_vq.files import (
    TEMP_SUFFIX,
    atomic_write,
    atomic_write_text,
    file_sha256,
    remove_stale_temps,
    temp_target,
)
from tokenizers_vq.model_dir import WEIGHTS_NAME

LabelScheme = Literal["uniform", "balanced"]
# Re-exported: the training callback checks its tokenizer with the same function.
__all__ = ["CLI_TOKENIZER_FIX", "check_tokenizer_fits", "sample_images", "SamplePlan", "plan_labels",
           "batch_seed", "image_path"]


def image_path(out: Path, index: int) -> Path:
    return out / "images" / f"{index:06d}.png"


def plan_labels(num_samples: int, num_classes: int, scheme: LabelScheme, seed: int) -> torch.Tensor:
    """int64 [N]: uniform at random (LlamaGen's FID protocol) or class-balanced (i % C, shuffled)."""
    generator = torch.Generator().manual_seed(seed)
    if scheme == "uniform":
        return torch.randint(0, num_classes, (num_samples,), generator=generator)
    if scheme == "balanced":
        return (torch.arange(num_samples) % num_classes)[torch.randperm(num_samples, generator=generator)]
    raise ValueError(f"label scheme must be 'uniform' or 'balanced', got {scheme!r}")


def batch_seed(seed: int, batch: int) -> int:
    """A 63-bit seed per batch, stable across processes and machines."""
    digest = hashlib.sha256(f"engram-vision-sample:{seed}:{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class SamplePlan:
    """The fixed partition of N images into batches."""

    num_samples: int
    batch_size: int

    def __post_init__(self) -> None:
        for name in ("num_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SamplePlan.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def num_batches(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def indices(self, batch: int) -> range:
        start = batch * self.batch_size
        return range(start, min(start + self.batch_size, self.num_samples))

    def pending(self, out: Path, rank: int = 0, world_size: int = 1) -> list[int]:
        """This rank's batches (k % world_size == rank) with at least one image missing on disk; an empty
        or cut PNG (`png_is_whole`) counts as missing, so the rerun writes it again."""
        return [k for k in range(rank, self.num_batches, world_size)
                if not all(png_is_whole(image_path(out, i)) for i in self.indices(k))]


def _model_hash(path: Path) -> str:
    return file_sha256(path / WEIGHTS_NAME if path.is_dir() else path)


class _Sampler(L.LightningModule):
    """predict_step(batch k) -> writes the batch's PNGs; nothing is returned to keep memory flat."""

    def __init__(self, model: torch.nn.Module, tokenizer: torch.nn.Module, plan: SamplePlan, labels: torch.Tensor,
                 sampling: SamplingConfig, seed: int, out: Path, compile: bool = False):
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer.eval()
        self.plan, self.labels, self.sampling, self.seed, self.out = plan, labels, sampling, seed, out
        self.compile = compile

    def predict_step(self, batch: int, batch_idx: int) -> None:
        indices = self.plan.indices(int(batch))
        labels = self.labels[indices.start:indices.stop].to(self.device)
        rng = torch.Generator(self.device).manual_seed(batch_seed(self.seed, int(batch)))
        tokens = generate(self.model, labels, self.sampling, rng, compile=self.compile)
        grid = self.model.config.token_grid
        images = self.tokenizer.decode(tokens.reshape(-1, *grid)).float().clamp(-1, 1)
        pixels = ((images + 1) * 127.5).round().to(torch.uint8).cpu()
        for index, image in zip(indices, pixels, strict=True):
            path = image_path(self.out, index)
            atomic_write(path, lambda tmp, image=image: Path(tmp).write_bytes(encode_png(image).numpy().tobytes()))


class _PendingBatches(L.LightningDataModule):
    def __init__(self, plan: SamplePlan, out: Path):
        super().__init__()
        self.plan, self.out = plan, out

    def predict_dataloader(self) -> DataLoader:
        pending = self.plan.pending(self.out, self.trainer.global_rank, self.trainer.world_size)
        # Temporary PNGs of a killed run, for this rank's images only (other ranks may be writing theirs).
        mine = {image_path(self.out, i).name for batch in pending for i in self.plan.indices(batch)}
        folder = image_path(self.out, 0).parent
        for tmp in folder.glob(f".*{TEMP_SUFFIX}") if folder.is_dir() else ():
            if temp_target(tmp) in mine:
                tmp.unlink(missing_ok=True)
        return DataLoader(pending, batch_size=None)


def sample_images(model: str, tokenizer: str, out: str, num_samples: int = 50_000,
                  labels: LabelScheme = "uniform", seed: int = 0, batch_size: int = 64,
                  sampling: SamplingConfig = SamplingConfig(), model_size: str | None = None,
                  tokenizer_size: str | None = None, accelerator: str = "auto", devices: int | str = "auto",
                  strategy: str = "auto", precision: str = "32-true", compile: bool = False) -> dict[str, Any]:
    """Sample `num_samples` images and write PNGs, samples.npz and manifest.json into `out`.

    Args:
        model: our exported model directory (train ... ExportModel) or a LlamaGen c2i `.pt`.
        tokenizer: a tokenizer directory, a diffusers VQModel directory or a LlamaGen VQ `.pt`.
        out: output directory; rerun with the same arguments to finish an interrupted run.
        num_samples: images to write (50,000 for FID).
        labels: `uniform` at random (LlamaGen's protocol) or `balanced` over classes.
        seed: the run's seed (labels and every batch's generator derive from it).
        batch_size: images per batch; the images depend on it (batch k has its own generator). They do
            not depend on the number of devices, up to float rounding: kernels that reduce in another order
            (another thread count, GPU model or precision) can flip a rare near-tie token choice.
        sampling: CFG scale and schedule, temperature, top-k, top-p, greedy.
        model_size: named config of a LlamaGen c2i `.pt` model (e.g. gpt-b).
        tokenizer_size: named config of a LlamaGen VQ `.pt` tokenizer (e.g. vq-16).
        accelerator: Lightning accelerator (cpu, gpu, auto, ...).
        devices: Lightning devices (e.g. 8: the batches are spread over them).
        strategy: Lightning strategy (auto, ddp, ...).
        precision: Lightning precision (e.g. 32-true, bf16-mixed).
        compile: compile the decode step (static cache, CUDA graphs on GPU); same images, faster after the
            first batch, which pays the compile. A last batch of another size compiles once more.
    """
    out_dir = Path(out)
    # Everything is checked before the manifest, the images and the Trainer: first what needs no model...
    previous = check_arguments(model, tokenizer, out, num_samples, batch_size, labels, get_args(LabelScheme))
    tokenizer_weights = tokenizer_weights_file(tokenizer)
    gpt = load_any_gpt(model, model_size)
    vq = load_tokenizer(tokenizer, tokenizer_size)
    # ...then the pair: a tokenizer of another codebook, or guidance without a null label, fails here.
    check_model_fits(gpt.config, vq, sampling, gpt.cls_embedding.has_null, compile, model=f"--model {model}",
                     tokenizer_name=f"--tokenizer {tokenizer}")
    plan = SamplePlan(num_samples, batch_size)
    settings = {"model": str(model), "model_sha256": _model_hash(Path(model)), "tokenizer": str(tokenizer),
                "tokenizer_sha256": file_sha256(tokenizer_weights), "num_samples": num_samples,
                "label_scheme": labels, "seed": seed, "batch_size": batch_size, "sampling": asdict(sampling),
                "num_classes": gpt.config.num_classes, "grid": list(gpt.config.token_grid)}
    manifest_path = out_dir / "manifest.json"
    if previous is not None:
        changed = sorted(k for k, v in settings.items() if previous.get(k) != v)
        if changed:
            raise ValueError(f"{out_dir} holds samples made with other settings ({', '.join(changed)}); "
                             f"use an empty --out folder or the same arguments")
    atomic_write_text(manifest_path, json.dumps({**settings, "complete": False}, indent=2))
    label_plan = plan_labels(num_samples, gpt.config.num_classes, labels, seed)
    trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, precision=precision,
                        logger=False, use_distributed_sampler=False, enable_model_summary=False)
    trainer.predict(_Sampler(gpt, vq, plan, label_plan, sampling, seed, out_dir, compile),
                    _PendingBatches(plan, out_dir),
                    return_predictions=False)
    trainer.strategy.barrier()  # every rank's PNGs are on disk before rank 0 gathers them
    if not trainer.is_global_zero:
        return {}
    for name in ("samples.npz", "manifest.json"):  # leftovers of a run killed while writing them
        remove_stale_temps(out_dir / name)
    pixels = read_sample_pngs([image_path(out_dir, i) for i in range(num_samples)])  # names unreadable ones

    def write_npz(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # a file object: np.savez would append .npz to a bare name
            np.savez(handle, arr_0=pixels, labels=label_plan.numpy().astype(np.int64))

    atomic_write(out_dir / "samples.npz", write_npz)
    manifest = {**settings, "complete": True, "image_shape": list(pixels.shape[1:])}
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
    print(f"{out_dir}: {num_samples} images, samples.npz and manifest.json written")
    return manifest
