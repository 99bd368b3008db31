"""Kill and resume of the study runner itself: the tiny study (tests/study/conftest.py) is started as a
subprocess (tests/study/study_command.py: `python -m study run` plus a fake feature extractor) and
SIGKILLed three times, once in each phase (training: after its first last.ckpt; sampling: after the first
PNGs; probing: after the first gate sample), each time rerun with the same command; the run that ends
finds exactly what an uninterrupted subprocess run finds: the exported weights, the training metrics, the
samples' bytes, every score and the probe results. One thread, as the bit-for-bit claim needs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _command(config: Path) -> list[str]:
    return [sys.executable, str(REPO / "tests" / "study" / "study_command.py"), "run", "--config", str(config)]


def _run(config: Path, log: Path, timeout: float = 300.0) -> None:
    with open(log, "w") as out:
        done = subprocess.run(_command(config), cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout)
    assert done.returncode == 0, log.read_text()[-3000:]


def _complete(out: Path, folder: str, step: str) -> bool | None:
    path = out / folder / f"study_{step}.json"
    return json.loads(path.read_text())["complete"] if path.is_file() else None


def test_study_killed_while_training_sampling_and_probing_ends_as_an_uninterrupted_one(
        tiny_study, write_ar_config, study_results, tmp_path, kill_when):
    # 40 steps (20 epochs, a last.ckpt after each) and 24 samples in batches of 2: the kills land mid-phase
    ar = write_ar_config(tmp_path / "ar.yaml", max_steps=40)
    changes = {"runs": [{"name": "engram", "config": str(ar)}], "sample": {"args": ["--num_samples=24",
                                                                                  "--batch_size=2"]}}
    reference, out = tmp_path / "reference", tmp_path / "killed"
    _run(tiny_study(reference, extractor="fake-subprocess", **changes), tmp_path / "reference.log")
    config = tiny_study(out, extractor="fake-subprocess", **changes)

    kill_when(_command(config), lambda: (out / "ar/engram/checkpoints/last.ckpt").is_file(), tmp_path / "kill1.log",
              timeout=300, poll=0.005)
    assert _complete(out, "ar/engram", "train") is False and not (out / "samples").exists()

    images = out / "samples/engram/images"
    kill_when(_command(config), lambda: images.is_dir() and any(images.glob("*.png")), tmp_path / "kill2.log",
              timeout=300, poll=0.005)
    assert _complete(out, "ar/engram", "train") is True and _complete(out, "samples/engram", "sample") is False
    assert "resuming training from" in (tmp_path / "kill2.log").read_text()

    gate = out / "probes/engram/gate_0/samples/images"
    kill_when(_command(config), lambda: gate.is_dir() and any(gate.glob("*.png")), tmp_path / "kill3.log",
              timeout=300, poll=0.005)
    assert _complete(out, "samples/engram", "evaluate") is True and _complete(out, "probes/engram", "probe") is False
    assert not (out / "probes/engram/metrics.json").exists()

    _run(config, tmp_path / "rerun.log")
    assert study_results(out) == study_results(reference)
    assert not list(out.rglob("*.tmp"))
