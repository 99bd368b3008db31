"""A study's results, loaded once for the report and the figures: the runs listed in `study.json` with the
JSON files they point to (training, sample and probe metrics) and the accessors both read them through.

Missing results (null paths, files not written yet or being rewritten) load as None, so a report can be
built at any point of a study. Formatting is `study.report`'s job, drawing `study.figures`'.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Source:
    """A parsed JSON result file and the link to it, relative to the study directory."""

    data: dict[str, Any]
    href: str


@dataclass
class Member:
    """One trained model of a run (one seed) and its result files."""

    seed: int | None
    train: Source | None
    sample: Source | None
    recon: Source | None
    probe: Source | None
    samples: Path | None


@dataclass
class Run:
    """A run of the study; `train`/`sample`/`recon`/`probe`/`samples` are its first seed's (what figures
    of single models show), `members` all its seeds."""

    name: str
    rho: float | None
    params: dict[str, Any]
    engram: dict[str, Any] | None
    train: Source | None
    sample: Source | None
    probe: Source | None
    samples: Path | None
    members: list[Member] = field(default_factory=list)
    recon: Source | None = None

    @property
    def kind(self) -> str:
        """"baseline" (no Engram), "sweep" (learned gate, trainable table) or "variant" (anything else)."""
        if self.engram is None:
            return "baseline"
        learned = self.engram.get("gate") == "learned" and self.engram.get("table") == "trainable"
        return "sweep" if learned else "variant"


def resolve(study_dir: Path, path: str | None) -> tuple[Path, str] | None:
    """(absolute path, link relative to study_dir) of an existing file, else None."""
    if not path:
        return None
    full = Path(path) if Path(path).is_absolute() else study_dir / path
    if not full.is_file():
        return None
    # resolved on both sides: the runner writes resolved absolute paths, study_dir may go through a symlink
    return full, Path(os.path.relpath(full.resolve(), study_dir.resolve())).as_posix()


def load_source(study_dir: Path, path: str | None) -> Source | None:
    found = resolve(study_dir, path)
    if found is None:
        return None
    try:
        return Source(json.loads(found[0].read_text()), found[1])
    except (OSError, json.JSONDecodeError):  # being rewritten by a running stage: show it as not run yet
        return None


def _member(study_dir: Path, entry: dict[str, Any]) -> Member:
    samples = resolve(study_dir, entry.get("samples"))
    return Member(entry.get("seed"), load_source(study_dir, entry.get("train_metrics")),
                  load_source(study_dir, entry.get("sample_metrics")),
                  load_source(study_dir, entry.get("reconstruction_metrics")),
                  load_source(study_dir, entry.get("probe_metrics")), samples[0] if samples else None)


def load_runs(study_dir: Path, study: dict[str, Any]) -> list[Run]:
    runs = []
    for r in study.get("runs", []):
        # a study.json written before seeds existed holds one model per run, at the top level
        members = [_member(study_dir, m) for m in r.get("seeds") or [r]]
        first = members[0]
        runs.append(Run(r["name"], r.get("rho"), r.get("params") or {}, r.get("engram"), first.train,
                        first.sample, first.probe, first.samples, members, first.recon))
    return runs


def get(source: Source | None, *keys: str) -> Any:
    """source.data[k1][k2]..., or None when the file or any key along the way is missing."""
    value: Any = source.data if source else None
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


# metrics.json files written before the neutral names (is_mean, kid_mean, ...) used torch-fidelity's
LEGACY_KEYS = {"is_mean": "inception_score_mean", "is_std": "inception_score_std",
               "kid_mean": "kernel_inception_distance_mean", "kid_std": "kernel_inception_distance_std"}


def source_metric(source: Source | None, key: str) -> Any:
    """One metric of a metrics.json (new or legacy name), None when not computed."""
    value = get(source, "metrics", key)
    return get(source, "metrics", LEGACY_KEYS[key]) if value is None and key in LEGACY_KEYS else value


def seed_values(run: Run, value: Callable[[Member], Any]) -> list[float]:
    """`value(member)` of each seed of the run where it is a number."""
    return [float(v) for v in (value(m) for m in run.members or [run_as_member(run)]) if is_num(v)]


def run_as_member(run: Run) -> Member:
    return Member(None, run.train, run.sample, run.recon, run.probe, run.samples)


def seed_mean(run: Run, value: Callable[[Member], Any]) -> float | None:
    """The mean over the run's seeds of `value(member)`, None when no seed has it."""
    values = seed_values(run, value)
    return sum(values) / len(values) if values else None


def metric(run: Run, key: str) -> Any:
    """One sample metric (FID, IS, ...) of a run, the mean over its seeds; None when not computed."""
    return seed_mean(run, lambda m: source_metric(m.sample, key))


def recon_metric(run: Run, key: str) -> Any:
    """A sample metric against the tokenizer's reconstructions, the mean over seeds; None when absent."""
    return seed_mean(run, lambda m: source_metric(m.recon, key))


def probe_nll(member: Member) -> Any:
    """The held-out NLL (bits/token) of one seed's model as trained, from the probes."""
    return get(member.probe, "nll_bits", "mean")


def member_val_nll(member: Member) -> float | None:
    best = get(member.train, "best", "value")
    return best / math.log(2) if is_num(best) else get(member.train, "metrics", "bits_per_token")


def val_nll_bits(run: Run) -> float | None:
    """Best val NLL (nats, as monitored) in bits, the mean over seeds; the last evaluation's bits/token
    when no best exists."""
    return seed_mean(run, member_val_nll)


def is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def sweep(r: Run) -> list[dict[str, Any]]:
    return [p for p in get(r.probe, "gate_sweep") or [] if isinstance(p, dict)]

def kl_rows(r: Run) -> list[tuple[str, dict[str, Any]]]:
    """(kind, KL stat) for the donor kinds, then the interventions, in file order."""
    groups = [("donor", get(r.probe, "donors") or {}),
              ("intervention", get(r.probe, "interventions") or {})]
    return [(f"{group}: {kind}", entry.get("kl") or {}) for group, entries in groups
            for kind, entry in entries.items()]

def kl_floor(runs: list[Run]) -> float:
    """A tenth of the smallest positive KL: exact zeros (a donor equal to the image) stay on a log axis."""
    values = [v for r in runs for _, s in kl_rows(r) for v in s.values() if is_num(v) and v > 0]
    return min(values) / 10 if values else 1e-9
