"""Lightning callbacks shared by the training stages: reconstruction grids, metrics.json, tokenizer export.

Each writes into the run's log directory (`trainer.log_dir`) through an atomic rename, so an interrupted
run never leaves a half-written file. EMA itself is Lightning's `EMAWeightAveraging`, not ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from torchvision.utils import make_grid, save_image

from tokenizers_vq.checkpoint import atomic_write, atomic_write_text, save_vq


def _log_dir(trainer: L.Trainer) -> Path:
    return Path(trainer.log_dir or trainer.default_root_dir)


class ReconstructionGrid(L.Callback):
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
        out = _log_dir(trainer) / "reconstructions" / f"step_{trainer.global_step:07d}.png"
        for path in (out, _log_dir(trainer) / "reconstructions.png"):
            atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))


class MetricsJson(L.Callback):
    """Writes the latest validation metrics (`val/*`) with step and epoch to `<log_dir>/metrics.json`."""

    def __init__(self, prefix: str = "val/"):
        self.prefix = prefix

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        # on_validation_end runs after the epoch's logged metrics are reduced into callback_metrics.
        metrics = {k.removeprefix(self.prefix): float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith(self.prefix)}
        report = {"metrics": metrics, "global_step": trainer.global_step, "epoch": trainer.current_epoch,
                  "model": type(pl_module).__name__}
        atomic_write_text(_log_dir(trainer) / "metrics.json", json.dumps(report, indent=2, sort_keys=True))


class ExportTokenizer(L.Callback):
    """At the end of fit, saves the tokenizer (EMA weights when EMA is on) as safetensors + config.json in
    `<log_dir>/tokenizer`, the directory later stages (`tokenizers_vq.checkpoint.load_tokenizer`) read."""

    def __init__(self, dirname: str = "tokenizer"):
        self.dirname = dirname

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            save_vq(pl_module.model, _log_dir(trainer) / self.dirname)
