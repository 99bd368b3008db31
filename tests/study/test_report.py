"""study/report.py on a made-up study directory: links, placeholders, figures, idempotence."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from study.__main__ import main
from study.figures import sample_grid
from study.report import build_report


def _write(path: Path, data: dict[str, Any]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return str(path)


def _stat(mean: float) -> dict[str, float]:
    return {"mean": mean, "low": mean * 0.9, "high": mean * 1.1}


def _train(nats: float) -> dict[str, Any]:
    return {"metrics": {"nll": nats + 0.01, "bits_per_token": (nats + 0.01) / math.log(2)},
            "global_step": 720, "best": {"monitor": "val/nll", "value": nats, "checkpoint": "x.ckpt"}}


def _sample(fid: float, **extra: Any) -> dict[str, Any]:
    metrics = {"fid": fid, "is_mean": 5.28, "is_std": 0.22, "precision": 0.71,
               "recall": 0.59, "class_accuracy": 0.828, **extra}
    return {"metrics": metrics, "skipped": {}, "samples": {"num_samples": 30}}


def _probe(run: str, donors_kl: dict[str, float], with_gate_samples: bool = False) -> dict[str, Any]:
    gates: list[Any] = [0.0, 0.05, 0.1, 0.25, 0.5, 1.0, "learned"]
    gate_samples = [{"gate": 0.0, "metrics": f"probes/{run}/gate_0.0/metrics.json"}] * with_gate_samples
    return {
        "run": run, "data": {"num_images": 20, "positions_per_image": 16}, "nll_bits": _stat(5.2),
        "gate_sweep": [{"gate": g, "nll_bits": _stat(7.9 - i * 0.4)} for i, g in enumerate(gates)],
        "gate_samples": gate_samples,
        "donors": {kind: {"kl": _stat(kl), "hamming": 5.25 + i}
                   for i, (kind, kl) in enumerate(donors_kl.items())},
        "interventions": {
            "collapse": {"kl": _stat(1.5), "ratio_to_donors": {k: _stat(150.0) for k in donors_kl}},
            "randomize": {"kl": _stat(0.75), "ratio_to_donors": {}}},
        "permutation_tests": [{"a": "nearest", "b": "farthest", "mean_difference": -0.00213,
                               "p_value": 0.4127, "permutations": 10000}],
    }


def _make_study(tmp_path: Path) -> Path:
    """A baseline, two rho-sweep runs and a frozen-table variant whose samples and probes are missing."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 16, 16, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(10), 3)
    runs = []
    learned = {"gate": "learned", "table": "trainable"}
    specs = [("baseline", 1.0, None, 9.06), ("engram_rho0.5", 0.511, learned, 8.12),
             ("engram_rho0.25", 0.26, learned, 8.55),
             ("frozen_rho0.5", 0.511, {"gate": 0.5, "table": "frozen"}, None)]
    for name, rho, engram, fid in specs:
        _write(tmp_path / f"ar/{name}/metrics.json", _train(3.606 + rho / 10))
        if fid is not None:
            _write(tmp_path / f"samples/{name}/metrics.json", _sample(fid))
            np.savez(tmp_path / f"samples/{name}/samples.npz", images, labels=labels)
        memory = 0 if engram is None else 425000
        runs.append({"name": name, "rho": rho, "engram": engram,
                     "params": {"backbone": 870000 - memory, "memory": memory, "total": 870000},
                     "train_metrics": f"ar/{name}/metrics.json",
                     "sample_metrics": None if fid is None else f"samples/{name}/metrics.json",
                     "samples": None if fid is None else f"samples/{name}/samples.npz",
                     "probe_metrics": f"probes/{name}/metrics.json"})
    # absolute path: links must still be relative to the study directory
    runs[1]["train_metrics"] = str(tmp_path / runs[1]["train_metrics"])
    base = _probe("baseline", {})
    base.update(gate_sweep=[], donors={}, interventions={}, permutation_tests=[])
    _write(tmp_path / "probes/baseline/metrics.json", base)
    # a zero KL (the image as its own donor) must not break the log axis
    donors = {"nearest": 0.0123, "farthest": 0.0456, "self": 0.0}
    _write(tmp_path / "probes/engram_rho0.5/metrics.json", _probe("engram_rho0.5", donors, True))
    _write(tmp_path / "probes/engram_rho0.5/gate_0.0/metrics.json", _sample(31.42))
    _write(tmp_path / "probes/engram_rho0.25/metrics.json", _probe("engram_rho0.25", {"nearest": 0.0321}))
    # frozen_rho0.5's probe file was never written
    _write(tmp_path / "study.json", {"name": "digits", "command": "python -m study run",
                                     "baseline": "baseline", "runs": runs})
    return tmp_path


@pytest.fixture
def study(tmp_path: Path) -> Path:
    return _make_study(tmp_path)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One study built once for the read-only checks (building draws every figure: about a second)."""
    study = _make_study(tmp_path_factory.mktemp("study"))
    return study, build_report(study).read_text()


def _row(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {name} |"))


def test_numbers_link_to_their_sources(built: tuple[Path, str]) -> None:
    _, text = built
    assert text.startswith("# Study: digits\n") and "`python -m study run`" in text
    for name in ("baseline", "engram_rho0.5", "engram_rho0.25", "frozen_rho0.5"):
        assert f"| {name} |" in text
    baseline = _row(text, "baseline")
    assert "[9.06](samples/baseline/metrics.json)" in baseline
    assert "[5.28](samples/baseline/metrics.json) ± [0.22](samples/baseline/metrics.json)" in baseline
    assert "[82.8](samples/baseline/metrics.json)" in baseline
    assert "[1.00](study.json)" in baseline and "[0.87M](study.json)" in baseline
    sweep = _row(text, "engram_rho0.5")
    # the best value in nats -> bits, linked relative to study_dir although study.json has an absolute path
    nll = (3.606 + 0.0511) / math.log(2)
    assert f"[{nll:.3f}](ar/engram_rho0.5/metrics.json)" in sweep
    assert "[0.51](study.json)" in sweep and "[0.42M](study.json)" in sweep
    # probe numbers: KL and the intervention ratio with its interval, the permutation test's p-value
    probe = "probes/engram_rho0.5/metrics.json"
    assert f"| donor: nearest | [0.0123]({probe}) [[0.0111, 0.0135]({probe})] | [5.25]({probe}) |" in text
    assert f"[150]({probe}) [[135, 165]({probe})]" in text
    assert f"[0.413]({probe})" in text and f"[-0.00213]({probe})" in text
    assert "[31.42](probes/engram_rho0.5/gate_0.0/metrics.json)" in text  # FID of the gate-clamped samples
    assert "[7.900](probes/engram_rho0.25/metrics.json)" in text


def test_missing_results_show_placeholders(built: tuple[Path, str]) -> None:
    study, text = built
    frozen = _row(text, "frozen_rho0.5")
    assert frozen.endswith("| – | – | – | – | – |")  # no sample metrics: FID, IS, accuracy, precision, recall
    assert "[0.51](study.json)" in frozen and "frozen" in frozen and "| 0.5 |" in frozen
    # no probe file: the run has no gate or donor subsection, and no sample grid
    assert "### frozen_rho0.5" not in text and not (study / "figures/samples_frozen_rho0.5.png").exists()


def test_figures_exist_and_grids_have_expected_size(built: tuple[Path, str]) -> None:
    study, text = built
    figures = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", text)
    expected = {"figures/fid_is_vs_rho.png", "figures/gate_clamp.png", "figures/probe_effects.png",
                "figures/samples_baseline.png", "figures/samples_engram_rho0.5.png",
                "figures/samples_engram_rho0.25.png"}
    assert set(figures) == expected
    for figure in figures:
        with Image.open(study / figure) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 0 and image.size[1] > 0
    # 10 classes x 3 samples, 16 px upscaled x4 to 64 px, make_grid's 2 px padding
    with Image.open(study / "figures/samples_baseline.png") as grid:
        assert grid.size == (3 * 66 + 2, 10 * 66 + 2)


def test_zero_kl_is_clipped_and_mentioned(built: tuple[Path, str]) -> None:
    _, text = built
    probe = "probes/engram_rho0.5/metrics.json"
    assert f"| donor: self | [0]({probe}) [[0, 0]({probe})]" in text
    # the floor is a tenth of the smallest positive value (the low bound 0.0111)
    assert "clipped to that floor" in text and "below 0.00111 nats" in text


def test_without_probes_or_samples(study: Path) -> None:
    for path in [*study.glob("probes/**/metrics.json"), *study.glob("samples/*/*")]:
        path.unlink()
    (study / "samples/engram_rho0.25/metrics.json").write_text("{half")  # unreadable: shown as not run yet
    text = build_report(study).read_text()
    assert "## Gate clamp" not in text and "## Donors" not in text and "## Samples" not in text
    assert "fid_is_vs_rho.png" not in text and "[9.06]" not in text and "[8.55]" not in text
    assert _row(text, "engram_rho0.25").endswith("| – | – | – | – | – |")
    assert "[0.51](study.json)" in _row(text, "engram_rho0.5")


def test_idempotent_and_cli(built: tuple[Path, str]) -> None:
    study, first = built
    assert main(["report", "--study_dir", str(study)]) == study / "report.md"
    assert (study / "report.md").read_text() == first
    assert not [p for p in study.rglob(".*") if p.is_file()]  # no temp files left behind by atomic writes


@pytest.mark.parametrize(("shape", "labels", "size"), [
    ((100, 16, 16, 3), False, (8 * 66 + 2, 10 * 66 + 2)),  # no labels: the first 80 images, 8 a row
    ((40, 70, 70), True, (4 * 72 + 2, 10 * 72 + 2)),  # 12 classes: the first 10; grayscale, not upscaled
])
def test_sample_grid_layouts(tmp_path: Path, shape: tuple[int, ...], labels: bool,
                             size: tuple[int, int]) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    extra = {"labels": np.arange(len(images)) % 12} if labels else {}
    np.savez(tmp_path / "samples.npz", images, **extra)
    sample_grid(tmp_path / "samples.npz", tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == size


def test_unreadable_samples_are_not_fatal(study: Path) -> None:
    (study / "samples/baseline/samples.npz").write_bytes(b"")  # still being written
    text = build_report(study).read_text()
    assert "– (samples not readable yet)" in text and "figures/samples_engram_rho0.5.png" in text
