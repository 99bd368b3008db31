"""train/callbacks.py under multi-process training: two CPU ranks (DDP over gloo) run `python -m train ar fit`
with every callback that writes into the run directory (metrics.json, the exported model, the sample
grid). Those files are written by rank 0 only, while finding the run directory is a broadcast all ranks
must join, so a callback that asked for it on rank 0 alone left the run hanging at its end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from train.data.images import DigitsDataModule
from train.prepare.extract_tokens import extract_tokens

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokens(tok: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Token shards of the digits val split (297 images in 3 shards, enough for 2 ranks) from `tok`."""
    out = tmp_path_factory.mktemp("ddp_tokens")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    extract_tokens(str(tok), DigitsDataModule(), str(out), split="val", views="center", shard_size=100,
                   batch_size=100, accelerator="cpu", devices=1)
    torch.set_num_threads(threads)
    return out


def test_two_rank_training_writes_metrics_export_and_samples_and_ends(tok: Path, tokens: Path, tmp_path: Path):
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
