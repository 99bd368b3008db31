"""train/callbacks.py: the reconstruction grid shows every class of the validation data (even when the
loader is sorted by class, as ImageFolder's is), and under multi-process training two CPU ranks (DDP over
gloo) run `python -m train ar fit` with every callback that writes into the run directory (metrics.json,
the exported model, the sample grid). Those files are written by rank 0 only, while finding the run
directory is a broadcast all ranks must join, so a callback that asked for it on rank 0 alone left the
run hanging at its end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from train.callbacks import ReconstructionGrid, pick_per_class

REPO = Path(__file__).resolve().parents[2]


class _Negate(torch.nn.Module):
    """A stand-in tokenizer: the reconstruction of x is -x; counts the images it encodes."""

    encoded = 0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.encoded += images.shape[0]
        return images

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return -codes


class _Tokenizer(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = _Negate()

    def validation_step(self, batch, batch_idx) -> None:
        pass


class _SortedByClass(L.LightningDataModule):
    """3 classes x 6 images of 4x4, in class order (as ImageFolder lists them); image of class c is c / 4."""

    def __init__(self, num_classes: int | None = None) -> None:
        super().__init__()
        if num_classes is not None:
            self.num_classes = num_classes
        self.labels = torch.arange(3).repeat_interleave(6)
        self.images = (self.labels.float() / 4)[:, None, None, None].expand(-1, 3, 4, 4).clone()

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=4)


def _validate(tmp_path: Path, grid: ReconstructionGrid, data: L.LightningDataModule) -> _Tokenizer:
    module = _Tokenizer()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[grid])
    trainer.validate(module, datamodule=data)
    return module


def test_pick_per_class_takes_the_first_images_of_each_class_up_to_the_caps():
    taken: dict[int, int] = {}
    assert pick_per_class(torch.tensor([0, 0, 0, 1]), taken, per_class=2, max_classes=2) == [0, 1, 3]
    assert pick_per_class(torch.tensor([2, 1, 1, 0]), taken, per_class=2, max_classes=2) == [1]  # 2: over the cap
    assert taken == {0: 2, 1: 2}


def test_reconstruction_grid_shows_every_class_of_a_class_sorted_loader(tmp_path: Path):
    grid = ReconstructionGrid(per_class=2)
    module = _validate(tmp_path, grid, _SortedByClass())
    assert grid.labels == [0, 1, 2]  # the first batch holds class 0 only; the grid still shows all three
    assert module.model.encoded == 6  # only the picked images are reconstructed
    pixels = np.asarray(Image.open(tmp_path / "reconstructions.png").convert("L")).astype(float) / 255
    assert pixels.shape == (3 * 5 + 1, 4 * 5 + 1)  # 3 rows x (2 originals + 2 reconstructions), 1 px padding
    for row, label in enumerate(grid.labels):
        original, reconstruction = label / 4 * 0.5 + 0.5, -label / 4 * 0.5 + 0.5  # [-1,1] -> [0,1]
        cells = [pixels[1 + 5 * row: 5 + 5 * row, 1 + 5 * col: 5 + 5 * col] for col in range(4)]
        for col, cell in enumerate(cells):
            expected = original if col % 2 == 0 else reconstruction  # (original, reconstruction) pairs
            assert np.abs(cell - expected).max() < 1 / 255 + 1e-6, (label, col)
    assert (tmp_path / "reconstructions" / "step_0000000.png").is_file()


def test_reconstruction_grid_caps_classes_and_stops_once_every_class_is_full(tmp_path: Path):
    capped = ReconstructionGrid(per_class=1, max_classes=2)
    _validate(tmp_path / "capped", capped, _SortedByClass())
    assert capped.labels == [0, 1]
    known = ReconstructionGrid(per_class=1)
    module = _validate(tmp_path / "known", known, _SortedByClass(num_classes=2))  # the data says 2 classes
    assert known.labels == [0, 1] and module.model.encoded == 2


def test_two_rank_training_writes_metrics_export_and_samples_and_ends(tok: Path, digit_tokens: Path, tmp_path: Path):
    tokens = digit_tokens
    run_dir = tmp_path / "run"
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_steps": 2, "max_epochs": -1,
                    "limit_val_batches": 1, "val_check_interval": 2, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(run_dir), "name": "", "version": ""}},
                    "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"save_last": True, "save_top_k": 0}},
                        {"class_path": "train.callbacks.MetricsJson"},
                        {"class_path": "train.callbacks.ExportModel"},
                        {"class_path": "train.callbacks.SampleGrid",
                         "init_args": {"tokenizer": str(tok), "every_n_steps": 1000, "per_class": 2,
                                       "num_classes": 2}}]},
        "model": {"gpt": {"dim": 32, "n_layer": 2, "n_head": 2, "multiple_of": 32, "vocab_size": 64,
                          "num_classes": 10, "block_size": 16,
                          "engram": {"layers": [1], "heads_per_order": 2, "head_dim": 8, "rows_per_head": 61}},
                  "lr": 1e-3},
        "data": {"class_path": "train.data.tokens.TokenShardsDataModule",
                 "init_args": {"train_shards": str(tokens), "val_shards": str(tokens), "batch_size": 8,
                               "num_workers": 0, "batches_per_epoch": 2}},
    }
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    try:
        done = subprocess.run([sys.executable, "-m", "train", "ar", "fit", "--config", str(tmp_path / "ddp.yaml")],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"two-rank training did not end within {error.timeout} s (a rank waits for the other)")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and "nll" in metrics["metrics"]
    assert (run_dir / "model" / "model.safetensors").is_file() and (run_dir / "model" / "config.json").is_file()
    assert (run_dir / "samples.png").stat().st_size > 0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
