"""`python -m study report <study_dir>`: turn a finished (or half-finished) study into report.md.

Reads what the study runner (study/runner.py) leaves in `<study_dir>`: `study.json` (the runs, their rho,
parameter counts and Engram settings, and paths to each run's results), the training metrics, the sample
metrics and samples.npz files, and the probe metrics written by engram_vision/probes.py. Writes
`<study_dir>/report.md`, `<study_dir>/summary.json` (each run's means over seeds with intervals, and its
comparison with the baseline from study/compare.py, which the report's numbers link to) and PNG figures (drawn by `study/figures.py`) under `<study_dir>/figures/`:
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
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engram_vision.stats import t_interval
from study.results import (
    Run,
    Source,
    get,
    is_num,
    kl_floor,
    kl_rows,
    load_runs,
    load_source,
    metric,
    recon_metric,
    seed_values,
    sweep,
    val_nll_bits,
)
from tokenizers_vq.files import atomic_write_text

MISSING = "–"
UNITS = ("NLL is in bits/token, KL divergences in nats. Intervals of one model's probes are 95% bootstrap "
         "intervals over held-out images; the intervals of runs with several seeds are over seeds.")


# -------------------------------------------------------------------------------------------- formatting


def _num(value: Any, fmt: str, href: str | None) -> str:
    """A number as a markdown link to the file it came from, or the placeholder."""
    return f"[{value:{fmt}}]({href})" if is_num(value) and href else MISSING


def _ci(stat: dict[str, Any] | None, fmt: str, href: str | None) -> str:
    """"mean [low, high]" with both parts linked."""
    if not isinstance(stat, dict) or not is_num(stat.get("mean")):
        return MISSING
    cell = _num(stat["mean"], fmt, href)
    if is_num(stat.get("low")) and is_num(stat.get("high")):
        cell += f" [[{stat['low']:{fmt}}, {stat['high']:{fmt}}]({href})]"
    return cell


def _human(n: Any) -> str:
    if not is_num(n):
        return ""
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:g}"


def _gate_label(gate: Any) -> str:
    """A gate (or table mode) as text: numbers compactly, absent settings as the placeholder."""
    return f"{gate:g}" if is_num(gate) else MISSING if gate is None else str(gate)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


# ----------------------------------------------------------------------------------------------- sections


SUMMARY = "summary.json"


def _metric_cell(r: Run, key: str, fmt: str, scale: float = 1.0, summary: dict[str, Any] | None = None) -> str:
    """A run's sample metric: the mean over seeds with its t interval (linked to summary.json) for several
    seeds; for one, the value with its bootstrap interval over samples where metrics.json has one."""
    stats = (summary or {}).get(r.name, {}).get(key)
    if len(r.members) > 1 and isinstance(stats, dict):
        return _scaled_ci(stats, fmt, scale, SUMMARY)
    value = metric(r, key)
    href = r.sample and r.sample.href
    cell = _num(value * scale if is_num(value) else None, fmt, href)
    interval = get(r.sample, "intervals", key)
    if cell != MISSING and isinstance(interval, dict) and is_num(interval.get("low")):
        cell += f" [[{interval['low'] * scale:{fmt}}, {interval['high'] * scale:{fmt}}]({href})]"
    return cell


def _scaled_ci(stats: dict[str, Any], fmt: str, scale: float, href: str) -> str:
    scaled = {k: v * scale if is_num(v) else v for k, v in stats.items() if k in ("mean", "low", "high")}
    return _ci(scaled, fmt, href)


def run_summary(runs: list[Run], level: float) -> dict[str, dict[str, Any]]:
    """{run: {quantity: mean over seeds with a t interval}} for the quantities the comparisons use."""
    from study.compare import QUANTITIES

    summary: dict[str, dict[str, Any]] = {}
    for r in runs:
        summary[r.name] = {"seeds": [m.seed for m in r.members]}
        for key, *_, value in QUANTITIES:
            values = seed_values(r, value)
            stats = t_interval(values, level) if values else None
            if stats is not None and key == "class_accuracy" and stats["low"] is not None:
                # a t interval of a few seeds can reach past what a fraction can be
                stats.update(low=max(stats["low"], 0.0), high=min(stats["high"], 1.0))
            summary[r.name][key] = stats
    return summary


def _runs_section(runs: list[Run], summary: dict[str, Any], recon: Source | None) -> list[str]:
    header = ["run", "seeds", "rho", "params", "memory", "table", "gate", "val NLL (bits)", "held-out NLL (bits)",
              "FID", "FID vs recon.", "IS", "class acc.", "precision", "recall"]
    rows = []
    for r in runs:
        inception = _metric_cell(r, "is_mean", ".2f", summary=summary)
        if len(r.members) == 1 and inception != MISSING and is_num(std := metric(r, "is_std")) \
                and get(r.sample, "intervals", "is_mean") is None:
            inception += f" ± [{std:.2f}]({r.sample.href})"
        params = [f"[{_human(r.params.get(k))}](study.json)" if is_num(r.params.get(k)) else MISSING
                  for k in ("total", "memory")]
        engram = r.engram or {}
        several = len(r.members) > 1
        val_nll = _ci(summary[r.name]["val_nll"], ".3f", SUMMARY) if several else \
            _num(val_nll_bits(r), ".3f", r.train and r.train.href)
        held_out = _ci(summary[r.name]["nll"], ".3f", SUMMARY) if several else \
            _ci(get(r.probe, "nll_bits"), ".3f", r.probe and r.probe.href)
        recon_fid = _ci(summary[r.name]["fid_vs_reconstructions"], ".2f", SUMMARY) if several else \
            _num(recon_metric(r, "fid"), ".2f", r.recon and r.recon.href)
        rows.append([r.name, str(len(r.members)), _num(r.rho, ".2f", "study.json"), *params,
                     _gate_label(engram.get("table")), _gate_label(engram.get("gate")), val_nll, held_out,
                     _metric_cell(r, "fid", ".2f", summary=summary), recon_fid, inception,
                     _metric_cell(r, "class_accuracy", ".1f", 100.0, summary), _metric_cell(r, "precision", ".3f"),
                     _metric_cell(r, "recall", ".3f")])
    lines = ["## Runs", "",
             "Val NLL is the best checkpoint's, held-out NLL the probes' on the held-out images (bits/token); "
             "class accuracy in %. A run with several seeds shows the mean over seeds with a t interval "
             "across seeds; a single model shows bootstrap intervals over images (NLL) or samples (FID, IS, "
             "class accuracy), where computed. Bootstrap resampling repeats samples, which raises FID, so a "
             "single model's FID interval sits above its value. Precision and recall are the first seed's. "
             f"{MISSING} marks results not produced yet.", "", *_table(header, rows)]
    if recon is not None:
        floor = get(recon, "metrics", "fid")
        lines += [f"FID vs recon. scores the samples against the tokenizer's reconstructions of the real images, "
                  f"so the AR prior is judged apart from the tokenizer's error; the reconstructions themselves "
                  f"score FID {_num(floor, '.2f', recon.href)} against the real images (the tokenizer's own error in "
                  f"this feature space; with few samples, noise can put a run below it).", ""]
    return lines


def _comparison_section(comparisons: list[dict[str, Any]], baseline: Run) -> list[str]:
    """Each run against the baseline: differences with intervals, and the sentences they allow."""
    if not comparisons:
        return []
    level = comparisons[0]["level"]
    header = ["run", "seeds", "Δ held-out NLL per image (bits) [interval], p", "Δ held-out NLL over seeds (bits)",
              "Δ FID over seeds", "Δ class acc. over seeds"]
    rows = []
    for c in comparisons:
        paired = c["paired_nll"]
        paired_cell = MISSING if paired is None else \
            f"{_ci(paired, '+.4f', SUMMARY)}, p = [{paired['p_value']:.3g}]({SUMMARY})"
        rows.append([c["run"], f"{c['seeds']} vs {c['baseline_seeds']}", paired_cell,
                     *(_ci(c["differences"].get(k), fmt, SUMMARY) for k, fmt in
                       (("nll", "+.4f"), ("fid", "+.2f"), ("class_accuracy", "+.3f")))])
    lines = [f"## Against the baseline ({baseline.name})", "",
             f"Differences are run minus baseline with {level:.0%} intervals. Per image: the held-out NLL of "
             "each image (averaged over a run's seeds) minus the baseline's on the same image, a bootstrap "
             "interval over images and a paired permutation test. Over seeds: the difference of seed means, "
             "with a t interval (paired by seed when both runs have the same seeds); it needs two seeds on "
             "each side. A difference is claimed only where its interval excludes zero.", "",
             *_table(header, rows)]
    for c in comparisons:
        lines += [f"- {s}" for s in c["sentences"]]
    return [*lines, ""]


def _gate_section(study_dir: Path, runs: list[Run]) -> list[str]:
    lines = ["## Gate clamp", "", "Held-out NLL with the Engram gate clamped to a constant g (0 switches the "
             "memory off) and with the learned gate.", "",
             "![NLL against a clamped gate](figures/gate_clamp.png)", ""]
    for r in runs:
        # FID of samples drawn with the gate clamped, where the probes produced them
        entries = get(r.probe, "gate_samples") or []
        fids = [(e.get("gate"), load_source(study_dir, e.get("metrics"))) for e in entries]
        rows = []
        for p in sweep(r):
            row = [_gate_label(p.get("gate")), _ci(p.get("nll_bits"), ".3f", r.probe.href)]
            if fids:
                src = next((s for g, s in fids if _same_gate(g, p.get("gate"))), None)
                row.append(_num(get(src, "metrics", "fid"), ".2f", src and src.href))
            rows.append(row)
        header = ["gate", "NLL (bits) [95% interval]"] + ["FID"] * bool(fids)
        lines += [f"### {r.name}", "", *_table(header, rows)]
    return lines


def _same_gate(a: Any, b: Any) -> bool:
    return math.isclose(a, b) if is_num(a) and is_num(b) else a == b


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
        donors, interventions = get(r.probe, "donors") or {}, get(r.probe, "interventions") or {}
        ratios = {kind: i.get("ratio_to_donors") or {} for kind, i in interventions.items()}
        ratio_kinds = list(dict.fromkeys(k for kinds in ratios.values() for k in kinds))  # union, in order
        rows = [[f"donor: {kind}", _ci(d.get("kl"), ".3g", href), _num(d.get("hamming"), ".3g", href)]
                + [""] * len(ratio_kinds) for kind, d in donors.items()]
        rows += [[f"intervention: {kind}", _ci(i.get("kl"), ".3g", href), ""]
                 + [_ci(ratios[kind].get(k), ".3g", href) for k in ratio_kinds]
                 for kind, i in interventions.items()]
        header = ["kind", "KL (nats) [95% interval]", "Hamming"] + [f"ratio to {k}" for k in ratio_kinds]
        lines += [f"### {r.name}", "", *_table(header, rows)]
        tests = get(r.probe, "permutation_tests") or []
        if tests:
            rows = [[str(t.get("a")), str(t.get("b")), _num(t.get("mean_difference"), ".3g", href),
                     _num(t.get("p_value"), ".3g", href), _num(t.get("permutations"), ".0f", href)]
                    for t in tests]
            lines += ["Paired permutation tests of the difference in mean KL (a − b):", "",
                      *_table(["a", "b", "mean difference (nats)", "p-value", "permutations"], rows)]
    return lines


def _samples_section(runs: list[Run], figures: Path) -> list[str]:
    from study.figures import sample_grid

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


def get_path(data: dict[str, Any], *keys: str) -> str | None:
    """data[k1][k2]... when it is a string (a path in study.json), else None."""
    value: Any = data
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, str) else None


def build_report(study_dir: str | Path) -> Path:
    """Write `<study_dir>/report.md` and its figures from the study's result files; returns report.md.

    Args:
        study_dir: The study directory (`out` of the study YAML), holding study.json.
    """
    # Imported here: matplotlib is slow to import.
    from study.figures import fid_is_figure, gate_clamp_figure, probe_figure

    study_dir = Path(study_dir)
    study = json.loads((study_dir / "study.json").read_text())
    runs = load_runs(study_dir, study)
    figures = study_dir / "figures"
    baseline = next((r for r in runs if r.name == study.get("baseline")), None)
    baseline = baseline or next((r for r in runs if r.kind == "baseline"), None)

    from study.compare import compare_all, probe_settings

    level = probe_settings(baseline)["level"] if baseline is not None else 0.95
    summary = run_summary(runs, level)
    comparisons = compare_all(runs, baseline)
    atomic_write_text(study_dir / SUMMARY, json.dumps({"runs": summary, "comparisons": comparisons}, indent=2,
                                                      allow_nan=False) + "\n")
    recon = load_source(study_dir, get_path(study, "reconstructions", "metrics"))
    lines = [f"# Study: {study.get('name', study_dir.name)}", "",
             f"Produced by `{study.get('command', '?')}`.", "", UNITS, "", *_runs_section(runs, summary, recon)]
    if baseline is not None:
        lines += _comparison_section(comparisons, baseline)
    if fid_is_figure(runs, baseline, figures / "fid_is_vs_rho.png"):
        lines += ["![FID and IS against rho](figures/fid_is_vs_rho.png)", ""]
    gated = [r for r in runs if sweep(r)]
    if gated:
        gate_clamp_figure(gated, baseline, figures / "gate_clamp.png")
        lines += _gate_section(study_dir, gated)
    probed = [r for r in runs if kl_rows(r)]
    if probed:
        floor = kl_floor(probed)
        probe_figure(probed, floor, figures / "probe_effects.png")
        lines += _probe_section(probed, floor)
    sampled = [r for r in runs if r.samples is not None]
    if sampled:
        lines += _samples_section(sampled, figures)
    report = study_dir / "report.md"
    atomic_write_text(report, "\n".join(lines).rstrip() + "\n")
    return report
