"""A tiny study the runner tests share: a random vq-tiny tokenizer, its codes of the digits val split, 20
real images as the reference, an Engram AR config of a few steps (`write_ar_config` for another count), a
sample YAML, `tiny_study(out, **changes)` writing a one-run study YAML around them (everything on CPU,
seconds per step), `finished_study` (that study run once, uninterrupted) and `study_results(out)` (what a
finished one found, for comparing two runs).

The AR config has no dropout and checkpoints only at epoch ends: then a training resumed from last.ckpt
draws the same batches and the same (no) random masks as an uninterrupted one, so its weights are equal bit
for bit (the checkpoint keeps no RNG state, and a mid-epoch resume restarts the epoch's data stream).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tokenizers_vq import VQModel, vq_config
from tokenizers_vq.checkpoint import save_vq
from tokenizers_vq.files import file_sha256
from train.data.digits import digits_split
from train.data.images import DigitsDataModule
from train.prepare.extract_tokens import extract_tokens


def ar_config(root: Path, max_steps: int = 4, lr: float = 1e-3) -> dict[str, Any]:
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "max_epochs": -1,
                    "limit_val_batches": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(root / "unused"), "name": "", "version": ""}},
                    "callbacks": [{"class_path": "train.callbacks.MetricsJson"},
                                  {"class_path": "train.callbacks.ExportModel"},
                                  {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"save_last": True, "save_top_k": 0, "every_n_epochs": 1,
                                                 "save_on_train_epoch_end": True}}]},
        "model": {"gpt": {"dim": 32, "n_layer": 2, "n_head": 2, "multiple_of": 32, "vocab_size": 64,
                          "num_classes": 10, "block_size": 16, "class_dropout_prob": 0.0, "token_dropout_p": 0.0,
                          "resid_dropout_p": 0.0, "ffn_dropout_p": 0.0,
                          "engram": {"layers": [1], "heads_per_order": 2, "head_dim": 8, "rows_per_head": 61}},
                  "lr": lr},
        "data": {"class_path": "train.data.tokens.TokenShardsDataModule",
                 "init_args": {"train_shards": str(root / "tokens"), "val_shards": str(root / "tokens"),
                               "batch_size": 16, "num_workers": 0, "batches_per_epoch": 2}},
    }


@pytest.fixture(scope="session")
def study_workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_study")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    save_vq(VQModel(vq_config("vq-tiny")), root / "tokenizer")
    extract_tokens(str(root / "tokenizer"), DigitsDataModule(), str(root / "tokens"), split="val", views="center",
                   shard_size=100, batch_size=100, accelerator="cpu", devices=1)
    torch.set_num_threads(threads)
    np.savez(root / "real.npz", arr_0=digits_split("val")[0][:20])
    (root / "ar.yaml").write_text(yaml.safe_dump(ar_config(root)))
    sample = {"tokenizer": str(root / "tokenizer"), "num_samples": 8, "labels": "balanced", "seed": 0,
              "batch_size": 4, "accelerator": "cpu", "devices": 1}
    (root / "sample.yaml").write_text(yaml.safe_dump(sample))
    return {"root": root, "ar": root / "ar.yaml", "sample": root / "sample.yaml", "real": root / "real.npz"}


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@pytest.fixture(scope="session")
def tiny_study(study_workspace: dict[str, Path]) -> Callable[..., Path]:
    """`tiny_study(out, extractor="fake-test", **changes)`: writes `<out>.yaml`, a study of one Engram run
    (`engram`, also the baseline) that trains, samples, evaluates (FID and IS), rebuilds the reference
    through the tokenizer and probes with gate samples; `changes` are merged into the spec (nested dicts
    key by key). Returns the YAML's path."""

    def write(out: Path, extractor: str = "fake-test", **changes: Any) -> Path:
        ws = study_workspace
        spec = {
            "name": "tiny", "out": str(out), "baseline": "engram", "report": False,
            "runs": [{"name": "engram", "config": str(ws["ar"])}],
            "sample": {"config": str(ws["sample"])},
            "evaluate": {"reference": str(ws["real"]), "extractor": extractor, "metrics": "fid,is",
                         "accelerator": "cpu", "cache_dir": str(out.parent / f"{out.name}_cache"),
                         "isc_splits": 2, "bootstrap": 5},
            "reconstructions": {"tokenizer": str(ws["root"] / "tokenizer"), "accelerator": "cpu"},
            "probes": {"tokens": str(ws["root"] / "tokens"), "images_per_class": 2, "accelerator": "cpu",
                       "gate_samples": 4, "settings": {"batch_size": 20, "bootstrap_samples": 20,
                                                       "permutations": 20, "gates": [0.0, 0.5]}},
        }
        path = out.parent / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(_merge(spec, changes)))
        return path

    return write


def _results(out: Path) -> dict:
    """What the tiny study found (scores, probes, training metrics, sample bytes, weights), without paths
    and timings."""
    probe = json.loads((out / "probes/engram/metrics.json").read_text())
    for key in ("seconds", "model", "study_settings"):
        probe.pop(key)
    scores = {name: {k: json.loads((out / name).read_text())[k] for k in ("metrics", "intervals")}
              for name in ("samples/engram/metrics.json", "samples/engram/metrics_vs_reconstructions.json",
                           "reconstructions/metrics.json", "probes/engram/gate_0/samples/metrics.json")}
    train = json.loads((out / "ar/engram/metrics.json").read_text())
    files = {name: file_sha256(out / name) for name in
             ("samples/engram/samples.npz", "reconstructions/samples.npz", "probes/engram/gate_0.5/samples/samples.npz")}
    # the weights themselves (the file's header is the saving code's business)
    weights = {k: v.numpy().tobytes() for k, v in load_file(out / "ar/engram/model/model.safetensors").items()}
    return {"probe": probe, "scores": scores, "train": train, "files": files, "weights": weights}


@pytest.fixture(scope="session")
def study_results() -> Callable[[Path], dict]:
    """`study_results(out)`: what a finished tiny study in `out` found, to compare two runs with."""
    return _results


@pytest.fixture(scope="session")
def write_ar_config(study_workspace: dict[str, Path]) -> Callable[..., Path]:
    """`write_ar_config(path, max_steps=4, lr=1e-3)`: the tiny AR config with other steps or learning rate."""

    def write(path: Path, **changes: Any) -> Path:
        path.write_text(yaml.safe_dump(ar_config(study_workspace["root"], **changes)))
        return path

    return write


@pytest.fixture(scope="session")
def finished_study(tiny_study: Callable[..., Path], fake_extractor: type,
                   tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny study run once to the end, uninterrupted, on one thread: the results others must equal.
    Tests must not change it (copy it first)."""
    from study.__main__ import main

    out = tmp_path_factory.mktemp("finished") / "study"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    main(["run", "--config", str(tiny_study(out))])
    torch.set_num_threads(threads)
    return out
