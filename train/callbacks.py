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
from torchvision.utils import make_grid, save_image

from engram_vision.checkpoint import save_gpt
from engram_vision.model import EngramGPT
from sample.generate import generate
from sample.sampling import SamplingConfig
from tokenizers_vq.checkpoint import save_vq
from tokenizers_vq.files import atomic_write, atomic_write_text


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


class ReconstructionGrid(RunDirCallback):
    """After each validation, saves originals (odd rows) above their reconstructions (even rows) as PNG.

    Writes `reconstructions/step_XXXXXXX.png` and a copy at `reconstructions.png` (the latest).
    """

    def __init__(self, num_images: int = 32, images_per_row: int = 16):
        self.num_images = num_images
        self.images_per_row = images_per_row

    @torch.no_grad()
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        # The first batch of the epoch, while validation weights (EMA, if on) are in place.
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        images = batch[0][: self.num_images]
        reconstructions = pl_module.model.decode(pl_module.model.encode(images)).clamp(-1, 1)
        rows = []
        for start in range(0, images.shape[0], self.images_per_row):
            rows += [images[start:start + self.images_per_row], reconstructions[start:start + self.images_per_row]]
        grid = make_grid(torch.cat(rows).float().cpu() * 0.5 + 0.5, nrow=self.images_per_row, padding=1)
        out = _log_dir(self) / "reconstructions" / f"step_{trainer.global_step:07d}.png"
        for path in (out, _log_dir(self) / "reconstructions.png"):
            atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))


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
        report = {"metrics": metrics, "global_step": trainer.global_step, "epoch": trainer.current_epoch,
                  "model": type(pl_module).__name__}
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.monitor and checkpoint.best_model_score is not None:
            report["best"] = {"monitor": checkpoint.monitor, "value": float(checkpoint.best_model_score),
                              "checkpoint": str(checkpoint.best_model_path)}
        atomic_write_text(_log_dir(self) / "metrics.json", json.dumps(report, indent=2, sort_keys=True))


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

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        model = pl_module.model
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
    classes (one row per class) and saves `samples/step_XXXXXXX.png` and `samples.png` (the latest).

    Args:
        tokenizer: the tokenizer that decodes the model's tokens (a directory or LlamaGen .pt).
        every_n_steps: sampling interval in optimizer steps.
        per_class: images per class (columns).
        num_classes: classes shown (rows), from label 0.
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

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and trainer.is_global_zero:
            self.save_grid(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.save_grid(trainer, pl_module)

    @torch.no_grad()
    def save_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from tokenizers_vq.checkpoint import load_tokenizer

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        model = pl_module.model
        was_training = model.training
        model.eval()
        device = pl_module.device
        labels = torch.arange(min(self.num_classes, model.config.num_classes), device=device)
        labels = labels.repeat_interleave(self.per_class)
        rng = torch.Generator(device).manual_seed(self.seed)
        tokens = generate(model, labels, self.sampling, rng)
        model.train(was_training)
        tokenizer = self._tokenizer.to(device)
        images = tokenizer.decode(tokens.reshape(-1, *model.config.token_grid)).clamp(-1, 1).float().cpu()
        grid = make_grid(images * 0.5 + 0.5, nrow=self.per_class, padding=1)
        for path in (_log_dir(self) / "samples" / f"step_{trainer.global_step:07d}.png",
                     _log_dir(self) / "samples.png"):
            atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))
