"""The study runner never reuses stale results: a rerun after the study's settings changed (sampling,
scoring, probing, the reconstruction reference, the training config's content) stops before any work,
naming every changed step and setting and the two ways out, and leaves every file as it was; with
`--rerun_changed true` it redoes exactly the changed steps and those depending on them, keeping the old
outputs under `replaced/<time>/`.

The tiny study (tests/study/conftest.py) is run once, uninterrupted (`finished_study`); tests that change
files work on a copy of it (every record is free of the study folder's own path, so a copy reruns alike).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from metrics.features import register_extractor
from study.__main__ import main
from study.steps import StaleResultsError
from tokenizers_vq.files import file_sha256

HEAVY = ("train.cli.run_stage", "study.runner.sample_job", "metrics.evaluate.evaluate", "study.runner.run_probes",
         "study.runner.reconstruct_reference")


def _tree(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): file_sha256(p) for p in sorted(out.rglob("*")) if p.is_file()}


def _forbid_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_run(*args, **kwargs):
        raise AssertionError("a step ran although the study should have stopped or skipped it")

    for target in HEAVY:
        monkeypatch.setattr(target, must_not_run)


def _count_work(monkeypatch: pytest.MonkeyPatch, seen: list | None = None) -> dict[str, int]:
    """Let the heavy functions run, counting their calls by short name (and appending (name, args) to
    `seen`)."""
    import importlib

    calls = {target.rsplit(".", 1)[1]: 0 for target in HEAVY}
    seen = [] if seen is None else seen
    for target in HEAVY:
        module, name = target.rsplit(".", 1)
        real = getattr(importlib.import_module(module), name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            seen.append((_name, args))
            return _real(*args, **kwargs)

        monkeypatch.setattr(target, counted)
    return calls


@pytest.fixture
def other_reference(study_workspace: dict[str, Path], tmp_path: Path) -> Path:
    path = tmp_path / "other_real.npz"
    with np.load(study_workspace["real"]) as data:
        np.savez(path, arr_0=data["arr_0"][:12])
    return path


RECON_EVAL, EVAL, EVAL_RECON = ("reconstructions (evaluate)", "samples/engram (evaluate)",
                                "samples/engram (evaluate_vs_reconstructions)")
SAMPLE, PROBE, RECON = "samples/engram (sample)", "probes/engram (probe)", "reconstructions (reconstruct)"
# (the change, the setting the error must name, every step it must list): the probe step lists sampling
# and scoring settings because its gate samples are sampled and scored like the runs (but take their own
# count); a step after one still to run is not looked at (the reconstructions' score and the runs' scores
# against them wait for the reconstructions)
CHANGES = [
    ({"sample": {"args": ["--num_samples=6"]}}, "num_samples: 8 -> 6", [SAMPLE]),
    ({"sample": {"args": ["--sampling.temperature=0.9"]}}, "sampling.temperature: 1.0 -> 0.9", [SAMPLE, PROBE]),
    ({"sample": {"args": ["--sampling.top_k=5"]}}, "sampling.top_k: 0 -> 5", [SAMPLE, PROBE]),
    ({"sample": {"args": ["--seed=1"]}}, "seed: 0 -> 1", [SAMPLE, PROBE]),
    ({"evaluate": {"bootstrap": 7}}, "bootstrap: 5 -> 7", [RECON_EVAL, EVAL, EVAL_RECON, PROBE]),
    ({"evaluate": {"extractor": "fake-test-2"}}, 'extractor: "fake-test" -> "fake-test-2"',
     [RECON_EVAL, EVAL, EVAL_RECON, PROBE]),
    # the reference is also the image set the reconstructions rebuild
    ("other_reference", "images_sha256: ", [RECON, EVAL, PROBE]),
    ({"probes": {"settings": {"permutations": 30}}}, "settings.permutations: 20 -> 30", [PROBE]),
    ({"reconstructions": {"image_size": 16}}, "image_size: null -> 16", [RECON]),
]


@pytest.mark.parametrize(("changes", "named", "steps"), CHANGES, ids=[c[1].split(":")[0] for c in CHANGES])  # fmt: skip
def test_a_changed_setting_stops_the_study_before_any_work(finished_study, tiny_study, fake_extractor,
                                                           other_reference, changes, named, steps, monkeypatch):
    register_extractor("fake-test-2", fake_extractor, overwrite=True)
    if changes == "other_reference":
        changes = {"evaluate": {"reference": str(other_reference)}}
    config = tiny_study(finished_study, **changes)
    before = _tree(finished_study)
    _forbid_work(monkeypatch)
    with pytest.raises(StaleResultsError) as error:
        main(["run", "--config", str(config)])
    message = str(error.value)
    listed = [line.split(": ", 1) for line in message.splitlines() if line.startswith("  ")]
    assert [where.strip() for where, _ in listed] == steps, message
    assert named in listed[0][1], message
    count = len(steps)
    assert f"{count} step{'s' if count > 1 else ''} already made with other settings" in message
    assert "--rerun_changed true" in message and "new `out` folder" in message and "nothing ran" in message
    assert _tree(finished_study) == before  # not one file touched


def test_every_changed_step_is_named_in_one_error(finished_study, tiny_study, fake_extractor, monkeypatch):
    config = tiny_study(finished_study, sample={"args": ["--num_samples=6"]}, probes={"images_per_class": 3})
    _forbid_work(monkeypatch)
    with pytest.raises(StaleResultsError, match="2 steps already made") as error:
        main(["run", "--config", str(config)])
    lines = [line for line in str(error.value).splitlines() if line.startswith("  ")]
    assert lines == ["  samples/engram (sample): num_samples: 8 -> 6",
                     "  probes/engram (probe): images_per_class: 2 -> 3"]


def test_outputs_without_a_record_are_not_taken_for_finished(finished_study, tiny_study, fake_extractor, tmp_path,
                                                             monkeypatch):
    """Samples an older runner (or a hand) left, with no record of their settings, stop the study too."""
    out = tmp_path / "study"
    shutil.copytree(finished_study, out)
    (out / "samples" / "engram" / "study_sample.json").unlink()
    _forbid_work(monkeypatch)
    with pytest.raises(StaleResultsError, match=r"samples/engram \(sample\): outputs without a record"):
        main(["run", "--config", str(tiny_study(out))])


def test_rerun_changed_redoes_sampling_and_scoring_and_keeps_the_old_results(finished_study, tiny_study,
                                                                             fake_extractor, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    out = tmp_path / "study"
    shutil.copytree(finished_study, out)
    config = tiny_study(out, sample={"args": ["--num_samples=6"]})
    old = _tree(out)
    calls = _count_work(monkeypatch)
    main(["run", "--config", str(config), "--rerun_changed", "true"])
    # the samples and both of their scores again; training, probes (their gate samples take their own
    # count) and the reconstructions were made with today's settings and stay
    assert calls == {"run_stage": 0, "sample_job": 1, "evaluate": 2, "run_probes": 0, "reconstruct_reference": 0}
    with np.load(out / "samples" / "engram" / "samples.npz") as data:
        assert data["arr_0"].shape[0] == 6
    assert json.loads((out / "samples" / "engram" / "metrics.json").read_text())["samples"]["num_samples"] == 6
    (replaced,) = (out / "replaced").iterdir()
    kept = replaced / "samples" / "engram"
    assert sorted(p.name for p in kept.iterdir()) == sorted(
        ["images", "samples.npz", "manifest.json", "metrics.json", "metrics_vs_reconstructions.json",
         "study_sample.json", "study_evaluate.json", "study_evaluate_vs_reconstructions.json"])
    for name in ("samples.npz", "metrics.json", "metrics_vs_reconstructions.json"):
        assert file_sha256(kept / name) == old[f"samples/engram/{name}"]  # moved, byte for byte
    for name in ("ar/engram/model/model.safetensors", "probes/engram/metrics.json", "reconstructions/samples.npz"):
        assert file_sha256(out / name) == old[name]
    # and now the study is finished with these settings: a plain rerun does nothing
    _forbid_work(monkeypatch)
    main(["run", "--config", str(config)])


def test_a_changed_training_config_stops_then_retrains_everything_after_it(study_workspace, tiny_study,
                                                                            fake_extractor, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    ar = tmp_path / "ar.yaml"
    spec = yaml.safe_load(study_workspace["ar"].read_text())
    ar.write_text(yaml.safe_dump(spec))
    out = tmp_path / "study"
    config = tiny_study(out, runs=[{"name": "engram", "config": str(ar)}], reconstructions=None,
                        probes={"gate_samples": 0})
    main(["run", "--config", str(config)])
    old = _tree(out)
    spec["model"]["lr"] = 3e-3  # the same file, other content
    ar.write_text(yaml.safe_dump(spec))
    _forbid_work(monkeypatch)
    with pytest.raises(StaleResultsError) as error:
        main(["run", "--config", str(config)])
    assert "  ar/engram (train): config_sha256: " in str(error.value)
    assert _tree(out) == old
    monkeypatch.undo()

    seen: list = []
    calls = _count_work(monkeypatch, seen)
    main(["run", "--config", str(config), "--rerun_changed", "true"])
    assert calls == {"run_stage": 1, "sample_job": 1, "evaluate": 1, "run_probes": 1, "reconstruct_reference": 0}
    (replaced,) = (out / "replaced").iterdir()
    new_model = file_sha256(out / "ar" / "engram" / "model" / "model.safetensors")
    assert new_model != old["ar/engram/model/model.safetensors"]
    assert file_sha256(replaced / "ar" / "engram" / "model" / "model.safetensors") == \
        old["ar/engram/model/model.safetensors"]
    assert file_sha256(replaced / "samples" / "engram" / "samples.npz") == old["samples/engram/samples.npz"]
    assert file_sha256(replaced / "probes" / "engram" / "metrics.json") == old["probes/engram/metrics.json"]
    # trained afresh (not resumed from the old run's last.ckpt), and every later step used the new model
    assert json.loads((out / "samples" / "engram" / "manifest.json").read_text())["model_sha256"] == new_model
    assert json.loads((out / "probes" / "engram" / "metrics.json").read_text())["model"]["sha256"] == new_model
    (train_args,) = [args for name, args in seen if name == "run_stage"]
    assert "--ckpt_path" not in train_args[1]
