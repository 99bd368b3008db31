"""Tests for `study.domain_classifier`: training the digits classifier (`train_domain_classifier`) is
deterministic for a seed, and the `python -m study classifier` entry point (`train_classifier`) writes the
weights and reports the validation accuracy.

CPU only: one-epoch trainings of a few seconds each. What the trained classifier measures is tested with
`metrics.domain` (tests/metrics/test_domain.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from study.domain_classifier import train_classifier, train_domain_classifier


def test_training_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    state = [load_file(train_domain_classifier(tmp_path / name, epochs=1, seed=seed))
             for name, seed in (("a", 3), ("b", 3), ("c", 4))]
    assert all(torch.equal(state[0][k], state[1][k]) for k in state[0])
    assert not all(torch.equal(state[0][k], state[2][k]) for k in state[0])


def test_command_trains_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    accuracy = train_classifier(out=str(tmp_path / "cli"), epochs=1, seed=0)
    assert (tmp_path / "cli" / "model.safetensors").is_file() and 0.0 <= accuracy <= 1.0
    assert "val accuracy" in capsys.readouterr().out
