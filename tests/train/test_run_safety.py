"""A training command never loses or silently spoils work: inputs of callbacks are checked before step 0,
a failing grid never costs the export, periodic checkpoints follow their retention policy, a rerun resumes (or refuses) instead of starting over on top of an
earlier run, logs survive a resume, and the optimizer cannot be swapped behind the modules' back.

Runs go through `train.cli.run_stage` in this process (the command line without the subprocess) on a tiny
Engram model and the digits' token shards.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

import train.callbacks
from train.cli import run_stage
from train.periodic_checkpoint import PeriodicCheckpoint, kept_steps


def _config(run_dir: Path, tokens: Path, tok: Path | str, max_steps: int = 2, callbacks: list | None = None,
            save_last: bool = True) -> dict:
    default_callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_last": save_last, "save_top_k": 0 if save_last else 1,
                       **({} if save_last else {"monitor": "val/nll", "filename": "best"})}},
        {"class_path": "train.callbacks.MetricsJson"},
        {"class_path": "train.callbacks.ExportModel"},
        {"class_path": "train.callbacks.SampleGrid",
         "init_args": {"tokenizer": str(tok), "every_n_steps": 1000, "per_class": 1, "num_classes": 2}}]
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "max_epochs": -1,
                    "limit_val_batches": 1, "val_check_interval": 2, "check_val_every_n_epoch": None,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(run_dir), "name": "", "version": ""}},
                    "callbacks": default_callbacks if callbacks is None else callbacks},
        "model": {"gpt": {"dim": 32, "n_layer": 2, "n_head": 2, "multiple_of": 32, "vocab_size": 64,
                          "num_classes": 10, "block_size": 16,
                          "engram": {"layers": [1], "heads_per_order": 2, "head_dim": 8, "rows_per_head": 61}},
                  "lr": 1e-3},
        "data": {"class_path": "train.data.tokens.TokenShardsDataModule",
                 "init_args": {"train_shards": str(tokens), "val_shards": str(tokens), "batch_size": 8,
                               "num_workers": 0}},
    }


def _fit(tmp_path: Path, config: dict, *extra: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return run_stage("ar", ["fit", "--config", str(path), *extra])


def _steps(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss")]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_bad_sample_grid_tokenizer_fails_before_any_step(tmp_path: Path, digit_tokens: Path):
    run_dir = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="missing_tokenizer"):
        _fit(tmp_path, _config(run_dir, digit_tokens, tmp_path / "missing_tokenizer"))
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.csv").exists()


def test_a_grid_that_fails_at_the_end_still_leaves_the_export_and_checkpoint(
        tmp_path: Path, digit_tokens: Path, tok: Path, monkeypatch: pytest.MonkeyPatch):
    def broken_generate(*args, **kwargs):
        raise RuntimeError("out of memory while sampling the grid")

    monkeypatch.setattr(train.callbacks, "generate", broken_generate)
    run_dir = tmp_path / "run"
    with pytest.warns(UserWarning, match="SampleGrid could not save the grid at step 2: RuntimeError: out of memory"):
        _fit(tmp_path, _config(run_dir, digit_tokens, tok))
    assert (run_dir / "model" / "model.safetensors").stat().st_size > 0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "samples.png").exists()


def test_a_rerun_resumes_from_last_ckpt_keeps_the_log_and_writes_no_versioned_checkpoint(
        tmp_path: Path, digit_tokens: Path, tok: Path, capsys: pytest.CaptureFixture):
    run_dir = tmp_path / "run"
    _fit(tmp_path, _config(run_dir, digit_tokens, tok, max_steps=2))
    assert _steps(run_dir) == [0, 1]
    capsys.readouterr()
    cli = _fit(tmp_path, _config(run_dir, digit_tokens, tok, max_steps=4))  # the same command, run longer
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().out
    assert cli.trainer.global_step == 4
    assert _steps(run_dir) == [0, 1, 2, 3]  # the first run's rows kept, each step once
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 4
    # the config of the first run is kept beside the one the resumed run used
    assert yaml.safe_load((run_dir / "config.earlier-1.yaml").read_text())["trainer"]["max_steps"] == 2
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_steps"] == 4


def test_a_resume_from_an_older_checkpoint_drops_the_log_rows_it_trains_again(
        tmp_path: Path, digit_tokens: Path, tok: Path):
    run_dir = tmp_path / "run"
    callbacks = [{"class_path": "train.periodic_checkpoint.PeriodicCheckpoint",
                  "init_args": {"every_n_steps": 2, "keep_last": 5}}]
    _fit(tmp_path, _config(run_dir, digit_tokens, tok, max_steps=4, callbacks=callbacks))
    assert _steps(run_dir) == [0, 1, 2, 3]
    cli = _fit(tmp_path, _config(run_dir, digit_tokens, tok, max_steps=4, callbacks=callbacks),
               "--ckpt_path", str(run_dir / "checkpoints" / "step_0000002.ckpt"))
    assert cli.trainer.global_step == 4
    assert _steps(run_dir) == [0, 1, 2, 3]  # steps 2 and 3 logged once, by the resumed run


def test_a_fresh_run_refuses_a_folder_with_an_earlier_run_and_no_last_checkpoint(
        tmp_path: Path, digit_tokens: Path, tok: Path):
    run_dir = tmp_path / "run"
    _fit(tmp_path, _config(run_dir, digit_tokens, tok, save_last=False))
    before = {path: path.read_bytes() for path in [run_dir / "metrics.json", run_dir / "metrics.csv",
                                                   run_dir / "model" / "model.safetensors"]}
    with pytest.raises(SystemExit, match=r"holds an earlier run .*new folder.*--ckpt_path <file>"):
        _fit(tmp_path, _config(run_dir, digit_tokens, tok, save_last=False))
    assert all(path.read_bytes() == data for path, data in before.items())


def test_a_log_of_a_run_killed_before_its_first_checkpoint_is_set_aside(
        tmp_path: Path, digit_tokens: Path, tok: Path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text("epoch,step,train/loss\n0,0,4.1\n")
    _fit(tmp_path, _config(run_dir, digit_tokens, tok), "--ckpt_path", "last")
    assert (run_dir / "metrics.unfinished-1.csv").read_text() == "epoch,step,train/loss\n0,0,4.1\n"
    assert _steps(run_dir) == [0, 1]


def test_the_cli_offers_no_optimizer_or_scheduler_override(tmp_path: Path, digit_tokens: Path, tok: Path,
                                                            capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit):
        run_stage("ar", ["fit", "--help"])
    usage = capsys.readouterr().out
    assert "--model.lr" in usage and "--optimizer" not in usage and "--lr_scheduler" not in usage
    with pytest.raises(SystemExit):
        _fit(tmp_path, _config(tmp_path / "run", digit_tokens, tok), "--optimizer", "torch.optim.SGD")
    assert "--optimizer" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def _losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")}


def test_a_resumed_run_with_dropout_has_the_losses_of_an_uninterrupted_one(
        tmp_path: Path, digit_tokens: Path, tok: Path):
    """Mid-epoch (the data module's position) and with dropout (torch's generator state in the checkpoint)."""
    callbacks = [{"class_path": "train.periodic_checkpoint.PeriodicCheckpoint", "init_args": {"every_n_steps": 3}}]
    whole, split = tmp_path / "whole", tmp_path / "split"
    _fit(tmp_path, _config(whole, digit_tokens, tok, max_steps=6, callbacks=callbacks), name="whole.yaml")
    _fit(tmp_path, _config(split, digit_tokens, tok, max_steps=3, callbacks=callbacks), name="split.yaml")
    _fit(tmp_path, _config(split, digit_tokens, tok, max_steps=6, callbacks=callbacks), name="split.yaml")
    assert list(_losses(split)) == list(range(6))
    assert _losses(split) == _losses(whole)


def test_kept_steps_are_the_newest_k_and_every_nth_multiple():
    assert kept_steps([2, 4, 6, 8, 10, 12], every_n_steps=2, keep_last=2, keep_every_nth=3) == {6, 10, 12}
    assert kept_steps([5, 10, 15, 17], every_n_steps=5, keep_last=1, keep_every_nth=None) == {17}
    assert kept_steps([5, 10, 15, 20], every_n_steps=5, keep_last=3, keep_every_nth=2) == {10, 15, 20}


@pytest.mark.parametrize("bad", [{"every_n_steps": 0}, {"keep_last": 0}, {"keep_every_nth": 0}])
def test_bad_settings_are_refused(bad: dict):
    with pytest.raises(ValueError, match="PeriodicCheckpoint: need every_n_steps >= 1"):
        PeriodicCheckpoint(**bad)


def test_a_run_keeps_the_policy_files_and_a_final_checkpoint(tmp_path: Path, digit_tokens: Path, tok: Path):
    run_dir = tmp_path / "run"
    callbacks = [{"class_path": "train.periodic_checkpoint.PeriodicCheckpoint",
                  "init_args": {"every_n_steps": 2, "keep_last": 2, "keep_every_nth": 2}}]
    _fit(tmp_path, _config(run_dir, digit_tokens, tok, max_steps=9, callbacks=callbacks))
    folder = run_dir / "checkpoints"
    # saved at 2, 4, 6, 8 and the end (9); kept: the newest two (8, 9) and the multiples of 2 x 2 (4, 8)
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step_0000004.ckpt", "step_0000008.ckpt",
                                                        "step_0000009.ckpt"]
    steps = {p.name: torch.load(p, map_location="cpu", weights_only=True)["global_step"] for p in folder.iterdir()}
    assert steps == {"last.ckpt": 9, "step_0000004.ckpt": 4, "step_0000008.ckpt": 8, "step_0000009.ckpt": 9}
