"""docs/own_data.md, tried as a user would: clone the repository, run every ```bash block of the guide as
written, and check what the commands wrote.

The clone (`git clone` of this checkout: committed files only, so an uncommitted guide or module is not
tested here) is a fresh working tree without data or runs. Each ```bash block runs as one `bash -euo
pipefail` script in the clone's root, in order, with `python` on PATH being this interpreter's
(`sys.executable`'s directory first on PATH), `OMP_NUM_THREADS=1` (the guide's advice, and repeatable
numbers) and a private cache directory. The guide's ```sh blocks (variants for real data) are not run.
The assertions read the files the guide says to check: the example images, the tokenizer's metrics, the
token sets' meta.json, the domain classifier, the AR configs and the study (study.json, summary.json, each
seed's metrics.json, probes, figures and report.md). How each stage computes its numbers is tested with the
stage; this test checks that the guide's commands fit together and produce finite, sensible numbers.
About three and a half minutes on one thread of a busy 2-core machine (less on an idle one).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
GUIDE = Path("docs/own_data.md")
CLASSES = ["cross", "disc", "square", "triangle"]
RUNS = ["baseline", "engram_rho0.5"]
SEEDS = [0, 1]
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)


def bash_blocks(text: str) -> list[str]:
    """The ```bash blocks of a markdown text, in order."""
    return BLOCK.findall(text)


def _in_git_checkout(path: Path) -> bool:
    if shutil.which("git") is None:
        return False
    found = subprocess.run(["git", "-C", str(path), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    return found.returncode == 0 and Path(found.stdout.strip()).resolve() == path


@pytest.fixture(scope="module")
def guide_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Clone the checkout, run the guide's bash blocks in the clone; {clone, seconds, logs}."""
    if not _in_git_checkout(REPO):
        pytest.skip(f"{REPO} is not a git checkout (with git on PATH): the guide is tried in a clone of it")
    base = tmp_path_factory.mktemp("own_data")
    clone = base / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    if not (clone / GUIDE).is_file():
        pytest.fail(f"{GUIDE} is not committed in {REPO}: the clone has no guide to try")
    blocks = bash_blocks((clone / GUIDE).read_text())
    assert len(blocks) >= 7, f"expected the guide's bash blocks (sections 1 to 7), found {len(blocks)}"
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(base / "cache")}
    env.pop("PYTHONPATH", None)  # the clone's own modules, found from its root, not this checkout's
    seconds, logs = [], []
    for number, block in enumerate(blocks, 1):
        started = time.perf_counter()
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=clone, env=env,
                              capture_output=True, text=True, timeout=900)
        seconds.append(time.perf_counter() - started)
        logs.append(done.stdout + done.stderr)
        if done.returncode != 0:
            pytest.fail(f"bash block {number} of {GUIDE} failed (exit {done.returncode}):\n{block}\n"
                        f"--- output (last 4000 characters) ---\n{logs[-1][-4000:]}")
    print("seconds per bash block of the guide:", [round(s) for s in seconds])  # shown with pytest -s
    return {"clone": clone, "seconds": seconds, "logs": logs}


def _json(path: Path) -> dict:
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_the_guide_has_its_sections_and_links() -> None:
    text = (REPO / GUIDE).read_text()
    headings = re.findall(r"^## (\d)\. ", text, re.M)
    assert headings == [str(n) for n in range(1, 9)], headings
    assert "## The layout your images must have" in text
    assert "docs/own_data.md" in (REPO / "README.md").read_text()
    assert "own_data.md" in (REPO / "docs" / "stages.md").read_text().split("\n## ")[0]  # the top section


def test_example_data_tokenizer_and_tokens(guide_run: dict) -> None:
    clone = guide_run["clone"]
    for split, count in (("train", 64), ("val", 16)):
        folders = sorted(p.name for p in (clone / "data" / "shapes" / split).iterdir())
        assert folders == CLASSES
        assert {len(list((clone / "data/shapes" / split / c).glob("*.png"))) for c in CLASSES} == {count}

    vq = _json(clone / "runs/shapes/vq/metrics.json")["metrics"]
    assert _finite(vq["psnr"]) and vq["psnr"] > 13.0, vq  # a mean-colour image scores about 11 dB here
    assert 0.25 < vq["codebook_usage"] <= 1.0, vq
    assert (clone / "runs/shapes/vq/reconstructions.png").is_file()
    assert (clone / "runs/shapes/vq/tokenizer/model.safetensors").is_file()

    for split, images, views in (("train", 256, 2), ("val", 64, 1)):
        meta = _json(clone / "runs/shapes/tokens" / split / "meta.json")
        assert (meta["num_samples"], meta["num_views"], meta["grid"]) == (images, views, [4, 4])
        assert (meta["num_classes"], meta["codebook_size"], meta["num_skipped"]) == (4, 256, 0)

    classifier = _json(clone / "runs/shapes/domain_classifier/config.json")
    assert classifier["classes"] == CLASSES
    assert classifier["val_accuracy"] >= 0.9, classifier["val_accuracy"]  # the shapes are easy to tell apart

    scores = _json(clone / "runs/shapes/vq/tokenizer/eval_metrics.json")["metrics"]
    assert all(_finite(scores[k]) for k in ("psnr", "ssim", "rfid")) and 0 < scores["ssim"] < 1, scores
    # the same tokenizer on the same val images as the training run's validation
    assert scores["psnr"] == pytest.approx(vq["psnr"], abs=0.5)

    names = sorted(p.name for p in (clone / "runs/shapes/configs").glob("*.yaml"))
    assert names == ["shapes_baseline.yaml", "shapes_engram_rho0.5.yaml", "shapes_engram_rho0.5_frozen.yaml",
                     "shapes_engram_rho0.5_gate0.1.yaml", "shapes_plus_memory0.43m.yaml"]


def test_the_study_results(guide_run: dict) -> None:
    from train.data.tokens import token_histogram

    study = guide_run["clone"] / "runs/shapes"
    index = _json(study / "study.json")
    assert [run["name"] for run in index["runs"]] == RUNS
    assert [entry["seed"] for entry in index["runs"][1]["seeds"]] == SEEDS
    assert index["runs"][0]["rho"] == 1.0 and 0.45 < index["runs"][1]["rho"] < 0.55
    assert index["runs"][1]["params"]["total"] == pytest.approx(index["runs"][0]["params"]["total"], rel=0.01)

    counts = token_histogram(str(study / "tokens/train"))
    probs = counts[counts > 0] / counts.sum()
    unigram = float(-(probs * np.log2(probs)).sum())
    recon = _json(study / "reconstructions/metrics.json")["metrics"]
    assert _finite(recon["fid"]) and recon["fid"] >= 0
    for run in RUNS:
        for seed in SEEDS:
            folder = f"{run}/seed_{seed}"
            train = _json(study / "ar" / folder / "metrics.json")
            assert train["global_step"] == 60  # the guide's train_args
            bits = train["best"]["value"] / math.log(2)
            # beats a model that ignores the context and the class, even after 60 steps
            assert bits < unigram - 0.3, (run, seed, bits, unigram)
            for name in ("metrics.json", "metrics_vs_reconstructions.json"):
                scored = _json(study / "samples" / folder / name)
                values = scored["metrics"]
                assert all(_finite(values[k]) for k in ("fid", "is_mean", "kid_mean", "precision", "recall")), values
                assert values["fid"] >= 0 and values["is_mean"] >= 1
            values = _json(study / "samples" / folder / "metrics.json")["metrics"]
            assert 0.0 <= values["class_accuracy"] <= 1.0
            interval = _json(study / "samples" / folder / "metrics.json")["intervals"]["fid"]
            assert interval["resamples"] == 100 and interval["low"] <= interval["high"]
            probes = _json(study / "probes" / folder / "metrics.json")
            assert probes["data"]["num_images"] == 64
            assert _finite(probes["nll_bits"]["mean"]) and probes["nll_bits"]["mean"] < 8.0  # log2(256 codes)
            if run != "baseline":
                assert [g["gate"] for g in probes["gate_sweep"]] == [0.0, 0.05, 0.1, 0.25, 0.5, 1.0, "learned"]
                assert sorted(probes["donors"]) == ["farthest", "nearest", "random_other", "random_same"]
                kls = [v["kl"]["mean"] for v in (*probes["donors"].values(), *probes["interventions"].values())]
                assert all(_finite(kl) and kl >= 0 for kl in kls)
                # destroying the tables moves a trained Engram model's predictions
                assert probes["interventions"]["collapse"]["kl"]["mean"] > 1e-4

    summary = _json(study / "summary.json")
    for run in RUNS:
        for key in ("val_nll", "fid", "is_mean", "class_accuracy"):
            cell = summary["runs"][run][key]
            assert cell["n"] == 2 and all(_finite(cell[k]) for k in ("mean", "low", "high")), (run, key, cell)
            assert cell["low"] <= cell["mean"] <= cell["high"]
    figures = {p.name for p in (study / "figures").glob("*.png")}
    assert {"fid_is_vs_rho.png", "gate_clamp.png", "probe_effects.png",
            "samples_baseline.png", "samples_engram_rho0.5.png"} <= figures
    check_report((study / "report.md").read_text(), summary)


def _row(table: list[str], name: str) -> dict[str, str]:
    """The cells of the row of `name` in a markdown table (its lines), keyed by the header's names."""
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    for line in table[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] == name:
            return dict(zip(header, cells, strict=True))
    raise AssertionError(f"no row {name!r} in the table {table[0]}")


def _table_after(text: str, heading: str) -> list[str]:
    section = text.split(heading, 1)[1]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| run"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def check_report(text: str, summary: dict) -> None:
    """The report's runs table shows each run's means over seeds (with intervals) as summary.json has them,
    and the section against the baseline has its row and sentences."""
    runs = _table_after(text, "## Runs")
    for run in RUNS:
        row = _row(runs, run)
        assert row["seeds"] == "2"
        for column, key, digits in (("FID", "fid", 2), ("IS", "is_mean", 2), ("val NLL (bits)", "val_nll", 3)):
            numbers = re.findall(r"-?\d+\.\d+", row[column])
            cell = summary["runs"][run][key]
            assert len(numbers) == 3, (run, column, row[column])  # mean [low, high]
            assert [float(n) for n in numbers] == pytest.approx(
                [round(cell["mean"], digits), round(cell["low"], digits), round(cell["high"], digits)]), row[column]
        assert re.search(r"\d", row["class acc."]) and re.search(r"\d", row["FID vs recon."])
    against = _table_after(text, "## Against the baseline")
    row = _row(against, "engram_rho0.5")
    assert row["seeds"] == "2 vs 2"
    assert all(re.search(r"[+-]\d", cell) for name, cell in row.items() if name.startswith("Δ")), row
    sentences = [line for line in text.split("## Against the baseline", 1)[1].split("\n## ", 1)[0].splitlines()
                 if line.startswith("- engram_rho0.5")]
    assert len(sentences) >= 3 and all("baseline" in s for s in sentences), sentences
    for heading in ("## Gate clamp", "## Donors and interventions", "## Samples"):
        assert heading in text
