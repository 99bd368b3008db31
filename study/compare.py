"""Every run of a study against its baseline: differences with intervals, a paired test, and the sentences
the report may say about them.

- Held-out NLL, paired over images: the probes score every model on the same held-out images
  (`nll_bits_per_image`, matched by `images_sha256`); a run's per-image NLL (averaged over its seeds) minus
  the baseline's, with a bootstrap interval over images and a paired sign-flip permutation test.
- Across training seeds: the difference of the seed means of held-out NLL, FID (against real images and
  against the tokenizer's reconstructions) and class accuracy, with a t interval (paired by seed when both
  runs have the same seeds, else Welch's). It needs two seeds on each side; with one there is no interval.

A sentence claims a difference only where its interval excludes zero; otherwise it says the interval
includes zero, and with a single seed it says no interval across training runs exists. Loading the files
is `study.results`', formatting `study.report`'s; the statistics are `engram_vision.stats`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from engram_vision.stats import bootstrap_mean, paired_permutation_test, t_interval, welch_interval
from study.results import (
    Member,
    Run,
    get,
    is_num,
    member_val_nll,
    probe_nll,
    source_metric,
)

# (key, label, unit, format, lower is better, value of one seed)
QUANTITIES: tuple[tuple[str, str, str, str, bool, Callable[[Member], Any]], ...] = (
    ("nll", "held-out NLL", "bits/token", ".4f", True, probe_nll),
    ("val_nll", "best val NLL", "bits/token", ".4f", True, member_val_nll),
    ("fid", "FID", "", ".2f", True, lambda m: source_metric(m.sample, "fid")),
    ("fid_vs_reconstructions", "FID against reconstructions", "", ".2f", True,
     lambda m: source_metric(m.recon, "fid")),
    ("is_mean", "IS", "", ".2f", False, lambda m: source_metric(m.sample, "is_mean")),
    ("class_accuracy", "class accuracy", "", ".3f", False, lambda m: source_metric(m.sample, "class_accuracy")),
)


def _per_seed(run: Run, value: Callable[[Member], Any]) -> dict[int | None, float]:
    return {m.seed: float(v) for m in run.members if is_num(v := value(m))}


def seed_difference(run: Run, baseline: Run, value: Callable[[Member], Any], level: float) -> dict[str, Any] | None:
    """mean over the run's seeds minus the baseline's, with a t interval: paired by seed when both have the
    same seeds (the seed also fixes the data order), else Welch's; None when either side has no value."""
    ours, theirs = _per_seed(run, value), _per_seed(baseline, value)
    if not ours or not theirs:
        return None
    if set(ours) == set(theirs) and len(ours) >= 2:
        interval = t_interval([ours[s] - theirs[s] for s in ours], level)
        return {**interval, "test": "paired t over seeds", "seeds": len(ours)}
    interval = welch_interval(list(ours.values()), list(theirs.values()), level)
    return {**interval, "test": "Welch t over seeds", "seeds": min(len(ours), len(theirs))}


def _per_image_nll(run: Run) -> tuple[np.ndarray, str] | None:
    """(per-image NLL averaged over the run's seeds [N], images hash), or None without paired values."""
    rows, hashes = [], set()
    for m in run.members:
        values, images = get(m.probe, "nll_bits_per_image"), get(m.probe, "settings", "images_sha256")
        if isinstance(values, list) and values and images:
            rows.append(np.asarray(values, np.float64))
            hashes.add(images)
    if not rows or len(hashes) != 1 or len({len(r) for r in rows}) != 1:
        return None
    return np.mean(rows, axis=0), hashes.pop()


def paired_nll(run: Run, baseline: Run, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The per-image held-out NLL difference (run - baseline, bits/token) over the same images: bootstrap
    interval and paired permutation test; None when the two were not probed on the same images."""
    ours, theirs = _per_image_nll(run), _per_image_nll(baseline)
    if ours is None or theirs is None or ours[1] != theirs[1]:
        return None
    difference = ours[0] - theirs[0]
    rng = np.random.default_rng(settings["seed"])
    interval = bootstrap_mean(difference, rng, settings["bootstrap_samples"], settings["level"])
    test = paired_permutation_test(ours[0], theirs[0], rng, settings["permutations"])
    return {**interval, "p_value": test["p_value"], "permutations": test["permutations"],
            "num_images": int(difference.size), "seeds_averaged": len(run.members)}


def _excludes_zero(interval: dict[str, Any]) -> bool:
    return is_num(interval.get("low")) and is_num(interval.get("high")) and \
        (interval["low"] > 0 or interval["high"] < 0)


def sentence(run: str, label: str, unit: str, fmt: str, lower_is_better: bool, interval: dict[str, Any],
             basis: str, reference: str = "the baseline") -> str:
    """What may be said of one difference: a direction only when the interval excludes zero. `run` and
    `reference` name what is compared (the runs, or their particular trained models)."""
    unit = f" {unit}" if unit else ""
    value = f"{interval['mean']:+{fmt}}{unit}"
    if not is_num(interval.get("low")):
        return (f"{run}: {label} differs from {reference}'s by {value} ({basis}); with one training seed on "
                f"a side there is no interval across training runs, so no claim is made.")
    bounds = f"[{interval['low']:+{fmt}}, {interval['high']:+{fmt}}]"
    if not _excludes_zero(interval):
        return f"{run}: no difference in {label} from {reference} detected: {value} {bounds} includes zero ({basis})."
    worse = (interval["mean"] > 0) == lower_is_better
    plural = "models" in run.split()[-1]  # "a's 3 models trail", "a trails"
    verb = ("trail" if plural else "trails") if worse else ("beat" if plural else "beats")
    # the size of the gap, with its interval in the same sense (a negative difference is flipped)
    sign = 1.0 if interval["mean"] > 0 else -1.0
    low, high = sorted((sign * interval["low"], sign * interval["high"]))
    return (f"{run} {verb} {reference} on {label} by {abs(interval['mean']):{fmt}}{unit} "
            f"[{low:{fmt}}, {high:{fmt}}] ({basis}).")


def probe_settings(baseline: Run) -> dict[str, Any]:
    """Resampling settings of the comparisons: the baseline's probe settings, else the probes' defaults."""
    settings = get(baseline.members[0].probe if baseline.members else baseline.probe, "settings") or {}
    return {"level": settings.get("level", 0.95), "bootstrap_samples": settings.get("bootstrap_samples", 2000),
            "permutations": settings.get("permutations", 10_000), "seed": settings.get("seed", 0)}


def compare(run: Run, baseline: Run) -> dict[str, Any]:
    """JSON-ready comparison of `run` with `baseline`: per quantity the seed-level difference, the paired
    per-image NLL difference, and the report's sentences."""
    settings = probe_settings(baseline)
    result: dict[str, Any] = {"run": run.name, "seeds": len(run.members), "baseline_seeds": len(baseline.members),
                              "level": settings["level"], "differences": {}, "paired_nll": None, "sentences": []}
    for key, *_, value in QUANTITIES:
        result["differences"][key] = seed_difference(run, baseline, value, settings["level"])
    paired = paired_nll(run, baseline, settings)
    result["paired_nll"] = paired
    seeds_both = min(len(run.members), len(baseline.members)) >= 2
    nll_seeds = result["differences"]["nll"]
    if seeds_both and nll_seeds is not None:
        result["sentences"].append(sentence(run.name, "held-out NLL", "bits/token", ".4f", True, nll_seeds,
                                            f"{nll_seeds['test']}, {nll_seeds['seeds']} seeds"))
    if paired is not None:
        # Paired over images, the interval covers which images were held out, not which models training
        # happened to produce: the sentence is about these trained models, not about the runs in general.
        basis = (f"paired over {paired['num_images']} held-out images, permutation p = {paired['p_value']:.3g}; "
                 "the interval covers the choice of images, not of training runs")
        subject = f"{run.name}'s model" if len(run.members) == 1 else f"{run.name}'s {len(run.members)} models"
        reference = "the baseline's model" if len(baseline.members) == 1 else \
            f"the baseline's {len(baseline.members)} models"
        result["sentences"].append(sentence(subject, "held-out NLL per image", "bits/token", ".4f", True, paired,
                                            basis, reference))
    for key, label, unit, fmt, lower, _ in QUANTITIES:
        interval = result["differences"][key]
        if key in ("nll", "val_nll") or interval is None:
            continue
        result["sentences"].append(sentence(run.name, label, unit, fmt, lower, interval,
                                            f"{interval['test']}, {interval['seeds']} seed(s)"))
    return result


def compare_all(runs: list[Run], baseline: Run | None) -> list[dict[str, Any]]:
    """`compare` of every run but the baseline, in study order."""
    return [] if baseline is None else [compare(r, baseline) for r in runs if r is not baseline]


__all__ = ["QUANTITIES", "compare", "compare_all", "paired_nll", "seed_difference", "sentence"]
