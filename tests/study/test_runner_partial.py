"""A study step stopped after some of its files but before its completion mark is never taken for
finished: each of the runner's steps in turn (reconstruct, its score, train, sample, evaluate, evaluate
against the reconstructions, probe) is stopped right before its record is marked complete, with
training's export also cut between its two files, and every rerun runs that step again, until the study
ends with exactly the results of an uninterrupted run (`finished_study`).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from study.__main__ import main
from study.steps import Ledger

# (folder, step) in the order the runner finishes them
STEPS = [("reconstructions", "reconstruct"), ("reconstructions", "evaluate"), ("ar/engram", "train"),
         ("samples/engram", "sample"), ("samples/engram", "evaluate"),
         ("samples/engram", "evaluate_vs_reconstructions"), ("probes/engram", "probe")]


class Stopped(Exception):
    pass


def test_each_step_stopped_before_its_mark_runs_again(finished_study, tiny_study, study_results, fake_extractor,
                                                      tmp_path, monkeypatch):
    torch.set_num_threads(1)
    out = tmp_path / "study"
    config = tiny_study(out)
    finish = Ledger.finish
    trained: list[list[str]] = []
    import train.cli

    run_stage = train.cli.run_stage
    monkeypatch.setattr(train.cli, "run_stage", lambda stage, args: (trained.append(args), run_stage(stage, args))[1])
    for folder, step in STEPS:
        def stop_at(self, where, name, settings, outputs, _folder=folder, _step=step):
            if (str(where.relative_to(out)), name) == (_folder, _step):
                raise Stopped(f"{_folder} {_step}")
            return finish(self, where, name, settings, outputs)

        monkeypatch.setattr(Ledger, "finish", stop_at)
        with pytest.raises(Stopped):
            main(["run", "--config", str(config)])
        record = json.loads((out / folder / f"study_{step}.json").read_text())
        assert record["complete"] is False  # the step's files may all be there; its mark is not
        if step == "train":
            assert (out / "ar/engram/model/model.safetensors").is_file()
            # as a kill between the export's weights and its config.json would leave it
            (out / "ar/engram/model/config.json").unlink()
    monkeypatch.setattr(Ledger, "finish", finish)
    main(["run", "--config", str(config)])

    # training ran once, then once more after it was stopped, resuming from its last.ckpt (at max_steps)
    assert len(trained) == 2 and "--ckpt_path" not in trained[0] and trained[1][-2:] == ["--ckpt_path", "last"]
    for folder, step in STEPS:
        assert json.loads((out / folder / f"study_{step}.json").read_text())["complete"] is True
    assert (out / "ar/engram/model/config.json").is_file()
    assert study_results(out) == study_results(finished_study)
    with np.load(out / "samples/engram/samples.npz") as data:
        assert data["arr_0"].shape[0] == 8
