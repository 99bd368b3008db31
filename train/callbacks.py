"""Lightning callbacks shared by the training stages: reconstruction and sample grids, metrics.json, export.

Each writes into the run's log directory (`trainer.log_dir`) through an atomic rename, so an interrupted
run never leaves a half-written file. EMA itself is Lightning's `EMAWeightAveraging`, not ours.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchvision.utils import make_grid, save_image

from engram_vision.checkpoint import save_gpt
from engram_vision.model import EngramGPT
from sample.generate import generate
from sample.job import check_tokenizer_fits
from sample.sampling import SamplingConfig
from tokenizers_vq.checkpoint import load_tokenizer, save_vq
from tokenizers_vq.files import atomic_write, atomic_write_text
from train.lit_ar import check_token_data
from train.strategies import unsharded_model


class RunDirCallback(L.Callback):
    """A callback that writes into the run directory. `trainer.log_dir` is a broadcast that every rank must
    join, so it is read in `setup`, which runs on every rank, and not in the rank-0 hooks that write files
    (a rank-0-only read waits forever for the other ranks, or crashes them, in multi-process training)."""

    run_dir: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.run_dir = Path(trainer.log_dir or trainer.default_root_dir)


def _log_dir(callback: RunDirCallback) -> Path:
    if callback.run_dir is None:
        raise RuntimeError(f"{type(callback).__name__} writes before its setup ran; add it to the Trainer's "
                           f"callbacks so Lightning calls its setup on every rank")
    return callback.run_dir


def pick_per_class(labels: Tensor, taken: dict[int, int], per_class: int, max_classes: int) -> list[int]:
    """Positions in `labels` [B] of the images to add to a per-class grid; updates `taken` (label -> count).

    An image is picked while its class has fewer than `per_class` images and is one of the first
    `max_classes` classes met (in the order the batches arrive), so a loader sorted by class (ImageFolder's
    order) still fills a row for every class instead of the first batch's class only.
    """
    picked = []
    for position, label in enumerate(labels.tolist()):
        if label not in taken and len(taken) >= max_classes:
            continue
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            picked.append(position)
    return picked


class ReconstructionGrid(RunDirCallback):
    """After each validation, saves a grid with one row per class of the validation images (up to
    `max_classes`, ascending labels): `per_class` (original, reconstruction) pairs side by side.

    Images are picked while validation runs, with its weights (EMA, if on) in place: the first `per_class`
    images of each of the first `max_classes` classes met (`pick_per_class`); picking stops once every class
    (the data module's `num_classes`, when it has one) is full. A class with fewer images leaves blank cells.
    Writes `reconstructions/step_XXXXXXX.png` and a copy at `reconstructions.png` (the latest); `labels`
    holds the label of each grid row. Under DDP rank 0 shows the classes in its part of the validation set.

    Args:
        per_class: images of each class (each shown with its reconstruction: 2 x per_class columns).
        max_classes: classes shown at most (rows).
    """

    def __init__(self, per_class: int = 8, max_classes: int = 16):
        if per_class < 1 or max_classes < 1:
            raise ValueError(f"ReconstructionGrid: per_class and max_classes must be >= 1, got {per_class}, "
                             f"{max_classes}")
        self.per_class, self.max_classes = per_class, max_classes
        self.labels: list[int] = []  # the label of each row of the last grid written
        self._taken: dict[int, int] = {}
        self._pairs: dict[int, list[tuple[Tensor, Tensor]]] = {}
        self._full_at: int | None = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._taken, self._pairs = {}, {}
        classes = _known_classes(trainer.datamodule)
        self._full_at = self.per_class * min(self.max_classes, classes) if classes is not None else None

    @torch.no_grad()
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if self._full_at is not None and sum(self._taken.values()) >= self._full_at:
            return  # every class shown is full: nothing more to encode this epoch
        images, labels = batch[0], batch[1]
        picked = pick_per_class(labels.cpu(), self._taken, self.per_class, self.max_classes)
        if not picked:
            return
        index = torch.tensor(picked, device=images.device)
        originals = images[index]
        reconstructions = pl_module.model.decode(pl_module.model.encode(originals)).clamp(-1, 1)
        for label, original, reconstruction in zip(labels.cpu()[picked].tolist(), originals, reconstructions,
                                                   strict=True):
            # uint8 on the CPU: a full grid of 256 px images stays small.
            self._pairs.setdefault(label, []).append((_to_uint8(original), _to_uint8(reconstruction)))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self._pairs:
            return
        self.labels = sorted(self._pairs)
        blank = torch.zeros_like(next(iter(self._pairs.values()))[0][0])
        cells = []
        for label in self.labels:
            pairs = self._pairs[label] + [(blank, blank)] * (self.per_class - len(self._pairs[label]))
            cells += [image for pair in pairs for image in pair]
        grid = make_grid(torch.stack(cells).float() / 255, nrow=2 * self.per_class, padding=1)
        self._pairs = {}
        out = _log_dir(self) / "reconstructions" / f"step_{trainer.global_step:07d}.png"
        for path in (out, _log_dir(self) / "reconstructions.png"):
            atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))


def _known_classes(data: object) -> int | None:
    """The data module's `num_classes` when it can say without error (remote shards may not know it)."""
    try:
        classes = getattr(data, "num_classes", None)
    except (OSError, ValueError):
        return None
    return classes if isinstance(classes, int) else None


def _to_uint8(image: Tensor) -> Tensor:
    """An image in [-1,1] -> uint8 on the CPU, as a saved PNG holds it."""
    return ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


class MetricsJson(RunDirCallback):
    """Writes the latest validation metrics (`val/*`) with step and epoch to `<log_dir>/metrics.json`."""

    def __init__(self, prefix: str = "val/"):
        self.prefix = prefix

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.write(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Again at the end: ModelCheckpoint (always the last callback) updates its best score after us.
        self.write(trainer, pl_module)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        # After validation the epoch's logged metrics have been reduced into callback_metrics.
        metrics = {k.removeprefix(self.prefix): float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith(self.prefix)}
        path = _log_dir(self) / "metrics.json"
        if not metrics and path.is_file():
            # A resume with nothing left to train (stopped after its last checkpoint) validates nothing: the
            # earlier file's values, at the same step, are still this run's; keep them rather than erase them.
            earlier = json.loads(path.read_text())
            if earlier.get("global_step") == trainer.global_step:
                metrics = earlier.get("metrics", {})
        report = {"metrics": metrics, "global_step": trainer.global_step, "epoch": trainer.current_epoch,
                  "model": type(pl_module).__name__}
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.monitor and checkpoint.best_model_score is not None:
            report["best"] = {"monitor": checkpoint.monitor, "value": float(checkpoint.best_model_score),
                              "checkpoint": str(checkpoint.best_model_path)}
        atomic_write_text(path, json.dumps(report, indent=2, sort_keys=True))


class ExportModel(RunDirCallback):
    """At the end of fit, saves `pl_module.model` (EMA weights when EMA is on: Lightning's callback has
    copied them in by then) as safetensors + config.json in `<log_dir>/<dirname>`, the directory later
    stages read (`load_tokenizer` for a VQModel, `engram_vision.checkpoint.load_gpt` for an EngramGPT).

    use_best: export the best checkpoint of the monitoring ModelCheckpoint (early stopping) instead of
    the final weights, when there is one.
    """

    def __init__(self, dirname: str = "model", use_best: bool = False):
        self.dirname = dirname
        self.use_best = use_best

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.use_best and getattr(trainer.strategy, "_state_dict_type", None) == "sharded":
            raise ValueError("ExportModel(use_best=True) reads the best checkpoint as one file, but the FSDP "
                             "strategy saves sharded checkpoints (folders): set the strategy's "
                             "init_args.state_dict_type: full, or use_best: false")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Under FSDP the weights are spread over the ranks: every rank joins their gather.
        model = unsharded_model(trainer, pl_module.model)
        if not trainer.is_global_zero:
            return
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if self.use_best and best:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            model = copy.deepcopy(model)
            model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
        if isinstance(model, EngramGPT):
            save_gpt(model, _log_dir(self) / self.dirname)
        else:
            save_vq(model, _log_dir(self) / self.dirname)


GRID_SAMPLING = SamplingConfig(cfg_scale=2.0)


class SampleGrid(RunDirCallback):
    """Every `every_n_steps` training steps, samples `per_class` images for each of the first `num_classes`
    classes (one row per class, labels 0, 1, ...: `grid_labels`) and saves `samples/step_XXXXXXX.png` and
    `samples.png` (the latest). At setup, before any step, it loads the tokenizer and checks that its
    codebook is the model's vocabulary, so a wrong tokenizer path fails then rather than at the first grid.

    Args:
        tokenizer: the tokenizer that decodes the model's tokens (a directory or LlamaGen .pt).
        every_n_steps: sampling interval in optimizer steps.
        per_class: images per class (columns).
        num_classes: classes shown (rows), from label 0; capped at the model's classes.
        sampling: how the grid is sampled, as in `python -m sample` (default CFG 2.0, temperature 1; a
            cfg_scale != 1 needs the model's null label).
        seed: generator seed, so grids at different steps are comparable.
    """

    def __init__(self, tokenizer: str, every_n_steps: int = 1000, per_class: int = 8, num_classes: int = 10,
                 sampling: SamplingConfig = GRID_SAMPLING, seed: int = 0):
        self.tokenizer_path = tokenizer
        self.every_n_steps = every_n_steps
        self.per_class, self.num_classes = per_class, num_classes
        self.sampling = sampling
        self.seed = seed
        self._tokenizer = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self._tokenizer is not None:
            return
        if trainer.datamodule is not None:
            # The model-vs-data error first (LitAR.setup makes it too, after the callbacks' setup), so a
            # wrong vocab_size is not reported as a wrong tokenizer.
            check_token_data(pl_module.model.config, trainer.datamodule)
        # Every rank checks (a rank-0-only error would leave the others waiting); only rank 0 keeps it.
        # Building the tokenizer draws initial weights: fork the CPU generator so that training sees the
        # same random stream as without this callback (seeded runs keep their numbers).
        with torch.random.fork_rng(devices=[]):
            tokenizer = load_tokenizer(self.tokenizer_path)
        name = f"SampleGrid's tokenizer {self.tokenizer_path} (its init_args.tokenizer)"
        meta = getattr(trainer.datamodule, "meta", None) if trainer.datamodule is not None else None
        meta = meta if isinstance(meta, dict) else {}
        made_with = f" ({meta['tokenizer']}, named in {meta.get('path')})" if meta.get("tokenizer") else ""
        fix = f"point init_args.tokenizer at the tokenizer that made the token data{made_with}"
        check_tokenizer_fits(pl_module.model.config, tokenizer, model="the model (model.gpt.vocab_size)",
                             tokenizer_name=name, fix=fix)
        theirs = meta.get("downsample_factor")
        if theirs is not None and int(theirs) != int(tokenizer.downsample_factor):
            raise ValueError(f"{name} downsamples by {tokenizer.downsample_factor} but the token data was made "
                             f"by a tokenizer that downsamples by {theirs} (downsample_factor in "
                             f"{meta.get('path')}): {fix}")
        self._tokenizer = tokenizer if trainer.is_global_zero else None

    def grid_labels(self, model_classes: int) -> Tensor:
        """Labels of the grid's images, row by row: [0]*per_class, [1]*per_class, ... (int64)."""
        return torch.arange(min(self.num_classes, model_classes)).repeat_interleave(self.per_class)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._try_grid(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # At fit end, not train end: Lightning calls on_train_end of every callback before any on_fit_end,
        # where ExportModel writes the model, so the final grid comes after an export listed before it.
        self._try_grid(trainer, pl_module)

    def _try_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A grid is a picture of progress, not a result: one that fails (out of memory, a broken tokenizer
        file) is reported and training, checkpoints and the export go on. Every rank calls this: under FSDP
        a forward pass needs all ranks, so the weights are first gathered into one copy on rank 0."""
        model = unsharded_model(trainer, pl_module.model)
        if not trainer.is_global_zero:
            return
        try:
            self.save_grid(trainer, model.to(pl_module.device))
        except Exception as error:  # noqa: BLE001 - any failure of an optional picture
            rank_zero_warn(f"SampleGrid could not save the grid at step {trainer.global_step}: "
                           f"{type(error).__name__}: {error}; training, checkpoints and the model export are "
                           f"not affected")

    @torch.no_grad()
    def save_grid(self, trainer: L.Trainer, model: EngramGPT) -> None:
        """Sample the grid with `model` (the module's, or its gathered copy) and save it."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        labels = self.grid_labels(model.config.num_classes).to(device)
        rng = torch.Generator(device).manual_seed(self.seed)
        tokens = generate(model, labels, self.sampling, rng)
        model.train(was_training)
        tokenizer = self._tokenizer.to(device)
        images = tokenizer.decode(tokens.reshape(-1, *model.config.token_grid)).clamp(-1, 1).float().cpu()
        grid = make_grid(images * 0.5 + 0.5, nrow=self.per_class, padding=1)
        for path in (_log_dir(self) / "samples" / f"step_{trainer.global_step:07d}.png",
                     _log_dir(self) / "samples.png"):
            atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))
