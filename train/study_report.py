"""`python -m train.study_report <study_dir>`: turn a finished (or half-finished) study into report.md.

Reads what the study runner (train/study.py) leaves in `<study_dir>`: `study.json` (the runs, their rho,
parameter counts and Engram settings, and paths to each run's results), the training metrics, the sample
metrics and samples.npz files, and the probe metrics written by engram_vision/probes.py. Writes
`<study_dir>/report.md` and PNG figures (drawn by `train/study_figures.py`) under `<study_dir>/figures/`:
fid_is_vs_rho.png, gate_clamp.png, probe_effects.png and samples_<run>.png.

This module only formats: training, sampling, scoring and probing are the runner's and the probes' job.
Results that are missing (null paths, files not written yet) show as "–" and their figures are skipped, so
the report can be rebuilt at any point of a study. Every number in the report links to the JSON file it was
read from (relative to study_dir), so a reader can check it. The output depends only on the inputs (no
timestamps), so rebuilding is idempotent; every file is written atomically.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers_vq.checkpoint import atomic_write_text

MISSING = "–"
GRID_COLUMNS, GRID_CLASSES, MIN_CELL_PX = 8, 10, 64
UNITS = ("NLL is in bits/token, KL divergences in nats; intervals are 95% bootstrap intervals over "
         "held-out images.")


@dataclass
class Source:
    """A parsed JSON result file and the link to it, relative to the study directory."""

    data: dict[str, Any]
    href: str


@dataclass
class Run:
    name: str
    rho: float | None
    params: dict[str, Any]
    engram: dict[str, Any] | None
    train: Source | None
    sample: Source | None
    probe: Source | None
    samples: Path | None

    @property
    def kind(self) -> str:
        """"baseline" (no Engram), "sweep" (learned gate, trainable table) or "variant" (anything else)."""
        if self.engram is None:
            return "baseline"
        learned = self.engram.get("gate") == "learned" and self.engram.get("table") == "trainable"
        return "sweep" if learned else "variant"


# ----------------------------------------------------------------------------------------------- loading


def _resolve(study_dir: Path, path: str | None) -> tuple[Path, str] | None:
    """(absolute path, link relative to study_dir) of an existing file, else None."""
    if not path:
        return None
    full = Path(path) if Path(path).is_absolute() else study_dir / path
    if not full.is_file():
        return None
    # resolved on both sides: the runner writes resolved absolute paths, study_dir may go through a symlink
    return full, Path(os.path.relpath(full.resolve(), study_dir.resolve())).as_posix()


def _load(study_dir: Path, path: str | None) -> Source | None:
    found = _resolve(study_dir, path)
    if found is None:
        return None
    try:
        return Source(json.loads(found[0].read_text()), found[1])
    except (OSError, json.JSONDecodeError):  # being rewritten by a running stage: show it as not run yet
        return None


def _load_runs(study_dir: Path, study: dict[str, Any]) -> list[Run]:
    runs = []
    for r in study.get("runs", []):
        samples = _resolve(study_dir, r.get("samples"))
        runs.append(Run(r["name"], r.get("rho"), r.get("params") or {}, r.get("engram"),
                        _load(study_dir, r.get("train_metrics")), _load(study_dir, r.get("sample_metrics")),
                        _load(study_dir, r.get("probe_metrics")), samples[0] if samples else None))
    return runs


def _get(source: Source | None, *keys: str) -> Any:
    """source.data[k1][k2]..., or None when the file or any key along the way is missing."""
    value: Any = source.data if source else None
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _metric(run: Run, key: str) -> Any:
    """One sample metric (FID, IS, ...) of a run, None when not computed (skipped, or no sample metrics)."""
    return _get(run.sample, "metrics", key)


def _val_nll_bits(run: Run) -> float | None:
    """Best val NLL (nats, as monitored) in bits; the last evaluation's bits/token when no best exists."""
    best = _get(run.train, "best", "value")
    return best / math.log(2) if _is_num(best) else _get(run.train, "metrics", "bits_per_token")


# -------------------------------------------------------------------------------------------- formatting


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _num(value: Any, fmt: str, href: str | None) -> str:
    """A number as a markdown link to the file it came from, or the placeholder."""
    return f"[{value:{fmt}}]({href})" if _is_num(value) and href else MISSING


def _ci(stat: dict[str, Any] | None, fmt: str, href: str | None) -> str:
    """"mean [low, high]" with both parts linked."""
    if not isinstance(stat, dict) or not _is_num(stat.get("mean")):
        return MISSING
    cell = _num(stat["mean"], fmt, href)
    if _is_num(stat.get("low")) and _is_num(stat.get("high")):
        cell += f" [[{stat['low']:{fmt}}, {stat['high']:{fmt}}]({href})]"
    return cell


def _human(n: Any) -> str:
    if not _is_num(n):
        return ""
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:g}"


def _gate_label(gate: Any) -> str:
    """A gate (or table mode) as text: numbers compactly, absent settings as the placeholder."""
    return f"{gate:g}" if _is_num(gate) else MISSING if gate is None else str(gate)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def _sweep(r: Run) -> list[dict[str, Any]]:
    return [p for p in _get(r.probe, "gate_sweep") or [] if isinstance(p, dict)]

def _kl_rows(r: Run) -> list[tuple[str, dict[str, Any]]]:
    """(kind, KL stat) for the donor kinds, then the interventions, in file order."""
    groups = [("donor", _get(r.probe, "donors") or {}),
              ("intervention", _get(r.probe, "interventions") or {})]
    return [(f"{group}: {kind}", entry.get("kl") or {}) for group, entries in groups
            for kind, entry in entries.items()]

def _kl_floor(runs: list[Run]) -> float:
    """A tenth of the smallest positive KL: exact zeros (a donor equal to the image) stay on a log axis."""
    values = [v for r in runs for _, s in _kl_rows(r) for v in s.values() if _is_num(v) and v > 0]
    return min(values) / 10 if values else 1e-9


# ----------------------------------------------------------------------------------------------- sections


def _metric_cell(r: Run, key: str, fmt: str, scale: float = 1.0) -> str:
    value = _metric(r, key)
    return _num(value * scale if _is_num(value) else None, fmt, r.sample and r.sample.href)


def _runs_section(runs: list[Run]) -> list[str]:
    header = ["run", "rho", "params", "memory", "table", "gate", "val NLL (bits)", "FID", "IS", "class acc.",
              "precision", "recall"]
    rows = []
    for r in runs:
        inception = _metric_cell(r, "inception_score_mean", ".2f")
        if inception != MISSING and _is_num(std := _metric(r, "inception_score_std")):
            inception += f" ± [{std:.2f}]({r.sample.href})"
        params = [f"[{_human(r.params.get(k))}](study.json)" if _is_num(r.params.get(k)) else MISSING
                  for k in ("total", "memory")]
        engram = r.engram or {}
        rows.append([r.name, _num(r.rho, ".2f", "study.json"), *params, _gate_label(engram.get("table")),
                     _gate_label(engram.get("gate")), _num(_val_nll_bits(r), ".3f", r.train and r.train.href),
                     _metric_cell(r, "fid", ".2f"), inception,
                     _metric_cell(r, "class_accuracy", ".1f", 100.0), _metric_cell(r, "precision", ".3f"),
                     _metric_cell(r, "recall", ".3f")])
    return ["## Runs", "", "Val NLL is the best checkpoint's (bits/token); class accuracy in %. "
            f"{MISSING} marks results not produced yet.", "", *_table(header, rows)]


def _gate_section(study_dir: Path, runs: list[Run]) -> list[str]:
    lines = ["## Gate clamp", "", "Held-out NLL with the Engram gate clamped to a constant g (0 switches the "
             "memory off) and with the learned gate.", "",
             "![NLL against a clamped gate](figures/gate_clamp.png)", ""]
    for r in runs:
        # FID of samples drawn with the gate clamped, where the probes produced them
        entries = _get(r.probe, "gate_samples") or []
        fids = [(e.get("gate"), _load(study_dir, e.get("metrics"))) for e in entries]
        rows = []
        for p in _sweep(r):
            row = [_gate_label(p.get("gate")), _ci(p.get("nll_bits"), ".3f", r.probe.href)]
            if fids:
                src = next((s for g, s in fids if _same_gate(g, p.get("gate"))), None)
                row.append(_num(_get(src, "metrics", "fid"), ".2f", src and src.href))
            rows.append(row)
        header = ["gate", "NLL (bits) [95% interval]"] + ["FID"] * bool(fids)
        lines += [f"### {r.name}", "", *_table(header, rows)]
    return lines


def _same_gate(a: Any, b: Any) -> bool:
    return math.isclose(a, b) if _is_num(a) and _is_num(b) else a == b


def _probe_section(runs: list[Run], floor: float) -> list[str]:
    lines = ["## Donors and interventions", "",
             "KL(P || Q) between the next-token distributions as trained (P) and with the Engram layers "
             "reading a donor image's tokens or with the tables intervened on (Q); see "
             "engram_vision/probes.py. Hamming is the mean token Hamming distance to the donor. In the "
             f"figure blue marks donors and red interventions; KL values below {floor:.3g} nats (exact "
             "zeros included) are clipped to that floor so the log axis can show them.", "",
             "![KL per donor and intervention](figures/probe_effects.png)", ""]
    for r in runs:
        href = r.probe.href
        donors, interventions = _get(r.probe, "donors") or {}, _get(r.probe, "interventions") or {}
        ratios = {kind: i.get("ratio_to_donors") or {} for kind, i in interventions.items()}
        ratio_kinds = list(dict.fromkeys(k for kinds in ratios.values() for k in kinds))  # union, in order
        rows = [[f"donor: {kind}", _ci(d.get("kl"), ".3g", href), _num(d.get("hamming"), ".3g", href)]
                + [""] * len(ratio_kinds) for kind, d in donors.items()]
        rows += [[f"intervention: {kind}", _ci(i.get("kl"), ".3g", href), ""]
                 + [_ci(ratios[kind].get(k), ".3g", href) for k in ratio_kinds]
                 for kind, i in interventions.items()]
        header = ["kind", "KL (nats) [95% interval]", "Hamming"] + [f"ratio to {k}" for k in ratio_kinds]
        lines += [f"### {r.name}", "", *_table(header, rows)]
        tests = _get(r.probe, "permutation_tests") or []
        if tests:
            rows = [[str(t.get("a")), str(t.get("b")), _num(t.get("mean_difference"), ".3g", href),
                     _num(t.get("p_value"), ".3g", href), _num(t.get("permutations"), ".0f", href)]
                    for t in tests]
            lines += ["Paired permutation tests of the difference in mean KL (a − b):", "",
                      *_table(["a", "b", "mean difference (nats)", "p-value", "permutations"], rows)]
    return lines


def _samples_section(runs: list[Run], figures: Path) -> list[str]:
    from train.study_figures import sample_grid

    lines = ["## Samples", "", "Up to 8 samples per class, one row per class (first 10 classes).", ""]
    for r in runs:
        name = f"samples_{re.sub(r'[^A-Za-z0-9._-]', '_', r.name)}.png"
        try:
            sample_grid(r.samples, figures / name)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # empty, or still being written
            lines += [f"### {r.name}", "", f"{MISSING} (samples not readable yet)", ""]
            continue
        lines += [f"### {r.name}", "", f"![samples of {r.name}](figures/{name})", ""]
    return lines


# ------------------------------------------------------------------------------------------------- report


def build_report(study_dir: str | Path) -> Path:
    """Write `<study_dir>/report.md` and its figures from the study's result files; returns report.md."""
    # Imported here: matplotlib is slow to import and the figures module reads this one's Run.
    from train.study_figures import fid_is_figure, gate_clamp_figure, probe_figure

    study_dir = Path(study_dir)
    study = json.loads((study_dir / "study.json").read_text())
    runs = _load_runs(study_dir, study)
    figures = study_dir / "figures"
    baseline = next((r for r in runs if r.name == study.get("baseline")), None)
    baseline = baseline or next((r for r in runs if r.kind == "baseline"), None)

    lines = [f"# Study: {study.get('name', study_dir.name)}", "",
             f"Produced by `{study.get('command', '?')}`.", "", UNITS, "", *_runs_section(runs)]
    if fid_is_figure(runs, baseline, figures / "fid_is_vs_rho.png"):
        lines += ["![FID and IS against rho](figures/fid_is_vs_rho.png)", ""]
    gated = [r for r in runs if _sweep(r)]
    if gated:
        gate_clamp_figure(gated, baseline, figures / "gate_clamp.png")
        lines += _gate_section(study_dir, gated)
    probed = [r for r in runs if _kl_rows(r)]
    if probed:
        floor = _kl_floor(probed)
        probe_figure(probed, floor, figures / "probe_effects.png")
        lines += _probe_section(probed, floor)
    sampled = [r for r in runs if r.samples is not None]
    if sampled:
        lines += _samples_section(sampled, figures)
    report = study_dir / "report.md"
    atomic_write_text(report, "\n".join(lines).rstrip() + "\n")
    return report


def main(argv: list[str] | None = None) -> Path:
    from jsonargparse import CLI

    report = CLI(build_report, args=argv)
    print(f"[study_report] wrote {report}")
    return report


if __name__ == "__main__":
    main()
