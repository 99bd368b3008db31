"""study/configs.py: the budget command prints the study's rho sweep for a named model, as a markdown table
and as JSON lines whose counts add up (the config files themselves are checked in tests/test_configs.py)."""

from __future__ import annotations

import json

import pytest

from engram_vision.budget import STUDY_RHOS
from study.__main__ import main

GPT_B_TOTAL = 110_888_448  # LlamaGen's GPT-B c2i at vocab 16384, 1000 classes


def test_budget_command_prints_every_rho_of_the_study(capsys: pytest.CaptureFixture[str]) -> None:
    rows = main(["budget", "--size", "gpt-b"])
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records == rows and [r["rho"] for r in records] == [*STUDY_RHOS, 1.0]
    assert records[-1]["total"] == GPT_B_TOTAL and records[-1]["rows_per_head"] is None
    for record in records[:-1]:
        assert record["total"] == record["backbone"] + record["memory"] and abs(record["error"]) <= 0.01
    assert sum(line.startswith("| ") for line in lines) == len(records) + 1  # header + one row per rho
    assert lines[0].startswith("gpt-b budget: 110,888,448 parameters")
