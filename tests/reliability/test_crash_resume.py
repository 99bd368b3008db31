"""Crash and resume: each long-running command is started as a subprocess, killed with SIGKILL in the
middle of its run (no handler runs, as with a pre-empted job or the OOM killer), and run again.

- AR training (`python -m train ar fit`, a checkpoint every step): the rerun with `--ckpt_path last` starts
  from the killed run's last.ckpt (it says so, and trains only the remaining steps) and ends at max_steps
  with the optimizer's step counts at max_steps;
- sampling (`python -m sample`): the rerun of the same command leaves exactly N PNGs, no temporary file,
  and the same images and samples.npz as an uninterrupted run;
- token extraction (`python -m train.prepare tokens`): after the rerun every image index is in the shards
  exactly once, and the total is the number of images.

The kill comes once the run has visibly made progress (a checkpoint, PNGs, shards on disk) and long before
it could finish, so where it lands varies but the outcome must not. CPU, tiny random models, one thread.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from engram_vision.checkpoint import save_gpt
from sample.job import sample_images
from tokenizers_vq import VQModel, vq_config
from tokenizers_vq.checkpoint import save_vq
from train.data.images import DigitsDataModule
from train.prepare.extract_tokens import extract_tokens

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def workspace(random_model, tiny_config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random vq-tiny tokenizer, its codes of the digits val split (297 images) and a tiny AR model."""
    root = tmp_path_factory.mktemp("crash")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    save_vq(VQModel(vq_config("vq-tiny")), root / "tokenizer")
    extract_tokens(str(root / "tokenizer"), DigitsDataModule(), str(root / "tokens"), split="val", views="center",
                   shard_size=100, batch_size=100, accelerator="cpu", devices=1)
    save_gpt(random_model(tiny_config()), root / "gpt")
    torch.set_num_threads(threads)
    return root


def _run(cmd: list[str], log: Path, timeout: float = 120.0) -> str:
    done = subprocess.run(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    log.write_text(done.stdout)
    assert done.returncode == 0, done.stdout[-3000:]
    return done.stdout


def _last_step(path: Path) -> int:
    """global_step of a checkpoint, or -1 while there is none (it is renamed into place whole)."""
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"] if path.is_file() else -1


def test_ar_training_killed_mid_run_resumes_from_last_ckpt(workspace: Path, tmp_path: Path, kill_when) -> None:
    max_steps = 60
    run_dir = tmp_path / "run"
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "max_epochs": -1,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(run_dir), "name": "", "version": ""}},
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 1}}]},
        "model": {"gpt": {"dim": 32, "n_layer": 2, "n_head": 2, "multiple_of": 32, "vocab_size": 64,
                            "num_classes": 10, "block_size": 16,
                            "engram": {"layers": [1], "heads_per_order": 2, "head_dim": 8, "rows_per_head": 61}},
                  "lr": 1e-3, "schedule": "cosine", "warmup_steps": 5},
        "data": {"class_path": "train.data.tokens.TokenShardsDataModule",
                 "init_args": {"train_shards": str(workspace / "tokens"), "batch_size": 16, "num_workers": 0,
                               "batches_per_epoch": 8}},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    fit = [sys.executable, "-m", "train", "ar", "fit", "--config", str(tmp_path / "tiny.yaml")]
    last = run_dir / "checkpoints" / "last.ckpt"
    kill_when(fit, lambda: _last_step(last) >= 3, tmp_path / "killed.log")
    killed_at = _last_step(last)  # whole: a kill mid-save leaves the previous last.ckpt in place
    assert 3 <= killed_at < max_steps

    log = _run([*fit, "--ckpt_path", "last"], tmp_path / "resumed.log")
    assert f"Restoring states from the checkpoint path at {last}" in log
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert final["global_step"] == max_steps
    optimizer = final["optimizer_states"][0]
    assert {float(s["step"]) for s in optimizer["state"].values()} == {float(max_steps)}
    assert final["lr_schedulers"][0]["last_epoch"] == max_steps
    # The log reads like one run: rows the killed process flushed before its checkpoint are kept, the steps
    # after it are logged once, by the resumed process (which trained only those).
    with open(run_dir / "metrics.csv") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    assert steps == list(range(steps[0], max_steps)) and steps[0] <= killed_at
    assert not [p for p in run_dir.rglob("*.tmp")]


def test_sampling_killed_mid_run_then_rerun_gives_exactly_n_images(workspace: Path, tmp_path: Path, kill_when) -> None:
    n = 60
    args = {"model": str(workspace / "gpt"), "tokenizer": str(workspace / "tokenizer"), "num_samples": n,
            "batch_size": 2, "seed": 3, "accelerator": "cpu", "devices": 1}
    cmd = [sys.executable, "-m", "sample", "--out", str(tmp_path / "run"),
           *(x for key, value in args.items() for x in (f"--{key}", str(value)))]
    images = tmp_path / "run" / "images"
    kill_when(cmd, lambda: images.is_dir() and len(list(images.glob("*.png"))) >= 4, tmp_path / "killed.log")
    written = len(list(images.glob("*.png")))
    assert 4 <= written < n and not (tmp_path / "run" / "samples.npz").exists()

    _run(cmd, tmp_path / "rerun.log")
    names = sorted(p.name for p in images.iterdir())
    assert names == [f"{i:06d}.png" for i in range(n)]  # exactly N, each index once, no temporary file
    torch.set_num_threads(1)  # the subprocesses' thread count: the same float rounding
    sample_images(out=str(tmp_path / "reference"), **args)
    resumed, reference = (np.load(tmp_path / d / "samples.npz") for d in ("run", "reference"))
    assert np.array_equal(resumed["arr_0"], reference["arr_0"])
    assert np.array_equal(resumed["labels"], reference["labels"])


def test_token_extraction_killed_mid_run_then_rerun_has_each_image_once(workspace: Path, tmp_path: Path,
                                                                         kill_when) -> None:
    out = tmp_path / "tokens"
    cmd = [sys.executable, "-m", "train.prepare", "tokens", "--tokenizer", str(workspace / "tokenizer"), "--data",
           "train.data.images.DigitsDataModule", "--split", "train", "--views", "center", "--out", str(out),
           "--shard_size", "50", "--batch_size", "25", "--accelerator", "cpu", "--devices", "1"]
    kill_when(cmd, lambda: len(list(out.glob("*.tar"))) >= 2, tmp_path / "killed.log")
    assert 2 <= len(list(out.glob("*.tar"))) < 30 and not (out / "meta.json").exists()

    _run(cmd, tmp_path / "rerun.log")
    keys = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys += [name.removesuffix(".cls") for name in tar.getnames() if name.endswith(".cls")]
    assert sorted(keys) == [f"{i:09d}" for i in range(1500)]  # each of the 1500 train images exactly once
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_samples"] == 1500 and meta["num_shards"] == 30
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
