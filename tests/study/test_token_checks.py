"""A study refuses probe tokens made by another tokenizer than its runs' training tokens, before any step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from study.members import StudyRun
from study.runner import ProbeStep, study
from study.token_checks import check_probe_tokens, train_shards


def _tokens(folder: Path, sha: str, codebook: int = 256) -> str:
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({
        "format": "engram-vision-tokens", "codebook_size": codebook, "num_classes": 10, "grid": [4, 4],
        "num_samples": 10, "num_views": 1, "dtype": "int16", "weights_sha256": sha, "shards": []}))
    return str(folder)


def _run(tmp_path: Path, name: str, shards: str, *train_args: str) -> StudyRun:
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"data": {"init_args": {"train_shards": shards}}}))
    return StudyRun(name=name, config=str(config), train_args=list(train_args))


def test_probe_tokens_of_another_tokenizer_are_refused_naming_the_run_and_field(tmp_path: Path):
    train = _tokens(tmp_path / "train", "aaa")
    same = _tokens(tmp_path / "val_same", "aaa")
    other = _tokens(tmp_path / "val_other", "bbb")
    runs = [_run(tmp_path, "baseline", train)]
    check_probe_tokens(runs, [same])  # the same tokenizer: passes
    with pytest.raises(ValueError, match=r"run 'baseline'.*different tokenizers \(weights_sha256: 'aaa' vs 'bbb'\)"):
        check_probe_tokens(runs, [same, other])
    # a train_args override of the training shards is the one compared
    overridden = _run(tmp_path, "engram", train, "--data.init_args.train_shards", other)
    assert train_shards(overridden) == other
    check_probe_tokens([overridden], [other])
    # training shards not made yet, or a run given as a finished model: not checked
    check_probe_tokens([_run(tmp_path, "later", str(tmp_path / "missing"))], [other])


def test_the_study_refuses_before_any_step(tmp_path: Path):
    train = _tokens(tmp_path / "train", "aaa", codebook=256)
    other = _tokens(tmp_path / "val", "bbb", codebook=128)
    with pytest.raises(ValueError, match=r"codebook_size: 256 vs 128"):
        study("s", [_run(tmp_path, "baseline", train)], out=str(tmp_path / "study"),
              probes=ProbeStep(tokens=other), report=False)
    assert not (tmp_path / "study").exists()
