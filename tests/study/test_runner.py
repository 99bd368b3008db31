"""The study runner (`python -m study run`): a tiny study end to end on CPU, then a rerun that must skip
every finished step, and the config checks.

The tokenizer is a random vq-tiny, the token shards its codes of the digits val split, and each AR model
trains for a handful of steps: the numbers mean nothing, the plumbing is what is tested. Stale settings,
half-finished steps and kills are tests/study/test_runner_stale.py, test_runner_partial.py and
test_runner_kill.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from engram_vision.probes import ProbeConfig
from metrics.features import register_extractor
from study.__main__ import main
from study.runner import ProbeStep, SampleStep, StudyRun, study
from tokenizers_vq import VQModel, vq_config
from tokenizers_vq.checkpoint import save_vq
from tokenizers_vq.files import file_sha256
from train.data.digits import digits_split
from train.data.images import DigitsDataModule
from train.prepare.extract_tokens import extract_tokens


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("study")
    torch.manual_seed(0)
    save_vq(VQModel(vq_config("vq-tiny")), root / "tokenizer")
    extract_tokens(str(root / "tokenizer"), DigitsDataModule(), str(root / "tokens"), split="val", views="center",
                   shard_size=100, batch_size=100, accelerator="cpu", devices=1)
    configs = {}
    for name, engram in (("baseline", None), ("engram", {"layers": [1], "heads_per_order": 2, "head_dim": 8,
                                                         "rows_per_head": 61})):
        config = {
            "seed_everything": 0,
            "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 4, "max_epochs": -1,
                        "limit_val_batches": 1, "val_check_interval": 2, "enable_progress_bar": False,
                        "enable_model_summary": False,
                        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": str(root / "unused"), "name": "", "version": ""}},
                        "callbacks": [{"class_path": "train.callbacks.MetricsJson"},
                                      {"class_path": "train.callbacks.ExportModel"}]},
            "model": {"gpt": {"dim": 32, "n_layer": 2, "n_head": 2, "multiple_of": 32, "vocab_size": 64,
                                "num_classes": 10, "block_size": 16, "engram": engram}, "lr": 1e-3},
            "data": {"class_path": "train.data.tokens.TokenShardsDataModule",
                     "init_args": {"train_shards": str(root / "tokens"), "val_shards": str(root / "tokens"),
                                   "batch_size": 16, "num_workers": 0, "batches_per_epoch": 2}},
        }
        configs[name] = root / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(config))
    sample = {"tokenizer": str(root / "tokenizer"), "num_samples": 20, "labels": "balanced", "seed": 0,
              "batch_size": 10, "accelerator": "cpu", "devices": 1}
    (root / "sample.yaml").write_text(yaml.safe_dump(sample))
    return {"root": root, "sample": root / "sample.yaml", **configs}


def _study_yaml(workspace: dict[str, Path], out: Path) -> Path:
    spec = {
        "name": "tiny", "out": str(out), "baseline": "baseline",
        "runs": [{"name": "baseline", "config": str(workspace["baseline"])},
                 {"name": "engram", "config": str(workspace["engram"])}],
        "sample": {"config": str(workspace["sample"])},
        "probes": {"tokens": str(workspace["root"] / "tokens"), "images_per_class": 4, "accelerator": "cpu",
                   "gate_samples": 10, "settings": {"batch_size": 16, "bootstrap_samples": 100,
                                                    "permutations": 100, "gates": [0.0, 0.5]}},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_study_runs_every_step_then_skips_finished_runs(workspace, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    out = tmp_path / "tiny"
    config = _study_yaml(workspace, out)
    report = main(["run", "--config", str(config)])
    assert report == out / "report.md" and report.is_file()
    index = json.loads((out / "study.json").read_text())
    assert index["command"] == f"python -m study run --config {config}"
    runs = {entry["name"]: entry for entry in index["runs"]}
    assert runs["baseline"]["rho"] == 1.0 and runs["baseline"]["engram"] is None
    assert 0 < runs["engram"]["rho"] < 1 and runs["engram"]["engram"] == {"gate": "learned", "table": "trainable"}
    assert runs["engram"]["params"]["memory"] > 0
    for name, entry in runs.items():
        assert entry["train_metrics"] == f"ar/{name}/metrics.json" and (out / entry["train_metrics"]).is_file()
        assert entry["sample_metrics"] is None  # no evaluate step in this study
        samples = (out / entry["samples"])
        assert samples.is_file() and (out / "samples" / name / "images" / "000019.png").is_file()
        probe = json.loads((out / entry["probe_metrics"]).read_text())
        assert probe["data"]["num_images"] == 40 and probe["run"] == name
    engram_probe = json.loads((out / runs["engram"]["probe_metrics"]).read_text())
    assert [e["gate"] for e in engram_probe["gate_sweep"]] == [0.0, 0.5, "learned"]
    # gate_samples: a saved copy per clamped gate, sampled like the runs (no evaluate step: no metrics)
    assert [(e["gate"], e["metrics"]) for e in engram_probe["gate_samples"]] == [(0.0, None), (0.5, None)]
    for entry in engram_probe["gate_samples"]:
        with np.load(out / entry["samples"]) as data:
            assert data["arr_0"].shape == (10, 16, 16, 3)
        model_config = json.loads((out / entry["samples"]).parent.parent.joinpath("model", "config.json").read_text())
        assert model_config["config"]["engram"]["gate"] == entry["gate"]
    assert "gate_samples" not in json.loads((out / runs["baseline"]["probe_metrics"]).read_text())
    assert set(engram_probe["donors"]) == {"nearest", "farthest", "random_same", "random_other"}
    assert engram_probe["interventions"]["collapse"]["kl"]["mean"] > 0
    assert "engram" in report.read_text()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished step ran again")

    # Everything is done: a rerun trains, samples and probes nothing, and rewrites the same index.
    import engram_vision.probes
    import train.cli

    monkeypatch.setattr(train.cli, "run_stage", must_not_run)
    monkeypatch.setattr("study.runner.sample_job", must_not_run)
    monkeypatch.setattr(engram_vision.probes, "run_probes", must_not_run)
    monkeypatch.setattr("study.runner.run_probes", must_not_run)
    before = (out / "study.json").read_text()
    main(["run", "--config", str(config)])
    assert (out / "study.json").read_text() == before


def test_study_checks_its_runs(tmp_path):
    with pytest.raises(ValueError, match="exactly one of `config`"):
        StudyRun(name="x")
    with pytest.raises(ValueError, match="baseline 'base' is not one of the runs"):
        study("s", [StudyRun("a", model=str(tmp_path))], out=str(tmp_path), baseline="base")
    with pytest.raises(ValueError, match="unique"):
        study("s", [StudyRun("a", model=str(tmp_path)), StudyRun("a", model=str(tmp_path))], baseline="a")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        study("s", [StudyRun("a", model=str(tmp_path / "missing"))], out=str(tmp_path), baseline="a")
    with pytest.raises(ValueError, match="unknown kinds"):
        ProbeStep(tokens="t", settings=ProbeConfig(donors=("closest",)))
    assert SampleStep("c").args == []


def test_seeds_intervals_and_the_reconstruction_reference(workspace, tmp_path, fake_extractor, monkeypatch):
    """Two seeds per run: one folder per seed, different models, a summary with t intervals across seeds,
    the per-image NLL paired with the baseline, and FID against the tokenizer's reconstructions too."""
    torch.set_num_threads(1)

    class TenClasses(fake_extractor):
        """The fake extractor with a classifier over the digits' 10 classes (class accuracy checks them)."""

        name = "fake-test-10"

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.w_logit = torch.randn(8, 10, generator=torch.Generator().manual_seed(2))

    register_extractor(TenClasses.name, TenClasses, overwrite=True)
    real, _ = digits_split("val")
    np.savez(tmp_path / "real.npz", arr_0=real[:60])
    out = tmp_path / "seeded"
    spec = yaml.safe_load(_study_yaml(workspace, out).read_text())
    spec["seeds"] = [0, 1]
    spec["probes"]["gate_samples"] = 0
    spec["evaluate"] = {"reference": str(tmp_path / "real.npz"), "extractor": "fake-test-10", "metrics": "fid,is,acc",
                        "accelerator": "cpu", "cache_dir": str(tmp_path / "cache"), "isc_splits": 2,
                        "bootstrap": 20}
    spec["reconstructions"] = {"tokenizer": str(workspace["root"] / "tokenizer"), "accelerator": "cpu"}
    config = tmp_path / "seeded.yaml"
    config.write_text(yaml.safe_dump(spec))
    main(["run", "--config", str(config)])
    index = json.loads((out / "study.json").read_text())
    assert index["reconstructions"] == {"samples": "reconstructions/samples.npz",
                                        "metrics": "reconstructions/metrics.json"}
    with np.load(out / "reconstructions" / "samples.npz") as data:
        assert data["arr_0"].shape == (60, 16, 16, 3)
    floor = json.loads((out / "reconstructions" / "metrics.json").read_text())["metrics"]["fid"]
    assert floor > 0
    for entry in index["runs"]:
        assert [m["seed"] for m in entry["seeds"]] == [0, 1]
        folders = [m["train_metrics"] for m in entry["seeds"]]
        assert folders == [f"ar/{entry['name']}/seed_0/metrics.json", f"ar/{entry['name']}/seed_1/metrics.json"]
        hashes = {file_sha256(Path(m["model"]) / "model.safetensors") for m in entry["seeds"]}
        assert len(hashes) == 2  # another seed, another model
        for member in entry["seeds"]:
            vs_recon = json.loads((out / member["reconstruction_metrics"]).read_text())
            assert vs_recon["reference"]["path"] == str((out / "reconstructions" / "samples.npz").resolve())
            manifest = json.loads((out / member["samples"]).parent.joinpath("manifest.json").read_text())
            assert manifest["seed"] == member["seed"]
    summary = json.loads((out / "summary.json").read_text())
    base = summary["runs"]["baseline"]["nll"]
    assert base["n"] == 2 and base["low"] < base["mean"] < base["high"]
    (comparison,) = summary["comparisons"]
    assert comparison["run"] == "engram" and comparison["paired_nll"]["num_images"] == 40
    paired = comparison["paired_nll"]
    assert paired["low"] <= paired["mean"] <= paired["high"] and 0 < paired["p_value"] <= 1
    seeds = comparison["differences"]["nll"]
    engram_nll = summary["runs"]["engram"]["nll"]["mean"]
    assert seeds["test"] == "paired t over seeds" and seeds["mean"] == pytest.approx(engram_nll - base["mean"])
    assert comparison["differences"]["fid_vs_reconstructions"]["n"] == 2
    text = (out / "report.md").read_text()
    assert "## Against the baseline (baseline)" in text and "FID vs recon." in text
    assert all(s in text for s in comparison["sentences"]) and len(comparison["sentences"]) >= 4

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished step ran again")

    import train.cli

    monkeypatch.setattr(train.cli, "run_stage", must_not_run)
    monkeypatch.setattr("study.runner.sample_job", must_not_run)
    monkeypatch.setattr("study.runner.run_probes", must_not_run)
    monkeypatch.setattr("study.reconstructions.np.savez", must_not_run)
    before = (out / "summary.json").read_text()
    main(["run", "--config", str(config)])
    assert (out / "summary.json").read_text() == before


def test_seeds_are_checked(tmp_path):
    with pytest.raises(ValueError, match="distinct non-negative"):
        StudyRun("a", config="c.yaml", seeds=[1, 1])
    with pytest.raises(ValueError, match="finished one"):
        StudyRun("a", model=str(tmp_path), seeds=[0])
    with pytest.raises(ValueError, match="distinct non-negative"):
        study("s", [StudyRun("a", config="c.yaml")], out=str(tmp_path), baseline="a", seeds=[])
